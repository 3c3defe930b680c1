"""Precision modes, named: what dtype weights, gradients and optimizer state live in."""

from __future__ import annotations

from dataclasses import dataclass

from planner.options import TrainingOptions

ZERO_STAGES = ("zero1", "zero2", "zero3")


@dataclass(frozen=True)
class PrecisionMode:
    name: str
    description: str
    # DeepSpeed keeps an fp32 copy of 16-bit trainable weights and fp32 optimizer state.
    fp32_master_in_optimizer: bool = False


def precision_mode(options: TrainingOptions) -> PrecisionMode:
    weights, compute = options.effective_weights_dtype, options.precision
    if weights == "fp32" and compute == "fp32":
        return PrecisionMode("fp32", "fp32 weights, fp32 compute")
    if weights == "fp32":
        return PrecisionMode("autocast", f"fp32 master weights with {compute} autocast (4 + 4 + 8 bytes/param for AdamW)")
    if options.parallelism in ZERO_STAGES and options.method in ("full", "freeze"):
        return PrecisionMode(
            "deepspeed_mixed",
            f"DeepSpeed mixed precision: {weights} weights and gradients, fp32 master weights and optimizer state "
            "(2 + 2 + 12 bytes/param for AdamW)",
            fp32_master_in_optimizer=True,
        )
    return PrecisionMode(f"pure_{weights}", f"pure {weights}: weights, gradients and optimizer state in {weights}")
