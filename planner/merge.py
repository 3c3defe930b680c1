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

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from planner.components import Component
from planner.spec import ModelSpec

GIB = 1 << 30
# a merge run's measured host peak (above the imported runtime) is within this fraction of the plan's
HOST_BAND = 0.10
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_SHARD_BYTES = 5 * 10**9  # mergekit's --out-shard-size default "5B"
MIB = 1 << 20
# Measured by app/merge_run.py on this project's CPU stack (torch 2.13 CPU, transformers 5.24, PEFT 0.21):
# the process's resident memory once torch, transformers and PEFT are imported and the model's class
# is built (0.44 GiB), and what loading and merging hold beyond the tensors the plan counts (about
# 20 MiB on every model size tried: the loader's thread arenas, safetensors' file handles).
HOST_RUNTIME_BYTES = 450 * MIB
HOST_RUNTIME_CUDA_BYTES = int(1.5 * GIB)  # CUDA's host-side libraries too (estimate, not measured here)
HOST_LOADING_BYTES = 20 * MIB
HOST_CAST_LOADING_BYTES = 4 * MIB  # loading a checkpoint stored in another dtype: about 3.5 MiB beyond the two copies

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


@dataclass
class MergePlan:
    model_name: str
    options: MergeOptions
    device_terms: list[Component]
    host_terms: list[Component]
    disk_bytes: int
    device_memory_bytes: int | None
    host_memory_bytes: int | None
    notes: list[str] = field(default_factory=list)
    num_layers: int = 0
    # mergekit: the inputs' checkpoint pages it reads by memory map (resident where memory allows,
    # reclaimable, so outside the peak)
    host_page_cache_bytes: int = 0

    @property
    def device_peak_bytes(self) -> int:
        return sum(t.bytes for t in self.device_terms)

    @property
    def host_peak_bytes(self) -> int:
        return sum(t.bytes for t in self.host_terms)

    @property
    def host_merge_bytes(self) -> int:
        """The host peak above the imported runtime: what a merge run measures (app/merge_run.py:
        the child's peak RSS less its RSS once torch, transformers and PEFT are imported)."""
        return sum(t.bytes for t in self.host_terms if t.name != "host.runtime")

    @property
    def host_floor_bytes(self) -> int:
        """The tensors resident by the time the merged model is saved: the model and the adapter.
        transformers 5 loads a checkpoint in the merge dtype without copying it (the parameters are
        the memory-mapped file), so untouched weights cost no RSS until the save reads them and the
        merge's temporaries need not coexist with the whole model: a run measures between this
        floor and host_merge_bytes, the plan's upper bound. A mergekit merge's floor is the output
        shard it holds at its peak."""
        return sum(t.bytes for t in self.host_terms if t.name.startswith(("weights.", "output.")))

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
            "host_merge_bytes": self.host_merge_bytes,
            "host_floor_bytes": self.host_floor_bytes,
            "host_page_cache_bytes": self.host_page_cache_bytes,
            "disk_bytes": self.disk_bytes,
            "gpu_memory_bytes": self.device_memory_bytes,
            "host_memory_bytes": self.host_memory_bytes,
            "fits": self.fits,
            "verdict": "fits" if self.fits else "does not fit",
            "gpu_components": [t.to_dict() for t in self.device_terms],
            "host_components": [t.to_dict() for t in self.host_terms],
            "notes": self.notes,
            "exports": {"mergekit_yaml": mergekit_yaml(self)} if self.options.method != "peft" else {},
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


CHECKPOINT_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
                     "float32": "float32", "fp32": "float32", "float": "float32"}


def checkpoint_dtype(config: dict | None) -> str | None:
    """The dtype a checkpoint's tensors are stored in, as its config.json says (torch_dtype, or
    transformers 5's dtype); None when it does not say."""
    if not config:
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    return CHECKPOINT_DTYPES.get(str(value).lower()) if value else None


def _checkpoint_term(spec: ModelSpec, options: MergeOptions, stored: str | None) -> Component | None:
    """transformers reads a safetensors checkpoint by memory map: in the merge dtype it keeps the
    mapped tensors (their pages counted once, in weights.base), in another dtype it casts each one
    to a new tensor and the file's pages it read stay resident while the file is mapped (measured:
    an fp32 checkpoint merged in bf16 peaks at the fp32 file plus the bf16 model). Loading onto a GPU
    reads every page of the file into host memory likewise."""
    if options.device == "cuda":
        b = DTYPE_BYTES[stored or options.dtype]
        return Component("host.checkpoint", spec.total_params * b, f"the checkpoint's pages ({stored or options.dtype}) read by memory map while loading onto the GPU")
    if stored is None or stored == options.dtype:
        return None
    return Component("host.checkpoint", spec.total_params * DTYPE_BYTES[stored],
                f"the checkpoint is stored in {stored}: its pages read by memory map while casting to {options.dtype} stay resident")


