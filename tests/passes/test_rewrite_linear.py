"""rewrite_linear: every linear of a decode-sized input (static rows <= MAX_ROWS) becomes pop::linear; no Inductor."""

import torch

from passes.nodes import _LINEAR
from passes.pipeline import run_passes
from passes.rewrite_linear import rewrite_decode_linears
from pop_fx import PopConfig
from pop_fx.ops.linear import MAX_ROWS

CFG = PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager")


def _count(gm, targets) -> int:
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


POP_LINEAR = {torch.ops.pop.linear.default}


def test_decode_graph_every_projection(llama):
    """A decode step of two rows: q, k, v, o of every layer, POP's gate/up over R ∪ C, and the LM head."""
    model, caps = llama
    n = model.config.num_hidden_layers
    rw = run_passes(caps[1].gm, CFG)
    linears = _count(rw.gm, _LINEAR)
    assert linears == 5 * n + 1  # q, k, v, o and POP's gate/up layout per layer, the LM head
    assert rewrite_decode_linears(rw.gm, MAX_ROWS) == linears
    assert _count(rw.gm, _LINEAR) == 0 and _count(rw.gm, POP_LINEAR) == linears


def test_dense_decode_graph_every_linear(llama):
    model, caps = llama
    gm = run_passes(caps[1].gm, PopConfig(sparsity=0.0, lowering="eager")).gm
    assert rewrite_decode_linears(gm, MAX_ROWS) == 7 * model.config.num_hidden_layers + 1


def test_prefill_keeps_its_gemms_but_the_head_of_one_position(llama):
    """A prefill of 2 x 6 rows (> MAX_ROWS) keeps Inductor's GEMMs; the LM head reads one position per row."""
    model, caps = llama
    gm = run_passes(caps[0].gm, PopConfig(sparsity=0.0, lowering="eager")).gm
    assert rewrite_decode_linears(gm, MAX_ROWS) == 1
    assert rewrite_decode_linears(gm, 1) == 0  # and nothing at all when the limit is below the head's 2 rows


def test_rewritten_graph_computes_the_same(llama):
    model, caps = llama
    cap = caps[1]
    gm = run_passes(cap.gm, PopConfig(sparsity=0.0, lowering="eager")).gm
    want = gm(*cap.example_inputs)
    rewrite_decode_linears(gm, MAX_ROWS)
    got = gm(*cap.example_inputs)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)  # the eager body of pop::linear is F.linear itself
