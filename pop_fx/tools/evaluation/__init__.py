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

Files: ``methods.py`` (names), ``text.py`` (windows), ``decode.py`` (one teacher-forced/greedy pass),
``baselines.py`` (Wanda-sp and random masks), ``results.py`` (rows, table, files, plot), ``harness.py``
(``evaluate``, ``agreement_check``), ``cli.py`` (``pop-fx eval``).
"""

from pop_fx.tools.evaluation.baselines import masks_from_scores, random_scores, wanda_sp_scores
from pop_fx.tools.evaluation.cli import SHARED_FLAGS, add_arguments, run
from pop_fx.tools.evaluation.decode import RowOutputs, decode_rows
from pop_fx.tools.evaluation.harness import BACKENDS, agreement_check, evaluate
from pop_fx.tools.evaluation.methods import (DEFAULT_GAMMAS, DEFAULT_METHODS, DEFAULT_SPARSITIES, METHOD_NAMES,
                                             PROXY_METHODS, Method, parse_methods)
from pop_fx.tools.evaluation.results import EvalResult, MethodResult
from pop_fx.tools.evaluation.text import ByteTokenizer, Window, default_text_path, make_windows

__all__ = [
    "BACKENDS", "SHARED_FLAGS", "DEFAULT_GAMMAS", "DEFAULT_METHODS", "DEFAULT_SPARSITIES", "METHOD_NAMES", "PROXY_METHODS",
    "ByteTokenizer", "EvalResult", "Method", "MethodResult", "RowOutputs", "Window", "add_arguments",
    "agreement_check", "decode_rows", "default_text_path", "evaluate", "make_windows", "masks_from_scores",
    "parse_methods", "random_scores", "run", "wanda_sp_scores",
]
