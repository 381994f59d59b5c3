"""Total-parameter budget -> FFN sparsity (the conversion behind the paper's Table 8).

The paper quotes *total* parameter reductions but prunes only the FFNs, so it
prunes them harder: Llama2-7B at 20% total is 29.9% FFN, at 40% it is 59.8%.
Like Table 8 we count the decoder layers only (token embeddings and the LM head
are excluded; they are never pruned). Per decoder layer:

    attention  = d·(n_h·h) [q] + 2·d·(n_kv·h) [k, v] + (n_h·h)·d [o]  (+ biases)
    ffn        = m·d·f  (m = 3 for gate/up/down, 2 for a plain FFN)    (+ biases)
    norms      = n_norm·d  (two RMSNorms in a Llama layer; ×2 with LayerNorm's bias)

Pruning a fraction r of the f intermediate channels removes r of every
channel-indexed parameter: the d·f matrices and the input biases, not the
down projection's own d-sized bias. The budget equation

    t · P_total = r · P_channel

is solved for r with sympy; ``sparsity_expression()`` returns the solution so a
reader (or a test) can see the formula rather than trust a number. The layer
count cancels out (all layers have the same shape) but is kept for the totals.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import sympy

# Symbols of the budget equation; sparsity_expression() is written in them (SYMBOLS["d_ff"], ...).
_t, _r = sympy.symbols("t r", nonnegative=True)
_dm, _f, _nl, _nh, _nkv, _hd = sympy.symbols("d_model d_ff n_layers n_heads n_kv_heads head_dim", positive=True, integer=True)
_mats, _qkvb, _ob, _fib, _fob, _normp = sympy.symbols(
    "ffn_mats qkv_bias o_bias ffn_in_bias ffn_out_bias norm_params", nonnegative=True, integer=True
)
SYMBOLS: dict[str, sympy.Symbol] = {
    s.name: s for s in (_t, _r, _dm, _f, _nl, _nh, _nkv, _hd, _mats, _qkvb, _ob, _fib, _fob, _normp)
}


def _layer_terms() -> dict[str, sympy.Expr]:
    q_out = _nh * _hd
    kv_out = _nkv * _hd
    attention = _dm * q_out + 2 * _dm * kv_out + q_out * _dm
    attention += _qkvb * (q_out + 2 * kv_out) + _ob * _dm
    # ffn_in_bias counts the biases indexed by channel: 1 for a plain FFN's W1, 2 for gate + up.
    ffn_channel = _mats * _dm * _f + _fib * _f
    ffn = ffn_channel + _fob * _dm
    norms = _normp * _dm
    return {"attention": attention, "ffn": ffn, "ffn_channel": ffn_channel, "norms": norms}


@functools.cache
def sparsity_expression() -> sympy.Expr:
    """r(t, shapes): the FFN sparsity that removes a fraction t of the decoder layers' parameters."""
    terms = _layer_terms()
    total = _nl * (terms["attention"] + terms["ffn"] + terms["norms"])
    pruned = _nl * _r * terms["ffn_channel"]
    (solution,) = sympy.solve(sympy.Eq(_t * total, pruned), _r)
    return sympy.simplify(solution)


