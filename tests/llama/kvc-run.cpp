// kvc-run: test harness for the kvcompress llama.cpp patch.
//
// Loads a model with the common parameters (so --kv-policy, --kv-policy-param, -c, -b, -ctk, -fa ...
// all work), prefills the prompt (-f FILE or -p TEXT) in -b chunks, decodes -n tokens greedily and
// prints one JSON line:
//   {"policy", "n_prompt", "answer", "cells_held", "cells_evicted", "kv_bytes_held", "prefill_ms", "decode_ms", "seqs": [...]}
//
// Own options (taken out before the common parser sees the arguments):
//   --kvc-prompt2 FILE   a second prompt, run as sequence 1 in the same context (use -np 2)
//   --kvc-logits FILE    append the logits of every sampled step (f32, n_vocab each) to FILE
//   --kvc-unified        one KV stream shared by all sequences (-kvu is not a completion option)
//   --kvc-joint          prefill all sequences together: each call holds n_batch/n_seqs tokens of each
//   --kvc-state-roundtrip  after the prefill, save sequence 0 (llama_state_seq_get_data), decode, then clear it,
//                        restore it (llama_state_seq_set_data) and decode again; the JSON gets
//                        "roundtrip": {"state_bytes", "answer", "cells_held"} of the first decode, the usual
//                        fields are of the decode after the restore; "state_same": the restored sequence saved
//                        again gives the same bytes
//   --kvc-truncate P     after the prefill, remove positions [P, end) of sequence 0 (llama_memory_seq_rm), feed the
//                        removed prompt tokens again (the logits at P and at the end to --kvc-logits) and print {"truncate": {"pos",
//                        "ok", "cells_before", "cells_after", "refeed_token"}} instead of decoding; with
//                        --kvc-state-roundtrip the sequence is saved, cleared and restored before the truncation
//   --kvc-attn-check     (patched, -fa off, a policy that keeps every cell) after the prefill, recompute the last
//                        token's attention in every layer the policy sees the way the library does (softmax of
//                        kq_scale * q.k over the captured query and K read from the cache) and compare it with the
//                        model's own softmax (the graph's kq_soft_max); prints {"attn_check": [{"il", "n_cells",
//                        "kq_scale", "tv_mean", "tv_max", "tv_inv_sqrt_d", "nucleus80_model", "nucleus80_lib",
//                        "nucleus80_inv_sqrt_d", "mass"}, ...]} (tv: total variation distance averaged / maximal over
//                        the query heads; *_inv_sqrt_d: with 1/sqrt(head_dim) applied to the captured query instead;
//                        nucleus80: fraction of the cells in the smallest set holding 80 % of the attention, head mean;
//                        mass: the model's attention on the sequence's cells) instead of decoding
//
// A KV cache policy error (common_kv_policy_take_error) stops the run: exit status 3, the message on stderr.
//
// Built in two flavours: with the patch (KVC_RUN_PATCHED) and against an unpatched llama.cpp
// (no --kv-policy; used to check that `--kv-policy none` changes nothing).

#include "arg.h"
#include "common.h"
#include "log.h"
#include "llama.h"
#ifdef KVC_RUN_PATCHED
#include "kv-policy.h"
#endif

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <map>
#include <clocale>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static std::string json_escape(const std::string & s) {
    std::string res;
    for (unsigned char c : s) {
        switch (c) {
            case '"':  res += "\\\""; break;
            case '\\': res += "\\\\"; break;
            case '\n': res += "\\n";  break;
            case '\r': res += "\\r";  break;
            case '\t': res += "\\t";  break;
            default:
                if (c < 0x20) {
                    char buf[8];
                    snprintf(buf, sizeof(buf), "\\u%04x", c);
                    res += buf;
                } else {
                    res += (char) c;
                }
        }
    }
    return res;
}

static bool read_file(const std::string & path, std::string & out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        return false;
    }
    std::stringstream ss;
    ss << f.rdbuf();
    out = ss.str();
    return true;
}

