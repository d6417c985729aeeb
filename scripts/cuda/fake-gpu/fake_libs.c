/* The CUDA runtime, cuBLAS, cuRAND and NCCL halves of the fake GPU (see fake_cuda.c): one
 * source, built once per library with FAKE_RUNTIME, FAKE_CUBLAS, FAKE_CURAND or FAKE_NCCL. */
#include <stddef.h>
#include <stdint.h>

#include "fake_cuda.h"

static int dummy_handle[8] __attribute__((unused));
#define HANDLE(i) ((void *)&dummy_handle[i])

#ifdef FAKE_RUNTIME
#include <string.h>
typedef struct { unsigned x, y, z; } dim3;
int cudaGetDeviceCount(int *n) { *n = fake_cuda_device_count(); return 0; }
static int current_device;
int cudaGetDevice(int *d) { *d = current_device; return 0; }
int cudaSetDevice(int d) {
  if (d < 0 || d >= fake_cuda_device_count()) return 101;
  current_device = d;
  return 0;
}
int cudaDeviceGetAttribute(int *v, int attr, int dev) {
  (void)attr; (void)dev;
  *v = attr == 16 ? 132 : attr == 75 ? 9 : attr == 76 ? 0 : 1;
  return 0;
}
int cudaGetLastError(void) { return 0; }
int cudaPeekAtLastError(void) { return 0; }
const char *cudaGetErrorName(int e) { (void)e; return "cudaErrorFake"; }
const char *cudaGetErrorString(int e) { (void)e; return "fake CUDA runtime error"; }
int cudaMalloc(void **p, size_t n) { *p = fake_cuda_alloc(n); return *p ? 0 : 2; }
int cudaMallocAsync_ptsz(void **p, size_t n, void *s) { (void)s; return cudaMalloc(p, n); }
int cudaFree(void *p) { fake_cuda_free(p); return 0; }
int cudaFreeAsync_ptsz(void *p, void *s) { (void)s; fake_cuda_free(p); return 0; }
int cudaMemsetAsync_ptsz(void *p, int v, size_t n, void *s) {
  (void)s; fake_cuda_count(C_MEMSET); memset(p, v, n); return 0;
}
int cudaStreamSynchronize_ptsz(void *s) { (void)s; fake_cuda_sync(); return 0; }
int cudaFuncGetAttributes(void *attr, const void *f) { (void)attr; (void)f; return 0; }
int cudaFuncSetAttribute(const void *f, int attr, int v) { (void)f; (void)attr; (void)v; return 0; }
int cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int *n, const void *f, int block,
                                                          size_t smem, unsigned flags) {
  (void)f; (void)block; (void)smem; (void)flags; *n = 1; return 0;
}
void **__cudaRegisterFatBinary(void *fatbin) { (void)fatbin; return (void **)HANDLE(0); }
void __cudaRegisterFatBinaryEnd(void **h) { (void)h; }
void __cudaUnregisterFatBinary(void **h) { (void)h; }
void __cudaRegisterFunction(void **h, const char *host, char *dev, const char *name, int limit,
                            void *tid, void *bid, void *bdim, void *gdim, int *wsize) {
  (void)h; (void)host; (void)dev; (void)name; (void)limit; (void)tid; (void)bid; (void)bdim;
  (void)gdim; (void)wsize;
}
void __cudaRegisterVar(void **h, char *host, char *dev, const char *name, int ext, size_t size,
                       int constant, int global) {
  (void)h; (void)host; (void)dev; (void)name; (void)ext; (void)size; (void)constant; (void)global;
}
unsigned __cudaPushCallConfiguration(dim3 g, dim3 b, size_t smem, void *s) {
  (void)g; (void)b; (void)smem; (void)s; return 0;
}
int __cudaPopCallConfiguration(dim3 *g, dim3 *b, size_t *smem, void *s) {
  (void)g; (void)b; (void)smem; (void)s; return 0;
}
int __cudaLaunchKernel_ptsz(const void *f, dim3 g, dim3 b, void **args, size_t smem, void *s) {
  (void)f; (void)g; (void)b; (void)args; (void)smem; (void)s;
  fake_cuda_count(C_RT_LAUNCH);
  return 0;
}
int __cudaGetKernel(void **k, const void *f) { (void)f; *k = HANDLE(1); return 0; }
#endif

#ifdef FAKE_CUBLAS
int cublasCreate_v2(void **h) { *h = HANDLE(2); return 0; }
int cublasDestroy_v2(void *h) { (void)h; return 0; }
int cublasSetStream_v2(void *h, void *s) { (void)h; (void)s; return 0; }
int cublasGemmStridedBatchedEx(void) { fake_cuda_count(C_GEMM); return 0; }
int cublasDgemmStridedBatched(void) { fake_cuda_count(C_GEMM); return 0; }
#endif

