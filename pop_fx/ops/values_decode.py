"""``pop::values_decode``: a whole decode FFN under ``candidate_proxy="int8-values"`` (x → y, one op per site).

Beyond the paper: a low-precision full re-evaluation with an exact down projection. Each decode step

    H̃     = act(x · G̃ᵀ) · (x · Ũᵀ)                    every channel, from the per-row int8 copy (pop_fx.lowbit)
    S_t   = R ∪ top_{n_select}( |H̃_C| · ||Wd[:, C]|| )  POP's candidate scoring (partition.candidate_topk)
    y     = Σ_{j ∈ S_t} H̃_j · Wd[:, j]  (+ bd)          exact down weights, the chosen n_keep channels only

The int8 products run in ``aten._weight_int8pack_mm`` (x and the scales in bf16, bf16 out; ``lowbit.int8_rows_mm``)
or, in the ``reduce_*`` choices, as one reduction Inductor compiles over the int8 rows (``lowbit.int8_rows_reduce``:
the same roundings, the fp32 sum in another order; reads the int8 bytes once where the packed kernel is
compute-bound on this CPU). No exact gate/up row is read: H of the chosen channels IS the int8-derived H̃. The down projection over the n_keep
chosen channels has three implementations (``pop_fx.autotune`` choices; under ``kernels="auto"`` Inductor measures
them, the op's ``kernels`` argument defaulting to it):

* ``ebag``       — ``F.embedding_bag`` over the channel-major copy ``wd_t`` [d_ff, d_out] (made once per model): each
  row's n_keep chosen rows cut into ``EBAG_SPLIT`` bags (ATen runs a bag on one thread), no gathered copy, the
  bags' sums added in fp32 (B reads of the chosen rows at batch B);
* ``masked``     — a masked dense GEMV over the site's own ``wd`` (unchosen channels zeroed): every column read once
  for the whole batch;
* ``gather_sum`` — Σ_j H̃_j · wd_t[j] over the chosen rows as one reduction Inductor fuses the row gather into.

Today's dispatch (eagerly, and without an autotuner): ``ebag`` at batch 1, ``masked`` above (chosen by reasoning).

Static shapes, no host sync (``tests/pop_fx/ops/test_no_host_sync.py``). On CUDA the same torch code runs (no
kernel of its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx import autotune
from pop_fx.lowbit import values_activations
from pop_fx.partition import candidate_topk


def _chosen(x: Tensor, q: Tensor, s: Tensor, rc_idx: Tensor, wd_norm_c: Tensor, n_R: int, n_select: int, d_ff: int,
            act: int, rows: str = "pack") -> tuple[Tensor, Tensor]:
    """(idx [n_keep]: R then the chosen candidates, h_sel [B, n_keep] fp32: their int8-derived activations)."""
    x2 = x.reshape(-1, x.shape[-1])
    h = values_activations(x2, q, s, d_ff, act, rows)  # [B, d_ff] fp32
    rc = rc_idx[0]
    c_idx = rc[n_R:]
    # topk's positions come unordered; sorted, ebag read its rows 1.3x faster alone but no faster in SmolLM2's
    # step, where the sort cost what it saved (0.87 ms a step: examples/decode_profile.py --proxy int8-values)
    pos = candidate_topk(h.index_select(1, c_idx), wd_norm_c, n_select)
    idx = torch.cat([rc[:n_R], c_idx.index_select(0, pos)])
    return idx, h.index_select(1, idx)


EBAG_SPLIT = 8
"""bags per row of ``ebag``: ATen's embedding_bag runs one bag on one thread, so a batch-1 row is cut into this
many bags (threads share them) and their sums added"""


def _down_ebag(idx, h_sel, wd_t, wd, bd, d_ff):
    B, n = h_sel.shape
    step = -(-n // EBAG_SPLIT)
    parts = -(-n // step)
    starts = torch.arange(0, n, step, device=idx.device)
    offsets = (torch.arange(B, device=idx.device)[:, None] * n + starts).reshape(-1)
    y = F.embedding_bag(idx[None].expand(B, -1).reshape(-1), wd_t, offsets,
                        per_sample_weights=h_sel.to(wd_t.dtype).reshape(-1), mode="sum")
    acc = torch.promote_types(wd_t.dtype, torch.float32)
    y = y.view(B, parts, -1).sum(1, dtype=acc)
    return (y + bd.to(acc) if bd is not None else y).to(wd_t.dtype)


def _down_masked(idx, h_sel, wd_t, wd, bd, d_ff):
    hm = torch.zeros(h_sel.shape[0], d_ff, dtype=wd.dtype, device=wd.device).index_copy(1, idx, h_sel.to(wd.dtype))
    return F.linear(hm, wd, bd)


def _down_gather_sum(idx, h_sel, wd_t, wd, bd, d_ff):
    y = (wd_t.index_select(0, idx).float()[None] * h_sel.to(wd_t.dtype).float()[:, :, None]).sum(1)
    return (y + bd.float() if bd is not None else y).to(wd_t.dtype)


DOWNS = {"ebag": _down_ebag, "masked": _down_masked, "gather_sum": _down_gather_sum}


def values_decode_down(x: Tensor, q: Tensor, s: Tensor, wd_t: Tensor, wd: Tensor, bd: Tensor | None, rc_idx: Tensor,
                       wd_norm_c: Tensor, n_R: int, n_select: int, d_ff: int, act: int, down: str,
                       rows: str = "pack") -> Tensor:
    """The op with its int8 row products by ``rows`` (``lowbit.ROWS``) and its down projection by ``down``
    (one of ``DOWNS``)."""
    idx, h_sel = _chosen(x, q, s, rc_idx, wd_norm_c, n_R, n_select, d_ff, act, rows)
    y = DOWNS[down](idx, h_sel, wd_t, wd, bd, d_ff)
    return y.to(x.dtype).reshape(*x.shape[:-1], wd_t.shape[1])


def values_decode_reference(x: Tensor, q: Tensor, s: Tensor, wd_t: Tensor, wd: Tensor, bd: Tensor | None,
                            rc_idx: Tensor, wd_norm_c: Tensor, n_R: int, n_select: int, d_ff: int,
                            act: int) -> Tensor:
    """Today's dispatch: ``embedding_bag`` at batch 1, the masked GEMV above."""
    down = "ebag" if x.reshape(-1, x.shape[-1]).shape[0] == 1 else "masked"
    return values_decode_down(x, q, s, wd_t, wd, bd, rc_idx, wd_norm_c, n_R, n_select, d_ff, act, down)


