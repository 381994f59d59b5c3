"""Eager POP on a live Hugging Face model: the oracle for every other execution path.

    with pop_fx.reference.pruned(model, PopConfig(sparsity=0.5)):
        model.generate(...)

How it works (plain hooks, no graph rewriting):

* A forward pre-hook on the model reads each call's inputs and decides prefill
  vs decode: L = new tokens per sequence; the call is a prefill iff L > 1 or
  the cache is empty (``cache``/``past_key_values`` is None or has length 0, which makes
  a one-token prompt a prefill). A multi-token forward on a non-empty cache
  (multi-turn, chunked prefill, assisted decoding) is a prefill too: it
  re-partitions from its own tokens only (docs/spec.md, "ours"). The hook also
  records the current tokens' padding mask (``partition.token_mask``: from a 2-D or a static cache's 4-D mask; 0 =
  padding); padding never counts towards importance.
* Dense sites (plain, gated, fused_gated, shared_expert): a forward pre-hook on
  the down projection receives H and returns ``H * keep_mask``. Multiplying by
  a 0/1 mask keeps the summation order of the dense down projection, so the
  result is exactly "compute only the kept channels" — what an oracle needs.
* 3-D experts: the experts module's forward is replaced, inside the context
  only, by a per-expert loop with the same math as transformers' eager
  ``MixtralExperts.forward``, masking each expert's intermediate.
* A site whose partition would keep every channel (r = 0) or none gets no
  hook at all, so r = 0 is bit-for-bit the dense model.

Leaving the context removes every hook and patch; ``state_dict`` is never
touched. ``masked(model, masks)`` applies fixed per-site keep-masks at every
forward (static baselines such as Wanda-sp or a random mask).

With ``scope="sequence"`` the batch must keep its prefill size and order while
decoding. Beam search satisfies this: ``generate()`` expands each prompt into its
beams before the prefill, so a prompt's beams share its partition, and beams of
one prompt reordered among themselves keep the same partition (tested in
tests/pop_fx/test_reliability.py).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from pop_fx import partition as P
from pop_fx.config import PopConfig
from pop_fx.partition import (
    PartitionSizes,
    down_column_norm,
    importance,
    keep_set,
    partition_sizes,
    select,
    split,
    weight_only_scores,
)
from pop_fx.sites import FFNSite, find_module_sites


@dataclass
class _Call:
    """What the model-level pre-hook learned about the forward call in flight."""

    prefill: bool
    B: int
    L: int
    token_mask: torch.Tensor | None  # [B, L] bool, False = padding


@dataclass
class SiteState:
    """One site's partition, replaced by every prefill.

    For scope "batch" R/C/keep are 1-D; for "sequence" they are [B, n] and
    ``dense`` marks sequences left unpruned (an expert that got no prefill
    token from them, with ``empty_expert="dense"``).
    """

    site: FFNSite
    sizes: PartitionSizes
    wd_norm: torch.Tensor
    R: torch.Tensor | None = None
    C: torch.Tensor | None = None
    dense: torch.Tensor | bool = False
    steps: int = 0
    """decode steps since the last prefill (for introspection)"""
    last_keep: torch.Tensor | None = field(default=None, repr=False)
    """the keep-mask ([d_ff] or [B, d_ff]) of the latest forward"""
    proxy: "_Proxy | None" = field(default=None, repr=False)
    """candidate_proxy: the site's int8 copy and activation (None: candidates scored exactly)"""
    allocated: list[PartitionSizes] | None = None
    """budget other than "uniform": the sizes the decode steps use, one per sequence (one for scope "batch"), set
    after each prefill by ``pop_fx.allocation``; None: ``sizes``"""


@dataclass
class _Proxy:
    q: torch.Tensor
    s: torch.Tensor
    act: int
    """index into pop_fx.activations.ACTIVATIONS"""

    values: bool = False
    """candidate_proxy="int8-values": H̃ of the kept channels replaces H (the down projection reads H̃)"""

    def activations(self, x: torch.Tensor, d_ff: int) -> torch.Tensor:
        """H̃ of every channel for the token rows x [N, d_model] ([N, d_ff], fp32): the dequantized copy's math
        as one matmul (the compiled ops compute the same products as a fused reduction). "int8-values": the
        bf16 int8 row products of ``lowbit.values_activations``, the very function the compiled op calls."""
        from pop_fx.activations import activation
        from pop_fx.lowbit import dequantize, values_activations

        if self.values:
            return values_activations(x, self.q, self.s.to(x.device), d_ff, self.act)

        w = dequantize(self.q, self.s, x.shape[-1]).to(x.device)
        z = x.float() @ w.t()
        h = activation(self.act)(z[:, :d_ff])
        return h * z[:, d_ff:] if self.q.shape[0] == 2 * d_ff else h


