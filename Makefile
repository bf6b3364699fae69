# kvcompress: build, test, benchmark, and the llama.cpp integration.
#
#   make            cargo build --release, then check that include/kvcompress.h is up to date
#   make demo       build everything, run SmolLM2 with an adaptive policy, show what it saved
#   make test       everything CI runs (.ci/run): fmt, clippy, cargo tests (C ABI and header
#                   included), valgrind on the C ABI test, the llama.cpp end-to-end tests,
#                   the quick evaluation and the CUDA compile check
#   make header     regenerate include/kvcompress.h with the pinned cbindgen
#   make bench      plan-time benchmark -> results/bench-plan.json (BENCH_QUICK=1: smoke run),
#                   then prefill/decode time per policy vs none -> results/bench-prefill.json,
#                   capacity (bench-capacity.json) and parallel requests in one -c 8192 cache
#                   (bench-parallel.json; alone: make bench-parallel)
#   make eval       fidelity evaluation (full grid on SmolLM2 and gemma3, chat flow, 8K prompts) -> results/ ;
#                   eval-quick: CI's small grid (writes build/eval, not results/)
#   make cuda-check compile every CUDA kernel (PyPI nvcc), build and test the `cuda` feature
#   make gpu-kit    artefacts for scripts/gpu-check.sh on a GPU machine (build/gpu-kit, <= 64 MiB with
#                   the tree): the `cuda` test and bench binaries, libkvcompress, the patched llama.cpp
#                   sources, a 4-layer SmolLM2; then the kit's rehearsal here (stops at "no GPU")
#   make llama-cuda the patched llama.cpp with CUDA (sm_90 + PTX) in build/llama-cuda (long on 2 cores)
#   make llama      fetch, patch and build the pinned llama.cpp (scripts/llama.sh all)
#   make test-llama the llama.cpp end-to-end tests alone (builds patched + baseline first)
#   make deps       install what a fresh Debian machine needs (idempotent)
#   make valgrind   the C ABI test under valgrind
#   make fuzz-quick libFuzzer over the whole C API: replay fuzz/regressions, then ~100 s of
#                   fuzzing from the committed seeds (part of `make test`); make fuzz: a long
#                   run (FUZZ_SECONDS, default 1800) with a corpus kept in ~/.cache/kvcompress
#   make install    header, static and shared library (soname libkvcompress.so.<ABI>) and
#                   kvcompress.pc into PREFIX (/usr/local; DESTDIR honoured); install-check: install
#                   into a temporary prefix, build tests/c/abi_test.c through pkg-config (shared and
#                   static) and run it (part of `make test`)
#   make clean      remove target/ and build/ (downloads stay in ~/.cache/kvcompress)

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := all

CARGO      ?= cargo
CC         ?= cc
PYTHON     ?= python3
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
LIB_A      := $(TARGET_DIR)/release/libkvcompress.a
C_OUT      := $(TARGET_DIR)/c
C_FLAGS    := -std=c11 -Wall -Wextra -Werror -pedantic -g -O1
C_LIBS     := -lpthread -ldl -lm
# make install: the usual GNU layout; the soname's number is the C ABI version (build.rs)
PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
ABI        := $(shell sed -n 's/^\#define KVC_ABI_VERSION \([0-9]*\)$$/\1/p' include/kvcompress.h)
VERSION    := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n1)
# the shared library scripts/llama.sh links llama.cpp against (follows CARGO_TARGET_DIR)
export KVC_LIB ?= $(abspath $(TARGET_DIR))/release/libkvcompress.so

.PHONY: all build header header-check test fmt-check clippy cargo-test valgrind test-llama \
        fuzz fuzz-quick bench bench-prefill bench-parallel eval eval-quick cuda-check gpu-kit llama-cuda llama demo \
        deps clean help \
        install install-check

all: build header-check

help:
	@sed -n '3,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

build:
	$(CARGO) build --release

# examples/gen_header.rs writes include/kvcompress.h (cbindgen pinned in Cargo.toml)
header:
	$(CARGO) run --release --quiet --example gen_header
	@echo "include/kvcompress.h regenerated"

# tests/header.rs: the committed header equals what cbindgen generates, version macros match
header-check:
	$(CARGO) test --release --quiet --test header

test: fmt-check clippy cargo-test build valgrind install-check fuzz-quick test-llama eval-quick cuda-check
	@echo "make test: all passed"

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --release --all-targets -- -D warnings

# unit tests, property tests, tests/c_abi.rs (C + C++ against the static library, with
# ASan/UBSan when available) and tests/header.rs
cargo-test:
	$(CARGO) test --release

