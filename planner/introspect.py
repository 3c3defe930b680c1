"""Config -> ModelSpec, by building the real transformers model on the meta device.

The one module of the planner that imports torch and transformers (lazily, inside functions),
so that planning a catalog model never pays for them. No weights are read and no memory is
allocated: the meta device gives shapes only. `trust_remote_code` is never set; a config whose
architecture transformers does not ship is refused.
"""

from __future__ import annotations

import re

from planner.errors import PlanInputError
from planner.model_config import validate_config
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
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
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
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "transformers_version")}
    try:
        return CONFIG_MAPPING[model_type](**kwargs)
    except Exception as exc:  # a malformed config can fail in many ways inside transformers
        raise PlanInputError("model", f"transformers rejected this {model_type} config: {exc}") from None


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
    from transformers.quantizers.quantizers_utils import should_convert_module

    text_config = model.config.get_text_config()
    skips = _quantization_skips(model)
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
                    quantizable=type(module) is nn.Linear and leaf == "weight" and should_convert_module(module_name, skips),
                )
            )

    heads = int(getattr(text_config, "num_attention_heads", 0) or 0)
    hidden = int(text_config.hidden_size)
    head_dim = getattr(text_config, "head_dim", None) or (hidden // heads if heads else 0)
    num_experts = (
        getattr(text_config, "num_local_experts", None)
        or getattr(text_config, "num_experts", None)
        or getattr(text_config, "n_routed_experts", None)
        or 0
    )
    return ModelSpec(
        name=name,
        model_type=text_config.model_type,
        architecture=type(model).__name__,
        num_layers=int(text_config.num_hidden_layers),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        intermediate_size=int(getattr(text_config, "intermediate_size", 0) or 0),
        vocab_size=int(text_config.vocab_size),
        tie_word_embeddings=bool(tied),
        num_experts=int(num_experts),
        experts_per_token=int(getattr(text_config, "num_experts_per_tok", 0) or 0) if num_experts else 0,
        # Mixtral-style configs size their experts with intermediate_size
        moe_intermediate_size=int(getattr(text_config, "moe_intermediate_size", 0) or getattr(text_config, "intermediate_size", 0) or 0)
        if num_experts
        else 0,
        # Gemma's (1 + w) and OLMo 2's w * x are applied in fp32 before the cast back
        norm_style="fp32" if text_config.model_type.startswith(("gemma", "olmo2")) else "llama",
        attn_softcap=getattr(text_config, "attn_logit_softcapping", None) is not None,
        final_logit_softcap=getattr(text_config, "final_logit_softcapping", None) is not None,
        tensors=tuple(tensors),
        peft_defaults=_peft_defaults(text_config.model_type, bool(num_experts)),
    )


def spec_from_config(config: dict, name: str) -> ModelSpec:
    return spec_from_model(build_meta_model(config), name)
