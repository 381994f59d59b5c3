"""POP inside a continuous-batching engine: ragged steps, per-request slots, chunked prefill.

* ``pop_fx.serving.phases`` — what each token row of a step is (PREFILL / LAST / DECODE / DENSE);
* ``pop_fx.serving.ffn`` — ``RaggedPopFFN`` and ``StepInfo``: per-slot state, the ``pop::ragged_*`` ops;
* ``pop_fx.serving.engine`` — a small reference engine (scheduler, chunking, preemption) the tests drive;
* ``pop_fx.integrations.vllm`` — the vLLM plugin (imported only where vLLM is installed).
"""

from pop_fx.serving.ffn import RaggedPopFFN, StepInfo, reset_slot, swap_mlps, unswap_mlps, wrap_mlps
from pop_fx.serving.phases import DECODE, DENSE, LAST, PREFILL

__all__ = ["DECODE", "DENSE", "LAST", "PREFILL", "RaggedPopFFN", "StepInfo", "reset_slot", "swap_mlps",
           "unswap_mlps", "wrap_mlps"]
