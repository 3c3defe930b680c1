"""build_plan: ModelSpec + TrainingOptions -> Plan, the one object every shell shows."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpu_catalog.catalog import GPU, MIB, find_gpu
from planner.components import Component
from planner.errors import PlanInputError
from planner.options import TrainingOptions, check_consistency
from planner.precision import precision_mode
from planner.spec import ModelSpec
from planner.static_memory import static_components
from planner.trainable import parameter_counts

GIB = 1 << 30
DEFAULT_GPU = "H100"

# Defaults worth telling the user about when they were not given.
_ANNOUNCED_DEFAULTS = ("method", "stage", "batch_size", "seq_len", "precision", "optimizer", "gradient_checkpointing", "trainer")


@dataclass(frozen=True)
class GpuTarget:
    name: str
    memory_bytes: int
    count: int


@dataclass(frozen=True)
class Plan:
    model_name: str
    params: dict[str, int]
    gpu: GpuTarget
    components: tuple[Component, ...]
    options: TrainingOptions
    precision_mode: str
    assumptions: tuple[str, ...] = field(default=())

    @property
    def peak_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu.memory_bytes * (1 - self.options.headroom))

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def to_dict(self) -> dict:
        return {
            "model": {"name": self.model_name, "params": dict(self.params)},
            "gpu": {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes, "count": self.gpu.count},
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "usable_bytes": self.usable_bytes,
            "headroom_bytes": self.usable_bytes - self.peak_bytes,
            "fits": self.fits,
            "precision_mode": self.precision_mode,
            "components": [{"name": c.name, "bytes": c.bytes, "note": c.note} for c in self.components],
            "assumptions": list(self.assumptions),
            "options": self.options.model_dump(mode="json"),
        }


def resolve_gpu(options: TrainingOptions) -> tuple[GpuTarget, list[str]]:
    notes: list[str] = []
    if options.gpu_memory_gib is not None:
        name = options.gpu or "custom"
        return GpuTarget(name, int(options.gpu_memory_gib * GIB), options.num_gpus), notes
    if options.gpu is not None and options.gpu.strip().lower() == "auto":
        raise PlanInputError("gpu", "gpu=auto needs NVML detection, which this version does not have yet; name a GPU or give gpu_memory_gib")
    gpu: GPU = find_gpu(options.gpu or DEFAULT_GPU)
    if options.gpu is None:
        notes.append(f"GPU {gpu.name} ({gpu.memory_mib:,} MiB), not given")
    return GpuTarget(gpu.name, gpu.memory_mib * MIB, options.num_gpus), notes


def _assumptions(options: TrainingOptions) -> list[str]:
    given = options.model_fields_set
    out = []
    for name in _ANNOUNCED_DEFAULTS:
        if name not in given:
            value = getattr(options, name)
            out.append(f"{name.replace('_', ' ')} {str(value).lower() if isinstance(value, bool) else value}, not given")
    if options.method in ("lora", "qlora", "dora") and "lora_r" not in given:
        out.append(f"LoRA rank {options.lora_r}, alpha {options.effective_lora_alpha:g}, targets {options.lora_targets}, not given")
    if options.weights_dtype is None:
        out.append(f"weights loaded in {options.effective_weights_dtype} (the compute precision), not given")
    return out


def build_plan(spec: ModelSpec, options: TrainingOptions) -> Plan:
    check_consistency(options)
    gpu, gpu_notes = resolve_gpu(options)
    components = static_components(spec, options)
    assumptions = _assumptions(options) + gpu_notes
    assumptions.append(
        "static memory only (weights, gradients, optimizer state): activations, logits, runtime and "
        "alignment models are not modelled yet, so the true peak is higher"
    )
    mode = precision_mode(options)
    return Plan(
        model_name=spec.name,
        params=parameter_counts(spec, options),
        gpu=gpu,
        components=tuple(components),
        options=options,
        precision_mode=mode.name,
        assumptions=tuple(assumptions),
    )
