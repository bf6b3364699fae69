// Shared helpers of the kvcompress kernels: element conversion and in-place K addressing.
//
// K is read where the engine keeps it: row r of a layer starts at `base + r * row_stride`
// (bytes), KV head g of a row at element `g * head_dim`, and cell j of a sequence lives in row
// `rows[j]`. Nothing is copied or converted up front.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// keep in sync with MAX_HEAD_DIM in src/backend/cuda.rs
#define KVC_MAX_D 512

__device__ __forceinline__ float kvc_f32(float x) { return x; }
__device__ __forceinline__ float kvc_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float kvc_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// First element of KV head `g` of cell `j`.
template <typename T>
__device__ __forceinline__ const T* kvc_key(unsigned long long base, unsigned long long row_stride,
                                            const unsigned* __restrict__ rows, int j, int g,
                                            int d) {
    const unsigned char* row = reinterpret_cast<const unsigned char*>(base) +
                               (unsigned long long)rows[j] * row_stride;
    return reinterpret_cast<const T*>(row) + (long long)g * d;
}

__device__ __forceinline__ float kvc_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float kvc_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
