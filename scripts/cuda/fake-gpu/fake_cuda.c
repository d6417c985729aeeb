/* A host-only stand-in for the CUDA driver, runtime, cuBLAS, cuRAND and NCCL: just the entry
 * points Medley's CUDA binary imports (scripts/cuda/fake-gpu.sh checks the list against the
 * binary). Memory is host memory, copies are memcpy, and every kernel launch, GEMM and
 * collective is counted and then skipped: outputs are never computed. It exists to run the
 * CUDA build's host side on a machine without a GPU, to measure what the host does per step
 * (API calls, launches, allocations, copies, host time) and to profile it with perf. A launch
 * whose shape a real GPU would refuse fails here too (see cuLaunchKernel).
 *
 * MEDLEY_FAKE_CUDA_LOG=FILE appends one line per point where the host waits for the device: a
 * stream synchronisation, or a copy to host memory (a decode step ends with one, when the logits
 * are read back): the calls since the previous line and the host microseconds between them.
 *
 * MEDLEY_FAKE_CUDA_DEVICES=N gives the fake N GPUs (default 1), ordinals 0 to N-1; each process
 * has its own memory (MEDLEY_FAKE_CUDA_MEMORY), as a rank on a GPU of its own.
 *
 * Stream capture and CUDA graphs are emulated strictly (see "stream capture" below): what a real
 * capture refuses fails here too, and is reported on stderr. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "fake_cuda.h"

typedef unsigned long long dptr;

/* ---- counters ---------------------------------------------------------------------------- */
static const char *NAMES[C_N] = {"launch", "rt_launch", "gemm", "alloc", "free", "htod",
                                 "dtoh", "dtod", "memset", "event", "wait", "collective",
                                 "get_function", "graph_launch"};
static unsigned long long counts[C_N], bytes_htod, bytes_dtoh, syncs;
static double last_sync_us;
static FILE *log_file;

/* ---- memory: host allocations ------------------------------------------------------------ */
/* Freed blocks are kept by size and handed out again, as the driver's stream-ordered pool does:
 * an allocation is then about as cheap as the real one. A new block is zeroed, and so is a
 * reused one of up to 64 KiB: no kernel writes the outputs, and a small one read back (token ids
 * chosen on the device) must hold valid values, not an earlier call's bytes.
 *
 * A block of LARGE bytes or more is its own mapping, reserved lazily (MAP_NORESERVE) and unmapped
 * when freed, and zeroing it (cuMemsetD8 with 0) hands its pages back (MADV_DONTNEED): a KV cache
 * sized to a large fake device (tens of GiB) then takes host memory only where it is written. */
#define POOL_BUCKETS 4096
#define LARGE (64ull << 20)
/* 32 bytes: the pointers handed out stay 16-byte aligned. */
typedef struct block { struct block *next; size_t size; size_t mapped; size_t pad; } block;
static block *pool[POOL_BUCKETS];
static size_t bucket(size_t n) { return (n * 11400714819323198485ull) >> 52; }
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
/* MEDLEY_FAKE_CUDA_MEMORY=BYTES: the device's memory (default 80 GiB); an allocation that would
 * take the bytes in use past it fails with CUDA_ERROR_OUT_OF_MEMORY, as on a full GPU. As with
 * the driver's stream-ordered pool under Medley's release threshold, memory once allocated stays
 * reserved until cuMemPoolTrimTo: cuMemGetInfo's free memory is the device's less the most in use
 * since the last trim. */
static size_t in_use, reserved, capacity;
/* The pool's attributes (cuMemPoolGetAttribute): the most in use and the most reserved since
 * their last reset; cuMemPoolTrimTo releases reserved memory not in use. */
