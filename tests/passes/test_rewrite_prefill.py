"""rewrite_prefill: a prefill graph's down projections become pop::prefill; gate/up stay dense (no Inductor)."""

from passes.graph import pop_ops_in
from passes.pipeline import run_passes
from pop_fx import PopConfig

from _graphs import ffn_params, linears_reading

CFG = PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager")


def test_prefill_graph_ops_before_and_after(graphs):
    model, caps = graphs
    n = model.config.num_hidden_layers
    ups, downs = ffn_params(model)
    before = caps[0].gm
    rw = run_passes(before, CFG)
    assert rw.counts == {"matched": n, "skipped": 0, "prefill": n, "decode": 0}
    assert pop_ops_in(before) == {}
    assert pop_ops_in(rw.gm) == {"prefill": n}
    # The prefill keeps its dense gate/up; the down projections are now inside pop::prefill.
    assert linears_reading(before, downs) == n and linears_reading(rw.gm, downs) == 0
    assert linears_reading(rw.gm, ups) == linears_reading(before, ups) > 0
    assert len(rw.state_tensors) == 6 * n


def test_the_prefill_reads_the_padding_mask(llama):
    _, caps = llama
    rw = run_passes(caps[0].gm, CFG)
    pre = [n for n in rw.gm.graph.nodes if n.op == "call_function" and "prefill" in str(n.target)]
    assert all(n.args[1] is not None and "attention_mask" in n.args[1].name for n in pre)
