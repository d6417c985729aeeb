/* The CUDA runtime, cuBLAS, cuRAND and NCCL halves of the fake GPU (see fake_cuda.c): one
 * source, built once per library with FAKE_RUNTIME, FAKE_CUBLAS, FAKE_CURAND or FAKE_NCCL. */
#include <stddef.h>
#include <stdint.h>

#include "fake_cuda.h"

static int dummy_handle[8];
#define HANDLE(i) ((void *)&dummy_handle[i])

#ifdef FAKE_RUNTIME
#include <string.h>
typedef struct { unsigned x, y, z; } dim3;
int cudaGetDeviceCount(int *n) { *n = 1; return 0; }
int cudaGetDevice(int *d) { *d = 0; return 0; }
int cudaSetDevice(int d) { return d == 0 ? 0 : 101; }
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
#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
int ncclGetUniqueId(ncclUniqueId *id) { memset(id, 0, sizeof *id); return 0; }
int ncclCommInitRank(void **c, int n, ncclUniqueId id, int rank) {
  (void)n; (void)id; (void)rank; *c = HANDLE(4); return 0;
}
int ncclCommAbort(void *c) { (void)c; return 0; }
int ncclAllReduce(void) { fake_cuda_count(C_COLL); return 0; }
int ncclAllGather(void) { fake_cuda_count(C_COLL); return 0; }
int ncclBroadcast(void) { fake_cuda_count(C_COLL); return 0; }
#endif