static size_t used_high, reserved_high;
static size_t device_memory(void) { /* under pool_lock */
  if (!capacity) {
    const char *c = getenv("MEDLEY_FAKE_CUDA_MEMORY");
    capacity = c ? strtoull(c, NULL, 10) : 0;
    if (!capacity) capacity = 80ull << 30;
  }
  return capacity;
}
static void *dev_alloc(size_t n) {
  counts[C_ALLOC]++;
  pthread_mutex_lock(&pool_lock);
  if (in_use + n > device_memory()) {
    pthread_mutex_unlock(&pool_lock);
    return NULL;
  }
  in_use += n;
  if (in_use > reserved) reserved = in_use;
  if (in_use > used_high) used_high = in_use;
  if (reserved > reserved_high) reserved_high = reserved;
  if (n >= LARGE) {
    pthread_mutex_unlock(&pool_lock);
    void *m = mmap(NULL, sizeof(block) + n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      pthread_mutex_lock(&pool_lock);
      in_use -= n;
      pthread_mutex_unlock(&pool_lock);
      return NULL;
    }
    block *mapped = m;
    mapped->size = n;
    mapped->mapped = 1;
    return mapped + 1;
  }
  for (block **b = &pool[bucket(n)]; *b; b = &(*b)->next)
    if ((*b)->size == n) {
      block *hit = *b;
      *b = hit->next;
      pthread_mutex_unlock(&pool_lock);
      if (n <= 65536) memset(hit + 1, 0, n);
      return hit + 1;
    }
  pthread_mutex_unlock(&pool_lock);
  block *fresh = calloc(1, sizeof(block) + (n ? n : 1));
  if (!fresh) {
    pthread_mutex_lock(&pool_lock);
    in_use -= n;
    pthread_mutex_unlock(&pool_lock);
    return NULL;
  }
  fresh->size = n;
  return fresh + 1;
}
static void dev_free(void *p) {
  counts[C_FREE]++;
  if (!p) return;
  block *b = (block *)p - 1;
  pthread_mutex_lock(&pool_lock);
  in_use -= b->size;
  if (b->mapped) {
    pthread_mutex_unlock(&pool_lock);
    munmap(b, sizeof(block) + b->size);
    return;
  }
  b->next = pool[bucket(b->size)];
  pool[bucket(b->size)] = b;
  pthread_mutex_unlock(&pool_lock);
}

/* Launches per kernel name since the last report (MEDLEY_FAKE_CUDA_KERNELS=1). */
#define TALLY_N 256
static struct { const char *name; unsigned long long n; } tallies[TALLY_N];
static void tally(const char *name) {
  for (int i = 0; i < TALLY_N; i++) {
    if (!tallies[i].name || tallies[i].name == name) {
      tallies[i].name = name;
      tallies[i].n++;
      return;
    }
  }
}

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void report(const char *what) {
  double t = now_us();
  if (!log_file) {
    const char *p = getenv("MEDLEY_FAKE_CUDA_LOG");
    if (!p) return;
    log_file = fopen(p, "a");
    if (!log_file) return;
    setvbuf(log_file, NULL, _IOLBF, 0);
    last_sync_us = t;
  }
  fprintf(log_file, "%s %llu host_us %.1f", what, ++syncs, t - last_sync_us);
  for (int i = 0; i < C_N; i++) fprintf(log_file, " %s %llu", NAMES[i], counts[i]);
  fprintf(log_file, " htod_bytes %llu dtoh_bytes %llu\n", bytes_htod, bytes_dtoh);
  if (getenv("MEDLEY_FAKE_CUDA_KERNELS"))
    for (int i = 0; i < TALLY_N && tallies[i].name; i++)
      if (tallies[i].n) fprintf(log_file, "  kernel %s %llu\n", tallies[i].name, tallies[i].n);
  for (int i = 0; i < TALLY_N && tallies[i].name; i++) tallies[i].n = 0;
  memset(counts, 0, sizeof counts);
  bytes_htod = bytes_dtoh = 0;
  last_sync_us = now_us();
}

/* ---- stream capture ----------------------------------------------------------------------
 * A capture belongs to the thread that began it, as on the per-thread default streams candle
 * issues its work to (another thread's work goes to its own stream and is not captured). While a
 * thread captures, its launches, GEMMs, collectives, device-to-device copies and memsets are
 * recorded, not run; its allocations are the graph's (kept until the graph is destroyed, and
 * reused by every launch) and its frees of them are recorded. What a real capture refuses fails
 * with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED (900), is reported on stderr and invalidates the
 * capture, whose later calls then fail with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED (901), as does
 * its end: a copy from or to host memory, a synchronisation, a synchronous allocation or free,
 * a free of memory the graph did not allocate. Stricter than the driver: a graph that does not
 * free everything it allocates fails to instantiate (Medley's graphs must). As the driver's graph
 * memory does, an allocation reuses the memory of one the graph freed before (of the same size
 * here), so a graph holds about its step's peak, not the sum of its allocations. A launch replays
 * the recorded copies and memsets and counts the recorded launches, GEMMs and collectives. */