def plan_peft_merge(spec: ModelSpec, options: MergeOptions, stored_dtype: str | None = None) -> MergePlan:
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
    merge_terms = [
        Component("weights.base", model, f"{spec.total_params:,} parameters in {options.dtype}"),
        Component("weights.adapter", adapter + magnitude, "LoRA A and B in fp32" + (" and DoRA's magnitude vectors" if magnitude else "")),
        Component("temporary.delta", delta, "the largest layer's delta weight" + (" and DoRA's fp32 merged weight and norms" if options.adapter == "dora" else "")),
    ]
    notes.append("saving: safetensors 0.8 writes each tensor from its own memory (no serialized copy of the shard); "
                 "a checkpoint loaded by memory map is read in whole by then, so the peak holds the whole model once")
    checkpoint = _checkpoint_term(spec, options, stored_dtype)
    if stored_dtype is None and options.device == "cpu":
        notes.append(f"the checkpoint's dtype is not known: planned as stored in {options.dtype} (another dtype adds the file's pages while casting)")
    runtime = Component("host.runtime", HOST_RUNTIME_BYTES, "the Python process with torch, transformers and PEFT imported (measured: torch 2.13 CPU, transformers 5.24, PEFT 0.21)")
    if options.device == "cuda":
        device_terms = merge_terms
        host_terms = [checkpoint, Component("host.save", _largest_tensor(spec) * b, "saving copies one tensor at a time from the GPU to host memory"),
                      Component("host.runtime", HOST_RUNTIME_CUDA_BYTES, "the Python process with torch (CUDA libraries), transformers and PEFT imported (estimate)")]
        return MergePlan(spec.name, options, device_terms, host_terms, model, None, None, notes)
    # two phases on the CPU; the peak is the larger: loading (the model, and the checkpoint's pages
    # when it is cast) and merging then saving (the model, the adapter, the largest delta)
    merge_phase = merge_terms + [Component("host.loading", HOST_LOADING_BYTES, "transformers' loading and PEFT's merge beyond the tensors: "
                                      "loader threads' arenas, file handles (measured, see docs/serving.md)")]
    load_phase = [merge_terms[0], checkpoint, Component("host.loading", HOST_CAST_LOADING_BYTES, "the loader beyond the tensors while casting (measured)")] if checkpoint else None
    if load_phase and sum(t.bytes for t in load_phase) > sum(t.bytes for t in merge_phase):
        host_terms = load_phase + [runtime]
        notes.append(f"the peak is while loading: the merge that follows holds {sum(t.bytes for t in merge_phase) / GIB:.2f} GiB "
                     "(the model, the adapter, the largest delta) once the checkpoint is unmapped")
    else:
        host_terms = merge_phase + [runtime]
        if load_phase:
            notes.append(f"loading holds {sum(t.bytes for t in load_phase) / GIB:.2f} GiB while casting the checkpoint, less than the merge")
    device_terms = []
    return MergePlan(spec.name, options, device_terms, host_terms, model, None, None, notes)


