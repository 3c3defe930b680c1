"""The distilled reserve: the simulated allocator's reserve, fitted to traced steps, for the fast plan.

A plan that is not simulated takes the caching allocator's reserve from a formula. The calibrated
one (planner/runtime.py) was fitted to 22 H100 runs; this one was fitted by `python bench/distill.py
fit` to the simulated reserve (planner/step_trace.py's replay of PyTorch's allocator: what brings the
plan's tensors at its peak phase up to the simulated reserved peak) of a matrix of traced single-GPU
SFT steps of catalog models, per regime (checkpointing on / off), on terms the formula computes
without torch:

    reserve = c0 + c1 x one recomputed layer's activations + c2 x logits and loss buffers
                 + c3 x the step's gradients + c4 x the largest temporary

The coefficients live in bench/results/distilled-fit-2026-12-05.json, with the fit's held-out errors. It would apply only where
the matrix has data (`not_applicable`): one GPU without offload, SFT, the methods and optimizers the
matrix traced, a model that is not a mixture of experts, sdpa or eager attention, the losses the
trace runs.

Not wired into build_plan: held to the 26 measured H100 runs it is no better than the calibrated
formula held out (3.3% median against 3.0% on the 22 runs that formula was fitted to; worst -7.8% /
+8.6% against -8.9% / +11.1%), and far from the simulated plan's 0.3%; on held-out traced models its
worst under-prediction (-24%) is larger than the calibrated formula's (-19%).
bench/results/distill-2026-12-05.md has the figures. A later fit that beats the calibrated formula
can be wired in where `not_applicable` is None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DISTILLED_FILE = Path(__file__).parent / "results" / "distilled-fit-2026-12-05.json"
TERMS = ("constant", "recompute", "logits", "gradients", "largest_temporary")


@dataclass(frozen=True)
class Distilled:
    name: str
    description: str
    # regime ("checkpointing" / "no_checkpointing") -> term -> coefficient (bytes per byte; the constant in bytes)
    regimes: dict = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    trainers: tuple[str, ...] = ()
    held_out: dict = field(default_factory=dict)


@lru_cache(maxsize=1)
def distilled() -> Distilled | None:
    """The committed distillation, or None where there is none."""
    try:
        data = json.loads(DISTILLED_FILE.read_text())
    except (OSError, ValueError):
        return None
    return Distilled(
        name=data["name"], description=data["description"],
        regimes={regime: {term: float(value) for term, value in coef.items()} for regime, coef in data["regimes"].items()},
        methods=tuple(data["applies"]["methods"]), optimizers=tuple(data["applies"]["optimizers"]),
        trainers=tuple(data["applies"]["trainers"]), held_out=data.get("held_out", {}),
    )


def regime(gradient_checkpointing: bool) -> str:
    return "checkpointing" if gradient_checkpointing else "no_checkpointing"


def features(components) -> dict[str, int]:
    """The distilled reserve's terms from a plan's tensors (every phase's, no runtime components)."""
    tensors = [c for c in components if c.family != "runtime"]
    return {
        "recompute": sum(c.bytes for c in tensors if c.name == "activations.recompute"),
        "logits": sum(c.bytes for c in tensors if c.family == "logits" or c.name == "temporary.loss_backward"),
        "gradients": sum(c.bytes for c in tensors if c.family == "gradients"),
        "largest_temporary": max((c.bytes for c in tensors if c.family == "temporary"), default=0),
    }


def predict(coefficients: dict[str, float], terms: dict[str, int]) -> int:
    """The reserve (bytes, never below 0) of these coefficients at these terms."""
    return max(0, round(sum(value * (1.0 if term == "constant" else terms[term]) for term, value in coefficients.items())))


def reserve_bytes(terms: dict[str, int], gradient_checkpointing: bool, fit: Distilled | None = None) -> int:
    fit = fit or distilled()
    return predict(fit.regimes[regime(gradient_checkpointing)], terms)


def not_applicable(spec, options, fit: Distilled | None = None) -> str | None:
    """Why the distilled reserve does not apply to this plan (the calibrated formula does), or None."""
    fit = fit or distilled()
    if fit is None:
        return "no distillation committed"
    if options.stage != "sft":
        return f"stage {options.stage}: the distillation traced SFT steps only"
    if options.num_gpus != 1 or options.offload != "none":
        return "the distillation traced one GPU without offload only"
    if options.method not in fit.methods or options.optimizer not in fit.optimizers or options.trainer not in fit.trainers:
        return f"method {options.method}, optimizer {options.optimizer}, trainer {options.trainer}: not in the distillation's matrix"
    if spec.num_experts:
        return "a mixture-of-experts model: not traced"
    if options.attention not in ("sdpa", "eager") or options.effective_loss_implementation not in ("fp32_upcast", "trl_fused"):
        return "attention or loss kernels the trace does not run"
    if options.effective_quantization not in ("none", "nf4") or options.batch_layout == "padding_free":
        return "a quantization or batch layout not in the distillation's matrix"
    return None
