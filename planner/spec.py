"""ModelSpec: the exact parameter inventory of a causal LM, as introspection found it.

A spec is plain data (no torch): every parameter tensor with its shape, its role in the
architecture, and two facts about the module that owns it that decide how PEFT and
bitsandbytes treat it. Tied tensors appear once, as `named_parameters()` lists them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SPEC_FORMAT_VERSION = 1

ROLES = (
    "embedding",
    "attention.q",
    "attention.k",
    "attention.v",
    "attention.qkv",
    "attention.o",
    "attention.other",
    "mlp.gate",
    "mlp.up",
    "mlp.gate_up",
    "mlp.down",
    "mlp.other",
    "expert",
    "router",
    "norm",
    "lm_head",
    "other",
)


MAX_MEMO_ENTRIES = 256


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None = None
    # The owning module is an nn.Linear (or subclass): PEFT's LoRA/IA3 can target it.
    peft_linear: bool = False
    # bitsandbytes would replace the owning module when loading in 4/8 bit
    # (exactly nn.Linear, not lm_head/tied/keep-in-fp32); only its weight is quantized.
    quantizable: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def is_weight(self) -> bool:
        return self.name.endswith(".weight")


@dataclass(frozen=True)
class LinearSpec:
    """A Linear module seen through its weight: what LoRA and quantization act on."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool
    role: str
    layer: int | None
    quantizable: bool


@dataclass(frozen=True)
class PeftDefaults:
    """PEFT's per-architecture default targets, recorded at introspection time."""

    lora_targets: tuple[str, ...] = ()
    ia3_targets: tuple[str, ...] = ()
    ia3_feedforward: tuple[str, ...] = ()
    # transformers 5 fuses MoE experts into 3-D parameters; PEFT maps the old Linear names onto
    # them (`w1` -> `gate_up_proj`) and targets the parameters, doubling the rank of fused pairs.
    moe_target_map: tuple[tuple[str, str], ...] = ()
    moe_fused: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    # forward-pass facts that change what autograd saves
    norm_style: str = "llama"  # "fp32": the weight multiplies in fp32 (Gemma, OLMo 2), so the fp32 normalized tensor is saved
    attn_softcap: bool = False  # tanh soft-capping of attention scores (no SDPA; eager saves the tanh)
    final_logit_softcap: bool = False  # tanh soft-capping of logits (saves a logits-sized tensor)
    tensors: tuple[TensorSpec, ...] = ()
    peft_defaults: PeftDefaults = field(default_factory=PeftDefaults)
    # sizes the config left out, which transformers' defaults filled ("hidden_size=4096")
    assumed_sizes: tuple[str, ...] = ()

    # -- derived views -------------------------------------------------------------
    def memoized(self, key: tuple, compute):
        """`compute()` once per key for this spec. A spec never changes, and the fit searches
        build hundreds of plans from one 70B spec: its tensor walks must not repeat."""
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            if len(memo) >= MAX_MEMO_ENTRIES:
                # keys include user input (target lists): a server must not grow without bound
                memo.clear()
            memo[key] = compute()
        return memo[key]

    def is_memoized(self, key: tuple) -> bool:
        return key in self.__dict__.get("_memo", {})

    @property
    def total_params(self) -> int:
        return self.memoized(("total_params",), lambda: sum(t.numel for t in self.tensors))

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linears(self) -> tuple[LinearSpec, ...]:
        return self.memoized(("linears",), self._find_linears)

    def _find_linears(self) -> tuple[LinearSpec, ...]:
        names = {t.name for t in self.tensors}
        out = []
        for t in self.tensors:
            if t.peft_linear and t.is_weight and len(t.shape) == 2:
                out.append(
                    LinearSpec(
                        name=t.module,
                        in_features=t.shape[1],
                        out_features=t.shape[0],
                        has_bias=f"{t.module}.bias" in names,
                        role=t.role,
                        layer=t.layer,
                        quantizable=t.quantizable,
                    )
                )
        return tuple(out)

    @property
    def norms_per_layer(self) -> int:
        """Hidden-sized norms in one decoder layer (2 for Llama, 4 for Gemma 2/3)."""
        return self.memoized(
            ("norms_per_layer",), lambda: sum(1 for t in self.tensors if t.role == "norm" and t.layer == 0 and t.shape == (self.hidden_size,))
        )

    def params_by_role(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.role] = counts.get(t.role, 0) + t.numel
        return counts

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": SPEC_FORMAT_VERSION,
            "name": self.name,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_style": self.norm_style,
            "attn_softcap": self.attn_softcap,
            "final_logit_softcap": self.final_logit_softcap,
            "total_params": self.total_params,
            "peft_defaults": {
                "lora_targets": list(self.peft_defaults.lora_targets),
                "ia3_targets": list(self.peft_defaults.ia3_targets),
                "ia3_feedforward": list(self.peft_defaults.ia3_feedforward),
                "moe_target_map": dict(self.peft_defaults.moe_target_map),
                "moe_fused": {k: list(v) for k, v in self.peft_defaults.moe_fused},
            },
            **({"assumed_sizes": list(self.assumed_sizes)} if self.assumed_sizes else {}),
            # Compact rows keep a 126-layer spec small: [name, shape, role, layer, flags]
            # where flags holds "l" (PEFT-targetable Linear) and "q" (quantizable).
            "tensors": [
                [t.name, list(t.shape), t.role, t.layer, ("l" if t.peft_linear else "") + ("q" if t.quantizable else "")]
                for t in self.tensors
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        if data.get("format") != SPEC_FORMAT_VERSION:
            raise ValueError(f"unsupported ModelSpec format {data.get('format')!r}")
        defaults = data.get("peft_defaults", {})
        tensors = tuple(
            TensorSpec(
                name=name,
                shape=tuple(shape),
                role=role,
                layer=layer,
                peft_linear="l" in flags,
                quantizable="q" in flags,
            )
            for name, shape, role, layer, flags in data["tensors"]
        )
        return cls(
            name=data["name"],
            model_type=data["model_type"],
            architecture=data["architecture"],
            num_layers=data["num_layers"],
            hidden_size=data["hidden_size"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data["num_key_value_heads"],
            head_dim=data["head_dim"],
            intermediate_size=data["intermediate_size"],
            vocab_size=data["vocab_size"],
            tie_word_embeddings=data["tie_word_embeddings"],
            num_experts=data.get("num_experts", 0),
            experts_per_token=data.get("experts_per_token", 0),
            moe_intermediate_size=data.get("moe_intermediate_size", 0),
            norm_style=data.get("norm_style", "llama"),
            attn_softcap=data.get("attn_softcap", False),
            final_logit_softcap=data.get("final_logit_softcap", False),
            tensors=tensors,
            assumed_sizes=tuple(data.get("assumed_sizes", ())),
            peft_defaults=PeftDefaults(
                lora_targets=tuple(defaults.get("lora_targets", ())),
                ia3_targets=tuple(defaults.get("ia3_targets", ())),
                ia3_feedforward=tuple(defaults.get("ia3_feedforward", ())),
                moe_target_map=tuple(defaults.get("moe_target_map", {}).items()),
                moe_fused=tuple((k, tuple(v)) for k, v in defaults.get("moe_fused", {}).items()),
            ),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def load(cls, path: Path) -> "ModelSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))
