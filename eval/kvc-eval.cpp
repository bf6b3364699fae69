// kvc-eval: fidelity and retrieval driver for the kvcompress llama.cpp patch.
//
// Loads the model once (common parameters: -m, -c, -b, -t, -ctk, -fa ...), then runs every job of
// a JSONL file in the same context, one job at a time on sequence 0, and prints one JSON line per
// job on stdout (flushed after each job). The KV policy of a job is set with
// common_kv_policy_set_seq(), so --kv-policy on the command line is not needed.
//
//   kvc-eval -m MODEL -c 4096 -b 512 -t 1 --eval-jobs jobs.jsonl [--eval-out results.jsonl]
//
// Job fields (unknown fields are copied to the output under "tag"):
//   id            string, echoed
//   mode          "aware"    prefill context+question, greedy-decode n_predict tokens
//                 "agnostic" prefill the context (logits on its last token, so the policy runs),
//                            then the question as a second batch, then decode
//                 "fidelity" teacher-forced: prefill the context, then feed the continuation one
//                            token at a time through the full cache (policy none) and through the
//                            policy; per position KL(p_full || p_policy), top-1 agreement, |dp| of
//                            the reference (next) token. The full-cache run is cached and reused by
//                            the following jobs with the same context and continuation.
//   policy        policy name (default "none"), params: ["k=v", ...]
//   share_prefix  (default true) the head of the prompt (context in fidelity mode) is prefilled once
//                 and restored from a copy by the next jobs on the same text (see prefill_prompt:
//                 prefill_ms is then the restore and the tail);
//                 false for scorers that accumulate the queries of every prefill call (h2o).
//                 --eval-no-share turns it off for every job (the equivalence test compares both)
//   context, question, continuation: text; n_predict: tokens to decode (default 16)
//
// Output (aware/agnostic): answer, n_shared (tokens restored from the shared head, 0 if none), n_prompt, n_context, cells_held_prefill (after the context),
// cells_held_prompt (after the whole prompt), cells_held (at the end), cells_evicted, policy_runs,
// kv_bytes_held, layer_kept, prefill_ms, decode_ms.
// Output (fidelity): n_context, n_positions, kl_mean, kl_median, kl_p99, kl_max, top1,
// top1_confident (top-1 agreement where the full cache's p1 - p2 >= 0.1), n_confident,
// flip_margin_median (the full cache's p1 - p2 where top-1 differs), dp_mean,
// dp_max, nll_full, nll_policy, cells_held_prefill, kept_mean (cells held / tokens seen, averaged
// over the positions: the policy runs again every `interval` tokens), cells_held, kv_bytes_held ...
//
// A failing job prints {"id", "error"} and the driver goes on; the exit status is 1 if any failed.

#include "arg.h"
#include "common.h"
#include "log.h"
#include "llama.h"
#include "kv-policy.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

using json = nlohmann::ordered_json;

struct eval_ctx {
    llama_model       * model = nullptr;
    llama_context     * ctx   = nullptr;
    const llama_vocab * vocab = nullptr;
    int32_t n_vocab   = 0;
    int32_t n_batch   = 0;
    size_t  cell_bytes = 0;
    common_batch * batch = nullptr;

    // cached full-cache reference of the last fidelity text
    std::string ref_key;
    std::vector<float>       ref_logp;  // n_pos * n_vocab
    std::vector<llama_token> ref_top1;
    std::vector<float>       ref_margin; // p(top-1) - p(top-2) of the full cache per position
    double ref_prefill_ms = 0.0;

    // the shared head of the last prompt (prefill_prompt)
    bool share = true;
    std::vector<llama_token> head_toks;
    std::vector<uint8_t>     head_state;
};

static const llama_seq_id SEQ = 0;

struct eval_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

static void set_policy(eval_ctx & ec, const std::string & name, const std::vector<std::string> & params) {
    llama_memory_clear(llama_get_memory(ec.ctx), true);
    std::string err;
    if (!common_kv_policy_set_seq(ec.ctx, SEQ, name, params, err)) {
        throw eval_error("policy '" + name + "': " + err);
    }
    common_kv_policy_reset_stats(ec.ctx, SEQ);
}

