"""Reading a user's config.json without trusting it.

A config is data from outside: it may be huge, malformed, or ask for remote code. This module
checks it before anything builds a model from it, so a hostile file gets a clear error and
never an allocation, a hang or an import. Pure Python, no torch.
"""

from __future__ import annotations

import json
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
    # text_config nests the language model in multimodal configs; check it the same way.
    sections = [("", data)]
    if isinstance(data.get("text_config"), dict):
        sections.append(("text_config.", data["text_config"]))
    for prefix, section in sections:
        for key, limit in SIZE_LIMITS.items():
            if key not in section or section[key] is None:
                continue
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanInputError("model", f"{source}: {prefix}{key} must be an integer, got {value!r:.40}")
            if value < 0 or value > limit:
                raise PlanInputError("model", f"{source}: {prefix}{key}={value} is outside 0..{limit}")
    main = sections[-1][1] if len(sections) > 1 else data
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
