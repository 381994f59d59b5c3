"""``pop::experts_decode``: each decode token through its chosen experts, each over R ∪ selected candidates.

State as in ``experts_prefill.py`` (which documents the experts' state tensors). Fixed shapes, no host sync:
a step at batch B and top-k is the B·k (token, expert) *pairs*, whatever the routing::

    pairs    = top_k_index.flatten(), sorted by expert (stable: ties keep token order)
    offs     = per-expert cumulative pair counts [E] (a binary search over the sorted experts: no ``.item()``)
    z        = grouped GEMV(x[token of pair], w_in[expert of pair])      [B·k, 2·(n_R+n_C)]   one call
    h        = act(gate) ⊙ up                                             [B·k, n_R+n_C]
    score_c  = ||h_C over the pairs of the same expert||_2 · ||Wd[:, C]||  (docs/spec.md's batch scoring, per expert)
    S        = top_{n_select}(score_c) per pair (``partition.candidate_topk``: docs/spec.md's tie-break)
    y        = grouped GEMV(h ⊙ [1_R, 1_S], wd_rc[expert of pair])          [B·k, H]             one call
    out      = Σ_k  y · top_k_weights, after a gather back to (token, k) order [B, H]

The two grouped GEMVs (``grouped_gemv``) read each pair's expert layout in place, one contiguous block per
expert: ``torch._grouped_mm`` (groups = experts, offsets from the sorted pairs; an expert a step does not route
to is never read) on the CPU, and on CUDA where torch has its fast kernel (bf16 on sm_90, aligned); the Triton
kernel ``_pair_gemv_kernel`` on CUDA otherwise and with ``kernels="triton"`` (one program per (pair, row block);
pairs past the last offset are skipped, as the grouped paths skip them); a gather + ``bmm`` anywhere else
(copies the pairs' blocks: correct, not fast).
Under ``scope="sequence"`` no layout exists (one per sequence would multiply expert memory by the batch):
gate/up and down run over the expert's whole weights and the pair's own R ∪ C is gathered from the result.

``empty_expert="dense"`` marks experts that got no prefill token as dense (all channels): their pairs run a
second grouped GEMV pair over the original weights, in which every other pair is sorted past the last offset
and so computes nothing on the grouped and Triton paths (still fixed shapes, no host sync).

``experts_decode_loop`` is the loop over experts this op replaces (host syncs, data-dependent shapes): the
reference the tests compare it with, with the eager reference's math (``pop_fx.reference``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pop_fx import autotune, partition as P
from pop_fx.activations import activation as activation_fn
from pop_fx.ops._triton import INTERPRET, tl, triton
from pop_fx.ops.layout import expert_in_rows

# --------------------------------------------------------------------------------------------
# grouped GEMV over per-expert weight blocks: one call for all pairs
# --------------------------------------------------------------------------------------------


def route_pairs(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(order, expert, token, offs) of the B·k pairs sorted by expert: ``order`` [P] positions in the flattened
    top_k_index, ``expert`` [P] and ``token`` [P] of each sorted pair, ``offs`` [E] int32 cumulative counts."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert = flat.index_select(0, order)
    return order, expert, torch.div(order, k, rounding_mode="floor"), _offsets(expert, num_experts)


def _offsets(sorted_keys: Tensor, num_experts: int) -> Tensor:
    """[E] int32 end of each expert's run in ``sorted_keys`` (a binary search: no scatter, no host sync)."""
    experts = torch.arange(num_experts, device=sorted_keys.device, dtype=sorted_keys.dtype)
    return torch.searchsorted(sorted_keys, experts, right=True, out_int32=True)