#ifdef KVC_RUN_PATCHED
// the last ubatch's rows of the last token, per model layer: the model's attention probabilities and the captured query
struct attn_capture {
    std::map<int, std::vector<float>> probs;   // [n_head][n_kv]
    std::map<int, int64_t>            n_kv;
    std::map<int, std::vector<float>> q;       // [n_head*head_dim]
    int64_t                           n_head = 0;
};

static bool attn_layer_of(const char * name, const char * prefix, int & il) {
    const size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) {
        return false;
    }
    il = atoi(name + n);
    return true;
}

static bool attn_capture_cb(struct ggml_tensor * t, bool ask, void * user) {
    auto * cap = (attn_capture *) user;
    int il = -1;
    const bool is_p = attn_layer_of(t->name, "kq_soft_max-", il);
    const bool is_q = !is_p && attn_layer_of(t->name, "kvp_q-", il);
    if (ask) {
        return is_p || is_q;
    }
    if ((!is_p && !is_q) || t->type != GGML_TYPE_F32) {
        return true;
    }
    if (is_p) {
        // [n_kv, n_tokens, n_head, n_stream]: the last token's row of every head (stream 0)
        const int64_t n_kv = t->ne[0];
        auto & dst = cap->probs[il];
        dst.resize((size_t) n_kv*t->ne[2]);
        for (int64_t h = 0; h < t->ne[2]; ++h) {
            ggml_backend_tensor_get(t, dst.data() + h*n_kv, (t->ne[1] - 1)*t->nb[1] + h*t->nb[2], n_kv*sizeof(float));
        }
        cap->n_kv[il] = n_kv;
        cap->n_head   = t->ne[2];
    } else {
        // [n_embd_q, n_rows]: the last captured row is the ubatch's last token
        auto & dst = cap->q[il];
        dst.resize((size_t) t->ne[0]);
        ggml_backend_tensor_get(t, dst.data(), (t->ne[1] - 1)*t->nb[1], t->ne[0]*sizeof(float));
    }
    return true;
}

// total variation distance between the model's and a recomputed attention, and the 80 % nucleus sizes
struct attn_cmp {
    double tv = 0.0;
    double nucleus_model = 0.0;
    double nucleus_lib = 0.0;
};

static double nucleus80(std::vector<double> p) {
    std::sort(p.begin(), p.end(), std::greater<double>());
    double  acc = 0.0;
    size_t  n   = 0;
    while (n < p.size() && acc < 0.8) {
        acc += p[n++];
    }
    return p.empty() ? 0.0 : (double) n/p.size();
}

static attn_cmp attn_compare(const float * p_model, const float * q, const float * k, int64_t n_cells, int64_t d,
                             int64_t k_stride, double scale) {
    std::vector<double> logit(n_cells), pm(n_cells);
    double mx = -INFINITY;
    for (int64_t j = 0; j < n_cells; ++j) {
        double dot = 0.0;
        for (int64_t c = 0; c < d; ++c) {
            dot += (double) q[c]*k[j*k_stride + c];
        }
        logit[j] = scale*dot;
        mx = std::max(mx, logit[j]);
    }
    double sum = 0.0;
    for (auto & l : logit) {
        l = exp(l - mx);
        sum += l;
    }
    attn_cmp res;
    for (int64_t j = 0; j < n_cells; ++j) {
        logit[j] /= sum;
        pm[j] = p_model[j];
        res.tv += 0.5*fabs(logit[j] - pm[j]);
    }
    res.nucleus_model = nucleus80(pm);
    res.nucleus_lib   = nucleus80(logit);
    return res;
}
#endif

