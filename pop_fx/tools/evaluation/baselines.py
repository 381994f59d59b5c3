"""Static baselines: one fixed mask per site from Wanda-sp scores (calibrated) or random scores."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from pop_fx.partition import partition_sizes, top_k
from pop_fx.tools.evaluation.decode import device_of, forward_kwargs
from pop_fx.tools.evaluation.text import Window


def model_sites(model: Any) -> list[Any]:
    from pop_fx.sites import find_module_sites

    found = find_module_sites(model)
    sites = found[0] if isinstance(found, tuple) else found
    if not sites:
        raise ValueError(f"{type(model).__name__} has no FFN site pop-fx can prune: allowed a model with FFN blocks")
    return list(sites)


def _down_column_l1(site: Any) -> torch.Tensor:
    """Σ_i |Wd[i, j]| per channel j (fp64)."""
    w = site.down_weight.detach().double()
    ch = site.channel_dim % w.dim()
    if site.down is None or w.dim() != 2:
        raise ValueError(
            f"site {site.path} ({site.kind}) has a {w.dim()}-D down weight: wanda-sp and random masks are "
            f"allowed on 2-D (dense FFN) sites only"
        )
    return w.abs().sum(dim=1 - ch)


@torch.no_grad()
def wanda_sp_scores(model: Any, sites: Sequence[Any], calib: Sequence[Window], batch_size: int = 8, on_batch: Any = None) -> dict[str, torch.Tensor]:
    """Wanda-sp channel scores ||X_j||_2 · Σ_i |Wd[i, j]|, X = the down projection's input over the calibration windows."""
    if not calib:
        raise ValueError("wanda-sp needs calibration windows: allowed calib_windows >= 1")
    sumsq = {s.path: torch.zeros(s.d_ff, dtype=torch.float64) for s in sites}
    hooks = []

    def hook_for(site):
        def pre_hook(module, args, kwargs=None):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != site.d_ff:
                raise ValueError(f"site {site.path}: down projection input has {x.shape[-1]} channels, expected d_ff={site.d_ff}")
            sumsq[site.path] += x.detach().double().pow(2).reshape(-1, site.d_ff).sum(0).cpu()

        return pre_hook

    for s in sites:
        _down_column_l1(s)  # refuse unsupported sites before running anything
        hooks.append(s.down.register_forward_pre_hook(hook_for(s)))
    try:
        extra = forward_kwargs(model)
        ids = torch.tensor([w.token_ids for w in calib], dtype=torch.long, device=device_of(model))
        for i in range(0, len(calib), batch_size):
            model(input_ids=ids[i : i + batch_size], use_cache=False, **extra)
            if on_batch is not None:
                on_batch()
    finally:
        for h in hooks:
            h.remove()
    return {s.path: sumsq[s.path].sqrt() * _down_column_l1(s) for s in sites}


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep the n_keep = round((1 - r) · d_ff) best channels of each site (POP's ranking and tie-breaking)."""
    masks = {}
    for path, s in scores.items():
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[top_k(s, partition_sizes(s.numel(), sparsity, 0.0).n_keep)] = True
        masks[path] = keep
    return masks


def random_scores(sites: Sequence[Any], seed: int) -> dict[str, torch.Tensor]:
    """One uniform score per channel from one generator seeded once, in site order."""
    g = torch.Generator().manual_seed(seed)
    for s in sites:
        _down_column_l1(s)
    return {s.path: torch.rand(s.d_ff, generator=g, dtype=torch.float64) for s in sites}
