"""rewrite_decode: gate/up over the R ∪ C layout and pop::decode (pop::decode_seq per sequence); no Inductor."""

from passes.graph import pop_ops_in
from passes.pipeline import run_passes
from pop_fx import PopConfig

from _graphs import ffn_params, linears_reading

CFG = PopConfig(sparsity=0.5, candidate_ratio=0.2, lowering="eager")


def test_decode_graph_ops_before_and_after(graphs):
    model, caps = graphs
    n = model.config.num_hidden_layers
    ups, downs = ffn_params(model)
    rw = run_passes(caps[1].gm, CFG)
    assert rw.counts["decode"] == n and rw.counts["prefill"] == 0
    assert pop_ops_in(rw.gm) == {"decode": n}
    # Neither the original gate/up nor the down weights are read while decoding: only the R∪C layouts.
    assert linears_reading(rw.gm, ups + downs) == 0
    assert linears_reading(caps[1].gm, ups + downs) > 0


def test_sequence_scope_decode_uses_per_sequence_ops(graphs):
    model, caps = graphs
    rw = run_passes(caps[1].gm, PopConfig(sparsity=0.5, scope="sequence", lowering="eager"))
    assert pop_ops_in(rw.gm) == {"decode_seq": model.config.num_hidden_layers}


def test_sparsity_zero_rewrites_nothing(graphs):
    model, caps = graphs
    rw = run_passes(caps[1].gm, PopConfig(sparsity=0.0, lowering="eager"))
    assert rw.counts["matched"] == model.config.num_hidden_layers
    assert rw.counts["decode"] == 0 and rw.state_tensors == [] and pop_ops_in(rw.gm) == {}