#ifdef FAKE_CURAND
int curandCreateGenerator(void **g, int kind) { (void)kind; *g = HANDLE(3); return 0; }
int curandDestroyGenerator(void *g) { (void)g; return 0; }
int curandSetPseudoRandomGeneratorSeed(void *g, unsigned long long seed) { (void)g; (void)seed; return 0; }
int curandSetStream(void *g, void *s) { (void)g; (void)s; return 0; }
#endif

#ifdef FAKE_NCCL
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
/* NCCL's bootstrap, between processes through files: ncclGetUniqueId makes an id of its own
 * ("fake-nccl-" with the process and the time), and ncclCommInitRank leaves a file named by the
 * id, the world size and the rank in MEDLEY_FAKE_NCCL_DIR (default TMPDIR or /tmp), then waits,
 * as NCCL does, until every rank of the group has left its own: ranks given different ids or
 * world sizes never meet, and fail after 60 s (ncclSystemError) instead of hanging. An id not
 * made by ncclGetUniqueId, or a rank outside the world, is ncclInvalidArgument. Each join is
 * one line "id world rank" in MEDLEY_FAKE_NCCL_LOG when set.
 *
 * Collectives exchange nothing: an all-reduce or broadcast leaves each rank's buffer as it was,
 * and an all-gather gives each rank its own input in every rank's slot (what it would get from
 * ranks holding the same values, as when the ranks agree on a size they each computed alike). */
typedef struct { int world, rank; } fake_comm;
typedef struct { char internal[128]; } ncclUniqueId;
int ncclGetUniqueId(ncclUniqueId *id) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  memset(id, 0, sizeof *id);
  snprintf(id->internal, sizeof id->internal, "fake-nccl-%d-%lld-%ld", (int)getpid(),
           (long long)t.tv_sec, t.tv_nsec);
  return 0;
}
static const char *nccl_dir(void) {
  const char *d = getenv("MEDLEY_FAKE_NCCL_DIR");
  if (!d) d = getenv("TMPDIR");
  return d ? d : "/tmp";
}
int ncclCommInitRank(void **c, int n, ncclUniqueId id, int rank) {
  char tag[129], path[1024];
  memcpy(tag, id.internal, 128);
  tag[128] = 0;
  if (strncmp(tag, "fake-nccl-", 10) != 0 || strchr(tag, '/') || n < 1 || rank < 0 || rank >= n)
    return 4; /* ncclInvalidArgument */
  snprintf(path, sizeof path, "%s/%s.%d.%d", nccl_dir(), tag, n, rank);
  FILE *mine = fopen(path, "w");
  if (!mine) return 2;
  fclose(mine);
  for (int waited = 0;; waited++) {
    int joined = 0;
    for (int r = 0; r < n; r++) {
      snprintf(path, sizeof path, "%s/%s.%d.%d", nccl_dir(), tag, n, r);
      joined += access(path, F_OK) == 0;
    }
    if (joined == n) break;
    if (waited >= 600) return 2; /* ncclSystemError: the group never formed */
    usleep(100000);
  }
  if (n == 1) { /* nobody else looks for it */
    snprintf(path, sizeof path, "%s/%s.1.0", nccl_dir(), tag);
    unlink(path);
  }
  const char *log = getenv("MEDLEY_FAKE_NCCL_LOG");
  FILE *f = log ? fopen(log, "a") : NULL;
  if (f) {
    fprintf(f, "%s %d %d\n", tag, n, rank);
    fclose(f);
  }
  fake_comm *comm = malloc(sizeof *comm);
  if (!comm) return 2;
  comm->world = n;
  comm->rank = rank;
  *c = comm;
  return 0;
}
int ncclCommAbort(void *c) { free(c); return 0; }
int ncclAllReduce(void) { fake_cuda_count(C_COLL); return 0; }
/* ncclDataType_t: int8, uint8, int32, uint32, int64, uint64, float16, float32, float64, bfloat16,
 * then the 1-byte float8 types. */
static size_t nccl_type_size(int type) {
  static const size_t sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
  return type >= 0 && type < 12 ? sizes[type] : 0;
}
int ncclAllGather(const void *send, void *recv, size_t count, int type, void *c, void *stream) {
  (void)stream;
  fake_cuda_count(C_COLL);
  const fake_comm *comm = c;
  size_t bytes = count * nccl_type_size(type);
  if (!comm || (count && !bytes)) return 4; /* ncclInvalidArgument */
  for (int r = 0; r < comm->world; r++) memmove((char *)recv + r * bytes, send, bytes);
  return 0;
}
int ncclBroadcast(void) { fake_cuda_count(C_COLL); return 0; }
#endif