# mergekit 0.1.5 on the CPU, per method and merge dtype: the bytes it holds per value of the output
# tensor it is computing, its output counted once and its inputs not (they are the checkpoints'
# memory-mapped pages), as (fixed, per model beside the base). Read from its merge_methods and
# sparsify.py, then measured tensor by tensor on the head of a random Llama (8.2 M values) for 1 to 3
# models beside the base (bench/mergekit_runs.py; docs/serving.md):
MERGEKIT_WORKING_PER_VALUE = {
    # an fp32 accumulator, an fp32 cast of each input in turn (addcmul_ of mixed dtypes), the output
    "linear": {"bfloat16": (8, 0), "float16": (8, 0), "float32": (4, 0)},
    # the result; fp32 scratch per chunk of rows (MERGEKIT_SLERP_SCRATCH_PER_VALUE)
    "slerp": {"bfloat16": (2, 0), "float16": (2, 0), "float32": (4, 0)},
    # the stacked task vectors, one being formed, their weighted sum, the output
    "task_arithmetic": {"bfloat16": (4, 2), "float16": (4, 2), "float32": (8, 4)},
    # as task_arithmetic, plus magnitude's mask, an fp32 copy of |delta| and argsort's fp32 values and
    # int64 indices for one task vector at a time; after the loop, the sign-consensus mask
    "ties": {"bfloat16": (26, 2), "float16": (26, 2), "float32": (28, 4)},
    # bernoulli's mask and the masked task vector instead of the sort (in fp32 for float16 on the
    # CPU), then ties' sign consensus; measured 10.1, 16.1 and 23.1 bytes for 1-3 models in bf16
    "dare_ties": {"bfloat16": (3.7, 6.5), "float16": (7.7, 6.5), "float32": (8.5, 12)},
    "dare_linear": {"bfloat16": (6, 2), "float16": (16.2, 2), "float32": (12, 4)},
    # the output is the input tensor itself: nothing beyond the mapped pages
    "passthrough": {"bfloat16": (0, 0), "float16": (0, 0), "float32": (0, 0)},
}
# slerp works on whole rows in chunks of max(1, 2**20 // rows) columns: the inputs' chunks cast to
# fp32 (views already when merging in fp32) and the two weighted terms
MERGEKIT_SLERP_SCRATCH_PER_VALUE = {"bfloat16": 16, "float16": 16, "float32": 8}
MERGEKIT_SLERP_CHUNK_VALUES = 1 << 20
# mergekit's own bookkeeping beyond the tensors (its task graph, the loaders' indexes), measured
MERGEKIT_FIXED_BYTES = 2 * MIB


