"""Which setting should I use? Quality against measured decode speed over sparsities and methods, and a pick.

    pop-fx frontier --quick --budget 1.10          # SmolLM2 on the packaged text, a few minutes on 2 cores
    pop-fx frontier --sparsities 0.2,0.3,0.5 --methods static,pop-0.1,full --out out/frontier

Every setting (a method at a sparsity r: ``static`` = γ 0, ``pop-<γ>``, ``full`` = γ 2, ``proxy-<γ>``,
``proxy-int3-<γ>``, ``proxy-gate-<γ>``) gets, side by side in one process:

* quality from the evaluation harness (``pop_fx.tools.evaluation``): windows of the text are prefilled,
  then fed one token per decode step through the KV cache under the eager reference; reported are the
  continuation perplexity over dense's and the next-token agreement with dense (teacher-forced argmax);
* speed as in ``pop-fx bench``: dense under stock Inductor and every setting under ``pop_fx.compile``,
  each compiled once, then timed in interleaved rounds of greedy ``generate()`` (decode tokens/s between the
  first and the last new token, prefill excluded); the median is reported and divided by dense's median
  from the same rounds.

A setting is on the Pareto front when no other is at least as fast and at least as good, and better in one.
``--budget`` names the fastest setting whose quality is inside it (dense always is) and prints the one
line that uses it. Results are cached under ``~/.cache/pop-fx/frontier`` (``POP_FX_CACHE``): quality per
setting, speed per set of settings (speeds are only comparable within one process), keyed by the model's
weights, the text, the options and pop-fx's runtime source, so a rerun is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

CACHE_VERSION = 1

QUICK = dict(
    # The int8-values method (one op per site, no layouts) at two sparsities; not the int8/int3 proxies: their
    # CPU decode is slower than dense (README "Proxy-scored candidates"), and under --lowering eager one warm-up
    # of the int3 proxy alone took >13 min on 2 shared cores.
    settings="static@0.2,pop-0.1@0.3,pop-0.1@0.5,full@0.5,proxy-values-2@0.5,proxy-values-2@0.6",
    windows=16, prompt_len=64, cont_len=48, new_tokens=24, rounds=3,
)
DEFAULT = dict(
    sparsities=(0.2, 0.3, 0.4, 0.5), methods=("static", "pop-0.1", "pop-0.2", "full"),
    windows=32, prompt_len=128, cont_len=128, new_tokens=32, rounds=5,
)
SPEED_PROMPT = "In the beginning, God created the heavens and the earth. The earth was formless and empty."


# ------------------------------------------------------------------------------------------------
# settings, points and the pick (pure: tested on synthetic frontiers)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One operating point to measure: a method of ``pop-fx eval`` at a sparsity."""

    method: str
    """dense, static, pop-<γ>, full, proxy-<γ>, proxy-int3-<γ>, proxy-gate-<γ>"""
    sparsity: float
    gamma: float | None = None
    """PopConfig.candidate_ratio (None for dense)"""
    proxy: str | None = None
    """PopConfig.candidate_proxy"""

    @property
    def label(self) -> str:
        return "dense" if self.method == "dense" else f"{self.method} r={self.sparsity:g}"

    def config(self, **fields):
        from pop_fx.config import PopConfig

        return PopConfig(sparsity=self.sparsity, candidate_ratio=self.gamma, candidate_proxy=self.proxy, **fields)

    def code(self) -> str:
        """The one line that uses this setting."""
        if self.method == "dense":
            return "model  # dense: no POP setting is faster within the budget"
        extra = f", candidate_proxy={self.proxy!r}" if self.proxy else ""
        return f"pop_fx.compile(model, sparsity={self.sparsity:g}, candidate_ratio={self.gamma:g}{extra})"


DENSE = Setting("dense", 0.0)


