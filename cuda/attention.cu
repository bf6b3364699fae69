// Window attention over K in place, per query head of a GQA group, without materializing the
// [query][cell] probability matrix: pass 1 (attn_stats) takes per-chunk softmax statistics,
// attn_stats_reduce combines them per query, pass 2 (attn_accum) recomputes the logits and adds
// the probabilities into per-head sums (window scores, H2O) and, for the newest query row, the
// squared probabilities (DBudgetKV evidence).
//
// Queries: row r of the observation window holds every layer's heads; query head h of the layer
// being scored starts at q + r * q_stride + q_off + h * d (f32). Query index qi of a unit runs
// over (head-in-group hl, row r) with qi = hl * n_rows + r. Row r sees cells j < n_vis[r]
// (causal rule, cells in ascending position).
#include "common.cuh"

// queries held in shared memory per batch
#define QB 8

// Load queries qi0 .. qi0+QB-1 of KV head g into sq (zeros past the last query).
__device__ __forceinline__ void load_queries(float (*sq)[KVC_MAX_D], const float* __restrict__ q,
                                             long long q_stride, long long q_off, int head0,
                                             int n_rows, int qi0, int nq, int d) {
    __syncthreads();  // the previous batch is no longer read
    for (int i = threadIdx.x; i < QB * d; i += blockDim.x) {
        const int b = i / d, c = i - b * d, qi = qi0 + b;
        float v = 0.0f;
        if (qi < nq) {
            const int hl = qi / n_rows, r = qi - hl * n_rows;
            v = q[r * q_stride + q_off + (long long)(head0 + hl) * d + c];
        }
        sq[b][c] = v;
    }
    __syncthreads();
}

// l[b] = scale * q_b . k over the batch (k == nullptr: the thread has no cell).
template <typename T>
__device__ __forceinline__ void logits(const T* __restrict__ k, const float (*sq)[KVC_MAX_D],
                                       int d, float scale, float* l) {
#pragma unroll
    for (int b = 0; b < QB; ++b) l[b] = 0.0f;
    if (k == nullptr) return;
    for (int c = 0; c < d; ++c) {
        const float kv = kvc_f32(k[c]);
#pragma unroll
        for (int b = 0; b < QB; ++b) l[b] += sq[b][c] * kv;
    }
#pragma unroll
    for (int b = 0; b < QB; ++b) l[b] *= scale;
}

// Grid: (n_chunks = ceil(n / blockDim.x), n_head_kv, 1); Block: (128, 1, 1), a multiple of 32.
// Thread t scores cell blockIdx.x * blockDim.x + t against every query of KV head blockIdx.y,
// QB queries at a time from shared memory (16 KiB), K read in place.
// part[(g * nq + qi) * n_chunks + chunk] = (max, sum of exp(l - max)) over the chunk's visible
// logits, (-inf, 0) when the chunk holds none. nq = group * n_rows.
template <typename T>
__device__ void attn_stats(unsigned long long base, unsigned long long row_stride,
                           const unsigned* __restrict__ rows, int n, int d,
                           const float* __restrict__ q, long long q_stride, long long q_off,
                           const int* __restrict__ n_vis, int n_rows, int group, float scale,
                           float2* __restrict__ part) {
    __shared__ float sq[QB][KVC_MAX_D];
    __shared__ float red[QB][32];
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int g = blockIdx.y;
    const int nq = group * n_rows;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const T* k = j < n ? kvc_key<T>(base, row_stride, rows, j, g, d) : nullptr;
    for (int qi0 = 0; qi0 < nq; qi0 += QB) {
        load_queries(sq, q, q_stride, q_off, g * group, n_rows, qi0, nq, d);
        float l[QB];
        logits<T>(k, sq, d, scale, l);
#pragma unroll
        for (int b = 0; b < QB; ++b) {
            const int qi = qi0 + b;
            const bool vis = qi < nq && j < n_vis[qi % n_rows];
            if (!vis) l[b] = -INFINITY;
        }
        float m[QB];
#pragma unroll
        for (int b = 0; b < QB; ++b) {
            const float w = kvc_warp_max(l[b]);
            if (lane == 0) red[b][warp] = w;
        }
        __syncthreads();
#pragma unroll
        for (int b = 0; b < QB; ++b) {
            m[b] = -INFINITY;
            for (int w = 0; w < n_warps; ++w) m[b] = fmaxf(m[b], red[b][w]);
        }
        __syncthreads();
#pragma unroll
        for (int b = 0; b < QB; ++b) {
            const float e = l[b] == -INFINITY ? 0.0f : expf(l[b] - m[b]);
            const float s = kvc_warp_sum(e);
            if (lane == 0) red[b][warp] = s;
        }
        __syncthreads();
        if (threadIdx.x < QB && qi0 + (int)threadIdx.x < nq) {
            const int b = threadIdx.x;
            float s = 0.0f;
            for (int w = 0; w < n_warps; ++w) s += red[b][w];
            part[((long long)g * nq + qi0 + b) * gridDim.x + blockIdx.x] = make_float2(m[b], s);
        }
    }
}

