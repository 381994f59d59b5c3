"""Fuzzing the pop backend with generated FFN blocks: compiled output equals the eager reference.

Each example builds a residual block ``x + mlp(norm(x))`` with a random FFN (HF attribute names, so that
``pop_fx.reference.pruned`` finds the same site), runs a prefill call (L > 1 tokens) and decode calls
(L = 1) through ``backend="pop"`` and through the reference, and compares. The bulk runs the rewritten
graph as is (``lowering="eager"``); a few go through Inductor.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pop_fx
from pop_fx import PopConfig
from pop_fx.reference import pruned

pytestmark = pytest.mark.compile

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
    # GPT-2's NewGELU, written out with pow and tanh
    "gelu_written": lambda h: 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0)))),
}
_KEEP = []  # Dynamo holds weak references to traced modules: keep them alive for the session


class FFN(nn.Module):
    def __init__(self, d, f, kind, act, bias):
        super().__init__()
        self.kind, self.act = kind, ACTIVATIONS[act]
        if kind == "plain":
            self.up_proj = nn.Linear(d, f, bias=bias)
        elif kind == "gated":
            self.gate_proj = nn.Linear(d, f, bias=bias)
            self.up_proj = nn.Linear(d, f, bias=bias)
        else:
            self.gate_up_proj = nn.Linear(d, 2 * f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        if self.kind == "plain":
            return self.down_proj(self.act(self.up_proj(x)))
        if self.kind == "gated":
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        g, u = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(g) * u)


class Block(nn.Module):
    def __init__(self, d, f, kind, act, bias):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = FFN(d, f, kind, act, bias)

    def forward(self, x, past_key_values=None):  # the cache only tells the reference prefill from decode
        return x + self.mlp(self.norm(x))


class _Past:
    """Stands in for a KV cache: the reference calls a one-token forward on a non-empty cache a decode step."""

    def get_seq_length(self):
        return 1


blocks = st.fixed_dictionaries({
    "d": st.integers(4, 40),
    "f": st.integers(2, 70),
    "kind": st.sampled_from(["plain", "gated", "fused"]),
    "act": st.sampled_from(sorted(ACTIVATIONS)),
    "bias": st.booleans(),
})
configs = st.fixed_dictionaries({
    "sparsity": st.sampled_from([0.1, 0.3, 0.5, 0.75, 0.9]),
    "candidate_ratio": st.sampled_from([0.0, 0.1, 0.25, 2.0]),
    "scope": st.sampled_from(["batch", "sequence"]),
    "prefill": st.sampled_from(["pruned", "dense"]),
})
runs = st.fixed_dictionaries({"batch": st.integers(1, 3), "tokens": st.integers(2, 6), "steps": st.integers(1, 3),
                              "seed": st.integers(0, 2**16)})


def _block(spec, seed):
    torch._dynamo.reset()  # a new module of the same class: start from a clean cache, not the recompile limit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = Block(**spec).eval()
        with torch.no_grad():  # non-zero biases and norm affine, so every term is exercised
            for p in block.parameters():
                if p.dim() == 1:
                    p.normal_(0, 0.5)
    _KEEP.append(block)
    return block


def _inputs(spec, run):
    g = torch.Generator().manual_seed(run["seed"])
    d, B = spec["d"], run["batch"]
    return [torch.randn(B, run["tokens"], d, generator=g)] + [torch.randn(B, 1, d, generator=g)
                                                              for _ in range(run["steps"])]


def _compiled_vs_reference(spec, cfg, run, lowering):
    block = _block(spec, run["seed"])
    xs = _inputs(spec, run)
    compiled = torch.compile(block, backend="pop", options=dict(cfg, lowering=lowering))
    with torch.no_grad():
        got = [compiled(x) for x in xs]
        with pruned(block, PopConfig(**cfg)):
            ref = [block(xs[0])] + [block(x, past_key_values=_Past()) for x in xs[1:]]
    return block, got, ref


@settings(max_examples=30)
@given(spec=blocks, cfg=configs, run=runs)
def test_generated_ffn_equals_reference(spec, cfg, run):
    block, got, ref = _compiled_vs_reference(spec, cfg, run, "eager")
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"call {i} (0 = prefill): {m}")
    rep = pop_fx.report(block, PopConfig(**cfg, lowering="eager"))
    sizes = pop_fx.partition_sizes(spec["f"], cfg["sparsity"], cfg["candidate_ratio"])
    if 1 <= sizes.n_keep < spec["f"]:
        assert [(s["path"], s["graphs"]) for s in rep.sites] == [("mlp", ["decode", "prefill"])]
    else:  # too small to prune: left dense and reported
        assert rep.sites == [] and [d["path"] for d in rep.dense] == ["mlp"]


@settings(max_examples=3)
@given(spec=blocks, cfg=configs, run=runs)
def test_generated_ffn_through_inductor_equals_reference(spec, cfg, run):
    block, got, ref = _compiled_vs_reference(spec, cfg, run, "inductor")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@settings(max_examples=10)
@given(spec=blocks, run=runs)
def test_sparsity_zero_is_the_dense_module_exactly(spec, run):
    block = _block(spec, run["seed"])
    compiled = torch.compile(block, backend="pop", options=dict(sparsity=0.0, lowering="eager"))
    with torch.no_grad():
        for x in _inputs(spec, run):
            assert torch.equal(compiled(x), block(x))
    assert pop_fx.report(block, PopConfig(sparsity=0.0, lowering="eager")).sites == []