def parse_settings(spec: str | None, methods: Iterable[str] = (), sparsities: Iterable[float] = ()) -> list[Setting]:
    """Dense first, then ``spec``'s ``method@r`` items, or else every method at every sparsity."""
    from pop_fx.config import PopConfig
    from pop_fx.tools.evaluation.methods import parse_methods

    pairs: list[tuple[str, float]] = []
    if spec:
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            name, at, r = item.partition("@")
            try:
                pairs.append((name, float(r)))
            except ValueError:
                raise ValueError(f"setting {item!r} is invalid: allowed method@sparsity, e.g. pop-0.1@0.3") from None
            if not at:
                raise ValueError(f"setting {item!r} is invalid: allowed method@sparsity, e.g. pop-0.1@0.3")
    else:
        pairs = [(m, float(r)) for r in sparsities for m in methods]
    out = [DENSE]
    for name, r in pairs:
        found = [m for m in parse_methods([name], gammas=(0.1,)) if m.kind != "dense"]
        for m in found:
            if m.kind != "pop":
                raise ValueError(f"method {name!r} is invalid here: allowed static, pop-<γ>, full and the proxy "
                                 f"methods (a fixed-mask baseline has no compiled speed)")
            s = Setting(m.name, PopConfig(sparsity=r).sparsity, m.gamma, m.proxy)
            if s not in out:
                out.append(s)
    if len(out) < 2:
        raise ValueError("no setting to measure: allowed --settings method@r,... or --methods with --sparsities")
    return out


@dataclass
class Point:
    setting: Setting
    perplexity: float
    ppl_ratio: float
    """continuation perplexity / dense's (decode mode)"""
    agreement: float
    """fraction of decode steps whose argmax equals dense's (teacher-forced)"""
    top1: float
    tokens_per_s: float
    """median decode tokens/s over the interleaved rounds"""
    speedup: float
    """tokens_per_s / dense's, same process and rounds"""
    samples: list[float] = field(default_factory=list)
    prefill_s: float = float("nan")
    extra_mib: float = 0.0
    pareto: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(label=self.setting.label, code=self.setting.code())
        return d


@dataclass(frozen=True)
class Budget:
    """A quality floor: perplexity at most ``value`` × dense's, or next-token agreement at least ``value``."""

    metric: str
    """"ppl" (perplexity ratio to dense, lower is better) or "agreement" (higher is better)"""
    value: float

    def admits(self, p: Point) -> bool:
        if self.metric == "ppl":
            return p.ppl_ratio <= self.value
        return p.agreement >= self.value

    def describe(self) -> str:
        return (f"perplexity <= {self.value:g} x dense" if self.metric == "ppl"
                else f"next-token agreement with dense >= {self.value:g}")


def parse_budget(text: str) -> Budget:
    """``1.10`` or ``ppl:1.10`` (max perplexity ratio), ``0.9`` or ``agreement:0.9`` (min agreement)."""
    raw = str(text).strip().lower()
    metric, _, num = raw.rpartition(":")
    try:
        value = float(num)
    except ValueError:
        value = float("nan")
    if metric == "":
        metric = "ppl" if value >= 1 else "agreement"
    if metric not in ("ppl", "agreement") or not math.isfinite(value) or value <= 0 \
            or (metric == "ppl" and value < 1) or (metric == "agreement" and value > 1):
        raise ValueError(f"--budget={text!r} is invalid: allowed a perplexity ratio >= 1 (e.g. 1.10 or ppl:1.10) "
                         f"or an agreement in (0, 1] (e.g. 0.9 or agreement:0.9)")
    return Budget(metric, value)


def _quality(p: Point, metric: str) -> float:
    """Smaller is better."""
    return p.ppl_ratio if metric == "ppl" else -p.agreement


def _usable(p: Point) -> bool:
    return all(math.isfinite(v) for v in (p.tokens_per_s, p.ppl_ratio, p.agreement))


