"""Config -> ModelSpec, by building the real transformers model on the meta device.

The one module of the planner that imports torch and transformers (lazily, inside functions),
so that planning a catalog model never pays for them. No weights are read and no memory is
allocated: the meta device gives shapes only. `trust_remote_code` is never set; a config whose
architecture transformers does not ship is refused.
"""

from __future__ import annotations

import dataclasses
import re

from planner.errors import PlanInputError
from planner.model_config import ASSUMED_IF_MISSING, ResolvedSizes, check_resolved_sizes, check_rope_factors, validate_config
from planner.spec import ModelSpec, PeftDefaults, TensorSpec

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")

_LEAF_ROLES = {
    "q_proj": "attention.q",
    "query": "attention.q",
    "k_proj": "attention.k",
    "key": "attention.k",
    "v_proj": "attention.v",
    "value": "attention.v",
    "qkv_proj": "attention.qkv",
    "query_key_value": "attention.qkv",
    "c_attn": "attention.qkv",
    "W_pack": "attention.qkv",
    "Wqkv": "attention.qkv",
    "o_proj": "attention.o",
    "out_proj": "attention.o",
    "dense": "attention.o",
    "gate_proj": "mlp.gate",
    "w1": "mlp.gate",
    "up_proj": "mlp.up",
    "w3": "mlp.up",
    "gate_up_proj": "mlp.gate_up",
    "down_proj": "mlp.down",
    "w2": "mlp.down",
    "fc1": "mlp.up",
    "fc2": "mlp.down",
    "c_fc": "mlp.up",
    "c_proj": "mlp.down",
}


def _is_router(module_name: str, modules: dict) -> bool:
    """A MoE router: a `gate`/`router` module whose parent also holds the experts."""
    parent_name, _, leaf = module_name.rpartition(".")
    if leaf not in ("gate", "router"):
        return False
    return hasattr(modules.get(parent_name), "experts")


def _role(module, module_name: str, is_router: bool, is_input_emb: bool, is_output_emb: bool) -> str:
    if is_output_emb:
        return "lm_head"
    if is_input_emb:
        return "embedding"
    if ".experts." in f".{module_name}." or module_name.endswith(".experts"):
        return "expert"
    if is_router:
        return "router"
    cls = type(module).__name__.lower()
    if "norm" in cls:
        return "norm"
    leaf = module_name.rsplit(".", 1)[-1]
    role = _LEAF_ROLES.get(leaf)
    if role is not None:
        if role == "attention.o" and leaf == "dense" and "attn" not in module_name and "attention" not in module_name:
            return "mlp.other"
        return role
    if "attn" in module_name or "attention" in module_name:
        return "attention.other"
    if "mlp" in module_name or "feed_forward" in module_name or "ffn" in module_name:
        return "mlp.other"
    return "other"


def _load_transformers():
    import logging

    # bitsandbytes (imported by PEFT) warns on every import on CPUs with AVX512-BF16 that its
    # optional CPU inference kernel is missing; nothing here runs a kernel.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import torch  # noqa: F401
        import transformers

        # its config warnings ("bos_token_id must be ...") are not the user's to act on here
        transformers.logging.set_verbosity_error()
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PlanInputError(
            "model",
            "introspecting a model outside the catalog needs torch and transformers "
            "(pip install 'vramplan[introspect]')",
        ) from exc


def build_config(config: dict):
    """A transformers PretrainedConfig from a validated config dict; refuses unknown architectures."""
    _load_transformers()
    from transformers import CONFIG_MAPPING

    config = validate_config(config)
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise PlanInputError(
            "model",
            f"model_type {model_type!r} is not built into transformers; it would need remote code, "
            "which vramplan never runs",
        )
    _refuse_non_causal(model_type, config)
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "transformers_version")}
    try:
        hf_config = CONFIG_MAPPING[model_type](**kwargs)
    except Exception as exc:  # a malformed config can fail in many ways inside transformers
        raise PlanInputError("model", f"transformers rejected this {model_type} config: {exc}") from None
    for section, sub in _config_sections(hf_config):
        check_resolved_sizes(resolved_sizes(sub, section))
        _check_layer_counts(sub, section)
        for key in ("rope_scaling", "rope_parameters"):
            check_rope_factors(getattr(sub, key, None), f"{section}{key}.")
    return hf_config


