"""Merge plans: the memory a merge of the tuned model takes, on the GPU (or the CPU) and on disk.

Two kinds of merge, each as its library runs it:

- PEFT `merge_and_unload` of a LoRA or DoRA adapter into its base. The base is loaded in 16 bit
  (a QLoRA adapter too: merging into 4-bit weights would round the update away, so the base is
  loaded in 16 bit, or dequantized to 16 bit first); PEFT loads the adapter in fp32
  (autocast_adapter_dtype). Each adapted layer then computes its delta B @ A x scaling in the
  adapter's dtype (an [out, in] fp32 temporary; on the CPU a 16-bit copy of it too) and adds it
  in place; DoRA also forms the merged weight in fp32 to take its column norms. The peak is the
  model, the adapter and the temporaries of the largest adapted layer. Saving goes through
  safetensors, which serializes one shard into host memory before writing it.
- mergekit's methods (linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, passthrough),
  run lazily tensor by tensor: for each output tensor it loads that tensor from every input
  model, computes in the merge dtype, and keeps the output until a shard (`--out-shard-size`)
  is written. `--cuda` computes on the GPU; `--low-cpu-memory` keeps the outputs there too.
  The peak is set by the largest tensor (the embedding or the head).

Pure functions over a ModelSpec; every number says where it comes from. The PEFT terms follow
PEFT's code; mergekit's per-method factors are estimates from its merge methods' code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from planner.spec import ModelSpec

GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained max_shard_size "5GB", mergekit's "5B"

METHODS = ("peft", "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough")


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["peft", "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough"] = "peft"
    adapter: Literal["lora", "qlora", "dora"] = "lora"
    lora_r: int = Field(default=16, ge=1, le=4096)
    lora_targets: list[str] | Literal["all-linear"] = "all-linear"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["cpu", "cuda"] = "cpu"
    num_models: int = Field(default=2, ge=1, le=64, description="mergekit: the models merged (the base counts when the method has one)")
    low_cpu_memory: bool = False
    out_shard_size_gb: float = Field(default=5.0, gt=0, le=1000)
    gpu: str | None = None
    gpu_memory_gib: float | None = Field(default=None, gt=0, le=4096)
    host_memory_gib: float | None = Field(default=None, gt=0, le=65536)

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str) and value != "all-linear":
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.method == "slerp" and self.num_models != 2:
            raise ValueError("slerp merges exactly two models")
        return self


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "note": self.note}


@dataclass
class MergePlan:
    model_name: str
    options: MergeOptions
    device_terms: list[Term]
    host_terms: list[Term]
    disk_bytes: int
    device_memory_bytes: int | None
    host_memory_bytes: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def device_peak_bytes(self) -> int:
        return sum(t.bytes for t in self.device_terms)

    @property
    def host_peak_bytes(self) -> int:
        return sum(t.bytes for t in self.host_terms)

    @property
    def fits(self) -> bool:
        ok = True
        if self.device_memory_bytes is not None and self.device_terms:
            ok &= self.device_peak_bytes <= self.device_memory_bytes
        if self.host_memory_bytes is not None:
            ok &= self.host_peak_bytes <= self.host_memory_bytes
        return ok

    def to_dict(self) -> dict:
        return {
            "model": {"name": self.model_name},
            "options": self.options.model_dump(),
            "device": self.options.device,
            "gpu_peak_bytes": self.device_peak_bytes if self.device_terms else 0,
            "host_peak_bytes": self.host_peak_bytes,
            "disk_bytes": self.disk_bytes,
            "gpu_memory_bytes": self.device_memory_bytes,
            "host_memory_bytes": self.host_memory_bytes,
            "fits": self.fits,
            "verdict": "fits" if self.fits else "does not fit",
            "gpu_components": [t.to_dict() for t in self.device_terms],
            "host_components": [t.to_dict() for t in self.host_terms],
            "notes": self.notes,
        }


def _targets(spec: ModelSpec, targets) -> list:
    """The Linear layers an adapter covers: all-linear is every decoder Linear (not the head)."""
    out = []
    for lin in spec.linears():
        if lin.layer is None or lin.role in ("lm_head", "router"):
            continue
        if targets == "all-linear" or lin.name.rsplit(".", 1)[-1] in targets:
            out.append(lin)
    return out


def _params_bytes(spec: ModelSpec, b: int) -> int:
    return spec.total_params * b


def _largest_tensor(spec: ModelSpec) -> int:
    return max(t.numel for t in spec.tensors)


def plan_peft_merge(spec: ModelSpec, options: MergeOptions) -> MergePlan:
    b = DTYPE_BYTES[options.dtype]
    model = _params_bytes(spec, b)
    targets = _targets(spec, options.lora_targets)
    if not targets:
        from planner.errors import PlanInputError

        raise PlanInputError("lora_targets", f"none of {options.lora_targets} is a Linear layer of {spec.name}")
    r = options.lora_r
    adapter = sum(r * (lin.in_features + lin.out_features) * 4 for lin in targets)
    magnitude = sum(lin.out_features * 4 for lin in targets) if options.adapter == "dora" else 0
    big = max(targets, key=lambda lin: lin.in_features * lin.out_features)
    w = big.in_features * big.out_features
    delta = w * 4  # B @ A x scaling in fp32 (the adapter's dtype)
    delta += w * b if options.device == "cpu" and b == 2 else 0  # get_delta_weight casts back on the CPU
    if options.adapter == "dora":
        delta += w * 4 * 2  # the fp32 merged weight and its norm's square, for the column norms
    notes = [
        f"PEFT merge_and_unload: base loaded in {options.dtype}, adapter in fp32 (PEFT's autocast_adapter_dtype)",
        f"{len(targets)} adapted Linear layers at rank {r}; the largest, {big.name} ({big.out_features} x {big.in_features}), sets the temporary",
    ]
    if options.adapter == "qlora":
        notes.append("QLoRA: the base is loaded in 16 bit to merge (a 4-bit base would round the update away); "
                     "dequantizing the 4-bit base instead gives the same 16-bit model and the same peak")
    shard = min(DEFAULT_SHARD_BYTES, model)
    merge_terms = [
        Term("weights.base", model, f"{spec.total_params:,} parameters in {options.dtype}"),
        Term("weights.adapter", adapter + magnitude, "LoRA A and B in fp32" + (" and DoRA's magnitude vectors" if magnitude else "")),
        Term("temporary.delta", delta, "the largest layer's delta weight" + (" and DoRA's fp32 merged weight and norms" if options.adapter == "dora" else "")),
    ]
    if options.device == "cuda":
        device_terms = merge_terms
        host_terms = [Term("host.shard", shard, "safetensors serializes one shard (up to 5 GB) in host memory while saving"),
                      Term("host.runtime", int(1.5 * GIB), "the Python process with torch, transformers and PEFT imported (estimate)")]
    else:
        device_terms = []
        host_terms = merge_terms + [Term("host.shard", shard, "safetensors serializes one shard (up to 5 GB) in host memory while saving"),
                                    Term("host.runtime", int(1.5 * GIB), "the Python process with torch, transformers and PEFT imported (estimate)")]
    return MergePlan(spec.name, options, device_terms, host_terms, model, None, None, notes)


# mergekit: working copies of one output tensor per method, in units of that tensor in the merge
# dtype (estimates from mergekit's merge_methods: inputs stacked, task vectors, masks, the result)
_METHOD_COPIES = {
    "passthrough": lambda n: 1,
    "linear": lambda n: 2 * n + 1,  # the inputs, their stack, the weighted sum
    "slerp": lambda n: 5,  # two inputs, two normalized copies, the result
    "task_arithmetic": lambda n: 3 * n + 1,  # inputs, task vectors (input - base), their stack, the sum
    "ties": lambda n: 4 * n + 2,  # task vectors trimmed by magnitude (a copy to rank), the sign-consensus mask and the masked stack
    "dare_ties": lambda n: 4 * n + 2,
    "dare_linear": lambda n: 3 * n + 2,  # the random keep mask and the rescaled task vectors
}


def plan_mergekit(spec: ModelSpec, options: MergeOptions) -> MergePlan:
    b = DTYPE_BYTES[options.dtype]
    n = options.num_models
    largest = _largest_tensor(spec)
    working = _METHOD_COPIES[options.method](n) * largest * b
    shard = min(int(options.out_shard_size_gb * 10**9), _params_bytes(spec, b))
    model = _params_bytes(spec, b)
    notes = [f"mergekit {options.method} of {n} models, lazily tensor by tensor; the largest tensor ({largest:,} values) sets the working set",
             f"output shards of {options.out_shard_size_gb:g} GB are held until written"]
    runtime = Term("host.runtime", int(1.2 * GIB), "the Python process with torch and mergekit imported (estimate)")
    work = Term("temporary.working_set", working, f"{_METHOD_COPIES[options.method](n)} copies of the largest tensor in {options.dtype} (estimate from mergekit's method)")
    out = Term("output.shard", shard, "the output tensors of the shard being written")
    if options.device == "cuda":
        device_terms = [work] + ([out] if options.low_cpu_memory else [])
        host_terms = [runtime] + ([] if options.low_cpu_memory else [out])
    else:
        device_terms = []
        host_terms = [runtime, work, out]
    return MergePlan(spec.name, options, device_terms, host_terms, model, None, None, notes)


def plan_merge(spec: ModelSpec, options: MergeOptions, gpu_memory_bytes: int | None = None) -> MergePlan:
    plan = plan_peft_merge(spec, options) if options.method == "peft" else plan_mergekit(spec, options)
    plan.device_memory_bytes = gpu_memory_bytes if options.device == "cuda" else None
    plan.host_memory_bytes = int(options.host_memory_gib * GIB) if options.host_memory_gib else None
    return plan


def plan_merge_request(model: str, options: MergeOptions, roots=None) -> MergePlan:
    """Resolve the model as every door does, find the GPU if one is named, plan."""
    from planner.request import ANY_PATH, resolve_source

    source = resolve_source(model, roots=ANY_PATH if roots is None else roots)
    gpu_bytes = None
    if options.gpu_memory_gib is not None:
        gpu_bytes = int(options.gpu_memory_gib * GIB)
    elif options.gpu:
        from gpu_catalog.catalog import lookup_gpu

        gpu_bytes = lookup_gpu(options.gpu).gpu.memory_bytes
    return plan_merge(source.spec, options, gpu_bytes)