def pareto_front(points: Sequence[Point], metric: str = "ppl") -> list[bool]:
    """For each point: no other point is at least as fast and at least as good, and strictly better in one."""
    out = []
    for p in points:
        if not _usable(p):
            out.append(False)
            continue
        qp = _quality(p, metric)
        dominated = any(
            _usable(o) and o.tokens_per_s >= p.tokens_per_s and _quality(o, metric) <= qp
            and (o.tokens_per_s > p.tokens_per_s or _quality(o, metric) < qp)
            for o in points if o is not p
        )
        out.append(not dominated)
    return out


def recommend(points: Sequence[Point], budget: Budget) -> Point | None:
    """The fastest point inside the budget (ties: the better quality, then the lower sparsity); None if none is."""
    inside = [p for p in points if _usable(p) and budget.admits(p)]
    if not inside:
        return None
    return max(inside, key=lambda p: (p.tokens_per_s, -_quality(p, budget.metric), -p.setting.sparsity))


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pruned(model, config):
    """The eager reference around ``model``, yielding the forward (as the harness's runners do)."""
    from pop_fx.reference import pruned

    with pruned(model, config):
        yield model


@torch.no_grad()
def measure_quality(model, tokenizer, text: str, settings: Sequence[Setting], *, n_windows: int, prompt_len: int,
                    cont_len: int, batch_size: int, prefill: str = "pruned", cache: "Cache | None" = None,
                    on_cell: Callable[[Setting, bool], None] | None = None) -> dict[Setting, dict[str, float]]:
    """Decode-mode perplexity, top-1 and agreement with dense per setting, through the eager reference."""
    from pop_fx.tools.evaluation.harness import RowPlan, run_rows
    from pop_fx.tools.evaluation.results import metrics
    from pop_fx.tools.evaluation.text import make_windows

    evals, _, _ = make_windows(tokenizer, text, n_windows=n_windows, length=prompt_len + cont_len)
    ids = torch.tensor([w.token_ids for w in evals], dtype=torch.long)
    prompts, conts = ids[:, :prompt_len], ids[:, prompt_len:]
    plan = RowPlan(n_windows, 0, batch_size)
    scope = "sequence" if batch_size > 1 else "batch"  # each window its own partition
    out: dict[Setting, dict[str, float]] = {}
    dense_ref = None
    for s in settings:
        key = ("quality", s, prefill, quality_source_hash())
        hit = cache.get(key) if cache is not None else None
        if hit is not None and (s != DENSE or "pred" in hit):
            out[s] = hit
            if s == DENSE:
                dense_ref = (torch.tensor(hit["pred"]), torch.zeros(0, cont_len, dtype=torch.long))
            if on_cell:
                on_cell(s, True)
            continue
        ctx = contextlib.nullcontext(model) if s == DENSE else _pruned(model, s.config(scope=scope, prefill=prefill))
        rows, _ = run_rows(model, ctx, plan, prompts, conts)
        teacher, greedy = plan.split(rows)
        if s == DENSE:
            dense_ref = (teacher.pred, greedy)
        m = metrics(teacher, greedy, conts, dense_ref)
        res = {k: m[k] for k in ("perplexity", "top1", "agreement")}
        if s == DENSE:
            res["pred"] = teacher.pred.tolist()  # the reference the other settings' agreement is taken against
        out[s] = res
        if cache is not None:
            cache.put(key, res)
        if on_cell:
            on_cell(s, False)
    return out