// decode toks at positions n_past.. in n_batch chunks; logits on the last token if want_logits
static void prefill(eval_ctx & ec, const std::vector<llama_token> & toks, llama_pos & n_past, bool want_logits, const char * what) {
    const int32_t n = (int32_t) toks.size();
    for (int32_t i = 0; i < n; i += ec.n_batch) {
        ec.batch->clear();
        const int32_t n_cur = std::min(ec.n_batch, n - i);
        for (int32_t j = 0; j < n_cur; ++j) {
            ec.batch->add(toks[i + j], n_past++, SEQ, want_logits && i + j == n - 1);
        }
        const int32_t rc = llama_process(ec.ctx, LLAMA_PROCESS_TYPE_DECODE, ec.batch->get());
        if (rc != 0) {
            throw eval_error(string_format("decode of the %s failed at token %d of %d (rc %d; cache full? raise -c)", what, i, n, rc));
        }
    }
}

// A prompt is prefilled as a head (n_batch calls, no logits) and a tail of kTailMin..2*kTailMin-1
// tokens (one call), and the head is prefilled once and restored from a copy for every job on the
// same text. A policy plans nothing before logits are requested (no cap binds with -c sized to the
// prompt, and decode-interval runs need one-token calls), and the patch captures queries per call:
// so a job that restores the head sees the same cells, and from the tail the same newest query rows
// (more than any default window), as one that prefills it. Scorers whose query ring spans calls
// (h2o) run unshared, with the same calls. Returns the tokens restored from the copy.
static const int32_t kTailMin = 64;

static int32_t prefill_prompt(eval_ctx & ec, const std::vector<llama_token> & toks, llama_pos & n_past, bool want_logits,
                              const char * what, bool share, const std::string & policy, const std::vector<std::string> & params) {
    const int32_t n = (int32_t) toks.size();
    const int32_t n_head = n >= 2*kTailMin && n_past == 0 ? (n - kTailMin)/kTailMin*kTailMin : 0;
    if (n_head == 0) {
        prefill(ec, toks, n_past, want_logits, what);
        return 0;
    }
    const std::vector<llama_token> head(toks.begin(), toks.begin() + n_head);
    const std::vector<llama_token> tail(toks.begin() + n_head, toks.end());
    if (!share || !ec.share) {
        prefill(ec, head, n_past, false, what);
        prefill(ec, tail, n_past, want_logits, what);
        return 0;
    }
    if (ec.head_toks != head) {
        ec.head_toks.clear();
        set_policy(ec, "none", {});
        llama_pos p = 0;
        prefill(ec, head, p, false, what);
        ec.head_state.resize(llama_state_seq_get_size(ec.ctx, SEQ));
        if (llama_state_seq_get_data(ec.ctx, ec.head_state.data(), ec.head_state.size(), SEQ) != ec.head_state.size()) {
            throw eval_error("cannot copy the state of the prompt's head");
        }
        ec.head_toks = head;
    }
    set_policy(ec, policy, params);
    if (llama_state_seq_set_data(ec.ctx, ec.head_state.data(), ec.head_state.size(), SEQ) == 0) {
        throw eval_error("cannot restore the state of the prompt's head");
    }
    n_past = n_head;
    prefill(ec, tail, n_past, want_logits, what);
    return n_head;
}

static void decode_one(eval_ctx & ec, llama_token tok, llama_pos & n_past) {
    ec.batch->clear();
    ec.batch->add(tok, n_past++, SEQ, true);
    const int32_t rc = llama_process(ec.ctx, LLAMA_PROCESS_TYPE_DECODE, ec.batch->get());
    if (rc != 0) {
        throw eval_error(string_format("decode failed at position %d (rc %d; cache full? raise -c)", n_past - 1, rc));
    }
}

static llama_token argmax(const float * logits, int32_t n) {
    llama_token best = 0;
    for (int32_t t = 1; t < n; ++t) {
        if (logits[t] > logits[best]) {
            best = t;
        }
    }
    return best;
}

static void log_softmax(const float * logits, int32_t n, float * out) {
    float mx = logits[0];
    for (int32_t i = 1; i < n; ++i) {
        mx = std::max(mx, logits[i]);
    }
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) {
        sum += std::exp((double) logits[i] - mx);
    }
    const float lse = mx + (float) std::log(sum);
    for (int32_t i = 0; i < n; ++i) {
        out[i] = logits[i] - lse;
    }
}

