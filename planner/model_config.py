"""Reading a user's config.json without trusting it.

A config is data from outside: it may be huge, malformed, or ask for remote code. This module
checks it before anything builds a model from it, so a hostile file gets a clear error and
never an allocation, a hang or an import. Pure Python, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from planner.errors import PlanInputError

MAX_CONFIG_BYTES = 1 << 20  # published configs are a few KiB; 1 MiB is generous

# Bounds well above any published model (405B has 126 layers, 16384 hidden, 128256 vocab),
# low enough that building the module tree on the meta device stays quick.
SIZE_LIMITS = {
    "vocab_size": 4_000_000,
    "hidden_size": 131_072,
    "intermediate_size": 1_048_576,
    "moe_intermediate_size": 1_048_576,
    "shared_expert_intermediate_size": 1_048_576,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "num_local_experts": 4096,
    "num_experts": 4096,
    "n_routed_experts": 4096,
    "num_experts_per_tok": 4096,
    "n_shared_experts": 256,
    "max_position_embeddings": 16_777_216,
    "q_lora_rank": 131_072,
    "kv_lora_rank": 131_072,
    "qk_rope_head_dim": 4096,
    "qk_nope_head_dim": 4096,
    "v_head_dim": 4096,
}
REQUIRED_POSITIVE = ("hidden_size", "num_hidden_layers", "vocab_size")
# Module objects are what a meta-device build costs (time and memory, not the sizes): Llama 3.1
# 405B has about 1,400, DeepSeek-V3 with unfused experts about 200,000.
MAX_MODULES = 300_000
# The sizes whose transformers defaults are arbitrary (Llama's 4096 hidden, 32 layers): a config
# that leaves them out is planned, with a word that they were assumed.
ASSUMED_IF_MISSING = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads")
# A rough upper bound on parameters (embedding + layers x 20 h^2) rejects absurd combinations
# of individually plausible sizes before any module is built.
MAX_ROUGH_PARAMS = 20_000_000_000_000


def parse_config_text(text: str | bytes, source: str = "config.json") -> dict:
    if len(text) > MAX_CONFIG_BYTES:
        raise PlanInputError("model", f"{source} is {len(text)} bytes; a config.json is at most {MAX_CONFIG_BYTES}")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanInputError("model", f"{source} is not valid JSON ({exc})") from None
    except RecursionError:
        raise PlanInputError("model", f"{source} nests deeper than a config.json does") from None
    return validate_config(data, source)


def read_config_file(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanInputError("model", f"no config.json at {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise PlanInputError("model", f"{path} is {size} bytes; a config.json is at most {MAX_CONFIG_BYTES}")
    return parse_config_text(path.read_bytes(), str(path))


def validate_config(data: object, source: str = "config.json") -> dict:
    if not isinstance(data, dict):
        raise PlanInputError("model", f"{source} must hold a JSON object, not {type(data).__name__}")
    if "auto_map" in data:
        raise PlanInputError(
            "model",
            f"{source} needs custom code (auto_map); vramplan never runs code from a model repository "
            "(trust_remote_code is refused)",
        )
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise PlanInputError("model", f"{source} has no model_type")
    # Sub-configs (text_config, vision_config, ffn_config, ...) nest models of their own; every
    # one is checked the same way. These are the keys as written; the sizes transformers resolves
    # (other key names, defaults) are checked again by check_resolved_sizes before any build.
    sections = list(_sections(data))
    for prefix, section in sections:
        for key, limit in SIZE_LIMITS.items():
            if key not in section or section[key] is None:
                continue
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanInputError("model", f"{source}: {prefix}{key} must be an integer, got {value!r:.40}")
            if value < 0 or value > limit:
                raise PlanInputError("model", f"{source}: {prefix}{key}={value} is outside 0..{limit}")
    main = data["text_config"] if isinstance(data.get("text_config"), dict) else data
    for key in REQUIRED_POSITIVE:
        value = main.get(key)
        if value is not None and value <= 0:
            raise PlanInputError("model", f"{source}: {key} must be positive")
    hidden = main.get("hidden_size") or 0
    rough = (main.get("vocab_size") or 0) * hidden * 2 + (main.get("num_hidden_layers") or 0) * 20 * hidden * max(
        hidden, main.get("intermediate_size") or 0
    ) * max(1, main.get("num_local_experts") or main.get("num_experts") or main.get("n_routed_experts") or 1)
    if rough > MAX_ROUGH_PARAMS:
        raise PlanInputError("model", f"{source}: sizes imply over {MAX_ROUGH_PARAMS:.0e} parameters")
    return data


def _sections(data: dict, prefix: str = "", depth: int = 0):
    yield prefix, data
    if depth >= 4:
        return
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _sections(value, f"{prefix}{key}.", depth + 1)


@dataclass(frozen=True)
class ResolvedSizes:
    """A (sub-)config's sizes as transformers resolved them: alias keys (n_layer, d_model)
    mapped and defaults filled in. 0 where a config has no such size."""

    section: str
    num_hidden_layers: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0

    def estimated_params(self) -> int:
        """An upper-leaning estimate: embeddings and head untied, attention as wide as the
        widest of hidden and heads x head_dim, a gated MLP per expert."""
        h = self.hidden_size
        attention = 4 * h * max(h, self.num_attention_heads * self.head_dim)
        expert_width = self.moe_intermediate_size or self.intermediate_size
        mlp = 3 * h * max(self.intermediate_size, max(1, self.num_experts) * expert_width)
        return 2 * self.vocab_size * h + self.num_hidden_layers * (attention + mlp)

    def estimated_modules(self) -> int:
        """Module objects of the build: a Llama layer has about 15; unfused experts add 4 each."""
        return 8 + self.num_hidden_layers * (16 + 4 * self.num_experts)


_RESOLVED_LIMITS = {
    "num_hidden_layers": SIZE_LIMITS["num_hidden_layers"],
    "hidden_size": SIZE_LIMITS["hidden_size"],
    "intermediate_size": SIZE_LIMITS["intermediate_size"],
    "vocab_size": SIZE_LIMITS["vocab_size"],
    "num_attention_heads": SIZE_LIMITS["num_attention_heads"],
    "num_key_value_heads": SIZE_LIMITS["num_key_value_heads"],
    "head_dim": SIZE_LIMITS["head_dim"],
    "num_experts": SIZE_LIMITS["num_experts"],
    "experts_per_token": SIZE_LIMITS["num_experts_per_tok"],
    "moe_intermediate_size": SIZE_LIMITS["moe_intermediate_size"],
}


def check_resolved_sizes(sizes: ResolvedSizes, source: str = "config.json") -> None:
    """Refuse sizes no model can have, or a build too large to make, before anything is built."""
    where = f"{source}: {sizes.section}"
    for name, limit in _RESOLVED_LIMITS.items():
        value = getattr(sizes, name)
        if not 0 <= value <= limit:
            raise PlanInputError("model", f"{where}{name} resolves to {value:,}, outside 0..{limit:,}")
    heads, kv = sizes.num_attention_heads, sizes.num_key_value_heads
    if heads and kv and (kv > heads or heads % kv):
        raise PlanInputError("model", f"{where}num_key_value_heads={kv} must divide num_attention_heads={heads} (grouped-query attention shares each k/v head among a whole number of query heads)")
    if sizes.num_experts and not 1 <= sizes.experts_per_token <= sizes.num_experts:
        raise PlanInputError("model", f"{where}{sizes.experts_per_token} experts per token with {sizes.num_experts} experts: it must be 1..{sizes.num_experts}")
    if sizes.estimated_params() > MAX_ROUGH_PARAMS:
        raise PlanInputError("model", f"{where}sizes imply about {sizes.estimated_params():.1e} parameters, over the limit of {MAX_ROUGH_PARAMS:.0e}")
    if sizes.estimated_modules() > MAX_MODULES:
        raise PlanInputError("model", f"{where}{sizes.num_hidden_layers:,} layers x {max(sizes.num_experts, 1):,} experts mean about {sizes.estimated_modules():,} modules to build, over the limit of {MAX_MODULES:,}")


def check_rope_factors(value, path: str = "", source: str = "config.json") -> None:
    """A rope scaling factor stretches positions: zero or negative makes no model."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "factor" and not isinstance(inner, bool) and isinstance(inner, (int, float)) and not inner > 0:
                raise PlanInputError("model", f"{source}: {path}factor={inner} must be positive")
            check_rope_factors(inner, f"{path}{key}.", source)