@torch.no_grad()
def measure_speed(model, tokenizer, settings: Sequence[Setting], *, new_tokens: int, rounds: int,
                  lowering: str = "inductor", on_step: Callable[[str], None] | None = None) -> dict[Setting, dict[str, Any]]:
    """Decode tokens/s per setting: dense under stock Inductor, the others under pop_fx.compile, each compiled
    once and then timed in interleaved rounds (so the machine's noise falls on all of them alike).

    ``lowering="eager"`` (tests) runs dense under Dynamo's eager backend and POP with ``lowering="eager"``:
    seconds to compile, speeds that are not Inductor's."""
    import pop_fx
    from pop_fx.api import recompile_limit_hits
    from pop_fx.tools.bench import _shallow, require_fully_rewritten
    from transformers import LogitsProcessorList

    from pop_fx.tools.timing import StepStamps

    device = next(model.parameters()).device
    if tokenizer is not None and not hasattr(tokenizer, "pad_token_id"):  # the byte tokenizer of tiny models
        ids = torch.tensor([tokenizer(SPEED_PROMPT)["input_ids"][:24]])
    elif tokenizer is not None:
        ids = tokenizer(SPEED_PROMPT, return_tensors="pt").input_ids
    else:
        ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              attention_mask=torch.ones_like(ids), pad_token_id=pad if pad is not None else 0)

    def gen(m) -> tuple[float, float]:
        stamps = StepStamps(sync=device.type == "cuda")
        t0 = time.perf_counter()
        m.generate(ids, logits_processor=LogitsProcessorList([stamps]), **kw)
        return stamps.t[0] - t0, stamps.decode_rate()

    # Every variant is a compiled copy of one model class: Dynamo's recompile limit counts all their graphs
    # against one code object, so each gets the default allowance (as in pop-fx bench).
    torch._dynamo.reset()
    hits = recompile_limit_hits()
    built: dict[Setting, Any] = {}
    res = {s: dict(samples=[], prefill_s=float("nan"), extra_mib=0.0) for s in settings}
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit * (len(settings) + 1)):
        for s in settings:
            if on_step:
                on_step(f"compiling {s.label}")
            if s == DENSE:
                m = _shallow(model)
                m.compile(backend="inductor" if lowering == "inductor" else "eager")
            else:
                m = pop_fx.compile(_shallow(model), s.config(lowering=lowering))
            gen(m)  # compile the prefill and decode graphs of this length
            gen(m)
            if s != DENSE:
                require_fully_rewritten(s.label, m)
                res[s]["extra_mib"] = pop_fx.report(m).extra_bytes / 2**20
            built[s] = m
        for k in range(rounds):
            for s, m in built.items():
                if on_step:
                    on_step(f"timing round {k + 1}/{rounds}: {s.label}")
                prefill_s, rate = gen(m)
                res[s]["samples"].append(rate)
                res[s]["prefill_s"] = prefill_s
    if recompile_limit_hits() > hits:
        raise RuntimeError("pop-fx frontier: Dynamo's recompile limit was hit, so some setting ran uncompiled; "
                           "the timings are void (measure fewer settings per run)")
    for s in settings:
        built.pop(s, None)
    torch._dynamo.reset()
    return res


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------


# What the quality of a setting depends on: the eager reference and the evaluation harness. Speed depends on
# the whole runtime (passes, ops, kernels: pop_fx.backend._source_hash), which changes far more often.
QUALITY_SOURCES = ("reference.py", "partition.py", "config.py", "sites.py", "activations.py", "lowbit.py",
                   "tools/evaluation/decode.py", "tools/evaluation/harness.py", "tools/evaluation/results.py",
                   "tools/evaluation/text.py")


def quality_source_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for name in QUALITY_SOURCES:
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Config and a sample of every parameter: two different weights never share cached results."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Cache:
    """JSON files under ``root``, one per key; ``base`` (model, text, options, pop-fx source) joins every key."""

    def __init__(self, root: Path | None, base: dict[str, Any]):
        self.root = root
        self.base = base

    def _path(self, key) -> Path:
        blob = json.dumps([self.base, _jsonable(key)], sort_keys=True, default=str)
        return self.root / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"

    def get(self, key):
        if self.root is None:
            return None
        p = self._path(key)
        try:
            return json.loads(p.read_text())["value"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key, value) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        p = self._path(key)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": _jsonable(key), "base": self.base, "value": value}, default=str))
        tmp.replace(p)