static std::vector<llama_token> tokenize(eval_ctx & ec, const std::string & text, bool bos) {
    return common_tokenize(ec.ctx, text, bos, true);
}

static void add_stats(eval_ctx & ec, json & out) {
    const auto st = common_kv_policy_get_stats(ec.ctx, SEQ);
    out["cells_held"]    = st.n_held;
    out["cells_evicted"] = st.n_evicted;
    out["policy_runs"]   = st.n_runs;
    out["kv_bytes_held"] = (int64_t) st.n_held * (int64_t) ec.cell_bytes;
    out["layer_kept"]    = st.layer_kept;
}

static int32_t held(eval_ctx & ec) {
    return common_kv_policy_get_stats(ec.ctx, SEQ).n_held;
}

static void run_task(eval_ctx & ec, const json & job, const std::string & mode, const std::string & policy,
                     const std::vector<std::string> & params, json & out) {
    const bool share = job.value("share_prefix", true);
    const std::string context  = job.value("context", "");
    const std::string question = job.value("question", "");
    const int32_t n_predict = job.value("n_predict", 16);
    if (context.empty()) {
        throw eval_error("job has no context");
    }

    std::vector<llama_token> ctx_toks, q_toks, all_toks;
    if (mode == "aware") {
        all_toks = tokenize(ec, context + question, true);
    } else {
        ctx_toks = tokenize(ec, context, true);
        q_toks   = question.empty() ? std::vector<llama_token>() : tokenize(ec, question, false);
    }

    set_policy(ec, policy, params);
    llama_pos n_past = 0;
    const int64_t t0 = ggml_time_us();
    int32_t held_prefill = -1;
    int32_t n_shared = 0;
    if (mode == "aware") {
        n_shared = prefill_prompt(ec, all_toks, n_past, true, "prompt", share, policy, params);
        held_prefill = held(ec);
        out["n_prompt"]  = all_toks.size();
    } else {
        n_shared = prefill_prompt(ec, ctx_toks, n_past, true, "context", share, policy, params);
        held_prefill = held(ec);
        if (!q_toks.empty()) {
            prefill(ec, q_toks, n_past, true, "question");
        }
        out["n_prompt"]  = ctx_toks.size() + q_toks.size();
        out["n_context"] = ctx_toks.size();
    }
    const int32_t held_prompt = held(ec);
    const int64_t t1 = ggml_time_us();

    std::vector<llama_token> answer;
    answer.push_back(argmax(llama_get_logits_ith(ec.ctx, -1), ec.n_vocab));
    int32_t n_decoded = 0;
    while (!llama_vocab_is_eog(ec.vocab, answer.back()) && (int32_t) answer.size() < n_predict) {
        decode_one(ec, answer.back(), n_past);
        n_decoded++;
        answer.push_back(argmax(llama_get_logits_ith(ec.ctx, -1), ec.n_vocab));
    }
    const int64_t t2 = ggml_time_us();

    std::string text;
    for (llama_token t : answer) {
        if (llama_vocab_is_eog(ec.vocab, t)) {
            break;
        }
        text += common_token_to_piece(ec.ctx, t);
    }

    out["answer"] = text;
    out["n_shared"] = n_shared;
    out["cells_held_prefill"] = held_prefill;
    out["cells_held_prompt"]  = held_prompt;
    add_stats(ec, out);
    out["n_decoded"]  = n_decoded;
    out["prefill_ms"] = (t1 - t0) / 1000.0;
    out["decode_ms"]  = (t2 - t1) / 1000.0;
}