struct seq_run {
    llama_seq_id             id;
    std::vector<llama_token> prompt;
    std::vector<llama_token> answer;
    llama_pos                n_past = 0;
    int32_t                  i_logits = -1; // batch index of the logits to sample from
    bool                     done = false;
};

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");

    std::string prompt2_path;
    std::string logits_path;
    bool        unified = false;
    bool        joint   = false;
    bool        roundtrip = false;
    int32_t     truncate_pos = -1;
    bool        attn_check = false;
    bool        rope_check = false;

    std::vector<char *> args;
    for (int i = 0; i < argc; ++i) {
        if (i + 1 < argc && strcmp(argv[i], "--kvc-prompt2") == 0) {
            prompt2_path = argv[++i];
        } else if (i + 1 < argc && strcmp(argv[i], "--kvc-logits") == 0) {
            logits_path = argv[++i];
        } else if (strcmp(argv[i], "--kvc-unified") == 0) {
            unified = true;
        } else if (strcmp(argv[i], "--kvc-joint") == 0) {
            joint = true;
        } else if (strcmp(argv[i], "--kvc-state-roundtrip") == 0) {
            roundtrip = true;
        } else if (strcmp(argv[i], "--kvc-attn-check") == 0) {
            attn_check = true;
        } else if (strcmp(argv[i], "--kvc-rope-check") == 0) {
            rope_check = true;
        } else if (i + 1 < argc && strcmp(argv[i], "--kvc-truncate") == 0) {
            truncate_pos = atoi(argv[++i]);
        } else {
            args.push_back(argv[i]);
        }
    }

    common_params params;
    params.n_predict = 16;
    params.sampling.temp = 0.0f;

    common_init();

    if (!common_params_parse((int) args.size(), args.data(), params, LLAMA_EXAMPLE_COMPLETION)) {
        return 1;
    }

    params.kv_unified = params.kv_unified || unified;

    if (!prompt2_path.empty() && params.n_parallel < 2) {
        params.n_parallel = 2;
    }

#ifdef KVC_RUN_PATCHED
    attn_capture cap;
    if (attn_check) {
        params.cb_eval           = attn_capture_cb;
        params.cb_eval_user_data = &cap;
    }
#else
    if (attn_check || rope_check) {
        LOG_ERR("%s: --kvc-attn-check and --kvc-rope-check need the patched build\n", __func__);
        return 1;
    }