def _working_bytes(method: str, shape: tuple[int, ...], dtype: str, others: int, cast_inputs: int) -> int:
    values = math.prod(shape)
    fixed, per_other = MERGEKIT_WORKING_PER_VALUE[method][dtype]
    working = int((fixed + per_other * others) * values)
    if method == "slerp" and values:
        rows = shape[0] if shape else 1
        working += MERGEKIT_SLERP_SCRATCH_PER_VALUE[dtype] * min(values, rows * max(1, MERGEKIT_SLERP_CHUNK_VALUES // rows))
    # an input stored in another dtype is cast on loading: a new tensor per input, held through the merge
    return working + cast_inputs * values * DTYPE_BYTES[dtype]


def _mergekit_outputs(spec: ModelSpec, options: MergeOptions) -> list[tuple[str, tuple[int, ...]]]:
    """The output tensors (name, shape) in the order mergekit computes them: its schedule sorts the
    tasks by tensor name (graph.build_schedule's group label). Passthrough stacks each model's layers
    in turn, renumbered."""
    if options.method != "passthrough":
        return sorted((t.name, t.shape) for t in spec.tensors)
    import re

    outputs, layer_of = [], re.compile(r"\.layers\.(\d+)\.")
    for t in spec.tensors:
        if t.layer is None:
            outputs.append((t.name, t.shape))
    for copy in range(options.num_models):
        for t in spec.tensors:
            if t.layer is not None:
                outputs.append((layer_of.sub(f".layers.{copy * spec.num_layers + t.layer}.", t.name, count=1), t.shape))
    return sorted(outputs)


def _layer_values(spec: ModelSpec) -> int:
    """The values in the decoder layers: what a passthrough merge takes from each model."""
    return sum(t.numel for t in spec.tensors if t.layer is not None)


@dataclass(frozen=True)
class MergekitPeak:
    host_bytes: int  # the anonymous memory at the peak: the shard held and the working set
    shard_bytes: int
    working_bytes: int
    tensor: str  # the output tensor being computed at the peak
    page_cache_bytes: int  # the inputs' checkpoint pages read (file-backed, reclaimable)


def mergekit_cpu_peak(spec: ModelSpec, options: MergeOptions, stored_dtype: str | None = None) -> MergekitPeak:
    """Walk the output tensors in mergekit's order: before each, the shard so far (TensorWriter
    flushes it when the next tensor would pass --out-shard-size, and writes it from the tensors'
    own memory), plus that tensor's working set. The peak is the largest such sum: usually the
    embedding or the head, computed first because their names sort first, or the last tensor of a
    full shard."""
    b = DTYPE_BYTES[options.dtype]
    cast = stored_dtype is not None and stored_dtype != options.dtype
    n = options.num_models
    others = n - 1 if options.method in _BASED else n
    inputs = 1 if options.method == "passthrough" else n
    max_shard = int(options.out_shard_size_gb * 10**9)
    # passthrough's outputs are the mapped inputs: no anonymous memory unless cast
    output_is_copy = options.method != "passthrough" or cast
    shard_bytes = shard_anon = 0
    best = MergekitPeak(0, 0, 0, "", 0)
    for name, shape in _mergekit_outputs(spec, options):
        values = math.prod(shape)
        size = values * b
        if shard_bytes and shard_bytes + size > max_shard:
            shard_bytes = shard_anon = 0
        working = _working_bytes(options.method, shape, options.dtype, others, inputs if cast else 0)
        if shard_anon + working > best.host_bytes:
            best = MergekitPeak(shard_anon + working, shard_anon, working, name, 0)
        shard_bytes += size
        shard_anon += size if output_is_copy else 0
    stored = DTYPE_BYTES[stored_dtype or options.dtype]
    if options.method == "passthrough":  # each model's layers, the rest once
        read = (spec.total_params + _layer_values(spec) * (n - 1)) * stored
    else:
        read = spec.total_params * stored * n
    return MergekitPeak(best.host_bytes, best.shard_bytes, best.working_bytes, best.tensor, read)


def plan_mergekit(spec: ModelSpec, options: MergeOptions, stored_dtype: str | None = None) -> MergePlan:
    b = DTYPE_BYTES[options.dtype]
    n = options.num_models
    model = _params_bytes(spec, b)
    if options.method == "passthrough":  # the output stacks every model's layers
        model += _layer_values(spec) * b * (n - 1)
    peak = mergekit_cpu_peak(spec, options, stored_dtype)
    where = (f"the peak is at {peak.tensor}, with {peak.shard_bytes / GIB:.2f} GiB of the output shard held" if peak.tensor
             else "its outputs are the inputs' mapped tensors, so it holds next to nothing beyond them")
    notes = [f"mergekit {options.method} of {n} models, lazily tensor by tensor in the order of their names: {where}",
             f"the inputs are read through memory-mapped checkpoints: {peak.page_cache_bytes / GIB:.2f} GiB of page cache, "
             "resident where memory allows and given back under pressure, so not counted in the peak",
             "working sets per method measured with mergekit 0.1.5 on the CPU (bench/mergekit_runs.py)"]
    if stored_dtype and stored_dtype != options.dtype:
        notes.append(f"the checkpoints are stored in {stored_dtype}: each input is cast to {options.dtype} as it is loaded")
    elif stored_dtype is None:
        notes.append(f"the checkpoints' dtype is not known: planned as stored in {options.dtype} (another dtype adds a cast copy of each input)")
    runtime = Component("host.runtime", HOST_RUNTIME_BYTES, "the Python process with torch, transformers and mergekit imported (measured: torch 2.13 CPU, mergekit 0.1.5)")
    fixed = Component("host.loading", MERGEKIT_FIXED_BYTES, "mergekit's task graph and loaders beyond the tensors (measured)")
    work = Component("temporary.working_set", peak.working_bytes, f"{options.method}'s working set for {peak.tensor} (measured per value, see docs/serving.md)")
    out = Component("output.shard", peak.shard_bytes, f"the output tensors of the shard being written ({options.out_shard_size_gb:g} GB shards) held at that point")
    if options.device == "cuda":
        # not measured: the inputs are copied to the GPU for each tensor; the CPU's fp32 upcasts in
        # magnitude() do not happen there, so the CPU's working set is an upper bound
        largest = _largest_tensor(spec)
        gpu_work = Component("temporary.working_set", _working_bytes(options.method, (largest,), options.dtype, n - 1 if options.method in _BASED else n, 0) + n * largest * b,
                             f"the inputs of the largest tensor on the GPU and {options.method}'s working set (estimate from the CPU's; not measured on a GPU)")
        shard = Component("output.shard", min(int(options.out_shard_size_gb * 10**9), model), "the output tensors of the shard being written")
        device_terms = [gpu_work] + ([shard] if options.low_cpu_memory else [])
        host_terms = [Component("host.runtime", HOST_RUNTIME_CUDA_BYTES, "the Python process with torch (CUDA libraries) and mergekit imported (estimate)"), fixed]
        host_terms += [] if options.low_cpu_memory else [shard]
        notes.append("--cuda: the GPU terms are estimates from the CPU's measured working sets; no GPU merge has been measured")
    else:
        device_terms = []
        host_terms = [runtime, fixed, work, out]
    plan = MergePlan(spec.name, options, device_terms, host_terms, model, None, None, notes)
    plan.host_page_cache_bytes = peak.page_cache_bytes
    return plan


def plan_merge(spec: ModelSpec, options: MergeOptions, gpu_memory_bytes: int | None = None,
               stored_dtype: str | None = None) -> MergePlan:
    """`stored_dtype`: the checkpoint's dtype (checkpoint_dtype of its config.json), for a PEFT merge."""
    plan = plan_peft_merge(spec, options, stored_dtype) if options.method == "peft" else plan_mergekit(spec, options, stored_dtype)
    plan.num_layers = spec.num_layers
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
    config = source.config
    if config is None:
        from planner.serving import catalog_config

        config = catalog_config(source.spec.name)
    return plan_merge(source.spec, options, gpu_bytes, checkpoint_dtype(config))


# -- export: mergekit's YAML -------------------------------------------------------------------------

# the methods that take a base model (its task vectors are taken against it)
_BASED = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")


def mergekit_config(plan: MergePlan, models: list[str] | None = None) -> dict:
    """The mergekit config of a mergekit plan, by mergekit's keys (merge_method, base_model,
    models with per-model parameters, parameters, dtype): the planned model is the base (or the
    first model), the others are `models` (a run's directories) or placeholders MODEL_2... to set.
    Weights are even, density 0.5, SLERP's t 0.5: starting values, not advice."""
    o = plan.options
    if o.method == "peft":
        raise ValueError("a PEFT merge has no mergekit config")
    n = o.num_models
    names = list(models) if models else [plan.model_name] + [f"MODEL_{i}" for i in range(2, n + 1)]
    config: dict = {"merge_method": o.method}
    if o.method == "passthrough":  # a layer stack: each model's layers in turn
        config["slices"] = [{"sources": [{"model": name, "layer_range": [0, plan.num_layers]}]} for name in names]
        config["dtype"] = o.dtype
        return config
    if o.method in _BASED:
        config["base_model"] = names[0]
    if o.method == "slerp":
        config["models"] = [{"model": name} for name in names]
        config["parameters"] = {"t": 0.5}
    else:
        merged = names[1:] if o.method in _BASED else names
        weight = round(1 / len(merged), 4) if merged else 1.0
        per_model = {"weight": weight} if o.method in ("linear", "task_arithmetic") else {"weight": weight, "density": 0.5}
        config["models"] = ([{"model": names[0]}] if o.method in _BASED else []) + [{"model": name, "parameters": dict(per_model)} for name in merged]
        if o.method in ("ties", "dare_ties", "dare_linear", "linear"):
            config["parameters"] = {"normalize": True}
    config["dtype"] = o.dtype
    return config


def mergekit_models(config: dict) -> list[str]:
    """The models a mergekit config names, in order, each once (base_model, models, slices' sources)."""
    names = [config.get("base_model")] + [m.get("model") for m in config.get("models") or []]
    names += [src.get("model") for piece in config.get("slices") or [] for src in piece.get("sources") or []]
    return list(dict.fromkeys(name for name in names if isinstance(name, str)))


def mergekit_command(plan: MergePlan) -> str:
    """The mergekit-yaml line that runs the config as planned (device, low CPU memory, shard size)."""
    o = plan.options
    flags = (" --cuda" if o.device == "cuda" else "") + (" --low-cpu-memory" if o.low_cpu_memory else "")
    return f"mergekit-yaml config.yml OUTPUT_DIR{flags} --out-shard-size {int(o.out_shard_size_gb * 1000)}M"


def mergekit_yaml(plan: MergePlan) -> str:
    import yaml

    o = plan.options
    head = [f"# vramplan: {o.method} merge of {o.num_models} models; run: {mergekit_command(plan)}",
            f"# planned peak: host {plan.host_peak_bytes / GIB:.2f} GiB" + (f", GPU {plan.device_peak_bytes / GIB:.2f} GiB" if plan.device_terms else "")
            + f", disk {plan.disk_bytes / GIB:.2f} GiB"]
    if o.num_models > 1:
        head.append("# placeholder: " + (f"set MODEL_2 ... MODEL_{o.num_models} to the other models" if o.num_models > 2 else "set MODEL_2 to the other model"))
    return "\n".join(head) + "\n" + yaml.safe_dump(mergekit_config(plan), sort_keys=False)
