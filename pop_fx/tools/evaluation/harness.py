"""``evaluate()``: every method at every sparsity on the same windows, side by side (see the package docstring)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from pop_fx.config import PopConfig
from pop_fx.tools.evaluation.baselines import model_sites, masks_from_scores, random_scores, wanda_sp_scores
from pop_fx.tools.evaluation.decode import RowOutputs, decode_rows
from pop_fx.tools.evaluation.methods import DEFAULT_GAMMAS, DEFAULT_METHODS, DEFAULT_SPARSITIES, parse_methods
from pop_fx.tools.evaluation.results import EvalResult, MethodResult, metrics
from pop_fx.tools.evaluation.text import read_text, make_windows

BACKENDS = ("reference", "compiled")


@contextlib.contextmanager
def _pop_runner(model: Any, config: PopConfig, backend: str):
    """Yields the callable that runs ``model`` under POP with ``config`` (the reference, or ``pop_fx.compile``)."""
    if backend == "compiled":
        import pop_fx

        pop_fx.compile(model, config)
        try:
            yield model
        finally:  # compile acts in place: the next method must see the plain model again
            pop_fx.decompile(model)
        return
    from pop_fx.reference import pruned

    with pruned(model, config):
        yield model


@contextlib.contextmanager
def _masked_runner(model: Any, masks: dict[str, torch.Tensor]):
    from pop_fx.reference import masked

    with masked(model, masks):
        yield model


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= {lo}")
    return value


@dataclass
class RowPlan:
    """The rows one method runs: every window teacher-forced, then the first ``greedy`` windows again, greedily."""

    n_windows: int
    greedy: int
    batch_size: int

    @property
    def n_rows(self) -> int:
        return self.n_windows + self.greedy

    @property
    def window(self) -> torch.Tensor:
        return torch.cat([torch.arange(self.n_windows), torch.arange(self.greedy)])

    @property
    def teacher(self) -> torch.Tensor:
        return torch.arange(self.n_rows) < self.n_windows

    @property
    def batches(self) -> list[slice]:
        return [slice(i, min(i + self.batch_size, self.n_rows)) for i in range(0, self.n_rows, self.batch_size)]

    def split(self, o: RowOutputs) -> tuple[RowOutputs, torch.Tensor]:
        """(teacher-forced rows, greedy tokens)."""
        return RowOutputs(o.nll[:self.n_windows], o.pred[:self.n_windows]), o.pred[self.n_windows:]


def run_rows(model: Any, ctx, plan: RowPlan, prompts: torch.Tensor, conts: torch.Tensor,
             on_step: Any = None) -> tuple[RowOutputs, float]:
    """Every row of ``plan`` through the model inside ``ctx`` (which yields the forward), and the seconds taken."""
    t0 = time.perf_counter()
    nll = torch.zeros(plan.n_rows, conts.shape[1], dtype=torch.float64)
    pred = torch.zeros(plan.n_rows, conts.shape[1], dtype=torch.long)
    window, teacher = plan.window, plan.teacher
    with ctx as fwd:
        for b in plan.batches:
            w = window[b]
            o = decode_rows(model, prompts[w], conts[w], teacher[b], on_step=on_step, forward=fwd)
            nll[b], pred[b] = o.nll, o.pred
    return RowOutputs(nll, pred), time.perf_counter() - t0


def _validate(n_windows, prompt_len, cont_len, batch_size, seed, calib_windows, check_agreement, greedy_windows,
              backend, calib_fraction, prefill) -> None:
    for name, value, lo in (("n_windows", n_windows, 1), ("prompt_len", prompt_len, 1), ("cont_len", cont_len, 1),
                            ("batch_size", batch_size, 1), ("seed", seed, 0), ("calib_windows", calib_windows, 0),
                            ("check_agreement", check_agreement, 0)):
        _check_int(name, value, lo)
    if greedy_windows is not None:
        _check_int("greedy_windows", greedy_windows, 0)
        if greedy_windows > n_windows:
            raise ValueError(f"greedy_windows={greedy_windows!r} is invalid: allowed 0 <= greedy_windows <= "
                             f"n_windows={n_windows}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: allowed one of {list(BACKENDS)}")
    if not (isinstance(calib_fraction, (int, float)) and 0 < calib_fraction < 1):
        raise ValueError(f"calib_fraction={calib_fraction!r} is invalid: allowed 0 < calib_fraction < 1")
    PopConfig(prefill=prefill)


def _text_info(text: str, text_path: str | None, split: int, evals, calib) -> dict[str, Any]:
    return {
        "path": text_path,
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "calibration_split": split,
        "eval_chars": [evals[0].char_start, evals[-1].char_end],
        "calibration_chars": [calib[0].char_start, calib[-1].char_end] if calib else None,
        "window_rule": "windows start at line starts spread evenly over their character range; each holds the first "
        "prompt_len + cont_len tokens of text[char_start:] (no special tokens)",
    }


def _mask_scores(model, ms, calib, batch_size, seed, bar) -> dict[str, dict[str, torch.Tensor]]:
    """Channel scores of the fixed-mask baselines in ``ms`` (Wanda-sp is calibrated here)."""
    sites = model_sites(model) if any(m.kind == "mask" for m in ms) else []
    scores: dict[str, dict[str, torch.Tensor]] = {}
    if any(m.name == "wanda-sp" for m in ms):
        bar.set_description("wanda-sp calibration")
        scores["wanda-sp"] = wanda_sp_scores(model, sites, calib, batch_size, on_batch=bar.update)
    if any(m.name == "random" for m in ms):
        scores["random"] = random_scores(sites, seed)
    return scores


def evaluate(
    model: Any,
    tokenizer: Any,
    text_or_path: str | Path | None = None,
    *,
    methods: Iterable[str] = DEFAULT_METHODS,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    n_windows: int = 32,
    prompt_len: int = 128,
    cont_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    calib_windows: int = 16,
    calib_fraction: float = 0.1,
    prefill: str = "pruned",
    backend: str = "reference",
    check_agreement: int = 2,
    progress: bool = True,
    model_name: str | None = None,
    greedy_windows: int | None = None,
    on_row: Any = None,
) -> EvalResult:
    """Run every method at every sparsity on the same windows; see the package docstring.

    ``batch_size`` > 1 batches windows with ``scope="sequence"`` (each window its
    own partition); 1 runs each window alone. ``backend="compiled"`` runs the POP
    methods through ``pop_fx.compile``; ``check_agreement`` windows of one POP
    setting are run through both backends and the largest logit difference is
    reported. ``greedy_windows`` (default: all) limits greedy generation to the
    first windows, to save time. ``on_row(partial EvalResult)`` is called after
    each (method, r) finishes.
    """
    _validate(n_windows, prompt_len, cont_len, batch_size, seed, calib_windows, check_agreement, greedy_windows,
              backend, calib_fraction, prefill)
    ms = parse_methods(methods, gammas)
    rs = [PopConfig(sparsity=r).sparsity for r in sparsities]  # range check, naming the field
    if not rs and len(ms) > 1:
        raise ValueError("sparsities is empty: allowed one or more values 0 <= r < 1")
    scope = "sequence" if batch_size > 1 else "batch"
    need_calib = any(m.name == "wanda-sp" for m in ms)
    torch.manual_seed(seed)

    text, text_path = read_text(text_or_path)
    # The calibration slice is cut whether or not wanda-sp runs, so the eval windows depend only on
    # (text, n_windows, lengths, calib_windows, calib_fraction) and runs with other methods stay comparable.
    evals, calib, split = make_windows(tokenizer, text, n_windows=n_windows, length=prompt_len + cont_len,
                                       calib_windows=calib_windows, calib_fraction=calib_fraction)
    ids = torch.tensor([w.token_ids for w in evals], dtype=torch.long)
    prompts, conts = ids[:, :prompt_len], ids[:, prompt_len:]
    plan = RowPlan(n_windows, n_windows if greedy_windows is None else greedy_windows, batch_size)

    settings = {
        "model": model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__,
        "methods": [m.name for m in ms], "sparsities": rs, "n_windows": n_windows, "greedy_windows": plan.greedy,
        "prompt_len": prompt_len, "cont_len": cont_len, "batch_size": batch_size, "scope": scope,
        "scope_note": ("windows batched with scope='sequence': each window has its own partition" if scope == "sequence"
                       else "batch size 1: each window has its own partition"),
        "prefill": prefill, "seed": seed, "backend": backend, "calib_windows": calib_windows,
        "calib_fraction": calib_fraction, "calibration_used": need_calib,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "mode": "teacher-forced decode (prefill prompt, then one continuation token per decode step with the KV cache) "
        "and greedy generation of cont_len tokens from the prompt",
        "random_seed": seed, "torch": torch.__version__,
    }
    text_info = _text_info(text, text_path, split, evals, calib)
    windows, calibration = [w.as_dict() for w in evals], [w.as_dict() for w in calib]

    n_runs = 1 + sum(len(rs) for m in ms if m.kind != "dense")
    total_steps = n_runs * len(plan.batches) * cont_len + (math.ceil(len(calib) / batch_size) if need_calib else 0)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="eval", unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    rows: list[MethodResult] = []

    def record(name, gamma, r, out, sec, used, dense_ref):
        teacher, greedy = plan.split(out)
        rows.append(MethodResult(name, gamma, r, **metrics(teacher, greedy, conts, dense_ref), seconds=sec, backend=used))
        if on_row is not None:
            on_row(EvalResult(list(rows), settings, windows, calibration, None, text_info))

    try:
        bar.set_description("dense")
        dense_out, sec = run_rows(model, contextlib.nullcontext(model), plan, prompts, conts, bar.update)
        d_teacher, d_greedy = plan.split(dense_out)
        dense_ref = (d_teacher.pred, d_greedy)
        record("dense", None, 0.0, dense_out, sec, "eager", dense_ref)
        scores = _mask_scores(model, ms, calib, batch_size, seed, bar)
        # Sparsity-major: a long run that is stopped early has every method at the first sparsities.
        for r in rs:
            for m in ms:
                if m.kind == "dense":
                    continue
                if m.kind == "pop":
                    cfg = PopConfig(sparsity=r, candidate_ratio=m.gamma, scope=scope, prefill=prefill,
                                    candidate_proxy=m.proxy, budget=m.budget)
                    # The compiled proxy ops serve scope="batch"; batched windows (per sequence) use the reference.
                    # A layer-adaptive budget runs in the reference only (PopConfig.check_compiled).
                    used = backend if (m.proxy is None or scope == "batch") and m.budget == "uniform" else "reference"
                    ctx = _pop_runner(model, cfg, used)
                else:
                    ctx, used = _masked_runner(model, masks_from_scores(scores[m.name], r)), "reference"
                bar.set_description(f"{m.name} r={r:g}")
                out, sec = run_rows(model, ctx, plan, prompts, conts, bar.update)
                record(m.name, m.gamma, r, out, sec, used, dense_ref)
    finally:
        bar.close()

    check = None
    if check_agreement:
        check = agreement_check(model, prompts, conts, rs, gammas=[m.gamma for m in ms if m.kind == "pop" and m.proxy is None
                                                                         and m.budget == "uniform"],
                                scope=scope, prefill=prefill, n=check_agreement)
    return EvalResult(rows, settings, windows, calibration, check, text_info)


@torch.no_grad()
def agreement_check(
    model: Any,
    prompts: torch.Tensor,
    conts: torch.Tensor,
    sparsities: Sequence[float],
    *,
    gammas: Sequence[float],
    scope: str = "sequence",
    prefill: str = "pruned",
    n: int = 2,
) -> dict[str, Any]:
    """Run ``n`` windows (teacher-forced) through the eager reference and ``pop_fx.compile``; report the differences."""
    if not sparsities or not gammas:
        return {"status": "skipped", "reason": "no POP method in this run"}
    gamma = 0.1 if 0.1 in gammas else gammas[0]
    cfg = PopConfig(sparsity=max(sparsities), candidate_ratio=gamma, scope=scope, prefill=prefill)
    k = min(n, prompts.shape[0])
    teacher = torch.ones(k, dtype=torch.bool)
    with _pop_runner(model, cfg, "reference") as fwd:
        ref = decode_rows(model, prompts[:k], conts[:k], teacher, keep_logits=True, forward=fwd)
    with _pop_runner(model, cfg, "compiled") as fwd:
        got = decode_rows(model, prompts[:k], conts[:k], teacher, keep_logits=True, forward=fwd)
    diff = (ref.logits - got.logits).abs()
    return {
        "status": "ran",
        "config": {"sparsity": cfg.sparsity, "candidate_ratio": cfg.candidate_ratio, "scope": scope, "prefill": prefill},
        "windows": k,
        "max_abs_logit_diff": diff.max().item(),
        "max_abs_logit_diff_prefill": diff[:, 0].max().item(),
        "argmax_agreement": (ref.pred == got.pred).double().mean().item(),
    }
