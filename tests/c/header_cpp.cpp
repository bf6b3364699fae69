// The header must be usable from C++ (llama.cpp is C++): it compiles under
// -std=c++17 -Wall -Wextra -Werror -pedantic, its declarations get C linkage (this links against
// the static library), and a few calls work. Built and run by tests/c_abi.rs.
#include "kvcompress.h"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static int failures = 0;

#define EXPECT(cond)                                                      \
    do {                                                                  \
        if (!(cond)) {                                                    \
            std::fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                   \
        }                                                                 \
    } while (0)

int main() {
    static_assert(KVC_STATUS_OK == 0, "KVC_STATUS_OK must be 0");
    static_assert(sizeof(kvc_status) == 4, "kvc_status is 32-bit");
    static_assert(KVC_VERSION_NUMBER ==
                      ((KVC_VERSION_MAJOR << 16) | (KVC_VERSION_MINOR << 8) | KVC_VERSION_PATCH),
                  "composite version");

    EXPECT(kvc_abi_version() == KVC_ABI_VERSION);
    EXPECT(std::string(kvc_version()) == std::to_string(KVC_VERSION_MAJOR) + "." +
                                             std::to_string(KVC_VERSION_MINOR) + "." +
                                             std::to_string(KVC_VERSION_PATCH));
    EXPECT(std::string(kvc_status_str(KVC_STATUS_OK)) == "ok");
    EXPECT(std::string(kvc_policy_names()).find("dbudget") != std::string::npos);

    kvc_params p = kvc_params_default();
    p.n_layer = 1;
    p.n_head = 2;
    p.n_head_kv = 1;
    p.head_dim = 4;
    p.n_threads = 1;
    const char *kv[] = {"tokens=3"};
    kvc_evictor *ev = nullptr;
    char err[128] = {0};
    EXPECT(kvc_evictor_init(&p, "streaming", kv, 1, &ev, err, sizeof err) == KVC_STATUS_OK);
    EXPECT(ev != nullptr);

    std::vector<uint32_t> cells = {0, 1, 2, 3, 4, 5, 6, 7};
    std::vector<int32_t> pos = {0, 1, 2, 3, 4, 5, 6, 7};
    kvc_seq_view s{};
    s.seq_id = 0;
    s.n_cells = static_cast<uint32_t>(cells.size());
    s.cells = cells.data();
    s.pos = pos.data();
    s.flags = KVC_SEQ_FLAG_PROMPT_END;
    bool due = false;
    EXPECT(kvc_evictor_due(ev, &s, &due) == KVC_STATUS_OK && due);
    std::vector<uint32_t> evict(cells.size());
    size_t n_evict = 0;
    kvc_stats st{};
    EXPECT(kvc_evictor_plan(ev, &s, evict.data(), evict.size(), &n_evict, &st) == KVC_STATUS_OK);
    EXPECT(st.n_keep == 3 && n_evict == 5 && st.n_keep + st.n_evict == st.n_cells);
    EXPECT(std::strcmp(kvc_evictor_last_error(ev), "") == 0);
    EXPECT(kvc_evictor_plan(ev, &s, evict.data(), 1, &n_evict, &st) == KVC_STATUS_BUFFER_TOO_SMALL);
    EXPECT(std::strlen(kvc_evictor_last_error(ev)) > 0);
    kvc_evictor_free(ev);
    kvc_evictor_free(nullptr);

    std::printf("C++ header: %s\n", failures == 0 ? "ok" : "FAILED");
    return failures == 0 ? 0 : 1;
}