def activation_code(act_fn) -> int | None:
    """The index in ``pop_fx.activations.ACTIVATIONS`` of the function ``act_fn`` computes (probed on [-6, 6]), or
    None. Callers that copy an FFN's activation into their own kernels (the proxy, the serving layouts) ask here."""
    from pop_fx.activations import ACTIVATIONS, activation

    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        ref = act_fn(probe)
    for code in range(len(ACTIVATIONS)):
        if torch.allclose(activation(code)(probe), ref, atol=1e-6, rtol=1e-5):
            return code
    return None


def proxy_support(site: FFNSite) -> tuple[torch.Tensor, torch.Tensor, int] | str:
    """(gate weight, up weight, activation index) of a site the candidate proxy handles, or why not."""
    from pop_fx.activations import ACTIVATIONS

    if site.kind not in ("gated", "shared_expert") or len(site.inputs) != 2:
        return f"candidate_proxy: {site.kind} site (gated FFNs with separate gate and up projections only)"
    names = list(site.inputs)
    gate = [n for n in names if "gate" in n]
    if len(gate) != 1:
        return "candidate_proxy: cannot tell the gate projection from the up projection"
    act_fn = getattr(site.module, "act_fn", None) or getattr(site.module, "activation_fn", None)
    if act_fn is None:
        return "candidate_proxy: the FFN module has no act_fn"
    code = activation_code(act_fn)
    if code is None:
        return "candidate_proxy: activation not one of " + ", ".join(ACTIVATIONS)
    up = names[1 - names.index(gate[0])]
    return getattr(site.module, gate[0]).weight, getattr(site.module, up).weight, code


def _call_info(module: nn.Module, args: tuple, kwargs: dict) -> _Call | None:
    x = kwargs.get("input_ids")
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        return None
    B, L = x.shape[0], x.shape[1]
    # transformers 5.2x passes the cache as "cache"; earlier releases as "past_key_values".
    past = kwargs.get("cache", kwargs.get("past_key_values"))
    if past is None:
        cached = 0
    elif hasattr(past, "get_seq_length"):
        cached = int(past.get_seq_length())
    else:  # legacy tuple cache
        cached = int(past[0][0].shape[-2]) if len(past) else 0
    token_mask = P.token_mask(kwargs.get("attention_mask"), B, L)
    return _Call(prefill=L > 1 or cached == 0, B=B, L=L, token_mask=token_mask)