#endif

    llama_backend_init();
    llama_numa_init(params.numa);

    auto llama_init = common_init_from_params(params);

    llama_model   * model = llama_init->model();
    llama_context * ctx   = llama_init->context();

    if (model == nullptr || ctx == nullptr) {
        LOG_ERR("%s: failed to load the model or create the context\n", __func__);
        return 1;
    }

    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);

    std::vector<seq_run> seqs;
    {
        seq_run s;
        s.id     = 0;
        s.prompt = common_tokenize(ctx, params.prompt, true, true);
        seqs.push_back(s);
    }
    if (!prompt2_path.empty()) {
        std::string text;
        if (!read_file(prompt2_path, text)) {
            LOG_ERR("%s: cannot read %s\n", __func__, prompt2_path.c_str());
            return 1;
        }
        seq_run s;
        s.id     = 1;
        s.prompt = common_tokenize(ctx, text, true, true);
        seqs.push_back(s);
    }

    FILE * f_logits = nullptr;
    if (!logits_path.empty()) {
        f_logits = fopen(logits_path.c_str(), "ab");
        if (!f_logits) {
            LOG_ERR("%s: cannot open %s\n", __func__, logits_path.c_str());
            return 1;
        }
    }

    const int32_t n_batch = llama_n_batch(ctx);

    common_batch batch(ctx);

    // prefill: every sequence in chunks of n_batch, one decode call per chunk
    // (--kvc-joint: one call holds a chunk of n_batch/n_seqs tokens of every sequence)
    const int64_t t_prefill_start = ggml_time_us();

    auto greedy = [&](int32_t idx) {
        const float * logits = llama_get_logits_ith(ctx, idx);
        if (f_logits) {
            fwrite(logits, sizeof(float), n_vocab, f_logits);
        }
        llama_token best = 0;
        for (int32_t t = 1; t < n_vocab; ++t) {
            if (logits[t] > logits[best]) {
                best = t;
            }
        }
        return best;
    };

    const int32_t n_chunk = joint ? std::max<int32_t>(1, n_batch/(int32_t) seqs.size()) : n_batch;

    // the policy failed during the last decode call (where: "prefill" or "decode step N")
    auto policy_failed = [&](const std::string & where) {
#ifdef KVC_RUN_PATCHED
        for (const auto & s : seqs) {
            std::string err;
            if (common_kv_policy_take_error(ctx, s.id, err)) {
                LOG_ERR("kvc-run: --kv-policy %s: seq %d, %s: %s\n", params.kv_policy.c_str(), s.id, where.c_str(), err.c_str());
                return true;
            }
        }
#endif
        GGML_UNUSED(where);
        return false;
    };

    for (size_t is = 0; is < seqs.size(); ++is) {
        // joint: all sequences advance together in the first pass
        if (joint && is > 0) {
            break;
        }
        while (true) {
            batch.clear();
            for (size_t js = joint ? 0 : is; js < (joint ? seqs.size() : is + 1); ++js) {
                auto & s = seqs[js];
                s.i_logits = -1;
                const int32_t n = (int32_t) s.prompt.size();
                for (int32_t j = 0; j < n_chunk && s.n_past < n; ++j) {
                    const bool last = s.n_past == n - 1;
                    const int32_t idx = batch.add(s.prompt[s.n_past], s.n_past, s.id, last);
                    s.n_past++;
                    if (last) {
                        s.i_logits = idx;
                    }
                }
            }
            if (batch.size() == 0) {
                break;
            }
            if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get()) != 0) {
                LOG_ERR("%s: prompt decode failed (cache full?)\n", __func__);
                return 1;
            }
            if (policy_failed("prefill")) {
                return 3;
            }
            // sample the first token of a finished prompt right away: later calls overwrite the logits
            for (size_t js = joint ? 0 : is; js < (joint ? seqs.size() : is + 1); ++js) {
                auto & s = seqs[js];
                if (s.i_logits >= 0) {
                    const llama_token best = greedy(s.i_logits);
                    s.answer.push_back(best);
                    s.done = llama_vocab_is_eog(vocab, best) || params.n_predict <= 1;
                }
            }
        }
    }
    const int64_t t_prefill_end = ggml_time_us();

    std::vector<uint8_t> state;
    std::vector<seq_run> seqs_saved;
    if (roundtrip) {
        if (seqs.size() != 1) {
            LOG_ERR("%s: --kvc-state-roundtrip takes one sequence\n", __func__);
            return 1;
        }
        state.resize(llama_state_seq_get_size(ctx, 0));
        if (state.empty() || llama_state_seq_get_data(ctx, state.data(), state.size(), 0) != state.size()) {
            LOG_ERR("%s: llama_state_seq_get_data failed\n", __func__);
            return 1;
        }
        seqs_saved = seqs;
    }

