"""Accuracy of POP against dense, its ablations and static baselines, in decode mode.

``pop-fx eval`` and ``evaluate()`` measure, on windows of P prompt + T
continuation tokens cut from a text file:

* teacher-forced decoding: the prompt is prefilled, then the continuation is fed
  one token per decode step through the KV cache, so pruning acts exactly as
  during generation. Reported: continuation perplexity, top-1 accuracy and the
  agreement of each step's argmax with dense's argmax.
* greedy generation of T tokens from the prompt: the fraction of positions whose
  token equals dense's greedy token, and the mean length of the common prefix.

Methods (one run, side by side):

=============  ===============================================================
dense          the unpruned model (the reference for agreement)
static         POP with γ = 0: the prefill's mask for every step (GRIFFIN-like)
pop-<γ>        POP with candidate band γ (default γ ∈ {0.05, 0.1, 0.2, 0.4})
full           POP with γ = 2: every channel re-scored at every step
wanda-sp       one fixed mask per site: channel j scored ||X_j||_2 · Σ_i |Wd[i, j]|,
               X the down projection's input over a calibration slice of the text
random         one fixed mask per site of random channels (seeded)
=============  ===============================================================

Every mask keeps n_keep = round((1 - r) · d_ff) channels of each site.
Each window gets its own partition: windows batched together run with
``scope="sequence"`` (with batch size 1 the scope does not matter).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import inspect
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from pop_fx.config import PopConfig
from pop_fx.partition import partition_sizes, top_k

DEFAULT_SPARSITIES = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_GAMMAS = (0.05, 0.1, 0.2, 0.4)
DEFAULT_METHODS = ("dense", "static", "pop", "full", "wanda-sp", "random")
METHOD_NAMES = ("dense", "static", "pop", "pop-<γ>", "full", "wanda-sp", "random", "proxy-<γ>", "proxy-int3-<γ>",
                "proxy-gate-<γ>")
# method prefix -> PopConfig.candidate_proxy (longest prefixes first)
PROXY_METHODS = (("proxy-gate-", "int8-gate"), ("proxy-int3-", "int3"), ("proxy-", "int8"))
BACKENDS = ("reference", "compiled")


def default_text_path() -> Path:
    """../shared/data/web_bible.txt relative to the repository root (present in this project's CI only)."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "web_bible.txt"


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    name: str
    """as shown in the table: dense, static, pop-0.1, full, wanda-sp, random"""
    kind: str
    """"dense", "pop" (the reference or compiled POP) or "mask" (one fixed mask per site)"""
    gamma: float | None = None
    """POP's candidate ratio γ (0 = static, 2 = full re-evaluation)"""
    proxy: str | None = None
    """PopConfig.candidate_proxy (proxy-<γ>: "int8", proxy-int3-<γ>: "int3", proxy-gate-<γ>: "int8-gate"); None for
    the paper's POP"""


def parse_methods(methods: Iterable[str], gammas: Sequence[float] = DEFAULT_GAMMAS) -> list[Method]:
    """Method names -> Methods; "pop" expands to one POP method per γ in ``gammas``. Dense always comes first."""
    out: list[Method] = [Method("dense", "dense")]
    for raw in methods:
        name = raw.strip().lower()
        if name in ("", "dense"):
            continue
        if name == "static":
            found = [Method("static", "pop", 0.0)]
        elif name == "full":
            found = [Method("full", "pop", 2.0)]
        elif name == "pop":
            found = [Method(f"pop-{g:g}", "pop", float(g)) for g in gammas]
        elif name.startswith("pop-"):
            try:
                g = float(name[4:])
            except ValueError:
                raise ValueError(f"method {raw!r} is invalid: allowed one of {list(METHOD_NAMES)}") from None
            found = [Method(f"pop-{g:g}", "pop", g)]
        elif name.startswith("proxy-"):
            prefix, proxy = next((p, x) for p, x in PROXY_METHODS if name.startswith(p))
            try:
                g = float(name[len(prefix):])
            except ValueError:
                raise ValueError(f"method {raw!r} is invalid: allowed one of {list(METHOD_NAMES)}") from None
            found = [Method(f"{prefix}{g:g}", "pop", g, proxy)]
        elif name in ("wanda-sp", "random"):
            found = [Method(name, "mask")]
        else:
            raise ValueError(f"method {raw!r} is invalid: allowed one of {list(METHOD_NAMES)}")
        for m in found:
            if m.gamma is not None:
                PopConfig(candidate_ratio=m.gamma)  # range check, naming the field
            if m not in out:
                out.append(m)
    return out


# --------------------------------------------------------------------------- text windows


@dataclass(frozen=True)
class Window:
    index: int
    role: str
    """"eval" or "calibration\""""
    char_start: int
    char_end: int
    """end of the last token's characters (exclusive); an upper bound when the tokenizer gives no offsets"""
    token_ids: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "role": self.role, "char_start": self.char_start, "char_end": self.char_end, "n_tokens": len(self.token_ids)}


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255), with character offsets: for tiny models that ship no tokenizer."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict[str, list]:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids.extend(b)
            offsets.extend([(i, i + 1)] * len(b))
        out: dict[str, list] = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of ``text`` (no special tokens) and each token's character span when the tokenizer has one."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc.get("offset_mapping") if hasattr(enc, "get") else enc["offset_mapping"]
    except (TypeError, NotImplementedError, ValueError, KeyError):
        enc = tokenizer(text, add_special_tokens=False)
        offsets = None
    ids = enc["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(i) for i in ids], ([tuple(map(int, o)) for o in offsets] if offsets is not None else None)


def _line_start_at_or_after(text: str, pos: int, limit: int) -> int:
    """The first line start at or after ``pos`` (windows begin at a verse/line), or ``pos`` if none before ``limit``."""
    if pos == 0 or text[pos - 1] == "\n":
        return pos
    nl = text.find("\n", pos, limit)
    return nl + 1 if nl != -1 and nl + 1 < limit else pos


def _region_windows(tokenizer, text: str, lo: int, hi: int, n: int, length: int, role: str) -> list[Window]:
    windows: list[Window] = []
    stride = (hi - lo) // max(n, 1)
    for k in range(n):
        start = _line_start_at_or_after(text, lo + k * stride, hi)
        span = max(64, length * 8)
        while True:
            end = min(hi, start + span)
            ids, offsets = _encode(tokenizer, text[start:end])
            if len(ids) > length or end == hi:  # one spare token: the chunk end may cut the last one
                break
            span *= 2
        if len(ids) < length or (len(ids) == length and end == hi and offsets is None):
            raise ValueError(
                f"text is too short: window {k} of {n} ({role}) starting at character {start} has {len(ids)} tokens "
                f"before character {hi}, needs {length}; allowed a longer text or fewer/shorter windows"
            )
        char_end = start + offsets[length - 1][1] if offsets is not None else end
        windows.append(Window(k, role, start, char_end, tuple(ids[:length])))
    for a, b in zip(windows, windows[1:]):
        if a.char_end > b.char_start:
            raise ValueError(
                f"text is too short for {n} disjoint {role} windows of {length} tokens (window {a.index} ends at "
                f"character {a.char_end}, window {b.index} starts at {b.char_start}); allowed a longer text or fewer windows"
            )
    return windows


def make_windows(
    tokenizer: Any, text: str, *, n_windows: int, length: int, calib_windows: int = 0, calib_fraction: float = 0.1
) -> tuple[list[Window], list[Window], int]:
    """Evaluation and calibration windows, and the character where the calibration slice begins.

    The text is cut once: evaluation windows are spread evenly over characters
    [0, split), calibration windows over [split, len(text)), with split at the
    line start nearest (1 - calib_fraction) · len(text). The two never overlap.
    """
    if calib_windows > 0:
        split = _line_start_at_or_after(text, int(len(text) * (1 - calib_fraction)), len(text))
    else:
        split = len(text)
    evals = _region_windows(tokenizer, text, 0, split, n_windows, length, "eval")
    calib = _region_windows(tokenizer, text, split, len(text), calib_windows, length, "calibration") if calib_windows else []
    assert all(w.char_end <= split for w in evals) and all(w.char_start >= split for w in calib)
    return evals, calib, split


# --------------------------------------------------------------------------- one decode pass


@dataclass
class RowOutputs:
    nll: torch.Tensor
    """[N, T] float64: -log p(continuation token) (teacher rows; meaningless on greedy rows)"""
    pred: torch.Tensor
    """[N, T] int64: each step's argmax (on greedy rows: the generated tokens)"""
    logits: torch.Tensor | None = None
    """[N, T, V] float32, only when asked for (the backend agreement check)"""


def _forward_kwargs(model: Any) -> dict[str, Any]:
    """Only the last position's logits are read: skip the others where the model allows it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}


def _forward_params(model: Any) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        return set()


def _cache_io(model: Any) -> tuple[str, Any]:
    """How to hand the KV cache back to the model, and how to read it from an output.

    transformers 5.2x renamed the argument ``cache`` (``past_key_values`` is deprecated).
    """
    name = "cache" if "cache" in _forward_params(model) else "past_key_values"

    def get(out):
        c = out.get("cache") if hasattr(out, "get") else None
        return c if c is not None else out.past_key_values

    return name, get


@torch.no_grad()
def decode_rows(
    model: Any,
    prompts: torch.Tensor,
    conts: torch.Tensor,
    teacher: torch.Tensor,
    *,
    keep_logits: bool = False,
    on_step: Any = None,
    forward: Any = None,
) -> RowOutputs:
    """Prefill ``prompts`` [N, P], then T one-token decode steps through the KV cache.

    Row i is fed the continuation ``conts[i]`` (teacher forcing) where
    ``teacher[i]``, else its own previous argmax (greedy generation). Step t's
    logits predict continuation token t: the prefill's last position predicts
    token 0, so T forwards cover T tokens. ``forward`` replaces ``model`` as the
    callable (a compiled model); ``model`` is only read for its signature.
    """
    fwd = forward if forward is not None else model
    extra = _forward_kwargs(model)
    cache_name, get_cache = _cache_io(model)
    n, T = conts.shape
    device = _device_of(model)
    prompts, conts, teacher = prompts.to(device), conts.to(device), teacher.to(device)
    nll = torch.zeros(n, T, dtype=torch.float64)
    pred = torch.zeros(n, T, dtype=torch.long)
    kept = [] if keep_logits else None
    out = fwd(input_ids=prompts, use_cache=True, **extra)
    for step in range(T):
        logits = out.logits[:, -1].float()
        logp = logits.log_softmax(-1)
        nll[:, step] = -logp.gather(1, conts[:, step : step + 1]).squeeze(1).double().cpu()
        arg = logits.argmax(-1)
        pred[:, step] = arg.cpu()
        if kept is not None:
            kept.append(logits.cpu())
        if on_step is not None:
            on_step()
        if step == T - 1:
            break
        nxt = torch.where(teacher, conts[:, step], arg)
        out = fwd(input_ids=nxt[:, None], use_cache=True, **{cache_name: get_cache(out)}, **extra)
    return RowOutputs(nll, pred, torch.stack(kept, 1) if kept is not None else None)


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# --------------------------------------------------------------------------- static baselines


def _sites(model: Any) -> list[Any]:
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
        extra = _forward_kwargs(model)
        ids = torch.tensor([w.token_ids for w in calib], dtype=torch.long, device=_device_of(model))
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


# --------------------------------------------------------------------------- results


@dataclass
class MethodResult:
    method: str
    gamma: float | None
    sparsity: float
    perplexity: float
    top1: float
    agreement: float
    """fraction of teacher-forced steps whose argmax equals dense's"""
    greedy_match: float
    """fraction of greedy positions whose token equals dense's greedy token"""
    greedy_prefix: float
    """mean number of greedy tokens before the first difference from dense"""
    n_tokens: int
    seconds: float
    backend: str = "reference"


@dataclass
class EvalResult:
    rows: list[MethodResult]
    settings: dict[str, Any]
    windows: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    agreement_check: dict[str, Any] | None = None
    text: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str, sparsity: float | None = None) -> MethodResult:
        for r in self.rows:
            if r.method == method and (sparsity is None or math.isclose(r.sparsity, sparsity)):
                return r
        raise KeyError((method, sparsity))

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "text": self.text,
            "windows": self.windows,
            "calibration": self.calibration,
            "results": [dataclasses.asdict(r) for r in self.rows],
            "agreement_check": self.agreement_check,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = [f.name for f in dataclasses.fields(MethodResult)]
        w = csv.DictWriter(buf, fieldnames=names)
        w.writeheader()
        for r in self.rows:
            w.writerow(dataclasses.asdict(r))
        return buf.getvalue()

    def table(self) -> str:
        head = f"{'method':<10} {'r':>5} {'ppl':>10} {'top1':>7} {'agree':>7} {'greedy':>7} {'prefix':>7} {'sec':>8}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.method:<10} {r.sparsity:>5.2f} {r.perplexity:>10.3f} {r.top1:>7.4f} {r.agreement:>7.4f} "
                f"{r.greedy_match:>7.4f} {r.greedy_prefix:>7.2f} {r.seconds:>8.1f}"
            )
        s = self.settings
        lines.append(
            f"{s['n_windows']} windows of {s['prompt_len']} prompt + {s['cont_len']} continuation tokens "
            f"(text characters [0, {self.text.get('calibration_split')})), batch {s['batch_size']}, {s['scope_note']}; "
            f"greedy generation on the first {s.get('greedy_windows', s['n_windows'])} windows"
        )
        if self.calibration:
            lines.append(
                f"wanda-sp calibrated on {len(self.calibration)} windows of {s['prompt_len'] + s['cont_len']} tokens from "
                f"characters [{self.text.get('calibration_split')}, {self.text.get('chars')}), disjoint from the eval windows"
            )
        if self.agreement_check is not None:
            lines.append(f"backend agreement check: {json.dumps(self.agreement_check)}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG: perplexity against sparsity, one line per method; dense as a dashed line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        dense = [r for r in self.rows if r.method == "dense"]
        methods = [m for m in dict.fromkeys(r.method for r in self.rows) if m != "dense"]
        for m in methods:
            pts = sorted((r.sparsity, r.perplexity) for r in self.rows if r.method == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if dense:
            ax.axhline(dense[0].perplexity, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("FFN sparsity r")
        ax.set_ylabel("continuation perplexity (decode mode)")
        s = self.settings
        ax.set_title(f"{s.get('model', 'model')}: {s['n_windows']} windows, {s['prompt_len']}+{s['cont_len']} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "png": out / f"{stem}.png"}
        files["csv"].write_text(self.to_csv())
        files["json"].write_text(self.to_json())
        self.plot(files["png"])
        return files


def _metrics(out: RowOutputs, greedy: torch.Tensor, conts: torch.Tensor, dense: tuple[torch.Tensor, torch.Tensor] | None):
    dense_pred, dense_greedy = dense if dense is not None else (out.pred, greedy)
    same = greedy == dense_greedy
    T = conts.shape[1]
    first_diff = torch.where(same.all(1), torch.full((same.shape[0],), T), (~same).int().argmax(1))
    if same.numel() == 0:  # no greedy windows
        same, first_diff = torch.full((1,), float("nan")), torch.full((1,), float("nan"))
    return {
        "perplexity": math.exp(out.nll.mean().item()),
        "top1": (out.pred == conts).double().mean().item(),
        "agreement": (out.pred == dense_pred).double().mean().item(),
        "greedy_match": same.double().mean().item(),
        "greedy_prefix": first_diff.double().mean().item(),
        "n_tokens": conts.numel(),
    }


# --------------------------------------------------------------------------- the harness


def _read_text(text_or_path: str | Path | None) -> tuple[str, str | None]:
    if text_or_path is None:
        p = default_text_path()
        if not p.is_file():
            raise ValueError(f"no text given and the default {p} does not exist: allowed a text file path (--text)")
        return p.read_text(encoding="utf-8"), str(p)
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path and len(text_or_path) < 4096 and Path(text_or_path).is_file()):
        p = Path(text_or_path)
        if not p.is_file():
            raise ValueError(f"text file {p} does not exist: allowed an existing text file")
        return p.read_text(encoding="utf-8"), str(p)
    if not isinstance(text_or_path, str):
        raise ValueError(f"text_or_path={type(text_or_path).__name__} is invalid: allowed a path or a string of text")
    return text_or_path, None


def _compile_fn():
    import pop_fx

    return getattr(pop_fx, "compile", None)


@contextlib.contextmanager
def _pop_runner(model: Any, config: PopConfig, backend: str):
    """Yields the callable that runs ``model`` under POP with ``config``."""
    if backend == "compiled":
        compile_fn = _compile_fn()
        if compile_fn is None:
            raise RuntimeError("backend='compiled' needs pop_fx.compile, which this pop_fx does not provide yet: allowed backend='reference'")
        import pop_fx

        compiled = compile_fn(model, config)
        try:
            yield compiled if callable(compiled) else model
        finally:
            # compile may act in place (model.compile); the next method must see the plain model again.
            decompile = getattr(pop_fx, "decompile", None)
            if decompile is not None:
                decompile(model)
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
    """Run every method at every sparsity on the same windows; see the module docstring.

    ``batch_size`` > 1 batches windows with ``scope="sequence"`` (each window its
    own partition); 1 runs each window alone. ``backend="compiled"`` runs the POP
    methods through ``pop_fx.compile``; ``check_agreement`` windows of one POP
    setting are run through both backends whenever ``pop_fx.compile`` exists,
    and the largest logit difference is reported. ``greedy_windows`` (default:
    all) limits greedy generation to the first windows, to save time.
    ``on_row(partial EvalResult)`` is called after each (method, r) finishes.
    """
    _check_int("n_windows", n_windows, 1)
    _check_int("prompt_len", prompt_len, 1)
    _check_int("cont_len", cont_len, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("calib_windows", calib_windows, 0)
    _check_int("check_agreement", check_agreement, 0)
    if greedy_windows is not None:
        _check_int("greedy_windows", greedy_windows, 0)
        if greedy_windows > n_windows:
            raise ValueError(f"greedy_windows={greedy_windows!r} is invalid: allowed 0 <= greedy_windows <= n_windows={n_windows}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: allowed one of {list(BACKENDS)}")
    if not (isinstance(calib_fraction, (int, float)) and 0 < calib_fraction < 1):
        raise ValueError(f"calib_fraction={calib_fraction!r} is invalid: allowed 0 < calib_fraction < 1")
    ms = parse_methods(methods, gammas)
    rs = [PopConfig(sparsity=r).sparsity for r in sparsities]  # range check, naming the field
    if not rs and len(ms) > 1:
        raise ValueError("sparsities is empty: allowed one or more values 0 <= r < 1")
    scope = "sequence" if batch_size > 1 else "batch"
    PopConfig(prefill=prefill)
    if backend == "compiled" and _compile_fn() is None:
        raise RuntimeError("backend='compiled' needs pop_fx.compile, which this pop_fx does not provide yet: allowed backend='reference'")
    need_calib = any(m.name == "wanda-sp" for m in ms)
    torch.manual_seed(seed)

    text, text_path = _read_text(text_or_path)
    length = prompt_len + cont_len
    # The calibration slice is cut whether or not wanda-sp runs, so the eval windows depend only on
    # (text, n_windows, lengths, calib_windows, calib_fraction) and runs with other methods stay comparable.
    evals, calib, split = make_windows(
        tokenizer, text, n_windows=n_windows, length=length, calib_windows=calib_windows, calib_fraction=calib_fraction
    )
    ids = torch.tensor([w.token_ids for w in evals], dtype=torch.long)
    prompts, conts = ids[:, :prompt_len], ids[:, prompt_len:]

    # Rows: every window teacher-forced, then the first greedy_windows windows again, generating greedily.
    g_windows = n_windows if greedy_windows is None else greedy_windows
    n_rows = n_windows + g_windows
    row_win = torch.cat([torch.arange(n_windows), torch.arange(g_windows)])
    row_teacher = torch.arange(n_rows) < n_windows
    batches = [slice(i, min(i + batch_size, n_rows)) for i in range(0, n_rows, batch_size)]

    settings = {
        "model": model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__,
        "methods": [m.name for m in ms],
        "sparsities": rs,
        "n_windows": n_windows,
        "greedy_windows": g_windows,
        "prompt_len": prompt_len,
        "cont_len": cont_len,
        "batch_size": batch_size,
        "scope": scope,
        "scope_note": (
            "windows batched with scope='sequence': each window has its own partition"
            if scope == "sequence"
            else "batch size 1: each window has its own partition"
        ),
        "prefill": prefill,
        "seed": seed,
        "backend": backend,
        "calib_windows": calib_windows,
        "calib_fraction": calib_fraction,
        "calibration_used": need_calib,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "mode": "teacher-forced decode (prefill prompt, then one continuation token per decode step with the KV cache) "
        "and greedy generation of cont_len tokens from the prompt",
        "random_seed": seed,
        "torch": torch.__version__,
    }
    text_info = {
        "path": text_path,
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "calibration_split": split,
        "eval_chars": [evals[0].char_start, evals[-1].char_end],
        "calibration_chars": [calib[0].char_start, calib[-1].char_end] if calib else None,
        "window_rule": "windows start at line starts spread evenly over their character range; each holds the first "
        "prompt_len + cont_len tokens of text[char_start:] (no special tokens)",
    }

    n_runs = 1 + sum(len(rs) for m in ms if m.kind != "dense")
    total_steps = n_runs * len(batches) * cont_len + (math.ceil(len(calib) / batch_size) if need_calib else 0)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="eval", unit="step", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def run_all(ctx, label) -> tuple[RowOutputs, float]:
        t0 = time.perf_counter()
        nll = torch.zeros(n_rows, cont_len, dtype=torch.float64)
        pred = torch.zeros(n_rows, cont_len, dtype=torch.long)
        bar.set_description(label)
        with ctx as fwd:
            for b in batches:
                w = row_win[b]
                o = decode_rows(model, prompts[w], conts[w], row_teacher[b], on_step=bar.update, forward=fwd)
                nll[b], pred[b] = o.nll, o.pred
        return RowOutputs(nll, pred), time.perf_counter() - t0

    def split_rows(o: RowOutputs) -> tuple[RowOutputs, torch.Tensor]:
        return RowOutputs(o.nll[:n_windows], o.pred[:n_windows]), o.pred[n_windows:]

    rows: list[MethodResult] = []

    def partial() -> EvalResult:
        return EvalResult(list(rows), settings, [w.as_dict() for w in evals], [w.as_dict() for w in calib], None, text_info)

    try:
        dense_out, sec = run_all(contextlib.nullcontext(model), "dense")
        d_teacher, d_greedy = split_rows(dense_out)
        dense_ref = (d_teacher.pred, d_greedy)
        rows.append(MethodResult("dense", None, 0.0, **_metrics(d_teacher, d_greedy, conts, dense_ref), seconds=sec, backend="eager"))
        if on_row is not None:
            on_row(partial())

        sites = _sites(model) if any(m.kind == "mask" for m in ms) else []
        scores: dict[str, dict[str, torch.Tensor]] = {}
        if need_calib:
            bar.set_description("wanda-sp calibration")
            scores["wanda-sp"] = wanda_sp_scores(model, sites, calib, batch_size, on_batch=bar.update)
        if any(m.name == "random" for m in ms):
            scores["random"] = random_scores(sites, seed)

        # Sparsity-major: a long run that is stopped early has every method at the first sparsities.
        for r in rs:
            for m in ms:
                if m.kind == "dense":
                    continue
                if m.kind == "pop":
                    cfg = PopConfig(sparsity=r, candidate_ratio=m.gamma, scope=scope, prefill=prefill,
                                    candidate_proxy=m.proxy)
                    # The compiled proxy ops serve scope="batch"; batched windows (per sequence) use the reference.
                    used = backend if m.proxy is None or scope == "batch" else "reference"
                    ctx = _pop_runner(model, cfg, used)
                else:
                    ctx, used = _masked_runner(model, masks_from_scores(scores[m.name], r)), "reference"
                out, sec = run_all(ctx, f"{m.name} r={r:g}")
                t_out, greedy = split_rows(out)
                rows.append(MethodResult(m.name, m.gamma, r, **_metrics(t_out, greedy, conts, dense_ref), seconds=sec, backend=used))
                if on_row is not None:
                    on_row(partial())
    finally:
        bar.close()

    check = None
    if check_agreement:
        check = agreement_check(model, prompts, conts, rs, gammas=[m.gamma for m in ms if m.kind == "pop" and m.proxy is None], scope=scope, prefill=prefill, n=check_agreement)
    return EvalResult(rows, settings, [w.as_dict() for w in evals], [w.as_dict() for w in calib], check, text_info)


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
    """Run ``n`` windows (teacher-forced) through the eager reference and ``pop_fx.compile``; report the differences.

    Skipped, with the reason, while ``pop_fx.compile`` does not exist.
    """
    compile_fn = _compile_fn()
    if compile_fn is None:
        return {"status": "skipped", "reason": "pop_fx.compile is not available"}
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


# --------------------------------------------------------------------------- CLI


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of numbers") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pop-fx eval`` flags.

    Of pop_fx.tools.cli's shared flags eval reads --model, --dtype, --prefill and --json;
    --sparsity and --candidate-ratio are replaced by the lists --sparsities and
    --gammas, and the scope follows --batch-size ("sequence" when > 1).
    """
    g = parser.add_argument_group("evaluation")
    g.add_argument("--text", default=None, help="text file to cut windows from (default ../shared/data/web_bible.txt from the repo root)")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHOD_NAMES)} (default %(default)s)")
    g.add_argument("--sparsities", type=_floats, default=list(DEFAULT_SPARSITIES), help="FFN sparsities r, comma-separated (default %(default)s)")
    g.add_argument("--total-reductions", type=_floats, default=None, help="instead of --sparsities: total decoder-parameter reductions, converted per model (pop_fx.tools.budget)")
    g.add_argument("--gammas", type=_floats, default=list(DEFAULT_GAMMAS), help="γ values the method 'pop' expands to (default %(default)s)")
    g.add_argument("--windows", type=int, default=32, help="evaluation windows (default %(default)s)")
    g.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per window (default %(default)s)")
    g.add_argument("--cont-len", type=int, default=128, help="continuation tokens per window, fed one per decode step (default %(default)s)")
    g.add_argument("--greedy-windows", type=int, default=None, help="greedy generation on the first N windows only (default: all)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per batch; > 1 uses scope='sequence' (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random baseline and torch (default %(default)s)")
    g.add_argument("--calib-windows", type=int, default=16, help="wanda-sp calibration windows, cut from the last --calib-fraction of the text (default %(default)s)")
    g.add_argument("--calib-fraction", type=float, default=0.1, help="share of the text kept for calibration only (default %(default)s)")
    g.add_argument("--backend", choices=BACKENDS, default="reference", help="POP methods through the eager reference or pop_fx.compile (default %(default)s)")
    g.add_argument("--check-agreement", type=int, default=2, help="windows run through both backends when pop_fx.compile exists; 0 = off (default %(default)s)")
    g.add_argument("--out", default=None, help="directory for eval.csv, eval.json and eval.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.models import load_model

    dtype = getattr(args, "dtype", None)
    model_name = getattr(args, "model", None) or "smollm2"
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, tokenizer = load_model(model_name, **kwargs)
    model.eval()
    if tokenizer is None:
        if model.config.vocab_size < 256:
            raise ValueError(f"model={model_name!r} comes without a tokenizer and has a vocabulary under 256: allowed a model with a tokenizer")
        tokenizer = ByteTokenizer()
    sparsities = args.sparsities
    if args.total_reductions:
        from pop_fx.tools.budget import ffn_sparsity_for_model

        sparsities = [round(ffn_sparsity_for_model(model.config, t), 4) for t in args.total_reductions]
    result = evaluate(
        model,
        tokenizer,
        args.text,
        methods=args.methods.split(","),
        sparsities=sparsities,
        gammas=args.gammas,
        n_windows=args.windows,
        prompt_len=args.prompt_len,
        cont_len=args.cont_len,
        batch_size=args.batch_size,
        seed=args.seed,
        calib_windows=args.calib_windows,
        calib_fraction=args.calib_fraction,
        prefill=getattr(args, "prefill", None) or "pruned",
        backend=args.backend,
        check_agreement=args.check_agreement,
        progress=not args.no_progress,
        model_name=str(model_name),
        greedy_windows=args.greedy_windows,
        on_row=(lambda res: res.write(args.out, stem="eval.partial")) if args.out else None,
    )
    if args.total_reductions:
        result.settings["total_reductions"] = list(args.total_reductions)
    files = result.write(args.out) if args.out else {}
    as_json = bool(getattr(args, "json", False))
    human = sys.stderr if as_json else sys.stdout
    print(result.table(), file=human)
    for kind, p in files.items():
        print(f"wrote {kind}: {p}", file=human)
    if as_json:
        payload = result.as_dict()
        payload["files"] = {k: str(v) for k, v in files.items()}
        print(json.dumps(payload, indent=2))
    return 0


__all__ = [
    "DEFAULT_GAMMAS",
    "DEFAULT_METHODS",
    "DEFAULT_SPARSITIES",
    "EvalResult",
    "Method",
    "MethodResult",
    "Window",
    "add_arguments",
    "ByteTokenizer",
    "agreement_check",
    "decode_rows",
    "default_text_path",
    "evaluate",
    "make_windows",
    "masks_from_scores",
    "parse_methods",
    "random_scores",
    "run",
    "wanda_sp_scores",
]
