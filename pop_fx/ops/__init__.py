"""The ``pop::`` custom ops that the passes insert: one op per file, each with its fake (or a ``triton_op``
whose body branches on the device), its torch reference and, where it has one, its Triton kernel.

    file                 op                      what it computes
    prefill.py           pop::prefill            importance, R/C/P and layouts into the state; the FFN output
    decode.py            pop::decode             down projection over R ∪ selected candidates (scope="batch")
    decode_seq.py        pop::decode_seq         per-sequence selection and down projection (scope="sequence")
    proxy_select.py      pop::proxy_select       candidates ranked from a low-precision copy (candidate_proxy)
    gather_in.py         pop::gather_in          exact gate/up over R ∪ the proxy's chosen candidates
    decode_sel.py        pop::decode_sel         down projection over R ∪ the proxy's chosen candidates
    values_decode.py     pop::values_decode      a whole decode FFN from the int8 copy's H ("int8-values")
    experts_prefill.py   pop::experts_prefill    per-expert partitions of routed experts; their output
    experts_decode.py    pop::experts_decode     each token through its chosen experts, pruned
    linear.py            pop::linear             a decode step's other linears (few rows), GEMM or reduction

Shared, not ops: ``layout.py`` (the prefill-time R ∪ C layout copies and the layout flags) and
``rows_gemv.py`` (a Triton kernel of gathered row products used by the proxy ops).

A site's state (see ``pop_fx.state``) enters the graphs as explicit tensors:

* ``rc_idx`` [S, n_R + n_C] int64 — R then C, each in ascending channel order
  (S = 1 under scope="batch", max_batch_size under scope="sequence");
* ``wd_norm_c`` [S, n_C] fp32 — ||Wd[:, j]|| of the candidates, for per-step scoring;
* ``w_in`` / ``b_in`` — the gate/up (or up) rows of R ∪ C laid out contiguously,
  [n_in·(n_R+n_C), d_model] and its bias ("batch" scope; empty under "sequence");
* ``wd_rc`` [d_out, n_R+n_C] — the down projection's columns of R ∪ C in ``nn.Linear``'s layout,
  so a decode step's down projection is one GEMV ("batch" scope).

The prefill op writes all of them in place; decode ops only read them. The
user's Parameters are never modified. Every op calls ``pop_fx.partition`` for
ranks and selection, like the eager reference does.

Layout flags (``flags`` argument, a bit set):
  FUSED  — ``w_a`` holds gate rows [0, d_ff) and up rows [d_ff, 2·d_ff) (Phi-3's gate_up_proj);
  CONV1D — weights are stored [in, out] (GPT-2's Conv1D) instead of [out, in].
"""

from pop_fx.ops.layout import CONV1D, FUSED  # noqa: F401  (layout flags the passes set)
from pop_fx.ops import (  # noqa: F401  (importing an op module registers its op)
    decode, decode_sel, decode_seq, experts_decode, experts_prefill, gather_in, linear, prefill, proxy_select,
    values_decode)

__all__ = ["CONV1D", "FUSED"]
