"""Rules the hardware imposes on a plan: what the GPU cannot run is replaced, and the plan says so.

- bf16 needs compute capability 8.0 (Ampere) or newer: before that, fp16 takes its place.
- FlashAttention needs Ampere or newer: before that, SDPA's other kernels run instead.
- bitsandbytes' 4-bit and 8-bit kernels ship for CUDA; on an AMD GPU they need bitsandbytes'
  ROCm backend, which its docs call a preview: the plan stands (same formats) and says so.
"""

from __future__ import annotations

from planner.options import TrainingOptions

AMPERE = (8, 0)


def _capability(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def apply_hardware_rules(
    options: TrainingOptions, gpu_name: str, compute_capability: str | None, vendor: str | None = None
) -> tuple[TrainingOptions, list[str]]:
    notes: list[str] = []
    if vendor not in (None, "nvidia"):
        bnb_parts = [f"{options.effective_quantization} weights"] if options.effective_quantization != "none" else []
        bnb_parts += ["the 8-bit optimizer"] if "8bit" in options.optimizer else []
        if bnb_parts:
            notes.append(
                f"{gpu_name} is not a CUDA GPU: bitsandbytes ({' and '.join(bnb_parts)}) needs its ROCm backend, "
                "a preview in bitsandbytes' docs, not the default pip wheel"
            )
    capability = _capability(compute_capability)
    if capability is None or capability >= AMPERE:
        return options, notes
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