class _Pop:
    """POP's per-site rule: partition at prefill, select candidates at every decode step."""

    def __init__(self, model: nn.Module, config: PopConfig, sites: list[FFNSite]):
        self.config = config
        self.per_sequence = config.scope == "sequence"
        self.states: dict[str, SiteState] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        """FFN inputs of the forward in flight, for sites scored by a proxy (filled by a pre-hook)"""
        self.values: dict[str, torch.Tensor] = {}
        """candidate_proxy="int8-values": per site path, the H̃ rows [N, d_ff] the decode step in flight uses as H"""
        self.unsupported: dict[str, str] = {}
        """sites that fall back to exact candidate scoring, with the reason"""
        self.pending: dict[str, torch.Tensor] = {}
        """budget other than "uniform": each site's scores from the prefill in flight ([d_ff] or [B, d_ff]),
        allocated once the forward has scored every site (``after_prefill``)"""
        for s in sites:
            sizes = partition_sizes(s.d_ff, config.sparsity, config.candidate_ratio)
            if sizes.is_dense or sizes.n_keep < 1:
                continue  # r = 0 (or a site too small to prune): stays exactly dense
            st = SiteState(s, sizes, down_column_norm(s.down_weight, s.channel_dim))
            if config.candidate_proxy is not None:
                from pop_fx.lowbit import proxy_tables

                sup = proxy_support(s)
                if isinstance(sup, str):
                    self.unsupported[s.path] = sup
                else:
                    gate, up, act = sup
                    st.proxy = _Proxy(*proxy_tables(gate, up, config.candidate_proxy), act,
                                      values=config.candidate_proxy == "int8-values")
            self.states[s.path] = st

    def keep_mask(self, path: str, h: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor, call: _Call):
        """Keep-mask for the rows ``h`` [N, d_ff] of sequences ``seq`` [N] (``valid`` [N]: not padding).

        Returns None (leave dense), a [d_ff] mask for all rows, or an [N, d_ff] mask.
        """
        st = self.states.get(path)
        if st is None:
            return None
        if call.prefill:
            return self._prefill(st, h, seq, valid, call.B)
        if st.dense is True:  # an expert no prefill token reached, under empty_expert="dense": it stays dense
            return None
        if st.R is None:
            raise RuntimeError(f"site {path}: a decode step came before any prefill")
        return self._decode(st, h, seq, valid)

    def _scores(self, st: SiteState, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Eq. 3 importance over the given rows; the empty-expert fallback when there are none."""
        if bool(rows.any()):
            # where() rather than a multiply: a fully masked padding row may hold NaN, and NaN * 0 is NaN.
            hv = torch.where(rows[:, None], h.detach().float(), 0.0)
            return importance(hv, st.wd_norm)
        if st.site.kind != "expert":
            return torch.zeros_like(st.wd_norm)  # no real token: the deterministic index-order partition
        if self.config.empty_expert == "dense":
            return None
        return weight_only_scores(st.wd_norm, st.site.in_weights)

    def _prefill(self, st: SiteState, h, seq, valid, B):
        st.steps = 0
        d_ff = st.site.d_ff
        if not self.per_sequence:
            scores = self._scores(st, h, valid)
            if scores is None:
                st.R, st.C, st.dense = None, None, True
                st.last_keep = None
                return None
            part = split(scores, st.sizes)
            st.R, st.C, st.dense = part.R, part.C, False
            self._hold(st, scores)
            keep = keep_set(scores, st.sizes)
            mask = torch.zeros(d_ff, dtype=torch.bool, device=h.device)
            mask[keep] = True
        else:
            scores = []
            dense = torch.zeros(B, dtype=torch.bool)
            for b in range(B):
                sc = self._scores(st, h, valid & (seq == b))
                if sc is None:
                    dense[b] = True
                    sc = torch.zeros_like(st.wd_norm)  # placeholder partition, never used
                scores.append(sc)
            scores = torch.stack(scores)
            part = split(scores, st.sizes)
            st.R, st.C, st.dense = part.R, part.C, dense
            self._hold(st, scores)
            keep = keep_set(scores, st.sizes)
            mask = torch.zeros(B, d_ff, dtype=torch.bool, device=h.device)
            mask.scatter_(1, keep.to(h.device), True)
            mask[dense.to(h.device)] = True
        st.last_keep = mask
        if self.config.prefill == "dense":
            return None
        return mask if mask.dim() == 1 else mask[seq]

    def _hold(self, st: SiteState, scores: torch.Tensor) -> None:
        """Keep a site's prefill scores for the allocation (budget other than "uniform"; experts keep theirs)."""
        st.allocated = None
        if self.config.budget != "uniform" and st.site.kind != "expert":
            self.pending[st.site.path] = scores

    def after_prefill(self) -> None:
        """Budget other than "uniform": once a prefill has scored every site, give each site (each sequence's, under
        scope "sequence") its bucket of n_keep (``pop_fx.allocation.allocate``) and re-split its scores with those
        sizes for the decode steps. The prefill itself ran with the uniform sizes: one forward, no second pass."""
        from pop_fx.allocation import allocate

        if not self.pending:
            return
        paths = [p for p in self.states if p in self.pending]
        scores = [self.pending.pop(p) for p in paths]
        self.pending.clear()
        d_ffs = [self.states[p].site.d_ff for p in paths]
        rows = scores[0].shape[0] if self.per_sequence else 1
        per_row = [allocate(self.config.budget, [s[b] if self.per_sequence else s for s in scores], d_ffs,
                            self.config.sparsity, self.config.candidate_ratio) for b in range(rows)]
        for i, p in enumerate(paths):
            st = self.states[p]
            st.allocated = [sizes[i] for sizes in per_row]
            if not self.per_sequence:
                part = split(scores[i], st.allocated[0])
                st.R, st.C = part.R, part.C
                continue
            # n_C and n_select are the same in every bucket (allocation.bucket_keeps): C stays [B, n_C]; R's
            # length differs between sequences, so it is kept as a [B, d_ff] mask.
            R = torch.zeros(rows, st.site.d_ff, dtype=torch.bool, device=scores[i].device)
            C = []
            for b in range(rows):
                part = split(scores[i][b], st.allocated[b])
                R[b, part.R] = True
                C.append(part.C)
            st.R, st.C = R, torch.stack(C)

    def _decode(self, st: SiteState, h, seq, valid):
        st.steps += 1
        d_ff, n_select = st.site.d_ff, st.sizes.n_select
        if st.dense is True:
            return None
        hv = torch.where(valid[:, None], h.detach(), torch.zeros((), dtype=h.dtype, device=h.device))
        if st.proxy is not None:  # candidates ranked by the proxy activations, not the exact ones
            x = self.inputs[st.site.path].reshape(h.shape[0], -1)
            h_proxy = st.proxy.activations(x.detach(), d_ff)
            hv = torch.where(valid[:, None], h_proxy, 0.0)
            if st.proxy.values:  # the kept channels' H is H̃ itself (the hook masks it)
                self.values[st.site.path] = h_proxy.to(h.dtype)
        if not self.per_sequence:
            C = st.C.to(h.device)
            chosen = C[select(hv[:, C], st.wd_norm[C], n_select)]
            mask = torch.zeros(d_ff, dtype=torch.bool, device=h.device)
            mask[st.R.to(h.device)] = True
            mask[chosen] = True
            st.last_keep = mask
            return mask
        # One partition per sequence: row i uses the R/C of its sequence seq[i].
        C = st.C.to(h.device)[seq]  # [N, n_C]
        pos = select(torch.gather(hv, 1, C), st.wd_norm[C], n_select, per_sequence=True)
        mask = torch.zeros(h.shape[0], d_ff, dtype=torch.bool, device=h.device)
        if st.R.dtype == torch.bool:  # a layer-adaptive budget: each sequence's R as a mask
            mask |= st.R.to(h.device)[seq]
        else:
            mask.scatter_(1, st.R.to(h.device)[seq], True)
        mask.scatter_(1, torch.gather(C, 1, pos), True)
        mask[st.dense.to(h.device)[seq]] = True
        st.last_keep = mask
        return mask


class _Fixed:
    """A fixed keep-mask per site path, applied at every forward (static baselines)."""

    def __init__(self, masks: Mapping[str, torch.Tensor], sites: list[FFNSite]):
        by_path = {s.path: s for s in sites}
        self.masks = {}
        for path, m in masks.items():
            if path not in by_path:
                raise ValueError(f"masks has unknown site path {path!r}: allowed {list(by_path)}")
            d_ff = by_path[path].d_ff
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != (d_ff,):
                raise ValueError(f"masks[{path!r}] must be a bool tensor of shape ({d_ff},), got {m!r:.80}")
            self.masks[path] = m
        self.states: dict[str, SiteState] = {}

    def keep_mask(self, path, h, seq, valid, call):
        m = self.masks.get(path)
        return None if m is None else m.to(h.device)


def _apply(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return h if mask is None else h * mask.to(h.dtype)


def _rows(call: _Call, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence id and validity of each of the B*L token rows, in the models' flattening order (B-major)."""
    B, L = call.B, call.L
    seq = torch.arange(B, device=h.device).repeat_interleave(L)
    valid = call.token_mask.reshape(-1).to(h.device) if call.token_mask is not None else torch.ones_like(seq, dtype=torch.bool)
    return seq, valid


class _Session:
    """Hooks and patches of one ``pruned``/``masked`` context."""

    def __init__(self, model: nn.Module, policy, sites: list[FFNSite]):
        self.model, self.policy, self.sites = model, policy, sites
        self.call: _Call | None = None
        self.handles: list = []
        self.patched: list[nn.Module] = []

    def current(self, h: torch.Tensor) -> _Call:
        if self.call is not None:
            return self.call
        # Called without the model-level hook (a sub-module run directly): infer from H's shape.
        B, L = (h.shape[0], h.shape[1]) if h.dim() == 3 else (1, h.shape[0])
        return _Call(prefill=True, B=B, L=L, token_mask=None)

    def __enter__(self):
        def model_hook(module, args, kwargs):
            self.call = _call_info(module, args, kwargs)

        def model_done(module, args, output):
            if self.call is not None and self.call.prefill and hasattr(self.policy, "after_prefill"):
                self.policy.after_prefill()

        self.handles.append(self.model.register_forward_pre_hook(model_hook, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(model_done))
        experts: dict[int, list[FFNSite]] = {}
        for s in self.sites:
            if s.kind == "expert":
                experts.setdefault(id(s.module), []).append(s)
                continue
            if s.path in self.policy.states or isinstance(self.policy, _Fixed) and s.path in self.policy.masks:
                self.handles.append(s.down.register_forward_pre_hook(self._down_hook(s)))
                st = self.policy.states.get(s.path)
                if st is not None and st.proxy is not None:
                    self.handles.append(s.module.register_forward_pre_hook(self._input_hook(s), with_kwargs=True))
        for group in experts.values():
            if any(g.path in self.policy.states or isinstance(self.policy, _Fixed) and g.path in self.policy.masks for g in group):
                self._patch_experts(group)
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m in self.patched:
            del m.forward  # back to the class's forward
        self.handles.clear()
        self.patched.clear()
        return False

    def _input_hook(self, site: FFNSite):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self.policy.inputs[site.path] = x

        return hook

    def _down_hook(self, site: FFNSite):
        def hook(module, args):
            h = args[0]
            call = self.current(h)
            rows = h.reshape(-1, h.shape[-1])
            if rows.shape[0] != call.B * call.L:  # H not laid out per token: infer from its own shape
                call = _Call(call.prefill, rows.shape[0], 1, None)
            seq, valid = _rows(call, h)
            mask = self.policy.keep_mask(site.path, rows, seq, valid, call)
            values = getattr(self.policy, "values", {}).pop(site.path, None)
            if mask is None:
                return None
            if values is not None:  # "int8-values": the down projection reads H̃ of the kept channels
                rows = values
            return (_apply(rows, mask).reshape(h.shape), *args[1:])

        return hook

    def _patch_experts(self, group: list[FFNSite]) -> None:
        experts_module = group[0].module
        paths = {g.expert: g.path for g in group}
        session = self

        def forward(self, hidden_states, top_k_index, top_k_weights):
            # transformers' eager MixtralExperts.forward, with each expert's intermediate masked.
            call = session.current(hidden_states)
            seq_all, valid_all = _rows(call, hidden_states)
            if seq_all.shape[0] != hidden_states.shape[0]:
                seq_all = torch.zeros(hidden_states.shape[0], dtype=torch.long, device=hidden_states.device)
                valid_all = torch.ones_like(seq_all, dtype=torch.bool)
            final = torch.zeros_like(hidden_states)
            for e in range(self.gate_up_proj.shape[0]):
                top_k_pos, token_idx = torch.where(top_k_index.t() == e)
                if token_idx.numel() == 0 and not call.prefill:
                    continue
                x = hidden_states[token_idx]
                h = self._apply_gate(nn.functional.linear(x, self.gate_up_proj[e]))
                # The partition is computed even for an expert with no routed token (fallback scores).
                mask = session.policy.keep_mask(paths[e], h, seq_all[token_idx], valid_all[token_idx], call)
                if token_idx.numel() == 0:
                    continue
                out = nn.functional.linear(_apply(h, mask), self.down_proj[e])
                out = out * top_k_weights[token_idx, top_k_pos, None]
                final.index_add_(0, token_idx, out.to(final.dtype))
            return final

        experts_module.forward = types.MethodType(forward, experts_module)
        self.patched.append(experts_module)


def _config(config: PopConfig | Mapping | None, fields: dict) -> PopConfig:
    return PopConfig.from_options(config, **fields)


@contextlib.contextmanager
def pruned(model: nn.Module, config: PopConfig | Mapping | None = None, **fields) -> Iterator[_Pop]:
    """Run ``model`` under eager POP inside the context; yields the policy (``.states`` per site path)."""
    cfg = _config(config, fields)
    sites, _ = find_module_sites(model)
    policy = _Pop(model, cfg, sites)
    with _Session(model, policy, sites):
        yield policy


@contextlib.contextmanager
def masked(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[_Fixed]:
    """Apply a fixed bool keep-mask ([d_ff], True = computed) per site path at every forward."""
    sites, _ = find_module_sites(model)
    policy = _Fixed(masks, sites)
    with _Session(model, policy, sites):
        yield policy


__all__ = ["SiteState", "masked", "pruned"]