def _jsonable(x):
    if isinstance(x, Setting):
        return dataclasses.asdict(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def cache_root() -> Path:
    from pop_fx.tools.models import _cache_root

    return _cache_root() / "frontier"


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


@dataclass
class FrontierResult:
    points: list[Point]
    budget: Budget
    pick: Point | None
    info: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(info=self.info, budget=dataclasses.asdict(self.budget), points=[p.as_dict() for p in self.points],
                    recommended=self.pick.as_dict() if self.pick else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any], budget: Budget | None = None) -> "FrontierResult":
        """A result read back from ``--out``'s frontier.json (optionally under another budget)."""
        names = {f.name for f in dataclasses.fields(Point)} - {"setting"}
        points = [Point(Setting(**p["setting"]), **{k: v for k, v in p.items() if k in names}) for p in d["points"]]
        budget = budget or Budget(**d["budget"])
        for p, on in zip(points, pareto_front(points, budget.metric)):
            p.pareto = on
        return cls(points, budget, recommend(points, budget), d["info"])

    def table(self) -> str:
        head = (f"{'setting':<22} {'r':>5} {'γ':>5} {'ppl':>8} {'×dense':>7} {'agree':>6} {'tok/s':>7} "
                f"{'×dense':>7} {'pareto':>6} {'budget':>6}")
        lines = [head, "-" * len(head)]
        for p in self.points:
            g = "-" if p.setting.gamma is None else f"{p.setting.gamma:g}"
            lines.append(
                f"{p.setting.label:<22} {p.setting.sparsity:>5.2f} {g:>5} {p.perplexity:>8.2f} {p.ppl_ratio:>7.3f} "
                f"{p.agreement:>6.3f} {p.tokens_per_s:>7.1f} {p.speedup:>7.2f} {'*' if p.pareto else '':>6} "
                f"{'in' if self.budget.admits(p) else '':>6}")
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| setting | r | γ | perplexity | × dense | agreement | decode tok/s | × dense | Pareto |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for p in self.points:
            g = "–" if p.setting.gamma is None else f"{p.setting.gamma:g}"
            name = f"**{p.setting.method}**" if self.pick is p else p.setting.method
            lines.append(f"| {name} | {p.setting.sparsity:g} | {g} | {p.perplexity:.2f} | {p.ppl_ratio:.3f} | "
                         f"{p.agreement:.3f} | {p.tokens_per_s:.1f} | {p.speedup:.2f} | {'✓' if p.pareto else ''} |")
        return "\n".join(lines)

    def summary(self) -> str:
        if self.pick is None:
            return f"no setting is inside the budget ({self.budget.describe()})"
        p = self.pick
        if p.setting == DENSE:
            return (f"within the budget ({self.budget.describe()}) no measured POP setting decodes faster than dense: "
                    f"keep the dense model, or loosen --budget")
        return (f"fastest inside the budget ({self.budget.describe()}): {p.setting.label} — {p.speedup:.2f}x dense "
                f"decode speed, perplexity {p.ppl_ratio:.3f}x dense, agreement {p.agreement:.3f}\n"
                f"use it:  {p.setting.code()}")

    def plot(self, path: str | Path) -> Path:
        """PNG: quality (perplexity / dense, log; or agreement) against measured decode speed / dense."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metric = self.budget.metric
        q = (lambda p: p.ppl_ratio) if metric == "ppl" else (lambda p: p.agreement)
        pts = [p for p in self.points if _usable(p)]
        fig, ax = plt.subplots(figsize=(8.5, 5.5))
        families = {"dense": "black", "static": "tab:gray", "pop": "tab:blue", "full": "tab:green",
                    "proxy": "tab:red"}

        def family(p: Point) -> str:
            m = p.setting.method
            return "proxy" if m.startswith("proxy") else ("pop" if m.startswith("pop-") else m)

        seen = set()
        for p in pts:
            fam = family(p)
            kw = dict(s=70 if p.pareto else 40, color=families.get(fam, "tab:purple"), zorder=3,
                      edgecolors="black" if p.pareto else "none", linewidths=1.2)
            if fam not in seen:
                kw["label"] = {"pop": "POP (γ per label)", "proxy": "proxy-scored candidates", "full":
                               "full re-evaluation (γ=2)", "static": "static mask (γ=0)"}.get(fam, fam)
                seen.add(fam)
            ax.scatter([p.speedup], [q(p)], **kw)
            ax.annotate(p.setting.label, (p.speedup, q(p)), textcoords="offset points", xytext=(6, 4), fontsize=8)
        front = sorted((p for p in pts if p.pareto), key=lambda p: p.speedup)
        if len(front) > 1:
            ax.step([p.speedup for p in front], [q(p) for p in front], where="post" if metric == "ppl" else "pre",
                    color="black", lw=1, ls="-", alpha=0.5, zorder=2, label="Pareto front (outlined points)")
        if self.pick is not None:
            ax.scatter([self.pick.speedup], [q(self.pick)], marker="*", s=320, color="gold", edgecolors="black",
                       zorder=4, label=f"pick: {self.pick.setting.label}")
        ax.axhline(self.budget.value, color="tab:orange", ls="--", lw=1, label=f"budget: {self.budget.describe()}")
        ax.axvline(1.0, color="black", ls=":", lw=0.8)
        if metric == "ppl":
            from matplotlib.ticker import FormatStrFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
            ax.set_ylabel("decode-mode perplexity / dense (log; lower is better)")
        else:
            ax.set_ylabel("next-token agreement with dense (higher is better)")
        low = self.info.get("lowering", "inductor")
        ax.set_xlabel(f"measured decode tokens/s / dense's (both lowered by {low}; higher is faster)")
        i = self.info
        ax.set_title(f"{i.get('model')}: quality vs measured decode speed\n"
                     f"{i.get('windows')} windows of {i.get('prompt_len')}+{i.get('cont_len')} tokens of "
                     f"{i.get('text_name')}; speed: median of {i.get('rounds')} interleaved rounds, "
                     f"{i.get('threads')} threads", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
        plt.close(fig)
        return path


def frontier(model, tokenizer, text: str, settings: Sequence[Setting], budget: Budget, *, windows: int,
             prompt_len: int, cont_len: int, batch_size: int, new_tokens: int, rounds: int, prefill: str = "pruned",
             lowering: str = "inductor", cache_dir: Path | None = None, model_name: str = "model",
             text_name: str = "text", progress: bool = True, log: Callable[[str], None] | None = None) -> FrontierResult:
    """Measure every setting's quality and speed (or read them from the cache) and pick one for ``budget``."""
    from tqdm.auto import tqdm

    from pop_fx.backend import _source_hash

    log = log or (lambda msg: None)
    settings = list(settings)
    if DENSE not in settings:
        settings.insert(0, DENSE)
    threads = torch.get_num_threads()
    info = dict(model=model_name, text_name=text_name, text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                windows=windows, prompt_len=prompt_len, cont_len=cont_len, batch_size=batch_size, prefill=prefill,
                new_tokens=new_tokens, rounds=rounds, threads=threads, lowering=lowering,
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""), torch=torch.__version__,
                device=str(next(model.parameters()).device))
    base = dict(version=CACHE_VERSION, model=model_fingerprint(model),
                **{k: info[k] for k in ("text_sha256", "windows", "prompt_len", "cont_len", "batch_size", "dtype",
                                        "torch", "device")})
    cache = Cache(cache_dir, base)
    speed_key = ("speed", list(settings), new_tokens, rounds, threads, lowering, _source_hash()[:16])
    speed = cache.get(speed_key)
    n_quality = len(settings)
    total = n_quality + (0 if speed else len(settings) * (1 + rounds))
    bar = tqdm(total=total, desc="frontier", unit="cell", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        def on_cell(s, cached):
            bar.set_description(f"quality {s.label}{' (cached)' if cached else ''}")
            bar.update()

        log(f"quality of {len(settings)} settings: {windows} windows of {prompt_len}+{cont_len} tokens, eager "
            f"reference" + (", cached results reused" if cache_dir else ""))
        quality = measure_quality(model, tokenizer, text, settings, n_windows=windows, prompt_len=prompt_len,
                                  cont_len=cont_len, batch_size=batch_size, prefill=prefill, cache=cache,
                                  on_cell=on_cell)
        if speed is None:
            log(f"speed of {len(settings)} settings: compile each, then {rounds} interleaved rounds of "
                f"{new_tokens} new tokens")

            def on_step(msg):
                bar.set_description(msg)
                if msg.startswith("compiling"):
                    log(msg)
                bar.update()

            measured = measure_speed(model, tokenizer, settings, new_tokens=new_tokens, rounds=rounds,
                                     lowering=lowering, on_step=on_step)
            speed = [measured[s] for s in settings]
            cache.put(speed_key, speed)
        else:
            log("speed: cached result of the same settings reused")
    finally:
        bar.close()
    dense_q = quality[DENSE]
    dense_tps = _median(speed[0]["samples"])
    points = []
    for s, sp in zip(settings, speed):
        qd, tps = quality[s], _median(sp["samples"])
        points.append(Point(s, qd["perplexity"], qd["perplexity"] / dense_q["perplexity"], qd["agreement"],
                            qd["top1"], tps, tps / dense_tps, list(sp["samples"]), sp["prefill_s"], sp["extra_mib"]))
    for p, on in zip(points, pareto_front(points, budget.metric)):
        p.pareto = on
    return FrontierResult(points, budget, recommend(points, budget), info)


def _median(xs: Sequence[float]) -> float:
    import statistics

    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``pop-fx frontier`` flags. Of the shared flags it reads --model, --dtype, --prefill and --json
    (--sparsity and --candidate-ratio are replaced by --settings or --methods × --sparsities)."""
    from pop_fx.tools.evaluation.cli import _floats

    g = parser.add_argument_group("frontier")
    g.add_argument("--budget", default="1.10", help="quality budget: max perplexity ratio to dense (1.10, ppl:1.10) "
                   "or min next-token agreement (0.9, agreement:0.9) (default %(default)s)")
    g.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: "
                   f"{len(QUICK['settings'].split(','))} settings, {QUICK['windows']} windows of "
                   f"{QUICK['prompt_len']}+{QUICK['cont_len']} tokens, {QUICK['rounds']} speed rounds")
    g.add_argument("--settings", default=None, help="comma-separated method@r, e.g. static@0.3,pop-0.1@0.3,full@0.5 "
                   "(default: --methods at every --sparsities)")
    g.add_argument("--methods", default=None, help="comma-separated: static, pop-<γ>, full, proxy-<γ>, "
                   f"proxy-int3-<γ>, proxy-gate-<γ> (default {','.join(DEFAULT['methods'])})")
    g.add_argument("--sparsities", type=_floats, default=None,
                   help=f"FFN sparsities r (default {','.join(map(str, DEFAULT['sparsities']))})")
    g.add_argument("--text", default=None, help="text file (default: the World English Bible sample packaged with "
                   "pop-fx, pop_fx/data/web_bible_sample.txt)")
    g.add_argument("--windows", type=int, default=None, help=f"evaluation windows (default {DEFAULT['windows']})")
    g.add_argument("--prompt-len", type=int, default=None, help=f"prompt tokens per window (default {DEFAULT['prompt_len']})")
    g.add_argument("--cont-len", type=int, default=None, help=f"decode steps per window (default {DEFAULT['cont_len']})")
    g.add_argument("--batch-size", type=int, default=16, help="windows per batch (> 1: scope='sequence', each window "
                   "its own partition) (default %(default)s)")
    g.add_argument("--new-tokens", type=int, default=None, help=f"tokens per timed generate() (default {DEFAULT['new_tokens']})")
    g.add_argument("--rounds", type=int, default=None, help=f"interleaved timing rounds (default {DEFAULT['rounds']})")
    g.add_argument("--lowering", choices=["inductor", "eager"], default="inductor",
                   help="compile dense and POP through Inductor (the speed a user gets) or eager (fast, for tests)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--out", default=None, help="directory for frontier.json, frontier.md and frontier.png")
    g.add_argument("--replot", default=None, metavar="FRONTIER_JSON", help="measure nothing: read an earlier "
                   "run's frontier.json, apply --budget, print and (with --out) write again")
    g.add_argument("--no-cache", action="store_true", help="measure everything again (and do not store)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar and no phase lines")


def run(args: argparse.Namespace) -> int:
    from pop_fx.tools.evaluation.text import ByteTokenizer, read_text
    from pop_fx.tools.models import load_model
    from pop_fx.tools.phases import Phases

    log = Phases(enabled=not args.no_progress)
    budget = parse_budget(args.budget)
    preset = QUICK if args.quick else DEFAULT
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset.get(name, DEFAULT.get(name))  # noqa: E731
    if args.settings or args.methods or args.sparsities:
        methods = args.methods.split(",") if args.methods else list(DEFAULT["methods"])
        settings = parse_settings(args.settings, methods, args.sparsities or DEFAULT["sparsities"])
    else:
        settings = parse_settings(preset.get("settings"), DEFAULT["methods"], DEFAULT["sparsities"])
    n = dict(windows=pick("windows"), prompt_len=pick("prompt_len"), cont_len=pick("cont_len"),
             new_tokens=pick("new_tokens"), rounds=pick("rounds"), batch_size=args.batch_size)
    for k, v in n.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{k.replace('_', '-')}={v!r} is invalid: allowed an integer >= 1")
    if n["new_tokens"] < 2:
        raise ValueError(f"--new-tokens={n['new_tokens']} is invalid: allowed an integer >= 2 (a decode rate "
                         f"needs two tokens)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replot:
        result = FrontierResult.from_dict(json.loads(Path(args.replot).read_text()), budget)
        return _report(result, args)
    text, text_path = read_text(args.text)
    log(f"loading {args.model}")
    model, tok = load_model(args.model, args.dtype)
    if tok is None:
        if model.config.vocab_size < 256:
            raise ValueError(f"--model={args.model!r} has no tokenizer and a vocabulary under 256: allowed a "
                             f"model with a tokenizer")
        tok = ByteTokenizer()
    log(f"loaded; {len(settings) - 1} settings and dense, budget: {budget.describe()}")
    result = frontier(model, tok, text, settings, budget, **n, prefill=args.prefill, lowering=args.lowering,
                      cache_dir=None if args.no_cache else cache_root(), model_name=str(args.model),
                      text_name=Path(text_path).name if text_path else "text", progress=not args.no_progress, log=log)
    result.info["text_path"] = text_path
    return _report(result, args)


def _report(result: FrontierResult, args: argparse.Namespace) -> int:
    files = {}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / "frontier.json", "md": out / "frontier.md", "png": out / "frontier.png"}
        files["json"].write_text(json.dumps(result.as_dict(), indent=2))
        files["md"].write_text(result.markdown() + "\n")
        result.plot(files["png"])
    human = sys.stderr if args.json else sys.stdout
    print(result.table(), file=human)
    i = result.info
    print(f"quality: {i['windows']} windows of {i['prompt_len']}+{i['cont_len']} tokens of {i['text_name']}, decode "
          f"mode; speed: median decode tokens/s of {i['rounds']} interleaved rounds of {i['new_tokens']} new tokens, "
          f"batch 1, {i['threads']} threads, {i['dtype']} (noisy on a shared machine)", file=human)
    print(result.summary(), file=human)
    for kind, p in files.items():
        print(f"wrote {kind}: {p}", file=human)
    if args.json:
        payload = result.as_dict()
        payload["files"] = {k: str(v) for k, v in files.items()}
        print(json.dumps(payload, indent=2))
    return 0