#ifdef KVC_RUN_PATCHED
    if (attn_check) {
        // the cache was empty and one sequence was prefilled: cell j holds position j (checked through "mass")
        const int32_t n_cells = llama_kv_policy_n_cells(ctx, 0);
        if (n_cells != (int32_t) seqs[0].prompt.size() || cap.q.empty()) {
            LOG_ERR("%s: --kvc-attn-check: %d cells for %zu prompt tokens, %zu captured layers (a policy that keeps every "
                    "cell and captures queries, e.g. snapkv tokens=100000)\n", __func__, n_cells, seqs[0].prompt.size(), cap.q.size());
            return 1;
        }
        const float kq_scale = common_kv_policy_kq_scale(ctx);
        std::vector<uint32_t> cells(n_cells);
        for (int32_t j = 0; j < n_cells; ++j) {
            cells[j] = j;
        }
        const int64_t n_head_kv = llama_model_n_head_kv(model);
        std::string out = "{\"attn_check\": [";
        int32_t l = 0; // the policy's layers are the captured ones, in model order
        for (const auto & [il, q] : cap.q) {
            if (!cap.probs.count(il)) {
                LOG_ERR("%s: --kvc-attn-check: no kq_soft_max for layer %d (use -fa off)\n", __func__, il);
                return 1;
            }
            const int64_t n_head = cap.n_head;
            const int64_t d      = (int64_t) q.size()/n_head;
            const int64_t n_kv   = cap.n_kv[il];
            std::vector<float> k((size_t) n_cells*n_head_kv*d);
            if (n_kv < n_cells || llama_kv_policy_read_k(ctx, 0, l, cells.data(), n_cells, k.data()) != 0) {
                LOG_ERR("%s: --kvc-attn-check: cannot read K of layer %d\n", __func__, il);
                return 1;
            }
            const double scale = kq_scale == 0.0f ? 1.0/sqrt((double) d) : kq_scale;
            double tv = 0.0, tv_max = 0.0, tv_d = 0.0, nm = 0.0, nl = 0.0, nd = 0.0, mass = 0.0;
            for (int64_t h = 0; h < n_head; ++h) {
                const float * pm = cap.probs[il].data() + h*n_kv;
                const float * qh = q.data() + h*d;
                const float * kg = k.data() + (h/(n_head/n_head_kv))*d;
                const attn_cmp a = attn_compare(pm, qh, kg, n_cells, d, n_head_kv*d, scale);
                const attn_cmp b = attn_compare(pm, qh, kg, n_cells, d, n_head_kv*d, 1.0/sqrt((double) d));
                tv += a.tv/n_head;
                tv_max = std::max(tv_max, a.tv);
                tv_d += b.tv/n_head;
                nm += a.nucleus_model/n_head;
                nl += a.nucleus_lib/n_head;
                nd += b.nucleus_lib/n_head;
                for (int32_t j = 0; j < n_cells; ++j) {
                    mass += pm[j]/n_head;
                }
            }
            char buf[512];
            snprintf(buf, sizeof(buf), "%s{\"il\": %d, \"n_cells\": %d, \"kq_scale\": %g, \"tv_mean\": %.6f, \"tv_max\": %.6f, "
                     "\"tv_inv_sqrt_d\": %.6f, \"nucleus80_model\": %.4f, \"nucleus80_lib\": %.4f, \"nucleus80_inv_sqrt_d\": %.4f, "
                     "\"mass\": %.6f}", l ? ", " : "", il, n_cells, kq_scale, tv, tv_max, tv_d, nm, nl, nd, mass);
            out += buf;
            ++l;
        }
        printf("%s]}\n", out.c_str());
        fflush(stdout);
        return 0;
    }
#endif