def _int(name: str, value: Any, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= {lo}")
    return int(value)


def _values(
    d_model_: int,
    d_ff_: int,
    n_layers_: int,
    n_heads_: int | None,
    n_kv_heads_: int | None,
    head_dim_: int | None,
    gated: bool,
    qkv_bias_: bool,
    o_bias_: bool,
    mlp_bias: bool,
    norms_per_layer: int,
    norm_bias: bool,
) -> dict[sympy.Symbol, int]:
    dm = _int("d_model", d_model_)
    f = _int("d_ff", d_ff_)
    nl = _int("n_layers", n_layers_)
    nh = 1 if n_heads_ is None else _int("n_heads", n_heads_)
    if head_dim_ is None:
        if dm % nh:
            raise ValueError(f"n_heads={n_heads_!r} is invalid: allowed a divisor of d_model={dm} (or pass head_dim)")
        hd = dm // nh
    else:
        hd = _int("head_dim", head_dim_)
    nkv = nh if n_kv_heads_ is None else _int("n_kv_heads", n_kv_heads_)
    if nkv > nh or nh % nkv:
        raise ValueError(f"n_kv_heads={n_kv_heads_!r} is invalid: allowed a divisor of n_heads={nh} (GQA), 1..{nh}")
    for name, flag in (("gated", gated), ("qkv_bias", qkv_bias_), ("o_bias", o_bias_), ("mlp_bias", mlp_bias), ("norm_bias", norm_bias)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r} is invalid: allowed True or False")
    norms = _int("norms_per_layer", norms_per_layer, lo=0)
    return {
        _dm: dm,
        _f: f,
        _nl: nl,
        _nh: nh,
        _nkv: nkv,
        _hd: hd,
        _mats: 3 if gated else 2,
        _qkvb: int(qkv_bias_),
        _ob: int(o_bias_),
        _fib: (2 if gated else 1) * int(mlp_bias),
        _fob: int(mlp_bias),
        _normp: norms * (2 if norm_bias else 1),
    }


def decoder_parameter_counts(
    *,
    d_model: int,
    d_ff: int,
    n_layers: int,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    gated: bool = True,
    qkv_bias: bool = False,
    o_bias: bool = False,
    mlp_bias: bool = False,
    norms_per_layer: int = 2,
    norm_bias: bool = False,
) -> dict[str, int]:
    """Parameter counts of all decoder layers: attention, ffn, ffn_channel (prunable), norms, total."""
    values = _values(d_model, d_ff, n_layers, n_heads, n_kv_heads, head_dim, gated, qkv_bias, o_bias, mlp_bias, norms_per_layer, norm_bias)
    counts = {k: int(v.subs(values)) * values[_nl] for k, v in _layer_terms().items()}
    counts["total"] = counts["attention"] + counts["ffn"] + counts["norms"]
    return counts


def ffn_sparsity_for_total(
    total_reduction: float,
    *,
    d_model: int,
    d_ff: int,
    n_layers: int,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    gated: bool = True,
    qkv_bias: bool = False,
    o_bias: bool = False,
    mlp_bias: bool = False,
    norms_per_layer: int = 2,
    norm_bias: bool = False,
) -> float:
    """The FFN sparsity r that removes ``total_reduction`` of the decoder layers' parameters.

    ``n_heads=None`` means q and o are d_model × d_model (multi-head attention of
    any head count); ``n_kv_heads`` (GQA) defaults to ``n_heads``; ``head_dim``
    defaults to d_model / n_heads. ``gated`` = gate/up/down (3 matrices), else a
    plain 2-matrix FFN. Norms (``norms_per_layer`` vectors of d_model, doubled by
    ``norm_bias``) are counted although they are a rounding error.
    Raises ValueError when the reduction is out of range, including any that
    would need r >= 1 (the FFNs alone are not that large a share).
    """
    values = _values(d_model, d_ff, n_layers, n_heads, n_kv_heads, head_dim, gated, qkv_bias, o_bias, mlp_bias, norms_per_layer, norm_bias)
    if isinstance(total_reduction, bool) or not isinstance(total_reduction, numbers.Real) or not (total_reduction == total_reduction):
        raise ValueError(f"total_reduction={total_reduction!r} is invalid: allowed a number in [0, 1)")
    share = sparsity_expression().subs(values).subs(_t, 1)  # r at t = 1, i.e. P_total / P_channel
    limit = 1 / float(share)
    if not (0 <= float(total_reduction) < limit):
        raise ValueError(
            f"total_reduction={total_reduction!r} is out of range: allowed 0 <= total_reduction < {limit:.4f} "
            f"(the prunable FFN share of the decoder parameters; more would need FFN sparsity r >= 1)"
        )
    return float(sparsity_expression().subs(values).subs(_t, sympy.Rational(str(float(total_reduction)))))


# Model types whose FFN is plain (two matrices) and whose linear layers carry biases.
_PLAIN_BIASED = {"gpt2": "gpt2", "opt": "opt", "gpt_neox": "gpt_neox", "phi": "phi", "gptj": "gptj", "bloom": "bloom", "falcon": "falcon"}
# Gated model types whose q, k and v projections carry a bias (o_proj does not).
_QKV_BIAS = {"qwen2", "qwen2_vl", "qwen2_5_vl"}


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def ffn_sparsity_for_model(config: Any, total_reduction: float) -> float:
    """``ffn_sparsity_for_total`` with the shapes read from a Hugging Face config (or a model's ``.config``).

    Covers dense decoders (Llama, Mistral, Qwen2/3, Gemma, Granite, Phi-3, GPT-2,
    OPT, ...). Mixture-of-experts configs raise ValueError: a routed token only
    meets some experts, so "total parameters" is not one number there.
    """
    config = getattr(config, "config", config)
    config = getattr(config, "text_config", None) or config
    if _get(config, "num_local_experts", "num_experts", "n_routed_experts") not in (None, 0):
        raise ValueError("config is a mixture-of-experts model: allowed dense decoders only (no num_experts/num_local_experts)")
    model_type = getattr(config, "model_type", "")
    dm = _get(config, "hidden_size", "n_embd", "d_model")
    if dm is None:
        raise ValueError(f"config of model_type {model_type!r} has no hidden_size/n_embd/d_model: allowed a decoder config")
    f = _get(config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", default=4 * dm if model_type in _PLAIN_BIASED else None)
    if f is None:
        raise ValueError(f"config of model_type {model_type!r} has no intermediate_size/n_inner/ffn_dim: allowed a decoder config")
    plain = model_type in _PLAIN_BIASED
    return ffn_sparsity_for_total(
        total_reduction,
        d_model=dm,
        d_ff=f,
        n_layers=_get(config, "num_hidden_layers", "n_layer", "num_layers"),
        n_heads=_get(config, "num_attention_heads", "n_head"),
        n_kv_heads=_get(config, "num_key_value_heads"),
        head_dim=getattr(config, "head_dim", None),
        gated=not plain,
        qkv_bias=plain or model_type in _QKV_BIAS or bool(getattr(config, "attention_bias", False)),
        o_bias=plain or bool(getattr(config, "attention_bias", False)),
        mlp_bias=plain or bool(getattr(config, "mlp_bias", False)),
        norms_per_layer=2,
        norm_bias=plain,
    )


__all__ = ["SYMBOLS", "decoder_parameter_counts", "ffn_sparsity_for_model", "ffn_sparsity_for_total", "sparsity_expression"]