enum { N_LAUNCH, N_COUNT, N_DTOD, N_MEMSET };
typedef struct { int kind; dptr d, s; size_t n; unsigned char v; const char *name; } gnode;
typedef struct {
  gnode *nodes;
  size_t len, cap;
  void **allocs;
  char *freed; /* per allocation: freed within the graph, its memory free for a later one */
  size_t nallocs, acap, live;
} fake_graph;
static __thread fake_graph *capturing;
static __thread int invalidated;
static int memset_dev(dptr d, unsigned char v, size_t n);

static int record(gnode n) {
  fake_graph *g = capturing;
  if (g->len == g->cap) {
    size_t cap = g->cap ? 2 * g->cap : 256;
    gnode *grown = realloc(g->nodes, cap * sizeof *grown);
    if (!grown) return 2;
    g->nodes = grown;
    g->cap = cap;
  }
  g->nodes[g->len++] = n;
  return 0;
}
/* A call a capture refuses: reported, and the capture invalidated. */
static int refuse(const char *what, size_t bytes) {
  fprintf(stderr, "fake-gpu: %s (%zu bytes) during stream capture: refused\n", what, bytes);
  invalidated = 1;
  return 900;
}
static void graph_free(fake_graph *g) {
  if (!g) return;
  for (size_t i = 0; i < g->nallocs; i++) dev_free(g->allocs[i]);
  free(g->allocs);
  free(g->freed);
  free(g->nodes);
  free(g);
}

/* Shared with the other fake libraries (fake_cuda.h). */
void fake_cuda_count(int kind) {
  if (kind < 0 || kind >= C_N) return;
  if (capturing && (kind == C_GEMM || kind == C_COLL)) {
    if (!invalidated) record((gnode){.kind = N_COUNT, .n = (size_t)kind});
    return;
  }
  counts[kind]++;
}
void *fake_cuda_alloc(size_t n) { return dev_alloc(n); }
void fake_cuda_free(void *p) { dev_free(p); }
int fake_cuda_device_count(void) {
  const char *c = getenv("MEDLEY_FAKE_CUDA_DEVICES");
  int n = c ? atoi(c) : 1;
  return n > 0 ? n : 1;
}
void fake_cuda_sync(void) { report("sync"); }

static int dummy_handle[64];
#define HANDLE(i) ((void *)&dummy_handle[i])

/* ---- driver API (libcuda.so.1) ------------------------------------------------------------ */
int cuInit(unsigned flags) { (void)flags; return 0; }
int cuDeviceGet(int *dev, int ordinal) {
  *dev = ordinal;
  return ordinal >= 0 && ordinal < fake_cuda_device_count() ? 0 : 101; /* INVALID_DEVICE */
}
int cuDeviceGetAttribute(int *v, int attr, int dev) {
  (void)dev;
  switch (attr) {
    case 1: *v = 1024; break;                         /* max threads per block */
    case 2: case 3: *v = 1024; break;                 /* max block dim x, y */
    case 4: *v = 64; break;                           /* max block dim z */
    case 5: *v = 2147483647; break;                   /* max grid dim x */
    case 6: case 7: *v = 65535; break;                /* max grid dim y, z */
    case 8: *v = 49152; break;                        /* shared memory per block */
    case 10: *v = 32; break;                          /* warp size */
    case 12: case 82: *v = 65536; break;              /* registers per block / SM */
    case 16: *v = 132; break;                         /* multiprocessors */
    case 39: *v = 2048; break;                        /* threads per SM */
    case 75: *v = 9; break;                           /* compute capability */
    case 76: *v = 0; break;
    case 81: *v = 233472; break;                      /* shared memory per SM */
    case 97: *v = 232448; break;                      /* shared memory per block, opt-in */
    default: *v = 1;
  }
  return 0;
}
int cuDeviceGetMemPool(void **pool, int dev) { (void)dev; *pool = HANDLE(0); return 0; }
/* CUmemPool_attribute: 4 release threshold (ignored: memory stays reserved until trimmed),
 * 5/6 reserved now/most, 7/8 in use now/most; the two "most" reset to "now" when set (to 0). */