# the C ABI program without sanitizers, under valgrind (skipped with a notice if valgrind is
# missing; `make deps` installs it, and CI always has it)
valgrind: build
	@if ! command -v valgrind >/dev/null 2>&1; then \
	  echo "valgrind: NOT INSTALLED, skipped (run 'make deps')"; exit 0; fi; \
	mkdir -p $(C_OUT); \
	$(CC) $(C_FLAGS) -Iinclude tests/c/abi_test.c $(LIB_A) $(C_LIBS) -o $(C_OUT)/abi_test-vg; \
	valgrind -q --error-exitcode=99 --leak-check=full --show-leak-kinds=definite \
	  --errors-for-leak-kinds=definite \
	  --track-origins=yes $(C_OUT)/abi_test-vg

install: build
	install -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR)/pkgconfig
	install -m 644 include/kvcompress.h $(DESTDIR)$(INCLUDEDIR)/
	install -m 644 $(LIB_A) $(DESTDIR)$(LIBDIR)/
	install -m 755 $(TARGET_DIR)/release/libkvcompress.so $(DESTDIR)$(LIBDIR)/libkvcompress.so.$(ABI)
	ln -sf libkvcompress.so.$(ABI) $(DESTDIR)$(LIBDIR)/libkvcompress.so
	printf '%s\n' 'prefix=$(PREFIX)' 'libdir=$(LIBDIR)' 'includedir=$(INCLUDEDIR)' '' \
	  'Name: kvcompress' 'Description: Adaptive KV-cache eviction for LLM inference engines (C ABI $(ABI))' \
	  'Version: $(VERSION)' 'Libs: -L$${libdir} -lkvcompress' 'Libs.private: $(C_LIBS)' \
	  'Cflags: -I$${includedir}' > $(DESTDIR)$(LIBDIR)/pkgconfig/kvcompress.pc
	@echo "installed kvcompress $(VERSION) (ABI $(ABI)) into $(DESTDIR)$(PREFIX)"

# what a C program does with an installed copy: pkg-config, link (shared, then static), run
install-check: build
	@d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	$(MAKE) --no-print-directory install PREFIX="$$d/usr" >/dev/null; \
	so=$$(readelf -d "$$d/usr/lib/libkvcompress.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p'); \
	[ "$$so" = "libkvcompress.so.$(ABI)" ] || { echo "install-check: soname '$$so', expected libkvcompress.so.$(ABI)" >&2; exit 1; }; \
	export PKG_CONFIG_PATH="$$d/usr/lib/pkgconfig"; \
	libdir=$$(pkg-config --variable=libdir kvcompress); \
	$(CC) $(C_FLAGS) tests/c/abi_test.c $$(pkg-config --cflags --libs kvcompress) -Wl,-rpath,"$$libdir" -o "$$d/abi_shared"; \
	ldd "$$d/abi_shared" | grep "libkvcompress.so.$(ABI) => $$libdir/libkvcompress.so.$(ABI)" >/dev/null \
	  || { echo "install-check: abi_shared does not load the installed libkvcompress.so.$(ABI):" >&2; ldd "$$d/abi_shared" >&2; exit 1; }; \
	"$$d/abi_shared" > "$$d/shared.log" || { cat "$$d/shared.log" >&2; exit 1; }; \
	$(CC) $(C_FLAGS) tests/c/abi_test.c $$(pkg-config --cflags kvcompress) "$$libdir/libkvcompress.a" \
	  $$(pkg-config --static --libs-only-other --libs-only-l kvcompress | sed 's/-lkvcompress//') -o "$$d/abi_static"; \
	! ldd "$$d/abi_static" | grep libkvcompress >/dev/null || { echo "install-check: abi_static loads libkvcompress" >&2; exit 1; }; \
	"$$d/abi_static" > "$$d/static.log" || { cat "$$d/static.log" >&2; exit 1; }; \
	echo "install-check: kvcompress.pc, soname $$so, tests/c/abi_test.c linked shared and static: passed"

# libFuzzer over the C API (fuzz/, scripts/fuzz.sh): stable toolchain, AddressSanitizer,
# libFuzzer from the pinned libfuzzer-sys crate; the build is cached in ~/.cache/kvcompress/fuzz.
# fuzz-quick fails on any crash; a crash input is printed as hex and left in fuzz/artifacts/.
FUZZ_SECONDS ?= 1800
fuzz-quick:
	bash scripts/fuzz.sh quick

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) nice -n 10 bash scripts/fuzz.sh long

# end-to-end tests against the patched llama.cpp (tests/llama/run-all.sh). They need the
# patched and the unpatched builds (build/llama, build/base/llama; cached, incremental, ccache).
# When the script exists it must run and pass; its absence is reported loudly, never skipped in
# silence.
test-llama: build
	@if [ -f tests/llama/run-all.sh ]; then \
	  bash scripts/llama.sh all && bash scripts/llama.sh baseline && bash tests/llama/run-all.sh; \
	else \
	  echo "!!! test-llama: tests/llama/run-all.sh does not exist: llama.cpp end-to-end tests NOT RUN" >&2; \
	fi

