"""``pop::experts_prefill``: fixed shapes, no host sync, equal to the per-expert loop it replaced.

Equal partitions (R, C, the dense flags), layouts and output; odd sizes, left padding, experts that get no
prefill token (weight-norm partition or dense), both scopes and both prefill modes.
"""

import pytest
import torch

import pop_fx.ops  # noqa: F401  (registers torch.ops.pop)
from pop_fx.ops.experts_prefill import experts_prefill_loop, experts_prefill_pairs
from pop_fx.ops.layout import padded
from pop_fx.partition import down_column_norm, partition_sizes

from _host_sync import NoHostSync

# (E, H, d_ff, top-k, batch, tokens per sequence, r, γ, scope="sequence")
CASES = [
    (6, 12, 37, 2, 2, 5, 0.5, 0.2, False),  # 12 tokens · 2 of 6 experts: some experts get none
    (5, 16, 24, 3, 3, 1, 0.4, 0.1, True),  # one-token prompts, per sequence
    (4, 20, 40, 4, 1, 9, 0.5, 2.0, False),  # every expert, full re-evaluation
    (8, 10, 13, 1, 2, 2, 0.3, 0.0, False),  # 40-byte rows (the bmm path), γ = 0, most experts empty
]


def _inputs(case, seed=0):
    E, H, d_ff, k, B, L, r, gamma, seq = case
    g = torch.Generator().manual_seed(seed)
    gate_up, down = torch.randn(E, 2 * d_ff, H, generator=g), torch.randn(E, H, d_ff, generator=g)
    hidden = torch.randn(B * L, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B * L)])
    w = torch.rand(B * L, k, generator=g)
    mask = torch.ones(B, L + 2, dtype=torch.long)
    if B > 1 and L > 1:
        mask[0, :3] = 0  # left padding: one prompt token of row 0 is padding
    z = partition_sizes(d_ff, r, gamma)
    return hidden, idx, w, gate_up, down, mask, B, z, seq


def _state(E, G, H, d_ff, z, seq):
    n_rc = z.n_R + z.n_C
    return dict(rc_idx=torch.zeros(E, G, n_rc, dtype=torch.long), wd_norm_c=torch.zeros(E, G, z.n_C),
                dense=torch.zeros(E, G, dtype=torch.bool),
                w_in=torch.zeros((0,) if seq else (E, 2 * n_rc, H)),
                wd_rc=torch.zeros((0,) if seq else (E, H, padded(n_rc))))


def _run(fn, case, pruned_prefill, empty_dense):
    hidden, idx, w, gate_up, down, mask, B, z, seq = _inputs(case)
    E, H, d_ff = down.shape
    st = _state(E, B if seq else 1, H, d_ff, z, seq)
    out = fn(hidden, idx, w, gate_up, down, mask, B, down_column_norm(down, -1), st["rc_idx"], st["wd_norm_c"],
             st["dense"], st["w_in"], st["wd_rc"], z.n_keep, z.n_R, z.n_C, "silu", seq, pruned_prefill, empty_dense)
    return out, st


@pytest.mark.parametrize("pruned_prefill,empty_dense", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "E{}-H{}-I{}-k{}-B{}-L{}-r{}-g{}-{}".format(
    *c[:8], "seq" if c[8] else "batch"))
def test_pairs_equal_the_per_expert_loop(case, pruned_prefill, empty_dense):
    want, want_st = _run(experts_prefill_loop, case, pruned_prefill, empty_dense)
    got, got_st = _run(torch.ops.pop.experts_prefill, case, pruned_prefill, empty_dense)
    for name in ("rc_idx", "dense", "wd_norm_c", "w_in", "wd_rc"):
        assert torch.equal(got_st[name], want_st[name]), name
    assert (got - want).abs().max().item() <= 1e-6 * (1 + want.abs().max().item())
    if empty_dense and case[0] > case[3] * case[4] * case[5]:  # some expert got no token: its fallback ran
        assert bool(got_st["dense"].any())


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["batch", "sequence", "bmm-path"])
def test_the_op_has_no_host_sync(case):
    with NoHostSync():
        _run(experts_prefill_pairs, case, True, True)
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        _run(experts_prefill_loop, case, True, True)
