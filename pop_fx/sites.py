"""Discovery of POP sites (FFN blocks) in a live Hugging Face model.

A block is recognised by structure: the attribute names AND the weight shapes
must agree (``gate_proj``/``up_proj`` produce ``d_ff`` channels and ``down_proj``
consumes them), so an attention block that happens to own a ``c_proj`` or a
router that happens to be called ``gate`` is never taken for an FFN.

    sites, skipped = find_module_sites(model)

``skipped`` lists (path, reason) for FFN-like blocks left alone, so a user can
see why a block is not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("plain", "gated", "fused_gated", "expert", "shared_expert")

# Only FFNs that run while decoding are sites (docs/spec.md): a vision tower runs in prefill only.
_VISION_WORDS = ("visual", "vision")
VISION_REASON = "vision tower runs only in prefill"


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return Conv1D


@dataclass
class FFNSite:
    """One FFN block whose ``d_ff`` intermediate channels POP prunes."""

    path: str
    """module path of the FFN block, e.g. "model.layers.0.mlp" (for experts: "...experts.3")"""
    kind: str
    """one of KINDS"""
    d_ff: int
    """number of intermediate channels"""
    module: nn.Module
    """the FFN block (for experts: the module holding the 3-D expert weights)"""
    down: nn.Module | None
    """module whose forward input is H (nn.Linear or GPT-2's Conv1D); None for 3-D experts"""
    channel_dim: int = -1
    """axis of the down weight that indexes channels: -1 for Linear and experts, 0 for Conv1D"""
    expert: int | None = None
    """index of the expert inside ``module`` (kind "expert" only)"""
    inputs: tuple[str, ...] = ()
    """attribute names (in ``module``) of the projections that produce H, for weight-only scores"""

    @property
    def down_weight(self) -> torch.Tensor:
        """The down projection's weight (for an expert: its 2-D slice [d_model, d_ff])."""
        if self.kind == "expert":
            return self.module.down_proj[self.expert]
        return self.down.weight

    @property
    def in_weights(self) -> list[torch.Tensor]:
        """Weights producing H, each with one row per channel ([d_ff, d_model]); gate and up separately."""
        if self.kind == "expert":
            return list(self.module.gate_up_proj[self.expert].chunk(2, dim=0))
        out = []
        for name in self.inputs:
            w = getattr(self.module, name).weight
            if isinstance(getattr(self.module, name), _conv1d_type() or ()):
                w = w.t()  # Conv1D stores [in, out]
            if self.kind == "fused_gated":
                out.extend(w.chunk(2, dim=0))
            else:
                out.append(w)
        return out


def _linear_like(m) -> bool:
    conv = _conv1d_type()
    return isinstance(m, nn.Linear) or (bool(conv) and isinstance(m, conv))


def _io(m) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = m.weight  # Conv1D: [in, out]
    return w.shape[0], w.shape[1]


def is_vision_path(path: str) -> bool:
    return any(word in part for part in path.lower().split(".") for word in _VISION_WORDS)


# Dense layouts: (up-side attribute names, down attribute name, kind). The first
# match wins, so the more specific gated layouts come first.
_DENSE_LAYOUTS = (
    (("gate_proj", "up_proj"), "down_proj", "gated"),
    (("gate_up_proj",), "down_proj", "fused_gated"),
    (("c_fc",), "c_proj", "plain"),  # GPT-2 (Conv1D)
    (("fc1",), "fc2", "plain"),  # OPT decoder layer, Phi-1/2, CLIP-style MLPs
    (("dense_h_to_4h",), "dense_4h_to_h", "plain"),  # GPT-NeoX, Falcon
    (("w1", "w3"), "w2", "gated"),  # gpt-fast style
    (("up_proj",), "down_proj", "plain"),  # Nemotron-style ungated MLP
)


def _match_dense(path: str, module: nn.Module) -> tuple[FFNSite | None, str | None]:
    for ups, down_name, kind in _DENSE_LAYOUTS:
        mods = [getattr(module, n, None) for n in (*ups, down_name)]
        if not all(isinstance(m, nn.Module) and _linear_like(m) for m in mods):
            continue
        if kind == "plain" and down_name == "fc2" and not (hasattr(module, "activation_fn") or hasattr(module, "act")):
            continue  # fc1/fc2 without an activation is e.g. an adapter, not an FFN (Qwen2-VL's VisionMlp calls it act)
        *up_mods, down = mods
        d_in, d_out = _io(down)
        d_ff = d_in
        want_up_out = 2 * d_ff if kind == "fused_gated" else d_ff
        d_model = _io(up_mods[0])[0]
        shapes_ok = all(_io(u) == (d_model, want_up_out) for u in up_mods) and d_out == d_model
        if not shapes_ok:
            return None, f"{'/'.join(ups)} + {down_name} found but their weight shapes disagree"
        if isinstance(down, nn.Linear):
            channel_dim = -1
        else:  # Conv1D weight is [d_ff, d_out]
            channel_dim = 0
        if kind == "gated" and path.split(".")[-1] in ("shared_expert", "shared_experts"):  # Qwen2-MoE, DeepSeek
            kind = "shared_expert"
        return FFNSite(path, kind, d_ff, module, down, channel_dim, None, tuple(ups)), None
    return None, None


def _match_experts(path: str, module: nn.Module) -> tuple[list[FFNSite], str | None]:
    gu = getattr(module, "gate_up_proj", None)
    dn = getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3):
        return [], None
    E, two_i, d_model = gu.shape
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
        return [], "3-D experts with a transposed, biased or ungated layout are not supported"
    if not getattr(module, "is_concatenated", True):
        return [], "3-D experts with interleaved gate/up rows are not supported"
    if two_i % 2 or tuple(dn.shape) != (E, d_model, two_i // 2) or not hasattr(module, "act_fn"):
        return [], "gate_up_proj + down_proj found but their weight shapes disagree"
    d_ff = two_i // 2
    return [FFNSite(f"{path}.{e}", "expert", d_ff, module, None, -1, e) for e in range(E)], None


def find_module_sites(model: nn.Module) -> tuple[list[FFNSite], list[tuple[str, str]]]:
    """All POP sites of ``model`` in module order, plus (path, reason) for FFN-like blocks left alone."""
    sites: list[FFNSite] = []
    skipped: list[tuple[str, str]] = []
    seen_down: set[tuple[int, int | None]] = set()
    for path, module in model.named_modules():
        experts, reason = _match_experts(path, module)
        site, dense_reason = (None, None) if experts or reason else _match_dense(path, module)
        reason = reason or dense_reason
        found = experts or ([site] if site is not None else [])
        if not found:
            if reason:
                skipped.append((path, reason))
            continue
        if is_vision_path(path):
            skipped.append((path, VISION_REASON))
            continue
        for s in found:
            key = (id(s.down_weight), None) if s.kind != "expert" else (id(s.module.down_proj), s.expert)
            if key in seen_down:  # tied/shared blocks are one site, reached by their first path
                continue
            seen_down.add(key)
            sites.append(s)
    return sites, skipped


__all__ = ["FFNSite", "KINDS", "VISION_REASON", "find_module_sites"]
