// test-kvp-mask: the per-layer / per-head KV cache masks of patch 0003, checked on ggml ops alone.
//
// build_kvp_mask() (llama.cpp src/llama-kv-policy.cpp) adds a bias (0 or -INF per cell) to the KQ
// mask: [n_kv, 1, 1, ns] per layer, or [n_kv, 1, n_head, ns] per query head (the shared mask is
// repeated to n_head rows first). This test builds the same ops on seeded random tensors and
// compares soft_max_ext (f32) and flash_attn_ext (f16 K/V/mask) with a double-precision
// reference that attends only to the rows each KV head keeps (gathered on the host).
//
// usage: test-kvp-mask        prints one line per case, exit status 1 if any case fails

#include "ggml.h"
#include "ggml-cpu.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

struct shape {
    int d;     // head size
    int n_kv;  // cells
    int n_tok; // queries
    int n_head;
    int n_head_kv;
};

static void fill(ggml_tensor * t, const std::vector<float> & v) {
    if (t->type == GGML_TYPE_F32) {
        memcpy(t->data, v.data(), v.size()*sizeof(float));
    } else {
        ggml_fp32_to_fp16_row(v.data(), (ggml_fp16_t *) t->data, v.size());
    }
}

// one case: returns the largest error against the reference
static double run_case(const shape & s, bool per_head, bool flash, uint32_t seed, double tol) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> ud(0.0f, 1.0f);

    const int d = s.d, n_kv = s.n_kv, T = s.n_tok, H = s.n_head, Hkv = s.n_head_kv, gqa = H/Hkv;

    std::vector<float> q(d*T*H), k(d*n_kv*Hkv), v(d*n_kv*Hkv);
    for (auto & x : q) x = nd(rng);
    for (auto & x : k) x = nd(rng);
    for (auto & x : v) x = nd(rng);
    if (flash) {
        // flash_attn_ext reads K, V (and Q) as f16: the reference sees the same values
        for (auto * a : { &q, &k, &v }) {
            for (auto & x : *a) x = ggml_fp16_to_fp32(ggml_fp32_to_fp16(x));
        }
    }

    // the shared mask: a few empty cells (holes) and the causal part for the last queries
    std::vector<float> m(n_kv*T, 0.0f);
    for (int j = 0; j < n_kv; ++j) {
        const bool hole = j % 11 == 5;
        for (int t = 0; t < T; ++t) {
            if (hole || j > n_kv - T + t) {
                m[t*n_kv + j] = -INFINITY;
            }
        }
    }

    // keep sets per KV head (per layer: one set for all); cell 0 is always kept
    std::vector<uint8_t> keep(Hkv*n_kv);
    for (int g = 0; g < Hkv; ++g) {
        for (int j = 0; j < n_kv; ++j) {
            keep[g*n_kv + j] = j == 0 || (per_head ? ud(rng) < 0.5f : (g == 0 ? ud(rng) < 0.5f : keep[j]));
        }
    }
    const int n_hb = per_head ? H : 1;
    std::vector<float> bias(n_kv*n_hb);
    for (int hb = 0; hb < n_hb; ++hb) {
        for (int j = 0; j < n_kv; ++j) {
            bias[hb*n_kv + j] = keep[(hb/gqa)*n_kv + j] ? 0.0f : -INFINITY;
        }
    }

    const float scale = 1.0f/sqrtf((float) d);

    // reference: per query head, attention over the kept (and unmasked) rows only
    std::vector<double> ref(d*T*H);
    for (int h = 0; h < H; ++h) {
        const int g = h/gqa;
        for (int t = 0; t < T; ++t) {
            std::vector<int> rows;
            for (int j = 0; j < n_kv; ++j) {
                if (keep[g*n_kv + j] && std::isfinite(m[t*n_kv + j])) {
                    rows.push_back(j);
                }
            }
            std::vector<double> w(rows.size());
            double mx = -1e300;
            for (size_t r = 0; r < rows.size(); ++r) {
                double dot = 0;
                for (int i = 0; i < d; ++i) {
                    dot += (double) q[(h*T + t)*d + i]*k[(g*n_kv + rows[r])*d + i];
                }
                w[r] = dot*scale;
                mx = std::max(mx, w[r]);
            }
            double z = 0;
            for (auto & x : w) { x = exp(x - mx); z += x; }
            for (int i = 0; i < d; ++i) {
                double acc = 0;
                for (size_t r = 0; r < rows.size(); ++r) {
                    acc += w[r]*v[(g*n_kv + rows[r])*d + i];
                }
                ref[(h*T + t)*d + i] = acc/z;
            }
        }
    }

    ggml_init_params ip = { 256u*1024*1024, nullptr, false };
    ggml_context * ctx = ggml_init(ip);

    const ggml_type tkv = flash ? GGML_TYPE_F16 : GGML_TYPE_F32;
    const ggml_type tm  = flash ? GGML_TYPE_F16 : GGML_TYPE_F32;

    ggml_tensor * tq = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, d, T, H, 1);
    ggml_tensor * tk = ggml_new_tensor_4d(ctx, tkv, d, n_kv, Hkv, 1);
    ggml_tensor * tv = ggml_new_tensor_4d(ctx, tkv, d, n_kv, Hkv, 1);
    ggml_tensor * tmask = ggml_new_tensor_4d(ctx, tm, n_kv, T, 1, 1);
    ggml_tensor * tbias = ggml_new_tensor_4d(ctx, tm, n_kv, 1, n_hb, 1);
    fill(tq, q); fill(tk, k); fill(tv, v); fill(tmask, m); fill(tbias, bias);

    // what build_kvp_mask() builds
    ggml_tensor * mask = tmask;
    if (n_hb > 1) {
        mask = ggml_repeat_4d(ctx, mask, n_kv, T, n_hb, 1);
    }
    mask = ggml_add(ctx, mask, ggml_view_4d(ctx, tbias, n_kv, 1, n_hb, 1, tbias->nb[1], tbias->nb[2], tbias->nb[3], 0));

    auto attn = [&](ggml_tensor * mask) -> ggml_tensor * { // [d, T, H]
        if (flash) {
            ggml_tensor * fa = ggml_flash_attn_ext(ctx, tq, tk, tv, mask, scale, 0.0f, 0.0f);
            return ggml_cont(ctx, ggml_permute(ctx, fa, 0, 2, 1, 3)); // [d, H, T] -> [d, T, H]
        }
        ggml_tensor * kq = ggml_mul_mat(ctx, tk, tq);               // [n_kv, T, H]
        kq = ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
        ggml_tensor * vt = ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_3d(ctx, tv, d, n_kv, Hkv))); // [n_kv, d, Hkv]
        return ggml_mul_mat(ctx, vt, kq);
    };

    ggml_tensor * out  = attn(mask);
    ggml_tensor * ctrl = attn(tmask); // control: the shared mask alone must be far from the reference

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_build_forward_expand(gf, ctrl);
    ggml_graph_compute_with_ctx(ctx, gf, 1);

    auto max_err = [&](const ggml_tensor * t) {
        double err = 0;
        const float * o = (const float *) t->data;
        for (size_t i = 0; i < ref.size(); ++i) {
            err = std::max(err, std::isfinite(o[i]) ? fabs(o[i] - ref[i]) : 1e30);
        }
        return err;
    };
    const double err      = max_err(out);
    const double err_ctrl = max_err(ctrl);

    ggml_free(ctx);

    const bool ok = err <= tol && err_ctrl > 50*tol;
    printf("  %s: per-%s %s n_kv=%d n_tok=%d n_head=%d/%d: max error %.3g (tolerance %.1g), without the bias %.3g\n",
            ok ? "ok  " : "FAIL", per_head ? "head " : "layer", flash ? "flash_attn_ext" : "soft_max_ext  ",
            n_kv, T, H, Hkv, err, tol, err_ctrl);

    return ok ? 0.0 : std::max(err, 1.0);
}

int main() {
    int n_fail = 0;
    const shape shapes[] = {
        { 64, 96, 1, 9, 3 },  // decode, SmolLM2's GQA 3
        { 64, 96, 7, 9, 3 },  // a small ubatch
        { 32, 300, 4, 8, 2 },
    };
    uint32_t seed = 1;
    for (const auto & s : shapes) {
        for (bool per_head : { false, true }) {
            for (bool flash : { false, true }) {
                n_fail += run_case(s, per_head, flash, seed++, flash ? 4e-3 : 1e-5) != 0.0;
            }
        }
    }
    printf("%s test-kvp-mask (%d failed)\n", n_fail ? "FAIL" : "PASS", n_fail);
    return n_fail ? 1 : 0;
}