def combine(y: Tensor, order: Tensor, top_k_weights: Tensor) -> Tensor:
    """[P, H] outputs of the sorted pairs -> [B, H]: back to (token, k) order, weighted by the router, summed
    over k. (A gather and a sum, not ``index_add_``: on the CPU that scatter took ~0.3 s for 8 rows into one
    token's row at 2 threads, measured; a gather has no write conflicts.)"""
    B, k = top_k_weights.shape
    y = y.index_select(0, torch.argsort(order))
    return (y.view(B, k, -1) * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(1)


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """``torch._grouped_mm`` on the CPU needs 16-byte-aligned strides and a base address."""
    if x.device.type != "cpu" or not hasattr(torch, "_grouped_mm"):
        return False
    es = x.element_size()
    return all((s * es) % 16 == 0 for s in (*x.stride()[:-1], *w.stride()[:-2], w.stride(-1))) \
        and x.stride(-1) == 1 and w.stride(-2) == 1 and _aligned(x) and _aligned(w)


def _aligned(t: Tensor) -> bool:
    if torch.compiler.is_compiling():  # no data_ptr under tracing (the op itself runs eagerly, as an extern call)
        return True
    return t.data_ptr() % 16 == 0  # also catches a memory-mapped checkpoint's unaligned storage


def _mm_aligned(x: Tensor, wt: Tensor) -> bool:
    es = x.element_size()
    return all((s * es) % 16 == 0 for s in (*x.stride()[:-1], *wt.stride()[:-2], wt.stride(-1), wt.shape[-1])) \
        and x.stride(-1) == 1 and wt.stride(-2) == 1 and _aligned(x) and _aligned(wt)


def cuda_gemv_path(kernels: int, dtype: torch.dtype, capability: tuple[int, int], aligned: bool,
                   has_triton: bool) -> str:
    """Which kernel ``grouped_gemv`` runs on CUDA: "grouped_mm" (torch's, reads each expert block in place),
    "triton" (``_pair_gemv_kernel``, reads in place too), or "bmm" (copies every pair's block: last resort)."""
    if kernels == 1 and has_triton:
        return "triton"
    if dtype == torch.bfloat16 and tuple(capability)[0] == 9 and aligned:
        return "grouped_mm"
    return "triton" if has_triton else "bmm"


GROUPED_MM = 2
"""``kernels`` code of ``grouped_gemv`` that asks for ``torch._grouped_mm`` wherever torch has it for these tensors"""


def grouped_mm_serves(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` computes ``grouped_gemv`` for these operands (CPU: 16-byte strides; CUDA: bf16 on
    sm_90 or later)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    wt = w.transpose(1, 2)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9 and _mm_aligned(x, wt)
    return _grouped_mm_ok(x, wt)


def grouped_gemv(x: Tensor, w: Tensor, expert: Tensor, offs: Tensor, kernels: int = 0) -> Tensor:
    """y[p] = w[expert[p]] @ x[p] for pairs sorted by expert: x [P, K], w [E, N, K] -> [P, N] (x's dtype).

    Rows p >= offs[-1] are not computed on the grouped and Triton paths (their value is undefined); ``expert``
    must then name an expert in range anyway (the bmm path computes them). ``kernels``: 0 = today's path for the
    device, 1 = the Triton pair kernel, ``GROUPED_MM`` = torch's grouped GEMM where it serves (else today's path)."""
    wt = w.transpose(1, 2)  # [E, K, N]: a view, the expert blocks stay where they are
    if kernels == GROUPED_MM and grouped_mm_serves(x, w):
        return torch._grouped_mm(x, wt, offs=offs)
    if kernels == 1 and INTERPRET and triton is not None:  # the pair kernel on CPU tensors: the interpreter's tests
        return pair_gemv_triton(x, w, expert, offs, launch=torch.library.wrap_triton)
    if x.device.type == "cuda":
        path = cuda_gemv_path(kernels, x.dtype, torch.cuda.get_device_capability(x.device), _mm_aligned(x, wt),
                              triton is not None)
        if path == "triton":
            return pair_gemv_triton(x, w, expert, offs, launch=torch.library.wrap_triton)
        if path == "grouped_mm":
            return torch._grouped_mm(x, wt, offs=offs)
    elif _grouped_mm_ok(x, wt):
        return torch._grouped_mm(x, wt, offs=offs)
    return torch.bmm(w.index_select(0, expert), x.unsqueeze(-1)).squeeze(-1)


# ``pop::grouped_gemv``: ``grouped_gemv`` as one opaque op, so the code around it (routing, scoring, top-k, mask,
# combine) can be plain torch that Inductor traces and fuses (the experts decode op and the serving layouts use
# it). Defined with ``torch.library.Library`` and backend kernels, not ``custom_op``: it runs twice per layer per
# decode step, and custom_op's Python wrapper cost 21 µs a call against 10 µs here (measured, [1, 576] rows).
# No autograd formula: decode runs under no_grad.
_LIB = torch.library.Library("pop", "FRAGMENT")
_LIB.define("grouped_gemv(Tensor x, Tensor w, Tensor group, Tensor offs, int kernels=1) -> Tensor")


def grouped_gemv_op(x: Tensor, w: Tensor, group: Tensor, offs: Tensor, kernels: int = 1) -> Tensor:
    """``grouped_gemv`` through the ``pop::grouped_gemv`` op (traceable: a fake kernel gives its shape)."""
    return torch.ops.pop.grouped_gemv(x, w, group, offs, kernels)


def _grouped_gemv_kernel(x: Tensor, w: Tensor, group: Tensor, offs: Tensor, kernels: int = 1) -> Tensor:
    return grouped_gemv(x, w, group, offs, kernels).contiguous()  # _grouped_mm may pad its rows


_LIB.impl("grouped_gemv", _grouped_gemv_kernel, "CPU")
_LIB.impl("grouped_gemv", _grouped_gemv_kernel, "CUDA")


@torch.library.register_fake("pop::grouped_gemv")
def _(x, w, group, offs, kernels=1):
    return x.new_empty(x.shape[0], w.shape[1])


# Triton (CUDA; checked under TRITON_INTERPRET=1): grid (pairs, N / BLOCK_N). Each program streams one
# [BLOCK_N, K] slab of its pair's expert block; adjacent programs of one pair read adjacent rows, and pairs
# of one expert (sorted next to each other) hit the same slabs in L2.
PAIR_BLOCK_N = 64  # 64 rows × 128 bf16 columns = one 16 KB tile in flight per load
PAIR_BLOCK_K = 128  # 256 contiguous bytes of a weight row per load (bf16): whole sectors


if triton is not None:

    @triton.jit
    def _pair_gemv_kernel(x_ptr, w_ptr, e_ptr, offs_ptr, y_ptr, N, K, E, stride_xp, stride_we, stride_wn, stride_yp,
                          HAS_OFFS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        p = tl.program_id(0)
        nb = tl.program_id(1)
        if HAS_OFFS:  # pairs sorted past the last expert's offset compute nothing (and read no weights)
            live = p < tl.load(offs_ptr + E - 1)
        else:
            live = p >= 0
        k_end = tl.where(live, K, 0)
        n_end = tl.where(live, N, 0)
        e = tl.load(e_ptr + p).to(tl.int64)
        rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + p * stride_xp + cols, mask=cols < K, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :],
                         mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(wv * xv[None, :], axis=1)
        tl.store(y_ptr + p * stride_yp + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < n_end)


def pair_gemv_triton(x: Tensor, w: Tensor, expert: Tensor, offs: Tensor | None = None, launch=None,
                     out: Tensor | None = None) -> Tensor:
    """One launch for all pairs: y[p] = w[expert[p]] @ x[p]; x [P, K], w [E, N, K] (rows contiguous). With
    ``offs`` (the grouped paths' [E] cumulative counts) rows p >= offs[-1] are left unwritten, as there (``out``,
    a contiguous [P, N] buffer, receives the rows; the tests poison it)."""
    x = x.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    Pn, K = x.shape
    E, N = w.shape[0], w.shape[1]
    y = torch.empty(Pn, N, dtype=x.dtype, device=x.device) if out is None else out
    grid = (Pn, triton.cdiv(N, PAIR_BLOCK_N))
    kernel = _pair_gemv_kernel if launch is None else launch(_pair_gemv_kernel)
    expert = expert.contiguous()
    kernel[grid](x, w, expert, offs.contiguous() if offs is not None else expert, y, N, K, E, x.stride(0),
                 w.stride(0), w.stride(1), y.stride(0), HAS_OFFS=offs is not None, BLOCK_N=PAIR_BLOCK_N,
                 BLOCK_K=PAIR_BLOCK_K)
    return y


def pair_gemv_reference(x: Tensor, w: Tensor, expert: Tensor) -> Tensor:
    return torch.bmm(w.index_select(0, expert).float(), x.float().unsqueeze(-1)).squeeze(-1).to(x.dtype)


# --------------------------------------------------------------------------------------------
# the op: fixed shapes
# --------------------------------------------------------------------------------------------


def _dense_pairs(x: Tensor, expert: Tensor, is_dense: Tensor, gate_up: Tensor, down: Tensor, act,
                 kernels: int) -> Tensor:
    """The whole expert for pairs flagged ``is_dense`` (0 elsewhere): the other pairs sort past the offsets."""
    E = down.shape[0]
    key = torch.where(is_dense, expert, torch.full_like(expert, E))  # other pairs sort past the last offset
    order = torch.argsort(key, stable=True)
    e_sorted = expert.index_select(0, order)
    offs = _offsets(key.index_select(0, order), E)
    gate, up = grouped_gemv_op(x.index_select(0, order), gate_up, e_sorted, offs, kernels).chunk(2, dim=-1)
    y = grouped_gemv_op((act(gate) * up).contiguous(), down, e_sorted, offs, kernels)
    y = torch.where(is_dense.index_select(0, order)[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y.index_select(0, torch.argsort(order))


GEMVS = ("grouped_mm", "bmm", "pair_loop", "triton_pair")
"""How the experts decode's two GEMVs over the pairs run (its autotuning choices, ``pop_fx.autotune``):

* ``grouped_mm``  — ``pop::grouped_gemv`` asking for ``torch._grouped_mm`` (groups = experts, each block read once
  for all its pairs; today's path at batch > 1, and eagerly);
* ``bmm``         — ``bmm(w[group], x)``: under Inductor on the CPU one generated C++ kernel that reads each pair's
  block in place (no copy), at about twice ``_grouped_mm``'s bandwidth for M = 1 (OLMoE's gate/up, 8 pairs: 2.30 vs
  4.68 ms in bf16, 5.24 vs 8.16 ms in fp32; ``examples/copy_gemv_variants.py``); a repeated expert is read once per
  pair. Today's path at batch 1 under Inductor. Run eagerly it copies the blocks first;
* ``pair_loop``   — one GEMV per pair, unrolled (P = B·k ≤ ``PAIR_LOOP_MAX``): what a loop over the routed experts
  costs at fixed shapes;
* ``triton_pair`` — ``pop::grouped_gemv`` with the Triton pair kernel (CUDA)."""
PAIR_LOOP_MAX = 16  # unrolled GEMVs per call: beyond it the traced graph (and its compile) grows for no gain


def _reads_in_place(x: Tensor, distinct: bool) -> bool:
    """Today's dispatch: whether the GEMVs over ``x``'s pairs run as ``bmm(w[group], x)`` (see ``GEMVS``)."""
    return distinct and x.device.type == "cpu" and torch.compiler.is_compiling()


def _gemv_code(gemv: str | None, kernels: int) -> int:
    return {"grouped_mm": GROUPED_MM, "triton_pair": 1}.get(gemv, kernels)


def pairs_gemv(x: Tensor, w: Tensor, group: Tensor, offs: Tensor, kernels: int, distinct: bool,
               gemv: str | None = None) -> Tensor:
    """y[p] = w[group[p]] @ x[p] by ``gemv`` (one of ``GEMVS``), or today's dispatch (None): ``bmm`` where every pair
    names its own group (``distinct``: one token's k experts) on the CPU under Inductor, ``grouped_gemv_op``
    otherwise (with repeated groups, batch > 1, the grouped GEMM reads each block once)."""
    if gemv == "bmm" or gemv is None and _reads_in_place(x, distinct):
        return torch.bmm(w[group], x.unsqueeze(-1)).squeeze(-1)
    if gemv == "pair_loop":
        return torch.stack([w[group[p:p + 1]][0] @ x[p] for p in range(x.shape[0])])  # a tensor index: no host read
    return grouped_gemv_op(x, w, group, offs, _gemv_code(gemv, kernels))


def _top_candidates(h_c: Tensor, wd_norm_rows: Tensor, n_select: int, same_group: Tensor | None) -> Tensor:
    """[P, n_select] positions in C of each row's top candidates by |h| · ||Wd[:, j]|| (``keep_top_candidates``)."""
    hf = h_c.float()
    if same_group is None:
        scores = hf.abs()
    else:
        scores = ((same_group[:, None] == same_group[None, :]).float() @ hf.square()).sqrt()
    return torch.topk(P.rank_keys(scores * wd_norm_rows.float()), n_select, dim=-1, sorted=False).indices


def keep_top_candidates(h_c: Tensor, wd_norm_rows: Tensor, n_select: int, same_group: Tensor | None = None) -> None:
    """Zero, in place, every candidate of ``h_c`` [P, n_C] but each row's top ``n_select`` by |h| · ||Wd[:, j]||
    (``wd_norm_rows`` [P, n_C]); with ``same_group`` [P], |h| is the L2 norm over the rows of the same group
    (docs/spec.md's batch scoring, as one [P, P] 0/1 product: P is tiny). Ties as ``partition.rank_keys``."""
    if n_select == 0:
        h_c.zero_()
        return
    if n_select >= h_c.shape[-1]:
        return
    sel = _top_candidates(h_c, wd_norm_rows, n_select, same_group)
    h_c.mul_(torch.zeros_like(h_c).scatter_(1, sel, 1))


def keep_mask(h: Tensor, wd_norm_rows: Tensor, n_R: int, n_select: int, same_group: Tensor | None = None) -> Tensor:
    """0/1 over R ∪ C ([P, n_R + n_C], h's dtype): R, and the candidates ``keep_top_candidates`` keeps."""
    Pn, n_rc = h.shape
    n_C = n_rc - n_R
    if n_select >= n_C:
        return torch.ones_like(h)
    idx = torch.arange(n_R, device=h.device).expand(Pn, n_R)
    if n_select:
        idx = torch.cat([idx, n_R + _top_candidates(h[:, n_R:], wd_norm_rows, n_select, same_group)], dim=1)
    return torch.zeros_like(h).scatter_(1, idx, 1)


def layout_decode_grouped(x: Tensor, w_in: Tensor, wd_rc: Tensor, group: Tensor, offs: Tensor, wd_norm_rows: Tensor,
                          n_R: int, n_select: int, act, same_group: Tensor | None = None, kernels: int = 1,
                          distinct: bool = False, gemv: str | None = None) -> Tensor:
    """Rows sorted by group, each through its group's R ∪ C layout (``w_in`` [G, 2·n_rc, K], ``wd_rc``
    [G, d_out, padded n_rc]): one grouped GEMV for gate/up, the candidates masked, one for down -> [P, d_out].
    The experts decode (groups = experts) and the serving layouts (groups = request slots) share it;
    ``distinct``: no two rows share a group; ``gemv``: how the GEMVs run (``pairs_gemv``)."""
    n_rc = w_in.shape[1] // 2
    gate, up = pairs_gemv(x, w_in, group, offs, kernels, distinct, gemv).chunk(2, dim=-1)
    h = act(gate) * up  # [P, n_rc]: R then C
    if gemv in ("bmm", "pair_loop") or gemv is None and _reads_in_place(x, distinct):
        # Inductor inlines the down GEMV's input into its loop over the weights: h times a 0/1 mask made by a
        # scatter (a stored buffer) costs two loads and a multiply per weight element there; a pad and an update
        # of h's C slice cost index arithmetic and blends per element (measured: half POP's bf16 MoE step)
        keep = keep_mask(h, wd_norm_rows, n_R, n_select, same_group)
        return pairs_gemv(h * keep, wd_rc[:, :, :n_rc], group, offs, kernels, distinct, gemv or "bmm")
    keep_top_candidates(h[:, n_R:], wd_norm_rows, n_select, same_group)
    # padded to the layout's row stride (layout.ROW_ALIGN): aligned rows keep the CPU on _grouped_mm (an unaligned
    # n_rc, e.g. SmolLM2's 845, sent every call to the fallback's weight gather)
    return grouped_gemv_op(F.pad(h, (0, wd_rc.shape[-1] - n_rc)), wd_rc, group, offs, _gemv_code(gemv, kernels))


def experts_decode_pairs(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor,
                         rc_idx: Tensor, wd_norm_c: Tensor, dense: Tensor, w_in: Tensor, wd_rc: Tensor, n_R: int,
                         n_select: int, activation: str, per_sequence: bool, empty_dense: bool = False,
                         kernels: int = 0, gemv: str | None = None) -> Tensor:
    """The op's body: hidden [B, H] -> [B, H] with fixed shapes and no host sync (module docstring); ``gemv``: how
    its GEMVs run (one of ``GEMVS``; None: today's dispatch for ``kernels``)."""
    act = activation_fn(activation)
    E, H, d_ff = down.shape
    B, k = top_k_index.shape
    n_rc = rc_idx.shape[-1]
    n_C = n_rc - n_R
    order, expert, token, offs = route_pairs(top_k_index, E)
    x = hidden.index_select(0, token)  # [P, H]
    group = token if per_sequence else torch.zeros_like(token)
    G = rc_idx.shape[1]
    slot = expert * G + group  # row of the pair's (expert, partition group) in the [E·G, ...] state
    # docs/spec.md's batch scoring per expert (the L2 norm over the pairs routed to it) unless each (expert, group)
    # has one pair: per sequence, or at batch 1 (a token's k experts differ)
    same_group = None if per_sequence or B == 1 else expert
    distinct = B == 1  # one token: its k experts differ
    wd_rows = wd_norm_c.reshape(E * G, n_C).index_select(0, slot)
    if w_in.numel():  # scope="batch": the R ∪ C layouts, one contiguous block per expert
        y = layout_decode_grouped(x, w_in, wd_rc, expert, offs, wd_rows, n_R, n_select, act, same_group, kernels,
                                  distinct, gemv)
    else:  # scope="sequence": the whole expert, then the pair's own R ∪ C
        rc = rc_idx.reshape(E * G, n_rc).index_select(0, slot)  # [P, n_rc]
        z = pairs_gemv(x, gate_up, expert, offs, kernels, distinct, gemv)
        h = act(z.gather(1, rc)) * z.gather(1, rc + d_ff)
        keep_top_candidates(h[:, n_R:], wd_rows, n_select, same_group)
        h_full = torch.zeros(h.shape[0], d_ff, dtype=h.dtype, device=h.device).scatter_(1, rc, h)
        y = pairs_gemv(h_full, down, expert, offs, kernels, distinct, gemv)
    if empty_dense:
        is_dense = dense.reshape(E * G).index_select(0, slot)
        y_dense = _dense_pairs(x, expert, is_dense, gate_up, down, act, kernels)
        y = torch.where(is_dense[:, None], y_dense, y)
    return combine(y, order, top_k_weights).to(hidden.dtype)


_ARGS = ("hidden", "top_k_index", "top_k_weights", "gate_up", "down", "rc_idx", "wd_norm_c", "dense", "w_in", "wd_rc",
         "n_R", "n_select", "activation", "per_sequence", "empty_dense")


def _choice(gemv: str):
    def fn(**a):
        return experts_decode_pairs(*(a[k] for k in _ARGS), kernels=1 if gemv == "triton_pair" else 0, gemv=gemv)

    return fn


def _pairs(a) -> int:
    return a["top_k_index"].numel()


def _default(code: int, a, lowering: bool) -> str:
    """Today's dispatch: the Triton pair kernel under ``kernels="triton"`` on CUDA; on the CPU the in-place ``bmm``
    at batch 1 under Inductor, torch's grouped GEMM otherwise; on CUDA torch's grouped GEMM where it has a kernel,
    else the pair kernel (``cuda_gemv_path``)."""
    x = a["hidden"]
    if x.device.type == "cuda":
        path = cuda_gemv_path(1 if code == 1 else 0, x.dtype, torch.cuda.get_device_capability(x.device),
                              lowering or _mm_aligned(x, a["gate_up"].transpose(1, 2)), triton is not None)
        return {"triton": "triton_pair", "grouped_mm": "grouped_mm"}.get(path, "bmm")
    return "bmm" if lowering and x.shape[0] == 1 else "grouped_mm"


def _grouped_serves(a) -> bool:
    x, w = a["hidden"], a["gate_up"]
    return x.device.type == "cpu" or grouped_mm_serves(x.new_empty(1, w.shape[-1]), w)


def _index_inputs(a):
    E = a["down"].shape[0]

    def routes(shape, dtype, device):  # distinct experts per token, spread over the experts like a real router
        B, k = shape
        return ((torch.arange(B, device=device)[:, None] * k + torch.arange(k, device=device)) % E).to(dtype)

    return {"top_k_index": routes,
            "rc_idx": lambda shape, dtype, device: torch.arange(shape[-1], device=device).expand(*shape).to(dtype)}


CHOICES = autotune.register("pop::experts_decode", [
    autotune.Choice("grouped_mm", _choice("grouped_mm"), serves=_grouped_serves),
    autotune.Choice("bmm", _choice("bmm")),
    autotune.Choice("pair_loop", _choice("pair_loop"), serves=lambda a: _pairs(a) <= PAIR_LOOP_MAX, any_size=False),
    autotune.Choice("triton_pair", _choice("triton_pair"), "triton",
                    lambda a: a["hidden"].device.type == "cuda" and triton is not None),
], _default, _index_inputs)


# A ``custom_op``, opaque until Inductor lowers it: ``pop_fx.autotune`` then inlines the chosen GEMV's traced body
# (plain torch around the two GEMVs), so the routing, scoring, top-k, mask and combine fuse into Inductor's own kernels
# instead of ~25 eager ops per layer.
@torch.library.custom_op("pop::experts_decode", mutates_args=())
def experts_decode(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    rc_idx: Tensor,
    wd_norm_c: Tensor,
    dense: Tensor,
    w_in: Tensor,
    wd_rc: Tensor,
    n_R: int,
    n_select: int,
    activation: str,
    per_sequence: bool,
    empty_dense: bool = False,
    kernels: int = 0,
) -> Tensor:
    """hidden [B, H] (one token per sequence) -> [B, H]; only the experts a token chose run for it."""
    a = dict(zip(_ARGS, (hidden, top_k_index, top_k_weights, gate_up, down, rc_idx, wd_norm_c, dense, w_in, wd_rc,
                         n_R, n_select, activation, per_sequence, empty_dense)))
    return autotune.run("pop::experts_decode", {**a, "kernels": kernels})


@experts_decode.register_fake
def _(hidden, *args, **kwargs):
    autotune.install()  # tracing reaches the fake before Inductor lowers the op: its lowering is in place
    return torch.empty_like(hidden)


# --------------------------------------------------------------------------------------------
# the loop this op replaced: the tests' reference (host syncs, data-dependent shapes)
# --------------------------------------------------------------------------------------------


def _decode_expert(x: Tensor, e: int, g: int, gate_up: Tensor, down: Tensor, rc_idx: Tensor, wd_norm_c: Tensor,
                   dense: Tensor, w_in: Tensor, wd_rc: Tensor, n_R: int, n_select: int, act) -> Tensor:
    """Expert ``e``'s output for rows ``x`` [n, H] of partition group ``g`` (before routing weights)."""
    if bool(dense[e, g]):
        gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        return F.linear(act(gate) * up, down[e])
    d_ff = down.shape[-1]
    if w_in.numel():
        z, wdl = F.linear(x, w_in[e]), wd_rc[e, :, : w_in.shape[1] // 2]  # rows padded (layout.ROW_ALIGN)
    else:  # scope="sequence": this group's R ∪ C gathered from the original weights
        rc = rc_idx[e, g]
        z, wdl = F.linear(x, gate_up[e].index_select(0, expert_in_rows(rc, d_ff))), down[e].index_select(1, rc)
    gate, up = z.chunk(2, dim=-1)
    h_rc = act(gate) * up  # [n, n_R + n_C]
    if n_select == 0:
        return F.linear(h_rc[:, :n_R], wdl[:, :n_R])
    h_c = h_rc[:, n_R:]
    sel = P.select(h_c, wd_norm_c[e, g], n_select)  # positions within C, scored over the group's rows
    keep_c = torch.zeros(h_c.shape[-1], dtype=h_c.dtype, device=h_c.device).index_fill_(0, sel, 1)
    return F.linear(torch.cat([h_rc[:, :n_R], h_c * keep_c], dim=-1), wdl)


def experts_decode_loop(hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor, down: Tensor,
                        rc_idx: Tensor, wd_norm_c: Tensor, dense: Tensor, w_in: Tensor, wd_rc: Tensor, n_R: int,
                        n_select: int, activation: str, per_sequence: bool) -> Tensor:
    """A Python loop over experts, ``where``/``numel``/``bool``/``int`` on the routing: the tests' reference."""
    act = activation_fn(activation)
    E = down.shape[0]
    final = torch.zeros_like(hidden)
    for e in range(E):
        top_k_pos, token_idx = torch.where(top_k_index.t() == e)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        if per_sequence:  # row b is sequence b (one token each): its own partition
            out = torch.cat([_decode_expert(x[i:i + 1], e, int(token_idx[i]), gate_up, down, rc_idx, wd_norm_c, dense,
                                            w_in, wd_rc, n_R, n_select, act) for i in range(x.shape[0])])
        else:
            out = _decode_expert(x, e, 0, gate_up, down, rc_idx, wd_norm_c, dense, w_in, wd_rc, n_R, n_select, act)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


__all__ = ["CHOICES", "GEMVS", "cuda_gemv_path", "experts_decode", "experts_decode_loop", "experts_decode_pairs", "grouped_gemv",
           "grouped_gemv_op",
           "keep_top_candidates", "layout_decode_grouped", "pair_gemv_reference", "pair_gemv_triton", "route_pairs",
           "combine"]
