"""POP inside a real vLLM (vLLM 0.32's CPU build, in its own venv ``.venv-vllm``; ``bash examples/run.sh setup-vllm``
builds it): every request of an offline ``LLM.generate`` equals ``reference.pruned(scope="sequence",
prefill="dense")`` on that request alone under transformers, and vLLM without the plugin equals the dense model.

The engine runs in a subprocess with the vLLM venv's python (tests/pop_fx/serving/vllm_driver.py); the
references run here. Each LLM packs the cases the plugin must survive: more requests than ``max_num_seqs`` (some
wait), a small ``max_num_batched_tokens`` (prompts chunked, chunks next to other requests' decode tokens), and a
KV cache of 5 blocks of 32 tokens (requests preempted and resumed, with prefix caching on). Skipped where the
venv is missing, unless ``POP_FX_REQUIRE_VLLM=1`` (``examples/run.sh test`` sets it).
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pop_fx.config import PopConfig
from pop_fx.serving.engine import solo

ROOT = Path(__file__).resolve().parents[3]
DRIVER = Path(__file__).with_name("vllm_driver.py")
VLLM_PYTHON = Path(os.environ.get("POP_FX_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
if not VLLM_PYTHON.exists():
    if os.environ.get("POP_FX_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"POP_FX_REQUIRE_VLLM=1 but {VLLM_PYTHON} is missing: run `bash examples/run.sh setup-vllm`")
    pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (bash examples/run.sh setup-vllm builds it)", allow_module_level=True)

POP = PopConfig(sparsity=0.5, candidate_ratio=0.2)
TIGHT = dict(dtype="float32", enforce_eager=True, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16,
             block_size=32, num_gpu_blocks_override=5, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True)
"""5 KV blocks of 32 tokens for requests of up to 80: preemption; 16 tokens a step: chunked prompts"""


def _prompts(seed: int, n: int = 12, vocab: int = 512, longest: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def _save_tiny(folder: Path, family: str) -> Path:
    """A 2-layer model with random weights (head_dim 32: vLLM's CPU attention needs >= 32; d_ff 352 = 11·32, a
    multiple of the CPU SiluAndMul's vector width). initializer_range 0.2 spreads the logits, so greedy choices
    are not decided by one rounding."""
    import transformers

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "gpt2": ("GPT2Config", "GPT2LMHeadModel")}[family]
    kw = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    if family == "gpt2":
        kw.update(n_embd=128, n_layer=2, n_head=4, n_positions=256)
    else:
        kw.update(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False)
    config = getattr(transformers, cls[0])(**kw)
    torch.manual_seed(0)
    getattr(transformers, cls[1])(config).eval().save_pretrained(folder)
    return folder


def _vllm(tmp: Path, name: str, spec: dict, expect_failure: bool = False) -> dict:
    """Run the driver on ``spec``; its output (or, with ``expect_failure``, its stderr)."""
    spec_path, out_path = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    # OMP_NUM_THREADS=1: vLLM's CPU worker otherwise keeps an OpenMP thread per core, and on a shared 2-core CI
    # machine a 2-thread oneDNN GEMV waits milliseconds on a descheduled thread (examples/vllm_bench.py)
    env = dict(os.environ, VLLM_CACHE_ROOT=str(tmp / "vllm-cache"), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(VLLM_PYTHON), str(DRIVER), str(spec_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    if expect_failure:
        assert proc.returncode != 0, "vLLM started with POP switched on and nothing to attach to"
        return {"stderr": proc.stderr}
    if proc.returncode:
        pytest.fail(f"vLLM driver failed ({name}):\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def llama(tmp):
    from transformers import AutoModelForCausalLM

    folder = _save_tiny(tmp / "llama", "llama")
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


RUNS = {"measured": None, "layouts": "layouts", "ragged": "ragged"}
"""decode path per run: the measured table (``decode="pop"``), or one forced for every decode-only step"""


@pytest.fixture(scope="module")
def pop_eager(tmp, llama):
    runs = [{"name": name, "prompts": _prompts(i), "max_tokens": 12, "force": force}
            for i, (name, force) in enumerate(RUNS.items())]
    a = list(range(3, 83))  # 80 tokens: two full blocks and a part
    b = list(range(3, 67)) + list(range(200, 216))  # a's first 64 tokens (2 blocks), then its own
    runs += [{"name": "prefix_first", "prompts": [a], "max_tokens": 8},
             {"name": "prefix_hit", "prompts": [b], "max_tokens": 8}]
    return runs, _vllm(tmp, "pop_eager", {"model": str(llama[0]), "llm": TIGHT,
                                          "pop": {"sparsity": POP.sparsity, "candidate_ratio": POP.candidate_ratio,
                                                  "decode": "pop"}, "runs": runs})


def _assert_equal_to_solo(model, run: dict, got: list[list[int]], config: PopConfig) -> None:
    want = [solo(model, p, run["max_tokens"], config) for p in run["prompts"]]
    bad = [(i, len(run["prompts"][i]), g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"run {run['name']}: (request, prompt length, vLLM, solo reference) differ: {bad}"


@pytest.mark.parametrize("run", list(RUNS))
def test_every_request_equals_its_solo_reference(llama, pop_eager, run):
    runs, out = pop_eager
    spec = next(r for r in runs if r["name"] == run)
    res = out["runs"][run]
    assert out["runner"] == "CPUModelRunner" and set(out["mlps"]) == {"PopVllmMLP"}
    assert res["calls"] > 0  # the MLPs vLLM ran were POP's
    _assert_equal_to_solo(llama[1], spec, res["tokens"], POP)
    # not vacuous: prompts were chunked, requests preempted and resumed, and a forced run took its decode path
    # (the measured run's paths depend on the timings at load, so only its tokens are checked)
    assert res["stats"]["chunked"] > 0 and res["stats"]["resumed"] > 0, res["stats"]
    if RUNS[run] == "ragged":
        assert "layouts" not in res["paths"], res["paths"]  # ("dense": a resumed prompt's recompute alone)
    elif RUNS[run] == "layouts":
        assert res["paths"]["layouts"] > 0, res["paths"]


@torch.no_grad()
def _solo_partitioned_from(model, prompt: list[int], seen_from: int, max_new: int, config: PopConfig) -> list[int]:
    """The request alone in the harness engine, its prompt's first ``seen_from`` tokens DENSE (attended to, not in
    its Σh²) and the rest one LAST chunk: POP partitioned from the uncached part of the prompt only."""
    from pop_fx.serving.engine import Engine, Request, Spec
    from pop_fx.serving.phases import DECODE, DENSE, LAST

    eng = Engine(model, config, max_slots=1)
    req = Request(0, Spec(prompt, max_new))
    eng.admit(req)
    eng.forward([(req, prompt[:seen_from], [DENSE] * seen_from)])
    out = [int(eng.forward([(req, prompt[seen_from:], [LAST] * (len(prompt) - seen_from))])[0].argmax())]
    while len(out) < max_new:
        out.append(int(eng.forward([(req, [out[-1]], [DECODE])])[0].argmax()))
    return out


def test_prefix_cache_hit_partitions_from_the_uncached_tokens(llama, pop_eager):
    """What prefix caching does to POP, forced: a request whose first 64 prompt tokens hit the cache never runs
    them through the MLP, so its Σh² (and partition) covers its other 16 tokens only — exactly the harness engine
    run with those 64 tokens DENSE, and not its solo reference; the plugin counts it. The request that filled the
    cache is exact."""
    runs, out = pop_eager
    first, hit = out["runs"]["prefix_first"], out["runs"]["prefix_hit"]
    assert first["cached"] == [0] and first["stats"].get("prefix_hits", 0) == 0
    _assert_equal_to_solo(llama[1], runs[-2], first["tokens"], POP)
    assert hit["cached"] == [64] and hit["stats"]["prefix_hits"] == 1
    prompt = runs[-1]["prompts"][0]
    assert hit["tokens"][0] == _solo_partitioned_from(llama[1], prompt, 64, 8, POP)
    assert hit["tokens"][0] != solo(llama[1], prompt, 8, POP)


def test_dense_vllm_equals_the_dense_model_and_pop_changes_tokens(tmp, llama, pop_eager):
    runs, pop_out = pop_eager
    run = {"name": "dense", "prompts": runs[0]["prompts"], "max_tokens": 12}
    out = _vllm(tmp, "dense_eager", {"model": str(llama[0]), "llm": TIGHT, "pop": None, "runs": [run]})
    assert set(out["mlps"]) == {"LlamaMLP"}
    _assert_equal_to_solo(llama[1], run, out["runs"]["dense"]["tokens"], PopConfig(sparsity=0.0))
    assert out["runs"]["dense"]["tokens"] != pop_out["runs"]["measured"]["tokens"]


def test_compiled_mode_equals_the_solo_reference(tmp, llama):
    """vLLM's compiled model (``enforce_eager=False``: Dynamo + Inductor) with POP's MLP as one opaque op."""
    runs = [{"name": path, "prompts": _prompts(7 + i), "max_tokens": 12, "force": path}
            for i, path in enumerate(("layouts", "ragged"))]
    out = _vllm(tmp, "pop_compiled", {"model": str(llama[0]), "llm": dict(TIGHT, enforce_eager=False),
                                      "pop": {"sparsity": POP.sparsity, "candidate_ratio": POP.candidate_ratio,
                                              "decode": "pop"}, "runs": runs})
    assert out["runs"]["layouts"]["calls"] > 0 and out["runs"]["layouts"]["paths"]["layouts"] > 0
    for run in runs:
        _assert_equal_to_solo(llama[1], run, out["runs"][run["name"]]["tokens"], POP)


def test_qwen2_family(tmp):
    from transformers import AutoModelForCausalLM

    folder = _save_tiny(tmp / "qwen2", "qwen2")
    run = {"name": "qwen2", "prompts": _prompts(11, n=8), "max_tokens": 10}
    out = _vllm(tmp, "qwen2", {"model": str(folder), "llm": TIGHT, "runs": [run],
                               "pop": {"sparsity": 0.6, "candidate_ratio": 0.1, "decode": "pop"}})
    assert set(out["mlps"]) == {"PopVllmMLP"}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _assert_equal_to_solo(model, run, out["runs"]["qwen2"]["tokens"], PopConfig(sparsity=0.6, candidate_ratio=0.1))


def test_switched_on_with_nothing_to_prune_vllm_refuses_to_start(tmp):
    """GPT-2's MLP is not one POP's plugin swaps: the engine fails to start, loudly, instead of serving dense."""
    folder = _save_tiny(tmp / "gpt2", "gpt2")
    out = _vllm(tmp, "refuse", {"model": str(folder), "llm": dict(TIGHT, max_model_len=64), "pop": {"sparsity": 0.5},
                                "runs": []}, expect_failure=True)
    assert "pop_fx: POP_FX_VLLM is set but GPT2LMHeadModel has no MLP of" in out["stderr"]


@pytest.mark.real_model
def test_smollm2_in_vllm_equals_its_solo_reference(tmp):
    """The real SmolLM2-135M (fp32) in vLLM with POP: 4 text prompts, 2 slots (two wait), 32 tokens a step;
    decode-only steps on per-slot oneDNN layouts (its real shapes: d_ff 1536, R ∪ C padded 845 -> 896)."""
    from pop_fx.tools.models import load_model, smollm2_path

    model, tok = load_model("smollm2")
    text = (ROOT / "pop_fx" / "data" / "web_bible_sample.txt").read_text()[:20000]
    ids = tok(text)["input_ids"]
    run = {"name": "smollm2", "prompts": [ids[i * 300 : i * 300 + n] for i, n in enumerate((5, 40, 23, 70))],
           "max_tokens": 12, "force": "layouts"}
    cfg = PopConfig(sparsity=0.5, candidate_ratio=0.1)
    out = _vllm(tmp, "smollm2", {"model": str(smollm2_path()), "runs": [run],
                                 "llm": dict(dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=2,
                                             max_num_batched_tokens=32, kv_cache_memory_bytes=64 << 20),
                                 "pop": {"sparsity": cfg.sparsity, "candidate_ratio": cfg.candidate_ratio,
                                         "decode": "pop"}})
    res = out["runs"]["smollm2"]
    assert res["stats"]["chunked"] > 0 and res["paths"].get("layouts", 0) > 0
    _assert_equal_to_solo(model, run, res["tokens"], cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