#ifdef KVC_RUN_PATCHED
    if (rope_check) {
        // the cache was empty and one sequence was prefilled: cell j holds position j. K of a token at position j is
        // its pre-RoPE key rotated by j, so where two positions hold the same token in the same context (a repeated
        // text), K at the later one should be K at the earlier one rotated by the distance with the rotation the
        // library was told. Compared with the plain cosine, the other pair layout (norm <-> neox) and base/100 (the
        // order of gemma3's sliding-window base against its global one).
        uint32_t type = 0, n_rot = 0;
        float base = 0.0f, fscale = 0.0f;
        const int32_t n_cells = llama_kv_policy_n_cells(ctx, 0);
        if (!common_kv_policy_rope(ctx, type, n_rot, base, fscale) || n_cells != (int32_t) seqs[0].prompt.size()) {
            LOG_ERR("%s: --kvc-rope-check: no policy, or %d cells for %zu prompt tokens (a policy that keeps every cell, "
                    "e.g. snapkv tokens=100000)\n", __func__, n_cells, seqs[0].prompt.size());
            return 1;
        }
        const auto & toks = seqs[0].prompt;
        std::vector<uint32_t> cells(n_cells);
        for (int32_t j = 0; j < n_cells; ++j) {
            cells[j] = j;
        }
        const int64_t n_head_kv = llama_model_n_head_kv(model);
        // the head size of K: <arch>.attention.key_length (gemma3: 256, not n_embd/n_head)
        int64_t d = llama_model_n_embd(model)/llama_model_n_head(model);
        {
            char arch[64] = "", val[64] = "";
            if (llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch)) > 0 &&
                llama_model_meta_val_str(model, (std::string(arch) + ".attention.key_length").c_str(), val, sizeof(val)) > 0) {
                d = atoll(val);
            }
        }
        // rotate x (one head) by delta positions; neox pairs (i, i + n_rot/2), norm pairs (2i, 2i + 1)
        auto rotate = [&](const float * x, float * y, int64_t delta, bool neox, double b) {
            std::copy(x, x + d, y);
            for (uint32_t i = 0; i < n_rot/2; ++i) {
                const double a  = delta*(double) fscale*pow(b, -2.0*i/n_rot);
                const int64_t i0 = neox ? i : 2*i;
                const int64_t i1 = neox ? i + n_rot/2 : 2*i + 1;
                y[i0] = (float) (x[i0]*cos(a) - x[i1]*sin(a));
                y[i1] = (float) (x[i0]*sin(a) + x[i1]*cos(a));
            }
        };
        auto cosine = [&](const float * a, const float * b) {
            double ab = 0.0, aa = 0.0, bb = 0.0;
            for (int64_t i = 0; i < d; ++i) {
                ab += (double) a[i]*b[i];
                aa += (double) a[i]*a[i];
                bb += (double) b[i]*b[i];
            }
            return ab/std::max(1e-30, sqrt(aa*bb));
        };
        std::string out = string_format("{\"rope_check\": {\"type\": %u, \"n_rot\": %u, \"freq_base\": %g, \"freq_scale\": %g, "
                                        "\"layers\": [", type, n_rot, base, fscale);
        std::vector<float> k((size_t) n_cells*n_head_kv*d), y(d);
        // the policy's layers, in model order, until read_k refuses the index
        for (int32_t l = 0; n_rot > 0 && llama_kv_policy_read_k(ctx, 0, l, cells.data(), n_cells, k.data()) == 0; ++l) {
            double c_rot = 0.0, c_raw = 0.0, c_other = 0.0, c_base = 0.0;
            int64_t n_pairs = 0;
            for (int32_t j = n_cells/2; j < n_cells; ++j) {
                for (int32_t delta = 1; delta <= 64 && j + delta < n_cells; ++delta) {
                    if (toks[j] != toks[j + delta]) {
                        continue;
                    }
                    for (int64_t h = 0; h < n_head_kv; ++h) {
                        const float * a = k.data() + ((size_t) j*n_head_kv + h)*d;
                        const float * b = k.data() + ((size_t) (j + delta)*n_head_kv + h)*d;
                        rotate(a, y.data(), delta, type == 2, base);
                        c_rot += cosine(y.data(), b);
                        rotate(a, y.data(), delta, type != 2, base);
                        c_other += cosine(y.data(), b);
                        rotate(a, y.data(), delta, type == 2, base/100.0);
                        c_base += cosine(y.data(), b);
                        c_raw += cosine(a, b);
                        ++n_pairs;
                    }
                }
            }
            const double inv = 1.0/std::max<int64_t>(1, n_pairs);
            out += string_format("%s{\"l\": %d, \"pairs\": %lld, \"cos_rot\": %.5f, \"cos_raw\": %.5f, \"cos_other_layout\": %.5f, \"cos_base_div100\": %.5f}",
                                 l ? ", " : "", l, (long long) n_pairs, c_rot*inv, c_raw*inv, c_other*inv, c_base*inv);
        }
        printf("%s]}}\n", out.c_str());
        fflush(stdout);
        return 0;
    }