def _index_inputs(a):
    return {"rc_idx": lambda shape, dtype, device: torch.arange(shape[-1], device=device).expand(*shape).to(dtype)}


CHOICES = autotune.register(
    "pop::values_decode",
    [autotune.Choice(name, lambda down=name, **a: values_decode_down(**a, down=down)) for name in DOWNS]
    + [autotune.Choice(f"reduce_{name}", lambda down=name, **a: values_decode_down(**a, down=down, rows="reduce"))
       for name in DOWNS],
    lambda code, a, lowering: "ebag" if a["x"].reshape(-1, a["x"].shape[-1]).shape[0] == 1 else "masked",
    _index_inputs)


@torch.library.custom_op("pop::values_decode", mutates_args=())
def values_decode(x: Tensor, q: Tensor, s: Tensor, wd_t: Tensor, wd: Tensor, bd: Tensor | None, rc_idx: Tensor,
                  wd_norm_c: Tensor, n_R: int, n_select: int, d_ff: int, act: int, kernels: int = 2) -> Tensor:
    """The FFN output [..., d_out] for decode tokens x [..., d_model] (see the module docstring)."""
    return autotune.run("pop::values_decode", dict(x=x, q=q, s=s, wd_t=wd_t, wd=wd, bd=bd, rc_idx=rc_idx,
                                                   wd_norm_c=wd_norm_c, n_R=n_R, n_select=n_select, d_ff=d_ff,
                                                   act=act, kernels=kernels))


@values_decode.register_fake
def _(x, q, s, wd_t, wd, bd, rc_idx, wd_norm_c, n_R, n_select, d_ff, act, kernels=2):
    autotune.install()  # tracing reaches the fake before Inductor lowers the op: its lowering is in place
    return x.new_empty(*x.shape[:-1], wd_t.shape[1])


__all__ = ["CHOICES", "DOWNS", "EBAG_SPLIT", "values_decode", "values_decode_down", "values_decode_reference"]
