"""POP inside a continuous-batching engine: ragged steps, per-request slots, chunked prefill.

* ``pop_fx.serving.phases`` — what each token row of a step is (PREFILL / LAST / DECODE / DENSE);
* ``pop_fx.serving.ffn`` — ``RaggedPopFFN`` and ``StepInfo``: per-slot state over ``pop::ragged_prefill``
  (pop_fx/ops) and the decode functions ``ragged_decode`` / ``ragged_decode_layout`` (plain torch, here);
* ``pop_fx.serving.engine`` — a small reference engine (scheduler, chunking, preemption) the tests drive;
* ``pop_fx.serving.check`` / ``pop_fx.serving.bench`` — the 200-schedule harness and the SmolLM2 tables;
* ``pop_fx.integrations.vllm`` — the vLLM plugin (docs/vllm.md; imports vLLM only when switched on).
"""

from pop_fx.serving.phases import DECODE, DENSE, LAST, PREFILL

_FFN = ("RaggedPopFFN", "StepInfo", "reset_slot", "swap_mlps", "unswap_mlps", "wrap_mlps")


def __getattr__(name):
    # Lazy: importing pop_fx.serving (for the phase codes) does not build the ops and models ffn imports.
    if name in _FFN:
        from pop_fx.serving import ffn

        return getattr(ffn, name)
    raise AttributeError(f"module 'pop_fx.serving' has no attribute {name!r}")


__all__ = ["DECODE", "DENSE", "LAST", "PREFILL", *_FFN]
