// Score post-processing on the device: GQA reduction of per-query-head sums and 1-D pooling
// along the cells, with the CPU path's operation order (src/score/mod.rs GqaReduce::fold,
// src/kernels.rs pool1d).

// Grid: (ceil(n / blockDim.x), n_head_kv, 1); Block: (256, 1, 1); one thread per (cell, KV head).
// out[g * n + j] = fold over hl < group of recv[(g * group + hl) * n + j] / rows, where fold is
// the mean (sum, then times 1 / group) or, with max_mode != 0, the maximum.
extern "C" __global__ void gqa_fold(const float* __restrict__ recv, int n, int group, float rows,
                                    int max_mode, float* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int g = blockIdx.y;
    if (j >= n) return;
    const float* r = recv + (long long)g * group * n + j;
    float acc = max_mode ? -INFINITY : 0.0f;
    for (int hl = 0; hl < group; ++hl) {
        const float v = r[(long long)hl * n] / rows;
        acc = max_mode ? fmaxf(acc, v) : acc + v;
    }
    if (!max_mode) acc *= 1.0f / (float)group;
    out[(long long)g * n + j] = acc;
}

// Grid: (ceil(n / blockDim.x), units, 1); Block: (256, 1, 1); one thread per (cell, unit).
// Stride-1 pooling with odd `kernel` and "same" padding: the window [j - kernel/2, j + kernel/2]
// clipped to the row; max (max_mode != 0) or average over the clipped window.
extern "C" __global__ void pool1d(const float* __restrict__ x, int n, int kernel, int max_mode,
                                  float* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int u = blockIdx.y;
    if (j >= n) return;
    const float* row = x + (long long)u * n;
    const int h = kernel / 2;
    const int lo = j - h < 0 ? 0 : j - h;
    const int hi = j + h + 1 > n ? n : j + h + 1;
    float acc = max_mode ? -INFINITY : 0.0f;
    for (int i = lo; i < hi; ++i) acc = max_mode ? fmaxf(acc, row[i]) : acc + row[i];
    if (!max_mode) acc /= (float)(hi - lo);
    out[(long long)u * n + j] = acc;
}
