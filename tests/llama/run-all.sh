#!/usr/bin/env bash
# End-to-end tests of the llama.cpp patch on the real model (make test-llama).
# Needs: scripts/llama.sh build (build/llama) and scripts/llama.sh baseline (build/base/llama).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
failed=()
for t in test_patch.sh test_none.py test_cache_types.py test_two_seqs.py test_server.py test_server_cost.py test_load.py test_faults.py test_cli.py test_masks.py test_eval.py test_passkey.py test_long_prompt.py test_hybrid.py test_iswa.py test_attention.py test_rpc.py test_pressure.py test_slots.py test_recon.py ${KVC_EXTRA_TESTS:-}; do
    echo "== $t"
    if ! "$HERE/$t"; then
        failed+=("$t")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all llama.cpp tests passed"