// Grid: (ceil(total / blockDim.x), 1, 1); Block: (128, 1, 1); one thread per query of the layer,
// total = n_head_kv * group * n_rows.
// stat[i] = (max, 1 / sum of exp(l - max)) over all chunks, (0, 0) when the query sees no cell.
extern "C" __global__ void attn_stats_reduce(const float2* __restrict__ part, int n_chunks,
                                             int total, float2* __restrict__ stat) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const float2* p = part + (long long)i * n_chunks;
    float m = -INFINITY;
    for (int c = 0; c < n_chunks; ++c) m = fmaxf(m, p[c].x);
    if (m == -INFINITY) {
        stat[i] = make_float2(0.0f, 0.0f);
        return;
    }
    float s = 0.0f;
    for (int c = 0; c < n_chunks; ++c)
        if (p[c].x != -INFINITY) s += p[c].y * expf(p[c].x - m);
    stat[i] = make_float2(m, 1.0f / s);
}

// Grid: (ceil(n / blockDim.x), n_head_kv, 1); Block: (128, 1, 1), the same as attn_stats.
// Thread t recomputes the logits of cell j = blockIdx.x * blockDim.x + t and, with p the softmax
// probability of (query head h = g * group + hl, row r):
//   recv[h * n + j]  = sum of p over the rows, in row order
//   last[h * n + j]  = prot[j] ? 0 : p * p    for the newest row r = n_rows - 1 (last may be null)
template <typename T>
__device__ void attn_accum(unsigned long long base, unsigned long long row_stride,
                           const unsigned* __restrict__ rows, int n, int d,
                           const float* __restrict__ q, long long q_stride, long long q_off,
                           const int* __restrict__ n_vis, int n_rows, int group, float scale,
                           const float2* __restrict__ stat, const unsigned char* __restrict__ prot,
                           float* __restrict__ recv, float* __restrict__ last) {
    __shared__ float sq[QB][KVC_MAX_D];
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int g = blockIdx.y;
    const int nq = group * n_rows;
    const T* k = j < n ? kvc_key<T>(base, row_stride, rows, j, g, d) : nullptr;
    // qi is head-major, so one head's rows arrive consecutively (across batches too): sum them
    // in a register in row order, as the CPU does, and store once per head
    float acc = 0.0f;
    int cur = 0;
    for (int qi0 = 0; qi0 < nq; qi0 += QB) {
        load_queries(sq, q, q_stride, q_off, g * group, n_rows, qi0, nq, d);
        float l[QB];
        logits<T>(k, sq, d, scale, l);
        if (j >= n) continue;
#pragma unroll
        for (int b = 0; b < QB; ++b) {
            const int qi = qi0 + b;
            if (qi >= nq) break;
            const int hl = qi / n_rows, r = qi - hl * n_rows;
            if (hl != cur) {
                recv[(long long)(g * group + cur) * n + j] = acc;
                acc = 0.0f;
                cur = hl;
            }
            const float2 st = stat[(long long)g * nq + qi];
            const float p = j < n_vis[r] ? expf(l[b] - st.x) * st.y : 0.0f;
            acc += p;
            if (last != nullptr && r == n_rows - 1)
                last[(long long)(g * group + hl) * n + j] = prot[j] ? 0.0f : p * p;
        }
    }
    if (j < n && nq > 0) recv[(long long)(g * group + cur) * n + j] = acc;
}

#define KVC_ATTENTION(SUFFIX, T)                                                                \
    extern "C" __global__ void attn_stats_##SUFFIX(                                             \
        unsigned long long base, unsigned long long row_stride, const unsigned* rows, int n,    \
        int d, const float* q, long long q_stride, long long q_off, const int* n_vis,           \
        int n_rows, int group, float scale, float2* part) {                                     \
        attn_stats<T>(base, row_stride, rows, n, d, q, q_stride, q_off, n_vis, n_rows, group,   \
                      scale, part);                                                             \
    }                                                                                           \
    extern "C" __global__ void attn_accum_##SUFFIX(                                             \
        unsigned long long base, unsigned long long row_stride, const unsigned* rows, int n,    \
        int d, const float* q, long long q_stride, long long q_off, const int* n_vis,           \
        int n_rows, int group, float scale, const float2* stat, const unsigned char* prot,      \
        float* recv, float* last) {                                                             \
        attn_accum<T>(base, row_stride, rows, n, d, q, q_stride, q_off, n_vis, n_rows, group,   \
                      scale, stat, prot, recv, last);                                           \
    }

KVC_ATTENTION(f32, float)
KVC_ATTENTION(f16, __half)
KVC_ATTENTION(bf16, __nv_bfloat16)
