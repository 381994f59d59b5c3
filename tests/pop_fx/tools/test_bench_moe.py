"""`pop-fx bench --moe`'s models (no timing): the router + experts stack decodes under POP, the sliced copy is
the ideal's shape and shares nothing it should not."""

import torch

import pop_fx
from pop_fx.partition import partition_sizes
from pop_fx.tools.bench import require_fully_rewritten
from pop_fx.tools.bench_moe import MoEStack, _fill, _with_impl, moe_config, sliced_experts_copy


def _stack():
    return _fill(MoEStack(moe_config("tiny", 2)), torch.float32)


def test_pop_rewrites_the_stack_in_prefill_and_decode_graphs():
    torch._dynamo.reset()
    model = pop_fx.compile(_with_impl(_stack(), "grouped_mm"), sparsity=0.5, candidate_ratio=0.1, lowering="eager")
    with torch.no_grad():
        model(torch.randn(2, 6, 64))
        y = model(torch.randn(2, 1, 64))
    assert torch.isfinite(y).all()
    require_fully_rewritten("pop", model)  # a router's softmax is not attention: the one-token graph decodes
    assert pop_fx.report(model).counts() == {"expert": 16, "dense": 0}


def test_sliced_copy_keeps_n_keep_channels_of_every_expert():
    model = _stack()
    n_keep = partition_sizes(48, 0.5, 0.1).n_keep
    sliced = sliced_experts_copy(model, n_keep)
    for a, b in zip(model.layers, sliced.layers):
        assert tuple(b.experts.gate_up_proj.shape) == (8, 2 * n_keep, 64)
        assert tuple(b.experts.down_proj.shape) == (8, 64, n_keep)
        assert torch.equal(b.experts.gate_up_proj[:, n_keep:], a.experts.gate_up_proj[:, 48:48 + n_keep])
        assert b.gate.weight is a.gate.weight  # the router is shared, not copied
    assert model.layers[0].experts.gate_up_proj.shape[1] == 96  # the original is untouched
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        assert sliced(x).shape == x.shape
