"""POP inside a continuous-batching engine: ragged steps, per-request slots, chunked prefill.

* ``pop_fx.serving.phases`` — what each token row of a step is (PREFILL / LAST / DECODE / DENSE);
* ``pop_fx.serving.ffn`` — ``RaggedPopFFN`` and ``StepInfo``: per-slot state, the ``pop::ragged_*`` ops;
* ``pop_fx.serving.engine`` — a small reference engine (scheduler, chunking, preemption) the tests drive;
* ``pop_fx.serving.check`` / ``pop_fx.serving.bench`` — the 200-schedule harness and the SmolLM2 tables;
* ``pop_fx.integrations.vllm`` — the vLLM plugin (imported only where vLLM is installed).
"""

from pop_fx.serving.phases import DECODE, DENSE, LAST, PREFILL

_FFN = ("RaggedPopFFN", "StepInfo", "reset_slot", "swap_mlps", "unswap_mlps", "wrap_mlps")


def __getattr__(name):
    # Lazy: the pop::ragged_* ops import pop_fx.serving.phases, and pop_fx.serving.ffn imports the ops.
    if name in _FFN:
        from pop_fx.serving import ffn

        return getattr(ffn, name)
    raise AttributeError(f"module 'pop_fx.serving' has no attribute {name!r}")


__all__ = ["DECODE", "DENSE", "LAST", "PREFILL", *_FFN]