int cuMemPoolSetAttribute(void *pool, int attr, void *value) {
  (void)pool; (void)value;
  pthread_mutex_lock(&pool_lock);
  if (attr == 6) reserved_high = reserved;
  if (attr == 8) used_high = in_use;
  pthread_mutex_unlock(&pool_lock);
  return 0;
}
int cuMemPoolGetAttribute(void *pool, int attr, void *value) {
  (void)pool;
  unsigned long long v;
  pthread_mutex_lock(&pool_lock);
  switch (attr) {
    case 5: v = reserved; break;
    case 6: v = reserved_high; break;
    case 7: v = in_use; break;
    case 8: v = used_high; break;
    default: pthread_mutex_unlock(&pool_lock); return 1; /* CUDA_ERROR_INVALID_VALUE */
  }
  pthread_mutex_unlock(&pool_lock);
  *(unsigned long long *)value = v;
  return 0;
}
int cuMemPoolTrimTo(void *pool, size_t keep) {
  (void)pool;
  pthread_mutex_lock(&pool_lock);
  if (reserved > keep) reserved = keep > in_use ? keep : in_use;
  pthread_mutex_unlock(&pool_lock);
  return 0;
}
int cuDevicePrimaryCtxRetain(void **ctx, int dev) { (void)dev; *ctx = HANDLE(1); return 0; }
int cuDevicePrimaryCtxRelease_v2(int dev) { (void)dev; return 0; }
static void *current_ctx;
int cuCtxGetCurrent(void **ctx) { *ctx = current_ctx; return 0; }
int cuCtxSetCurrent(void *ctx) { current_ctx = ctx; return 0; }
int cuCtxDestroy_v2(void *ctx) { (void)ctx; return 0; }
/* An event holds the host time it was last recorded at (no work is queued, so an event is done
 * once recorded): elapsed times are the host's. */
