// Key kernels: squared L2 norms per (KV head, cell) with a finiteness check, and the transposed
// f32 gather the host scorers without a device kernel fall back to.
#include "common.cuh"
#include <climits>

// Grid: (ceil(n / blockDim.x), n_head_kv, 1); Block: (128, 1, 1); one thread per (cell, KV head).
// sq[g * n + j] = sum_c k[j][g][c]^2. bad[g] = smallest cell index whose key holds a NaN/Inf
// (atomicMin; the host initializes it to INT_MAX).
template <typename T>
__device__ void key_norms(unsigned long long base, unsigned long long row_stride,
                          const unsigned* __restrict__ rows, int n, int d,
                          float* __restrict__ sq, int* __restrict__ bad) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int g = blockIdx.y;
    if (j >= n) return;
    const T* k = kvc_key<T>(base, row_stride, rows, j, g, d);
    float s = 0.0f;
    bool finite = true;
    for (int c = 0; c < d; ++c) {
        const float v = kvc_f32(k[c]);
        finite = finite && isfinite(v);
        s += v * v;
    }
    sq[(long long)g * n + j] = s;
    if (!finite) atomicMin(&bad[g], j);
}

// Grid: (ceil(n / blockDim.x), n_head_kv, 1); Block: (128, 1, 1); one thread per (cell, KV head).
// out[(g * d + c) * n + j] = k[j][g][c] as f32: the `[head_dim][n]` layout of the CPU kernels,
// written so that consecutive threads store consecutive addresses.
template <typename T>
__device__ void gather_t(unsigned long long base, unsigned long long row_stride,
                         const unsigned* __restrict__ rows, int n, int d,
                         float* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int g = blockIdx.y;
    if (j >= n) return;
    const T* k = kvc_key<T>(base, row_stride, rows, j, g, d);
    float* o = out + (long long)g * d * n + j;
    for (int c = 0; c < d; ++c) o[(long long)c * n] = kvc_f32(k[c]);
}

#define KVC_KEYS(SUFFIX, T)                                                                     \
    extern "C" __global__ void key_norms_##SUFFIX(unsigned long long base,                      \
                                                  unsigned long long row_stride,                \
                                                  const unsigned* rows, int n, int d, float* sq, \
                                                  int* bad) {                                   \
        key_norms<T>(base, row_stride, rows, n, d, sq, bad);                                    \
    }                                                                                           \
    extern "C" __global__ void gather_t_##SUFFIX(unsigned long long base,                       \
                                                 unsigned long long row_stride,                 \
                                                 const unsigned* rows, int n, int d, float* out) { \
        gather_t<T>(base, row_stride, rows, n, d, out);                                         \
    }

KVC_KEYS(f32, float)
KVC_KEYS(f16, __half)
KVC_KEYS(bf16, __nv_bfloat16)