# benchmarks, JSON in results/: the library's plan time (bench-plan.json), prefill/decode overhead
# against `none` at 2K/4K/8K (bench-prefill.json), the longest passkey kept with -c 2048 and decode
# speed with a cache sized to the budget (bench-capacity.json), how many parallel passkey requests
# fit in one -c 8192 llama-server cache (bench-parallel.json); then RESULTS.md is regenerated
bench: llama
	$(CARGO) bench --bench plan
	bash scripts/bench-prefill.sh
	$(PYTHON) scripts/bench-capacity.py
	$(PYTHON) scripts/bench-parallel.py
	$(PYTHON) eval/report.py

# parallel passkey requests in one shared (-kvu) -c 8192 llama-server cache, per policy: the largest
# N whose passkeys all survive (scripts/bench-parallel.py; BENCH_QUICK=1: smoke run into build/bench)
bench-parallel: llama
	$(PYTHON) scripts/bench-parallel.py

# the evaluation of issue 4: retrieval (question-aware and -agnostic) and teacher-forced KL
# against the full cache. eval-quick is CI's small grid with assertions that can fail (it writes
# build/eval/, never the committed results/); eval runs the full grid on SmolLM2 and gemma3
# (summary.json, summary-gemma3.json), the two-turn chat flow through llama-server on both
# (chat.json, chat-gemma3.json) and regenerates results/ (RESULTS.md side by side, plots).
eval-quick: llama
	$(PYTHON) eval/run.py --preset quick

# (a failed check of the full grid is a finding, reported in RESULTS.md: the reports are written
# anyway and make exits with the first failure's status)
eval: llama
	rc=0; \
	$(PYTHON) eval/run.py --preset full --resume || rc=$$?; \
	$(PYTHON) eval/run.py --preset full --model gemma3 --resume || rc=$$?; \
	$(PYTHON) eval/run.py --flow chat || rc=$$?; \
	$(PYTHON) eval/run.py --flow chat --model gemma3 || rc=$$?; \
	$(PYTHON) eval/run.py --preset long --resume || rc=$$?; \
	$(PYTHON) eval/report.py --summary results/summary-long.json; \
	$(PYTHON) eval/report.py; \
	exit $$rc

# the CUDA backend: PyPI nvcc (pinned, cached under ~/.cache/kvcompress) compiles every kernel to
# PTX and cubins, ptxas checks them, the `cuda` feature builds and its tests run (device tests
# report skipped without a GPU)
cuda-check:
	bash scripts/cuda-check.sh

llama: build
	bash scripts/llama.sh all

# KVC_CUDA=1 make llama works too; this target names it
llama-cuda: build
	KVC_CUDA=1 bash scripts/llama.sh all

gpu-kit: llama
	bash scripts/gpu-check.sh prepare
	bash scripts/gpu-check.sh

demo:
	@if [ -f scripts/demo.sh ]; then bash scripts/demo.sh; \
	else echo "make demo: scripts/demo.sh does not exist yet" >&2; exit 1; fi

# Idempotent and quiet when everything is there: apt packages (ccache, valgrind, a C/C++
# compiler, pkg-config), rustfmt + clippy, and the Python build tools llama.cpp's sdist needs.
deps:
	@need=""; \
	for t in ccache:ccache valgrind:valgrind cc:build-essential c++:build-essential \
	         git:git curl:curl pkg-config:pkgconf readelf:binutils; do \
	  command -v "$${t%%:*}" >/dev/null 2>&1 || need="$$need $${t#*:}"; \
	done; \
	need="$$(echo $$need | tr ' ' '\n' | sort -u | tr '\n' ' ')"; \
	if [ -n "$${need// /}" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	  echo "deps: apt-get install $$need"; \
	  $$sudo apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
	fi
	@if command -v rustup >/dev/null 2>&1; then \
	  for c in rustfmt clippy; do \
	    rustup component list --installed 2>/dev/null | grep "^$$c" >/dev/null || rustup component add $$c; \
	  done; \
	fi
	@# the fuzz target's crates (libfuzzer-sys, pinned in fuzz/Cargo.lock), fetched ahead
	@$(CARGO) fetch --locked --quiet --manifest-path fuzz/Cargo.toml
	@pip_need=""; \
	command -v cmake >/dev/null 2>&1 || pip_need="$$pip_need cmake"; \
	command -v ninja >/dev/null 2>&1 || pip_need="$$pip_need ninja"; \
	$(PYTHON) -c 'import scikit_build_core' 2>/dev/null || pip_need="$$pip_need scikit-build-core"; \
	if [ -n "$$pip_need" ]; then \
	  echo "deps: pip install$$pip_need"; \
	  $(PYTHON) -m pip install -q $$pip_need; \
	fi

clean:
	$(CARGO) clean
	rm -rf build