int cuEventCreate(void **ev, unsigned flags) {
  (void)flags;
  *ev = calloc(1, sizeof(double));
  return *ev ? 0 : 2;
}
int cuEventDestroy_v2(void *ev) { free(ev); return 0; }
int cuEventRecord(void *ev, void *s) {
  (void)s;
  counts[C_EVENT]++;
  *(double *)ev = now_us();
  return 0;
}
int cuEventSynchronize(void *ev) {
  (void)ev;
  if (capturing) return refuse("an event synchronisation", 0);
  report("sync");
  return 0;
}
int cuEventElapsedTime_v2(float *ms, void *start, void *end) {
  *ms = (float)((*(double *)end - *(double *)start) / 1e3);
  return 0;
}
int cuStreamWaitEvent(void *s, void *ev, unsigned f) { (void)s; (void)ev; (void)f; counts[C_WAIT]++; return 0; }
int cuStreamIsCapturing(void *s, int *status) {
  (void)s;
  *status = capturing ? (invalidated ? 2 : 1) : 0;
  return 0;
}
int cuStreamSynchronize(void *s) {
  (void)s;
  if (capturing) return refuse("a stream synchronisation", 0);
  report("sync");
  return 0;
}
int cuStreamBeginCapture_v2(void *s, int mode) {
  (void)s; (void)mode;
  if (capturing) return 401; /* CUDA_ERROR_ILLEGAL_STATE */
  capturing = calloc(1, sizeof *capturing);
  invalidated = 0;
  return capturing ? 0 : 2;
}
int cuStreamEndCapture(void *s, void **out) {
  (void)s;
  fake_graph *g = capturing;
  if (!g) return 401;
  capturing = NULL;
  if (invalidated) {
    graph_free(g);
    *out = NULL;
    return 901;
  }
  *out = g;
  return 0;
}
int cuGraphInstantiateWithFlags(void **exec, void *graph, unsigned long long flags) {
  (void)flags;
  fake_graph *g = graph;
  if (g->live) {
    fprintf(stderr, "fake-gpu: a graph keeps %zu of its allocations after it ends: refused\n",
            g->live);
    return 1;
  }
  *exec = g; /* the executable graph is the graph itself */
  return 0;
}
int cuGraphUpload(void *exec, void *s) { (void)exec; (void)s; return 0; }
int cuGraphLaunch(void *exec, void *s) {
  (void)s;
  if (capturing) return refuse("a graph launch", 0);
  fake_graph *g = exec;
  counts[C_GRAPH]++;
  for (size_t i = 0; i < g->len; i++) {
    gnode *n = &g->nodes[i];
    switch (n->kind) {
      case N_LAUNCH: counts[C_LAUNCH]++; tally(n->name); break;
      case N_COUNT: counts[n->n]++; break;
      case N_DTOD: counts[C_DTOD]++; memmove((void *)(uintptr_t)n->d, (void *)(uintptr_t)n->s, n->n); break;
      case N_MEMSET: counts[C_MEMSET]++; memset_dev(n->d, n->v, n->n); break;
    }
  }
  return 0;
}
int cuGraphExecDestroy(void *exec) { (void)exec; return 0; }
int cuGraphDestroy(void *graph) { graph_free(graph); return 0; }
int cuStreamDestroy_v2(void *s) { (void)s; return 0; }
int cuGetErrorString(int e, const char **s) { (void)e; *s = "fake CUDA error"; return 0; }
int cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned smem, void *s, void **params, void **extra) {
  (void)s; (void)params; (void)extra;
  /* A launch a real GPU refuses (CUDA_ERROR_INVALID_VALUE): an empty or oversized grid or block,
   * or dynamic shared memory past the 48 KiB a kernel gets without opting in (nothing here calls
   * cuFuncSetAttribute to opt in). The limits are an H100/H200's (cuDeviceGetAttribute above). */
  unsigned long long threads = (unsigned long long)bx * by * bz;
  if (!gx || !gy || !gz || !bx || !by || !bz || gx > 2147483647u || gy > 65535 || gz > 65535 ||
      bx > 1024 || by > 1024 || bz > 64 || threads > 1024 || smem > 49152) {
    fprintf(stderr,
            "fake-gpu: refused launch of %s: grid (%u, %u, %u), block (%u, %u, %u), %u bytes of "
            "dynamic shared memory\n",
            (const char *)f, gx, gy, gz, bx, by, bz, smem);
    return 1;
  }
  if (capturing) return invalidated ? 901 : record((gnode){.kind = N_LAUNCH, .name = f});
  counts[C_LAUNCH]++;
  tally((const char *)f);
  return 0;
}
int cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
  pthread_mutex_lock(&pool_lock);
  *total = device_memory();
  *free_bytes = *total - reserved;
  pthread_mutex_unlock(&pool_lock);
  return 0;
}
int cuMemAlloc_v2(dptr *p, size_t n) {
  if (capturing) return refuse("a synchronous allocation", n);
  *p = (dptr)(uintptr_t)dev_alloc(n);
  return *p ? 0 : 2;
}
int cuMemAllocAsync(dptr *p, size_t n, void *s) {
  (void)s;
  fake_graph *g = capturing;
  if (g && invalidated) return 901;
  if (g)
    for (size_t i = 0; i < g->nallocs; i++)
      if (g->freed[i] && ((block *)g->allocs[i] - 1)->size == n) {
        g->freed[i] = 0;
        g->live++;
        *p = (dptr)(uintptr_t)g->allocs[i];
        return 0;
      }
  void *m = dev_alloc(n);
  if (!m) return 2;
  if (g) {
    if (g->nallocs == g->acap) {
      size_t cap = g->acap ? 2 * g->acap : 64;
      void **grown = realloc(g->allocs, cap * sizeof *grown);
      char *grown_freed = realloc(g->freed, cap);
      if (grown) g->allocs = grown;
      if (grown_freed) g->freed = grown_freed;
      if (!grown || !grown_freed) return 2;
      g->acap = cap;
    }
    g->freed[g->nallocs] = 0;
    g->allocs[g->nallocs++] = m;
    g->live++;
  }
  *p = (dptr)(uintptr_t)m;
  return 0;
}
int cuMemFree_v2(dptr p) {
  if (capturing) return refuse("a synchronous free", 0);
  dev_free((void *)(uintptr_t)p);
  return 0;
}
int cuMemFreeAsync(dptr p, void *s) {
  (void)s;
  fake_graph *g = capturing;
  if (!g) {
    dev_free((void *)(uintptr_t)p);
    return 0;
  }
  if (invalidated) return 901;
  for (size_t i = 0; i < g->nallocs; i++)
    if (g->allocs[i] == (void *)(uintptr_t)p && !g->freed[i]) {
      g->freed[i] = 1; /* the graph's memory: kept for its launches, released with it */
      g->live--;
      return 0;
    }
  return refuse("a free of memory allocated outside the graph", 0);
}
int cuMemcpyHtoDAsync_v2(dptr d, const void *h, size_t n, void *s) {
  (void)s;
  if (capturing) return invalidated ? 901 : refuse("a copy from host memory", n);
  counts[C_HTOD]++; bytes_htod += n;
  memcpy((void *)(uintptr_t)d, h, n);
  return 0;
}
int cuMemcpyDtoHAsync_v2(void *h, dptr d, size_t n, void *s) {
  (void)s;
  if (capturing) return invalidated ? 901 : refuse("a copy to host memory", n);
  counts[C_DTOH]++; bytes_dtoh += n;
  memcpy(h, (void *)(uintptr_t)d, n);
  report("dtoh"); /* a copy to pageable memory returns once done: the host waits here */
  return 0;
}
int cuMemcpyDtoDAsync_v2(dptr d, dptr src, size_t n, void *s) {
  (void)s;
  if (capturing) return invalidated ? 901 : record((gnode){.kind = N_DTOD, .d = d, .s = src, .n = n});
  counts[C_DTOD]++;
  memmove((void *)(uintptr_t)d, (void *)(uintptr_t)src, n);
  return 0;
}
int cuMemcpyPeerAsync(dptr d, void *dc, dptr src, void *sc, size_t n, void *s) {
  (void)dc; (void)sc;
  return cuMemcpyDtoDAsync_v2(d, src, n, s);
}
int cuMemsetD8Async(dptr d, unsigned char v, size_t n, void *s) {
  (void)s;
  if (capturing) return invalidated ? 901 : record((gnode){.kind = N_MEMSET, .d = d, .v = v, .n = n});
  counts[C_MEMSET]++;
  return memset_dev(d, v, n);
}
static int memset_dev(dptr d, unsigned char v, size_t n) {
  char *p = (char *)(uintptr_t)d;
  if (v == 0 && n >= LARGE) { /* within one LARGE block's mapping (see dev_alloc) */
    const uintptr_t page = 4096;
    char *lo = (char *)(((uintptr_t)p + page - 1) & ~(page - 1));
    char *hi = (char *)(((uintptr_t)(p + n)) & ~(page - 1));
    memset(p, 0, (size_t)(lo - p));
    memset(hi, 0, (size_t)(p + n - hi));
    if (hi > lo && madvise(lo, (size_t)(hi - lo), MADV_DONTNEED) == 0) return 0;
    memset(lo, 0, (size_t)(hi - lo));
    return 0;
  }
  memset(p, v, n);
  return 0;
}
int cuModuleLoad(void **m, const char *path) { (void)path; *m = HANDLE(3); return 0; }
int cuModuleLoadData(void **m, const void *image) { (void)image; *m = HANDLE(3); return 0; }
int cuModuleUnload(void *m) { (void)m; return 0; }
/* A function handle is its name, interned (kept for the per-kernel tally). */
int cuModuleGetFunction(void **f, void *m, const char *name) {
  (void)m;
  counts[C_GETFN]++;
  static char *names[4096];
  for (int i = 0; i < 4096; i++) {
    if (!names[i]) names[i] = strdup(name);
    if (!names[i]) return 2;
    if (!strcmp(names[i], name)) {
      *f = names[i];
      return 0;
    }
  }
  return 2;
}
