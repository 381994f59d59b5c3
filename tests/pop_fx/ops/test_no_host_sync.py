"""The decode ops never wait for the host and have no data-dependent shape: what a CUDA graph needs.

Each decode graph the passes produce (dense sites under both scopes and the proxy, routed experts) runs
once on the CPU under a dispatch mode that records every aten op executed *inside* a ``pop::`` decode op.
A host sync (``.item()``, ``int(t)``, ``bool(t)``: ``_local_scalar_dense``) or an op whose output size
depends on the data (``nonzero``, boolean indexing, ``masked_select``, ``unique``) fails the test: neither
can be captured in a CUDA graph (a GPU would stall at it every step).
"""

import pytest
import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode

from passes.pipeline import run_passes
from pop_fx import PopConfig
from pop_fx.tools.capture import capture_graphs
from pop_fx.tools.models import tiny_model

pytestmark = pytest.mark.compile

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
           aten.repeat_interleave.Tensor, aten.nonzero_numpy.default, aten.argwhere.default}
DECODE_OPS = {"decode", "decode_seq", "proxy_select", "gather_in", "decode_sel", "experts_decode", "values_decode"}


def _data_dependent(func, args) -> bool:
    if func in SYNCING:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):  # boolean-mask indexing
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
    return False


class _Detect(TorchDispatchMode):
    def __init__(self, op, found):
        super().__init__()
        self.op, self.found = op, found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _data_dependent(func, args):
            self.found.append((self.op, str(func)))
        return func(*args, **(kwargs or {}))


class DecodeOpSyncs(TorchDispatchMode):
    """Records the calls of pop decode ops; ``check()`` then runs each op's Python body again under a mode that
    sees every aten op it executes (a dispatch mode sees a custom op as one opaque call, and cannot nest
    another mode inside its handler) and returns (pop op, aten op) for each syncing or data-dependent one."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def ran(self):
        return {name for name, *_ in self.calls}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "pop" and name in DECODE_OPS:
            self.calls.append((name, func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))

    def check(self):
        found = []
        for name, func, args, kwargs in self.calls:
            with _Detect(name, found):
                _maybe_get_opdef(func)._init_fn(*args, **kwargs)
        return found


CASES = {
    "batch": ("llama", dict(), {"decode"}),
    "sequence": ("llama", dict(scope="sequence"), {"decode_seq"}),
    "proxy": ("llama", dict(candidate_proxy="int8", candidate_ratio=0.6), {"proxy_select", "gather_in", "decode_sel"}),
    "experts": ("qwen3_moe", dict(), {"experts_decode"}),
    "values": ("llama", dict(candidate_proxy="int8-values", candidate_ratio=2.0), {"values_decode"}),
    "values-band": ("llama", dict(candidate_proxy="int8-values", candidate_ratio=0.8), {"values_decode"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_ops_have_no_host_sync_and_no_data_dependent_shape(case):
    family, fields, ops = CASES[case]
    model = tiny_model(family)
    if family == "qwen3_moe":
        model.set_experts_implementation("grouped_mm")
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    cfg = PopConfig(sparsity=0.5, lowering="eager", **fields)
    captured = capture_graphs(model, ids, torch.ones_like(ids), max_new_tokens=2)
    mode = DecodeOpSyncs()
    with torch.no_grad():
        for c in captured:
            rw = run_passes(c.gm, cfg)
            rw.gm(*c.example_inputs, *rw.state_tensors)  # prefill first: the decode graphs read its partition
            if rw.phase == "decode":
                with mode:
                    rw.gm(*c.example_inputs, *rw.state_tensors)
    assert mode.ran == ops
    assert mode.check() == []


def test_the_mode_catches_a_host_sync_inside_a_decode_op(monkeypatch):
    # The negative control: the same check fails once the decode op reads a value back to the host.
    import pop_fx.ops.decode as D

    real = D.decode_reference

    def syncing(h_rc, *args):
        if bool((h_rc != h_rc).any()):  # a host sync, as a NaN check written in Python would be
            raise AssertionError
        return real(h_rc, *args)

    monkeypatch.setattr(D, "decode_reference", syncing)
    h, wd_rc, wd_norm_c = torch.randn(1, 1, 12), torch.randn(5, 16), torch.rand(4)
    mode = DecodeOpSyncs()
    with mode:
        torch.ops.pop.decode(h, wd_rc, None, wd_norm_c, 8, 2)
    assert mode.check() == [("decode", "aten._local_scalar_dense.default")]
