"""Which setting should I use? Quality against measured decode speed over sparsities and methods, and a pick.

    pop-fx frontier --quick --budget 1.10          # SmolLM2 on the packaged text, a few minutes on 2 cores
    pop-fx frontier --sparsities 0.2,0.3,0.5 --methods static,pop-0.1,full --out out/frontier

Every setting (a method at a sparsity r: ``static`` = γ 0, ``pop-<γ>``, ``full`` = γ 2, ``proxy-<γ>``,
``proxy-int3-<γ>``, ``proxy-gate-<γ>``) gets, side by side in one process:

* quality from the evaluation harness (``pop_fx.tools.evaluation``): windows of the text are prefilled,
  then fed one token per decode step through the KV cache under the eager reference; reported are the
  continuation perplexity over dense's and the next-token agreement with dense (teacher-forced argmax);
* speed as in ``pop-fx bench``: every setting under ``pop_fx.compile``, dense as ``sparsity=0`` (the same
  autotuned decode linears as POP), each compiled once, then timed in interleaved rounds of greedy
  ``generate()`` (decode tokens/s between the first and the last new token, prefill excluded); the median is
  reported and divided by dense's median from the same rounds.

A setting is on the Pareto front when no other is at least as fast and at least as good, and better in one.
``--budget`` names the fastest setting whose quality is inside it (dense always is) and prints the one
line that uses it. Results are cached under ``~/.cache/pop-fx/frontier`` (``POP_FX_CACHE``): quality per
setting, speed per set of settings (speeds are only comparable within one process), keyed by the model's
weights, the text, the options and pop-fx's runtime source, so a rerun is instant.

Modules: ``settings`` (settings, points, budget, presets), ``measure`` (quality and speed), ``pareto`` (the
front and the pick), ``cache``, ``result`` (one run and its result), ``plot``, ``cli`` (``pop-fx frontier``).
"""

from pop_fx.tools.frontier.cache import Cache, cache_root, model_fingerprint, quality_source_hash
from pop_fx.tools.frontier.cli import SHARED_FLAGS, add_arguments, report, run
from pop_fx.tools.frontier.measure import SPEED_PROMPT, measure_quality, measure_speed
from pop_fx.tools.frontier.pareto import pareto_front, recommend, usable
from pop_fx.tools.frontier.result import FrontierResult, frontier
from pop_fx.tools.frontier.settings import DEFAULT, DENSE, QUICK, Budget, Point, Setting, parse_budget, parse_settings

__all__ = [
    "DEFAULT", "DENSE", "QUICK", "SHARED_FLAGS", "SPEED_PROMPT", "Budget", "Cache", "FrontierResult", "Point",
    "Setting", "add_arguments", "cache_root", "frontier", "measure_quality", "measure_speed", "model_fingerprint",
    "pareto_front", "parse_budget", "parse_settings", "quality_source_hash", "recommend", "report", "run", "usable",
]
