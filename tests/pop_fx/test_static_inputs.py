"""CUDA-graph safety, checked on the CPU: AOT must see every weight and every POP state tensor as a static input.

Under ``mode="reduce-overhead"`` cudagraph trees copy each *non*-static input into the graph's own buffer on
every replay. The backend rewrites a copy of Dynamo's graph; unless the copy carries Dynamo's metadata, AOT
takes it for an exported graph, marks no placeholder static, and every replay would copy the whole model's
weights and the partition state. AOT's verdict is read where it is made (``_try_get_metadata_from_dynamo``).
"""

import pytest
import torch

import pop_fx
from passes.nodes import param_of
from pop_fx.tools.models import tiny_model

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("regional", [True, False])
def test_every_weight_and_state_placeholder_is_a_static_input(monkeypatch, regional):
    import torch._functorch.aot_autograd as aot

    seen = []
    real = aot._try_get_metadata_from_dynamo

    def spy(mod, param_keys, full_args_num, full_args_descs):
        out = real(mod, param_keys, full_args_num, full_args_descs)
        placeholders = list(mod.graph.find_nodes(op="placeholder"))
        if any("pop_state" in n.meta for n in placeholders):  # a graph the pop backend rewrote
            state = [len(param_keys) + i for i, n in enumerate(placeholders) if "pop_state" in n.meta]
            weights = [len(param_keys) + i for i, n in enumerate(placeholders) if param_of(n) is not None]
            seen.append((state, weights, out[1], [n.name for n in placeholders], len(param_keys)))
        return out

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", spy)
    torch._dynamo.reset()
    model = pop_fx.compile(tiny_model("llama"), sparsity=0.5, regional=regional)
    ids = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(seen) >= 2, "the prefill and decode graphs did not both reach AOT"
    for state, weights, static, names, n_params in seen:
        if regional and not (state and weights):
            continue  # a block with no site (the embedding, the LM head)
        assert state and weights
        missing = sorted(set(state + weights) - set(static))
        assert not missing, [names[i - n_params] for i in missing]