#endif

    if (truncate_pos >= 0) {
        llama_memory_t mem = llama_get_memory(ctx);
        if (roundtrip) {
            // with --kvc-state-roundtrip: the sequence saved above is cleared and restored first, so the truncation
            // acts on what the state carried
            llama_memory_seq_rm(mem, 0, -1, -1);
            if (llama_state_seq_set_data(ctx, state.data(), state.size(), 0) != state.size()) {
                LOG_ERR("%s: llama_state_seq_set_data failed\n", __func__);
                return 1;
            }
        }
        const int32_t before = llama_memory_seq_pos_max(mem, 0) + 1;
#ifdef KVC_RUN_PATCHED
        const int32_t cells_before = llama_kv_policy_n_cells(ctx, 0);
        const bool    ok           = llama_memory_seq_rm(mem, 0, truncate_pos, -1);
        const int32_t cells_after  = llama_kv_policy_n_cells(ctx, 0);
#else
        const int32_t cells_before = before;
        const bool    ok           = llama_memory_seq_rm(mem, 0, truncate_pos, -1);
        const int32_t cells_after  = llama_memory_seq_pos_max(mem, 0) + 1;
#endif
        // the removed prompt tokens fed again: the logits at the first of them (what a row still holding a removed
        // token would leak to most: the tokens after it) and at the prompt's end (--kvc-logits; computed before the
        // policy runs again) show what the truncated sequence still holds
        int32_t refeed = -1;
        const int32_t n_prompt = (int32_t) seqs[0].prompt.size();
        for (int32_t p = truncate_pos; ok && p < n_prompt; ) {
            batch.clear();
            int32_t idx_first = -1;
            int32_t idx_last  = -1;
            for (int32_t j = 0; j < n_batch && p < n_prompt; ++j, ++p) {
                const bool first = p == truncate_pos && p < n_prompt - 1;
                const int32_t i = batch.add(seqs[0].prompt[p], p, 0, first || p == n_prompt - 1);
                idx_first = first ? i : idx_first;
                idx_last  = p == n_prompt - 1 ? i : idx_last;
            }
            if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get()) != 0) {
                LOG_ERR("%s: decode after the truncation failed\n", __func__);
                return 1;
            }
            if (idx_first >= 0) {
                greedy(idx_first);
            }
            if (idx_last >= 0) {
                refeed = greedy(idx_last);
            }
        }
        printf("{\"truncate\": {\"pos\": %d, \"ok\": %s, \"cells_before\": %d, \"cells_after\": %d, \"pos_end\": %d, \"refeed_token\": %d}}\n",
               truncate_pos, ok ? "true" : "false", cells_before, cells_after, before, refeed);
        fflush(stdout);
        return 0;
    }

    // greedy decode, all sequences in one batch per step
    int32_t n_decoded = 0;
    std::string rt_answer;
    int32_t     rt_held = -1;
    bool        rt_same = false;
    for (int pass = 0; pass < (roundtrip ? 2 : 1); ++pass) {
        if (pass == 1) {
            for (size_t i = 0; i < seqs[0].answer.size() && !llama_vocab_is_eog(vocab, seqs[0].answer[i]); ++i) {
                rt_answer += common_token_to_piece(ctx, seqs[0].answer[i]);
            }
#ifdef KVC_RUN_PATCHED
            rt_held = llama_kv_policy_n_cells(ctx, 0);
#else
            rt_held = llama_memory_seq_pos_max(llama_get_memory(ctx), 0) + 1;
#endif

            llama_memory_seq_rm(llama_get_memory(ctx), 0, -1, -1);
            if (llama_state_seq_set_data(ctx, state.data(), state.size(), 0) != state.size()) {
                LOG_ERR("%s: llama_state_seq_set_data failed\n", __func__);
                return 1;
            }
            // the restored sequence saved again: the same bytes (positions, rows, the policy's masks) in the same
            // order, wherever the restore put its cells
            std::vector<uint8_t> again(llama_state_seq_get_size(ctx, 0));
            rt_same = !again.empty() && llama_state_seq_get_data(ctx, again.data(), again.size(), 0) == again.size() && again == state;
            seqs = seqs_saved;
            n_decoded = 0;
        }
        while (true) {
            batch.clear();
            for (auto & s : seqs) {
                s.i_logits = -1;
                if (s.done) {
                    continue;
                }
                s.i_logits = batch.add(s.answer.back(), s.n_past++, s.id, true);
            }
            if (batch.size() == 0) {
                break;
            }
            if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch.get()) != 0) {
                LOG_ERR("%s: decode failed at step %d\n", __func__, n_decoded);
                return 1;
            }
            if (policy_failed("decode step " + std::to_string(n_decoded + 1))) {
                return 3;
            }
            n_decoded++;
            for (auto & s : seqs) {
                if (s.i_logits < 0) {
                    continue;
                }
                const llama_token best = greedy(s.i_logits);
                s.answer.push_back(best);
                s.done = llama_vocab_is_eog(vocab, best) || (int32_t) s.answer.size() >= params.n_predict;
            }
        }
    }
    const int64_t t_decode_end = ggml_time_us();

    if (f_logits) {
        fclose(f_logits);
    }

    // bytes of one cell in every layer (K + V)
    const int32_t n_layer   = llama_model_n_layer(model);
    const int32_t n_head    = llama_model_n_head(model);
    const int32_t n_head_kv = llama_model_n_head_kv(model);
    const int64_t n_embd_gqa = (int64_t) llama_model_n_embd(model)/std::max(1, n_head)*n_head_kv;
    const size_t  cell_bytes = (size_t) n_layer*(ggml_row_size(params.cache_type_k, n_embd_gqa) +
                                                 ggml_row_size(params.cache_type_v, n_embd_gqa));

    std::string policy = "none";