def _refuse_non_causal(model_type: str, config: dict) -> None:
    """transformers builds a "causal LM" from some encoders (BertLMHeadModel) and from the decoder
    half of encoder-decoders; neither is what a fine-tune of a causal LM trains."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise PlanInputError("model", f"{model_type} is an encoder-decoder model; vramplan plans decoder-only causal LMs")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and config.get("is_decoder") is not True:
        raise PlanInputError("model", f"{model_type} is an encoder (masked-LM) model, not a causal LM; vramplan plans decoder-only causal LMs")


def _config_sections(hf_config, prefix: str = "", depth: int = 0):
    """The config and every sub-config transformers will build from (text, vision, ...)."""
    yield prefix, hf_config
    if depth >= 3:
        return
    for key in getattr(hf_config, "sub_configs", {}) or {}:
        sub = getattr(hf_config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _config_sections(sub, f"{prefix}{key}.", depth + 1)


def _int(config, *names) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def resolved_sizes(config, section: str = "") -> ResolvedSizes:
    """The sizes transformers will build with, whatever keys the config used (gpt2's n_layer,
    mpt's d_model resolve through attribute_map; dbrx keeps its experts in ffn_config)."""
    ffn = getattr(config, "ffn_config", None)
    heads = _int(config, "num_attention_heads")
    hidden = _int(config, "hidden_size")
    return ResolvedSizes(
        section=section,
        num_hidden_layers=_int(config, "num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=_int(config, "intermediate_size", "n_inner", "ffn_dim") or _int(ffn, "ffn_hidden_size"),
        vocab_size=_int(config, "vocab_size"),
        num_attention_heads=heads,
        num_key_value_heads=_int(config, "num_key_value_heads") or _int(getattr(config, "attn_config", None), "kv_n_heads") or heads,
        head_dim=_int(config, "head_dim") or (hidden // heads if heads else 0),
        num_experts=_int(config, "num_local_experts", "num_experts", "n_routed_experts") or _int(ffn, "moe_num_experts"),
        experts_per_token=_int(config, "num_experts_per_tok", "moe_top_k") or _int(ffn, "moe_top_k"),
        moe_intermediate_size=_int(config, "moe_intermediate_size"),
    )


def _check_layer_counts(config, section: str) -> None:
    """Any other layer count a config may carry under a name of its own (decoder_layers,
    num_layers...) is held to the same cap as num_hidden_layers."""
    from planner.model_config import SIZE_LIMITS

    limit = SIZE_LIMITS["num_hidden_layers"]
    for key, value in config.to_dict().items():
        if "layers" in key and isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise PlanInputError("model", f"config.json: {section}{key}={value:,} is over {limit:,} layers")


def assumed_sizes(config: dict, hf_config) -> tuple[str, ...]:
    """Architecture sizes the config did not give, which transformers filled from its defaults."""
    text = hf_config.get_text_config()
    raw = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    aliases = dict(getattr(text, "attribute_map", {}) or {})
    out = []
    for name in ASSUMED_IF_MISSING:
        if name in raw or aliases.get(name) in raw:
            continue
        value = getattr(text, name, None)
        if value is not None:
            out.append(f"{name}={value}")
    return tuple(out)


def build_meta_model(config: dict):
    """The real causal-LM module tree on the meta device (no storage allocated)."""
    _load_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    hf_config = build_config(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except ValueError as exc:
        raise PlanInputError("model", f"{config['model_type']} is not a causal language model in transformers: {exc}") from None
    except Exception as exc:
        raise PlanInputError("model", f"could not build {config['model_type']} from this config: {exc}") from None
    return model


def bitsandbytes_linears(model) -> list:
    """The modules bitsandbytes replaces when it loads `model` quantized: exactly nn.Linear, less
    what transformers keeps unconverted (the LM head, keep-in-fp32 modules)."""
    from torch import nn
    from transformers.quantizers.quantizers_utils import should_convert_module

    skips = _quantization_skips(model)
    return [module for name, module in model.named_modules() if type(module) is nn.Linear and should_convert_module(name, skips)]


def _quantization_skips(model) -> list[str]:
    from transformers.quantizers.base import get_keys_to_not_convert

    skips = list(get_keys_to_not_convert(model))
    skips.extend(getattr(model, "_keep_in_fp32_modules", None) or [])
    skips.extend(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return skips


def _peft_defaults(model_type: str, has_experts: bool) -> PeftDefaults:
    try:
        from peft.utils import constants
    except ImportError:
        return PeftDefaults()
    lora = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, [])
    ia3 = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type, [])
    ia3_ff = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    target_map: dict[str, str] = {}
    fused: dict[str, list[str]] = {}
    if has_experts:
        try:  # private to PEFT; absent in older releases, which target no fused expert
            from peft.utils import transformers_weight_conversion as conversion

            base = conversion._MODEL_TO_CONVERSION_PATTERN.get(model_type)
            target_map = dict(conversion._MOE_TARGET_MODULE_MAPPING.get(base, {}))
            fused = dict(conversion._MOE_FUSED_TARGETS.get(base, {})) if target_map else {}
        except (ImportError, AttributeError):
            pass
    return PeftDefaults(
        tuple(lora),
        tuple(ia3),
        tuple(ia3_ff),
        tuple(target_map.items()),
        tuple((k, tuple(v)) for k, v in fused.items()),
    )


def spec_from_model(model, name: str) -> ModelSpec:
    """Read every parameter of a built model (meta or real) into a ModelSpec."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    text_config = model.config.get_text_config()
    quantized = {id(module) for module in bitsandbytes_linears(model)}
    input_emb = model.get_input_embeddings()
    output_emb = model.get_output_embeddings()
    tied = output_emb is not None and input_emb is not None and output_emb.weight is input_emb.weight

    tensors: list[TensorSpec] = []
    modules = dict(model.named_modules())
    seen: set[int] = set()
    for module_name, module in modules.items():
        for leaf, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied tensors are one tensor
                continue
            seen.add(id(param))
            full = f"{module_name}.{leaf}" if module_name else leaf
            is_linear = isinstance(module, (nn.Linear, Conv1D))
            role = _role(module, module_name, _is_router(module_name, modules), module is input_emb,
                         module is output_emb and not tied)
            layer_match = _LAYER_RE.search(f".{full}")
            tensors.append(
                TensorSpec(
                    name=full,
                    shape=tuple(int(s) for s in param.shape),
                    role=role,
                    layer=int(layer_match.group(1)) if layer_match else None,
                    peft_linear=is_linear,
                    quantizable=id(module) in quantized and leaf == "weight",
                )
            )

    sizes = resolved_sizes(text_config)
    num_experts = sizes.num_experts
    if not num_experts and any(t.role == "expert" for t in tensors):
        raise PlanInputError("model", f"{text_config.model_type} builds expert parameters, but vramplan cannot read its expert count from this config")
    return ModelSpec(
        name=name,
        model_type=text_config.model_type,
        architecture=type(model).__name__,
        num_layers=sizes.num_hidden_layers,
        hidden_size=sizes.hidden_size,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_key_value_heads,
        head_dim=sizes.head_dim,
        intermediate_size=sizes.intermediate_size,
        vocab_size=sizes.vocab_size,
        tie_word_embeddings=bool(tied),
        num_experts=num_experts,
        experts_per_token=sizes.experts_per_token if num_experts else 0,
        # Mixtral-style configs size their experts with intermediate_size
        moe_intermediate_size=(sizes.moe_intermediate_size or sizes.intermediate_size) if num_experts else 0,
        # Gemma's (1 + w) and OLMo 2's w * x are applied in fp32 before the cast back
        norm_style="fp32" if text_config.model_type.startswith(("gemma", "olmo2")) else "llama",
        attn_softcap=getattr(text_config, "attn_logit_softcapping", None) is not None,
        final_logit_softcap=getattr(text_config, "final_logit_softcapping", None) is not None,
        tensors=tuple(tensors),
        peft_defaults=_peft_defaults(text_config.model_type, bool(num_experts)),
    )


def spec_from_config(config: dict, name: str) -> ModelSpec:
    model = build_meta_model(config)
    spec = spec_from_model(model, name)
    assumed = assumed_sizes(config, model.config)
    return dataclasses.replace(spec, assumed_sizes=assumed) if assumed else spec