// teacher-forced pass: prefill ctx_toks, then feed cont[0..n-2]; calls fn(j, logits) for the
// logits after cont[j] (predicting cont[j+1])
template <typename F>
static void teacher_force(eval_ctx & ec, const std::vector<llama_token> & ctx_toks, const std::vector<llama_token> & cont,
                          const std::string & policy, const std::vector<std::string> & params, bool share,
                          double & prefill_ms, double & decode_ms, int32_t & held_prefill, F fn) {
    set_policy(ec, policy, params);
    llama_pos n_past = 0;
    const int64_t t0 = ggml_time_us();
    prefill_prompt(ec, ctx_toks, n_past, true, "context", share, policy, params);
    held_prefill = held(ec);
    const int64_t t1 = ggml_time_us();
    for (size_t j = 0; j + 1 < cont.size(); ++j) {
        decode_one(ec, cont[j], n_past);
        fn(j, llama_get_logits_ith(ec.ctx, -1));
    }
    const int64_t t2 = ggml_time_us();
    prefill_ms = (t1 - t0) / 1000.0;
    decode_ms  = (t2 - t1) / 1000.0;
}

static double percentile(std::vector<double> v, double q) {
    if (v.empty()) {
        return 0.0;
    }
    std::sort(v.begin(), v.end());
    const double idx = q * (v.size() - 1);
    const size_t lo = (size_t) std::floor(idx);
    const size_t hi = std::min(v.size() - 1, lo + 1);
    return v[lo] + (v[hi] - v[lo]) * (idx - lo);
}

static void run_fidelity(eval_ctx & ec, const json & job, const std::string & policy, const std::vector<std::string> & params, json & out) {
    const std::string context = job.value("context", "");
    const std::string contin  = job.value("continuation", "");
    if (context.empty() || contin.empty()) {
        throw eval_error("a fidelity job needs a context and a continuation");
    }
    const auto ctx_toks = tokenize(ec, context, true);
    const auto cont     = tokenize(ec, contin, false);
    if (cont.size() < 2) {
        throw eval_error("the continuation is shorter than 2 tokens");
    }
    const size_t n_pos = cont.size() - 1;
    const int32_t V = ec.n_vocab;
    const bool share = job.value("share_prefix", true);

    double pf_ms = 0, dc_ms = 0;
    int32_t held_prefill = -1;

    const std::string key = context + std::string(1, '\0') + contin;
    if (ec.ref_key != key) {
        ec.ref_key.clear();
        ec.ref_logp.resize(n_pos * (size_t) V);
        ec.ref_top1.resize(n_pos);
        ec.ref_margin.resize(n_pos);
        teacher_force(ec, ctx_toks, cont, "none", {}, share, pf_ms, dc_ms, held_prefill, [&](size_t j, const float * logits) {
            float * lp = ec.ref_logp.data() + j * V;
            log_softmax(logits, V, lp);
            ec.ref_top1[j] = argmax(logits, V);
            float second = -INFINITY;
            for (int32_t t = 0; t < V; ++t) {
                if (t != ec.ref_top1[j]) {
                    second = std::max(second, lp[t]);
                }
            }
            ec.ref_margin[j] = std::exp(lp[ec.ref_top1[j]]) - std::exp(second);
        });
        ec.ref_key = key;
        ec.ref_prefill_ms = pf_ms;
        out["ref_prefill_ms"] = pf_ms;
        out["ref_decode_ms"]  = dc_ms;
    }

    std::vector<float>  logp(V);
    std::vector<double> kl(n_pos), dp(n_pos);
    double kept_sum = 0.0; // cells held / tokens seen, averaged over the positions
    double nll_full = 0.0, nll_pol = 0.0;
    size_t n_top1 = 0;
    // a top-1 flip where the full cache itself hesitates (margin < CONFIDENT) is a coin toss between
    // near-equal tokens; reported apart so that the gate can be read for the tokens the model is sure of
    const float CONFIDENT = 0.1f;
    size_t n_conf = 0, n_conf_top1 = 0;
    std::vector<double> flip_margin;
    teacher_force(ec, ctx_toks, cont, policy, params, share, pf_ms, dc_ms, held_prefill, [&](size_t j, const float * logits) {
        log_softmax(logits, V, logp.data());
        const float * lf = ec.ref_logp.data() + j * V;
        double s = 0.0;
        for (int32_t t = 0; t < V; ++t) {
            const double pf = std::exp((double) lf[t]);
            if (pf > 0.0) {
                s += pf * ((double) lf[t] - (double) logp[t]);
            }
        }
        kl[j] = std::max(0.0, s);
        const bool same = argmax(logits, V) == ec.ref_top1[j];
        n_top1 += same;
        if (ec.ref_margin[j] >= CONFIDENT) {
            n_conf      += 1;
            n_conf_top1 += same;
        }
        if (!same) {
            flip_margin.push_back(ec.ref_margin[j]);
        }
        const llama_token ref = cont[j + 1];
        dp[j] = std::fabs(std::exp((double) lf[ref]) - std::exp((double) logp[ref]));
        nll_full -= lf[ref];
        nll_pol  -= logp[ref];
        kept_sum += (double) held(ec) / (double) (ctx_toks.size() + j + 1);
    });

    double kl_sum = 0.0, dp_sum = 0.0, dp_max = 0.0;
    for (size_t j = 0; j < n_pos; ++j) {
        kl_sum += kl[j];
        dp_sum += dp[j];
        dp_max = std::max(dp_max, dp[j]);
    }
    out["n_context"]   = ctx_toks.size();
    out["n_positions"] = n_pos;
    out["kl_mean"]     = kl_sum / n_pos;
    out["kl_median"]   = percentile(kl, 0.5);
    out["kl_p99"]      = percentile(kl, 0.99);
    out["kl_max"]      = *std::max_element(kl.begin(), kl.end());
    out["top1"]        = (double) n_top1 / n_pos;
    out["top1_confident"]    = n_conf ? (double) n_conf_top1 / n_conf : 1.0;
    out["n_confident"]       = n_conf;
    out["flip_margin_median"] = flip_margin.empty() ? 0.0 : percentile(flip_margin, 0.5);
    out["dp_mean"]     = dp_sum / n_pos;
    out["dp_max"]      = dp_max;
    out["nll_full"]    = nll_full / n_pos;
    out["nll_policy"]  = nll_pol / n_pos;
    out["cells_held_prefill"] = held_prefill;
    out["kept_mean"]   = kept_sum / n_pos;
    add_stats(ec, out);
    out["prefill_ms"]  = pf_ms;
    out["decode_ms"]   = dc_ms;
}

