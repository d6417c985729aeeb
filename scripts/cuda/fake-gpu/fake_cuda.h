/* What the fake driver (fake_cuda.c, libcuda.so.1) shares with the other fake libraries
 * (fake_libs.c), which link against it: the kinds of call it counts, and its memory and log. */
#pragma once
#include <stddef.h>

enum { C_LAUNCH, C_RT_LAUNCH, C_GEMM, C_ALLOC, C_FREE, C_HTOD, C_DTOH, C_DTOD, C_MEMSET,
       C_EVENT, C_WAIT, C_COLL, C_GETFN, C_GRAPH, C_N };

/* Counts one call of `kind` (while this thread captures a stream, a GEMM or a collective is
 * recorded into the graph instead, and counted when the graph is launched). */
void fake_cuda_count(int kind);
/* Device memory (host memory here) and its release. */
void *fake_cuda_alloc(size_t n);
void fake_cuda_free(void *p);
/* A point where the host waits for the device: one log line. */
void fake_cuda_sync(void);
/* The GPUs the fake has (MEDLEY_FAKE_CUDA_DEVICES, default 1). */
int fake_cuda_device_count(void);