#ifdef KVC_RUN_PATCHED
    policy = params.kv_policy;
#endif

    std::string out_seqs;
    std::string answer0;
    int64_t total_held    = 0;
    uint64_t total_evicted = 0;
    for (auto & s : seqs) {
        std::string answer;
        for (size_t i = 0; i < s.answer.size(); ++i) {
            if (llama_vocab_is_eog(vocab, s.answer[i])) {
                break;
            }
            answer += common_token_to_piece(ctx, s.answer[i]);
        }

        int32_t  held    = llama_memory_seq_pos_max(llama_get_memory(ctx), s.id) + 1;
        uint64_t evicted = 0;
        uint32_t kept_max = 0; // the most cells a layer kept at the last run of the policy
#ifdef KVC_RUN_PATCHED
        const auto st = common_kv_policy_get_stats(ctx, s.id);
        held    = st.n_held;
        evicted = st.n_evicted;
        for (uint32_t n : st.layer_kept) {
            kept_max = std::max(kept_max, n);
        }
#endif
        total_held    += held;
        total_evicted += evicted;

        char buf[256];
        snprintf(buf, sizeof(buf), "%s{\"seq\": %d, \"n_prompt\": %zu, \"cells_held\": %d, \"cells_evicted\": %" PRIu64
                ", \"layer_kept_max\": %u, \"answer\": \"", out_seqs.empty() ? "" : ", ", s.id, s.prompt.size(), held, evicted, kept_max);
        out_seqs += buf;
        out_seqs += json_escape(answer) + "\"}";

        if (s.id == 0) {
            answer0 = answer;
        }
    }

    std::string out_rt;
    if (roundtrip) {
        char buf[128];
        snprintf(buf, sizeof(buf), ", \"roundtrip\": {\"state_bytes\": %zu, \"cells_held\": %d, \"state_same\": %s, \"answer\": \"",
                 state.size(), rt_held, rt_same ? "true" : "false");
        out_rt = buf + json_escape(rt_answer) + "\"}";
    }

    printf("{\"policy\": \"%s\", \"n_prompt\": %zu, \"answer\": \"%s\", \"cells_held\": %" PRId64 ", \"cells_evicted\": %" PRIu64
           ", \"kv_bytes_held\": %" PRId64 ", \"prefill_ms\": %.1f, \"decode_ms\": %.1f, \"n_decoded\": %d, \"n_ctx\": %u, \"seqs\": [%s]%s}\n",
           json_escape(policy).c_str(), seqs[0].prompt.size(), json_escape(answer0).c_str(),
           total_held, total_evicted, (int64_t) (total_held*cell_bytes),
           (t_prefill_end - t_prefill_start)/1000.0, (t_decode_end - t_prefill_end)/1000.0, n_decoded,
           llama_n_ctx(ctx), out_seqs.c_str(), out_rt.c_str());
    fflush(stdout);

    return 0;
}