static void print_usage(const char * argv0) {
    fprintf(stderr, "usage: %s -m MODEL [-c N -b N -t N ...] --eval-jobs FILE.jsonl [--eval-out FILE.jsonl] [--eval-no-share]\n", argv0);
    fprintf(stderr, "  jobs: {\"id\", \"mode\": aware|agnostic|fidelity, \"policy\", \"params\": [\"k=v\"], \"context\", \"question\", \"continuation\", \"n_predict\"}\n");
}

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");

    std::string jobs_path;
    std::string out_path;
    bool no_share = false;

    std::vector<char *> args;
    for (int i = 0; i < argc; ++i) {
        if (i + 1 < argc && strcmp(argv[i], "--eval-jobs") == 0) {
            jobs_path = argv[++i];
        } else if (i + 1 < argc && strcmp(argv[i], "--eval-out") == 0) {
            out_path = argv[++i];
        } else if (strcmp(argv[i], "--eval-no-share") == 0) {
            no_share = true;
        } else {
            args.push_back(argv[i]);
        }
    }
    if (jobs_path.empty()) {
        print_usage(argv[0]);
        return 2;
    }

    // read and validate every job before loading the model
    std::vector<json> jobs;
    {
        std::ifstream f(jobs_path);
        if (!f) {
            fprintf(stderr, "kvc-eval: cannot read %s\n", jobs_path.c_str());
            return 1;
        }
        std::string line;
        int lineno = 0;
        while (std::getline(f, line)) {
            lineno++;
            if (line.find_first_not_of(" \t\r") == std::string::npos) {
                continue;
            }
            json j = json::parse(line, nullptr, false);
            if (j.is_discarded() || !j.is_object()) {
                fprintf(stderr, "kvc-eval: %s:%d: not a JSON object\n", jobs_path.c_str(), lineno);
                return 1;
            }
            const std::string mode = j.value("mode", "");
            if (mode != "aware" && mode != "agnostic" && mode != "fidelity") {
                fprintf(stderr, "kvc-eval: %s:%d: mode must be aware, agnostic or fidelity (got '%s')\n", jobs_path.c_str(), lineno, mode.c_str());
                return 1;
            }
            if (j.contains("params") && !j["params"].is_array()) {
                fprintf(stderr, "kvc-eval: %s:%d: params must be an array of \"key=value\" strings\n", jobs_path.c_str(), lineno);
                return 1;
            }
            std::string err;
            const std::vector<std::string> params = j.value("params", std::vector<std::string>());
            if (!common_kv_policy_check(j.value("policy", "none"), params, err)) {
                fprintf(stderr, "kvc-eval: %s:%d: policy %s: %s\n", jobs_path.c_str(), lineno, j.value("policy", "none").c_str(), err.c_str());
                return 1;
            }
            jobs.push_back(std::move(j));
        }
    }
    if (!common_kv_policy_available()) {
        fprintf(stderr, "kvc-eval: llama-common was built without libkvcompress (-DLLAMA_KVCOMPRESS=ON)\n");
        return 1;
    }

    common_params params;
    params.sampling.temp = 0.0f;

    common_init();

    if (!common_params_parse((int) args.size(), args.data(), params, LLAMA_EXAMPLE_COMPLETION)) {
        print_usage(argv[0]);
        return 1;
    }
    if (!params.kv_policy.empty() && params.kv_policy != "none") {
        fprintf(stderr, "kvc-eval: --kv-policy is ignored; the policy of each job comes from the jobs file\n");
        params.kv_policy = "none";
    }

    llama_backend_init();
    llama_numa_init(params.numa);

    auto llama_init = common_init_from_params(params);

    eval_ctx ec;
    ec.model = llama_init->model();
    ec.ctx   = llama_init->context();
    if (ec.model == nullptr || ec.ctx == nullptr) {
        fprintf(stderr, "kvc-eval: failed to load the model or create the context\n");
        return 1;
    }
    ec.vocab   = llama_model_get_vocab(ec.model);
    ec.n_vocab = llama_vocab_n_tokens(ec.vocab);
    ec.n_batch = llama_n_batch(ec.ctx);
    ec.share   = !no_share;

    {
        const int32_t n_layer    = llama_model_n_layer(ec.model);
        const int32_t n_head     = llama_model_n_head(ec.model);
        const int32_t n_head_kv  = llama_model_n_head_kv(ec.model);
        const int64_t n_embd_gqa = (int64_t) llama_model_n_embd(ec.model)/std::max(1, n_head)*n_head_kv;
        ec.cell_bytes = (size_t) n_layer*(ggml_row_size(params.cache_type_k, n_embd_gqa) +
                                          ggml_row_size(params.cache_type_v, n_embd_gqa));
    }

    common_batch batch(ec.ctx);
    ec.batch = &batch;

    FILE * fout = nullptr;
    if (!out_path.empty()) {
        fout = fopen(out_path.c_str(), "a");
        if (!fout) {
            fprintf(stderr, "kvc-eval: cannot open %s\n", out_path.c_str());
            return 1;
        }
    }

    int n_failed = 0;
    for (const auto & job : jobs) {
        const std::string mode   = job.value("mode", "");
        const std::string policy = job.value("policy", "none");
        const std::vector<std::string> pparams = job.value("params", std::vector<std::string>());

        json out;
        out["id"]     = job.value("id", "");
        out["mode"]   = mode;
        out["policy"] = policy;
        out["params"] = pparams;
        out["n_ctx"]  = llama_n_ctx(ec.ctx);
        try {
            if (mode == "fidelity") {
                run_fidelity(ec, job, policy, pparams, out);
            } else {
                run_task(ec, job, mode, policy, pparams, out);
            }
        } catch (const std::exception & e) {
            out["error"] = e.what();
            fprintf(stderr, "kvc-eval: job %s: %s\n", out["id"].get<std::string>().c_str(), e.what());
            n_failed++;
        }
        if (job.contains("tag")) {
            out["tag"] = job["tag"];
        }
        const std::string line = out.dump(-1, ' ', false, json::error_handler_t::replace);
        printf("%s\n", line.c_str());
        fflush(stdout);
        if (fout) {
            fprintf(fout, "%s\n", line.c_str());
            fflush(fout);
        }
    }

    if (fout) {
        fclose(fout);
    }
    llama_memory_clear(llama_get_memory(ec.ctx), true);

    return n_failed ? 1 : 0;
}
