"""Rules the hardware imposes on a plan: what the GPU cannot run is replaced, and the plan says so.

- bf16 needs compute capability 8.0 (Ampere) or newer: before that, fp16 takes its place.
- FlashAttention needs Ampere or newer: before that, SDPA's other kernels run instead.
"""

from __future__ import annotations

from planner.options import TrainingOptions

AMPERE = (8, 0)


def _capability(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def apply_hardware_rules(options: TrainingOptions, gpu_name: str, compute_capability: str | None) -> tuple[TrainingOptions, list[str]]:
    capability = _capability(compute_capability)
    if capability is None or capability >= AMPERE:
        return options, []
    notes: list[str] = []
    update: dict = {}
    if options.precision == "bf16":
        update["precision"] = "fp16"
        if options.effective_weights_dtype == "bf16":
            update["weights_dtype"] = "fp16"
        notes.append(f"{gpu_name} (compute capability {compute_capability}) has no bf16: planned in fp16 instead")
    if options.attention == "flash":
        update["attention"] = "sdpa"
        notes.append(f"FlashAttention needs compute capability 8.0; {gpu_name} runs SDPA's other kernels, planned as sdpa")
    if not update:
        return options, notes
    # keep the user's given fields marked as given, so assumptions stay accurate
    return options.model_copy(update=update), notes
