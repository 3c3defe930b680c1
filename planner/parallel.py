"""Per-GPU memory under DDP, ZeRO-1/2/3, FSDP1, FSDP2 and CPU offload: the shares, and each strategy's buffers.

- DDP replicates everything and, with PyTorch's default `gradient_as_bucket_view=False`, keeps
  its gradient buckets as a second copy of the gradients.
- ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3 and FSDP (FULL_SHARD) also
  parameters.
- Offload moves optimizer state (and, with `params`, the parameter shards) to host memory.
- bitsandbytes' quantization constants are no parameters: whole on every GPU under FSDP and
  ZeRO-3, and never offloaded (QUANT_CONSTANTS_WHOLE below).

Beyond the shares, each strategy's own buffers, from its code (DeepSpeed at edaa722, 2026-08-22;
torch 2.13's FSDP1 and FSDP2), named by where they live (plan.py's SHARDED_PHASES):
- DeepSpeed ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py): `setup_buckets` allocates the
  reduce (ipg) bucket, `reduce_bucket_size` elements in the 16-bit dtype, at each backward's start,
  and a second one when `overlap_comm` is on ("double buffers"); `_release_ipg_buffers` frees them
  after the backward. At the step, `single_grad_partition`: this rank's gradient partition in
  fp32, made from the flat 16-bit one. The 16-bit parameters are all-gathered after the step with
  `all_gather_into_tensor` into the flat buffer itself (runtime/utils.py all_gather_dp_groups), so
  `allgather_bucket_size` allocates nothing on NCCL.
- DeepSpeed ZeRO-3 (deepspeed/runtime/zero/stage3.py): the ipg bucket is allocated once at init
  and kept; `initialize_optimizer_states` keeps a fp32 gradient buffer of the largest sub-group
  (`sub_group_size`, 1e9 elements) as the fp32 partition's `.grad`; parameters of at most
  `stage3_param_persistence_threshold` elements stay whole on every rank; each module's
  parameters are gathered for its forward and backward with up to `stage3_prefetch_bucket_size`
  elements prefetched ahead (within `stage3_max_live_parameters`); a bucket's reduce-scatter
  flattens its gradients into one more bucket-sized buffer, and with `overlap_comm` it runs on its
  own stream while the next bucket fills (the gradients of one more bucket in flight).
- FSDP2 (`fully_shard` per decoder layer and at the root, as the export sets it up), from a
  fake-process-group trace of one rank (planner/sharded_trace.py, tests/test_sharded.py): the
  root's parameters (embeddings, LM head, final norm) stay unsharded from the forward to the end
  of the backward (FSDP2 does not reshard the root after forward); three decoder layers' parameters
  at a time: the one computing, the next one's all-gather output and its copy into the unsharded
  parameters (in backward the reduce-scatter input of a layer's gradients takes that place); and
  in backward one layer's unsharded gradients before their reduce-scatter. A layer is gathered as
  stored (bitsandbytes' 4-bit weights packed), as FSDP1's units are.
- FSDP1 (`FullyShardedDataParallel`, `fsdp_version` 1: accelerate's FSDP plugin's and the HF
  Trainer's default, and what Answer.AI's fsdp_qlora and fms-acceleration ran), as accelerate's
  TRANSFORMER_BASED_WRAP sets it up (a unit per decoder layer, the rest in the root unit;
  FULL_SHARD, BACKWARD_PRE, limit_all_gathers), from torch 2.13's fsdp/_runtime_utils.py and
  _flat_param.py and a fake-process-group trace (planner/sharded_trace.py trace_fsdp1):
  `FlatParamHandle.unshard` all-gathers a unit's flat shard straight into its padded unsharded flat
  parameter (`_alloc_padded_unsharded_flat_param`, `_all_gather_flat_param`), with no copy-out;
  `_post_forward_reshard` frees every unit after its forward but the root's; in backward
  `_pre_backward_hook` unshards a unit and `_prefetch_handle` (BACKWARD_PRE) starts the next one's
  all-gather, two units unsharded at a time (`limit_all_gathers` lets no more be in flight);
  autograd concatenates a unit's parameter gradients into its unsharded flat gradient (the
  views' split backward), which `_post_backward_hook` / `_reduce_grad` reduce-scatters into the
  sharded gradient, and frees. The unsharded flat parameter is in the mixed-precision param_dtype
  (`init_flat_param_attributes`: bf16 over fp32 shards with accelerate's policy), its shard cast
  to it first (`_use_low_precision_shard`); with CPU offload the shard is copied to the GPU for
  the all-gather (`pre_unshard` -> `flat_param_to`).
- NCCL's buffers outside PyTorch's allocator, for every multi-GPU strategy: NVIDIA/nccl#964
  measured 544 MB per GPU for a communicator of 2 GPUs and 688 MB above 2 (4 x A100, NVLink, one
  all-reduce); it grows with channels and peers (nccl#1685), so it is one measurement, not a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.components import Component
from planner.dtypes import dtype_bytes, packed_4bit_bytes
from planner.options import TrainingOptions
from planner.spec import ModelSpec

SHARDS_OPTIMIZER = ("zero1", "zero2", "zero3", "fsdp")
SHARDS_GRADIENTS = ("zero2", "zero3", "fsdp")
SHARDS_PARAMS = ("zero3", "fsdp")
ZERO_STAGES = ("zero1", "zero2", "zero3")
GATHERED_LAYERS = 2  # FSDP2: the layer computing and the next one's all-gather output
FSDP_COPY_LAYERS = 1  # FSDP2: the all-gather's flat output while it is copied out (backward: the reduce-scatter input)
FSDP1_GATHERED_UNITS = 2  # FSDP1 in backward: the unit computing and the next one's (BACKWARD_PRE); one in forward
FSDP1_GRADIENT_COPIES = 2  # FSDP1: a unit's parameter gradients and their concatenation into its flat gradient

# bitsandbytes keeps a 4-bit weight's quantization constants (absmax, the nested absmax and
# offset, the code tables: a QuantState) and LLM.int8's row scales (SCB) as Python attributes of
# the Params4bit / Int8Params and of the Linear4bit module, not as parameters or buffers. Neither
# FSDP nor ZeRO-3 sees them:
# - FSDP1 flattens only the module's nn.Parameters (torch 2.13 fsdp/_flat_param.py
#   FlatParamHandle._init_flat_param_and_metadata, lines 688-691: _named_parameters_with_duplicates
#   per submodule), and CPU offload moves only the flat parameter (_init_utils.py 672-673:
#   handle.flat_param_to(cpu));
# - FSDP2 manages a module's named_parameters(recurse=False) and buffers (_fully_shard/_fsdp_init.py
#   _get_managed_states, lines 341-367) and puts a new DTensor Parameter in the weight's place, so
#   the QuantState stays on the module, where bitsandbytes 0.50's Linear4bit.forward finds it again
#   (nn/modules.py 487-501, fix_4bit_weight_quant_state_from_module: "the quant state got lost when
#   the parameter got converted. This happens for example for fsdp");
# - DeepSpeed ZeRO-3 (edaa722) partitions param.data into param.ds_tensor and frees param.data
#   (runtime/zero/partition_parameters.py free_param, 308-324; _partition_param, 1750), and its
#   zero/ code never names quant_state, bitsandbytes or Params4bit.
# So they stay whole on every GPU, where they were quantized, also under CPU offload (a tiny
# Llama's QuantStates under FSDP1 and FSDP2: tests/test_sharded.py). The packed 4-bit weight is a
# parameter (in its bnb_4bit_quant_storage dtype, bf16 in PEFT's FSDP QLoRA recipe) and is sharded.
QUANT_CONSTANTS_WHOLE = ("whole on every GPU: bitsandbytes keeps them as attributes (QuantState, SCB), not parameters, so FSDP and "
                         "ZeRO-3 neither shard nor offload them (planner/parallel.py)")

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py)
DEEPSPEED_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
}
DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000
MASTER_BYTES = 4  # DeepSpeed's master_weights_and_grads_dtype: fp32
# NCCL's own device memory per GPU (NVIDIA/nccl#964: 4 x A100 with NVLink, one communicator)
NCCL_TWO_GPUS_BYTES = 544 * 1000**2
NCCL_BYTES = 688 * 1000**2


@dataclass(frozen=True)
class DeepSpeedSettings:
    reduce_bucket_size: int
    allgather_bucket_size: int
    overlap_comm: bool
    prefetch_bucket_size: int
    param_persistence_threshold: int
    max_live_parameters: int
    sources: tuple[str, ...]  # "reduce_bucket_size 16,777,216 (auto: hidden_size^2)", one per setting


def auto_values(hidden_size: int) -> dict[str, int]:
    """What transformers' HfTrainerDeepSpeedConfig.trainer_config_finalize (and accelerate's
    _prepare_deepspeed) fill in for "auto" (transformers 5.24, integrations/deepspeed.py)."""
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def deepspeed_settings(spec: ModelSpec, options: TrainingOptions) -> DeepSpeedSettings:
    auto = auto_values(spec.hidden_size)
    values, sources = {}, []
    for key, default in DEEPSPEED_DEFAULTS.items():
        given = getattr(options, key)
        if given is None:
            values[key], why = default, "DeepSpeed's default"
        elif given == "auto":
            values[key] = auto[key]
            why = {"reduce_bucket_size": "auto: hidden_size^2", "stage3_prefetch_bucket_size": "auto: 0.9 x hidden_size^2",
                   "stage3_param_persistence_threshold": "auto: 10 x hidden_size"}[key]
        else:
            values[key], why = given, "given"
        sources.append(f"{key} {values[key]:,} ({why})")
    overlap = options.overlap_comm if options.overlap_comm is not None else options.parallelism == "zero3"
    sources.append(f"overlap_comm {str(overlap).lower()} ({'given' if options.overlap_comm is not None else 'DeepSpeed default: on for ZeRO-3 only'})")
    return DeepSpeedSettings(values["reduce_bucket_size"], values["allgather_bucket_size"], overlap, values["stage3_prefetch_bucket_size"],
                             values["stage3_param_persistence_threshold"], values["stage3_max_live_parameters"], tuple(sources))


def _shard(component: Component, n: int, why: str) -> Component:
    whole = component.replicated_bytes
    share = whole + math.ceil((component.bytes - whole) / n)
    return Component(component.name, share, f"{component.note}; 1/{n} per GPU ({why})", whole)


def largest_layer_params(spec: ModelSpec) -> int:
    per_layer: dict[int, int] = {}
    for t in spec.tensors:
        if t.layer is not None:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.numel
    return max(per_layer.values(), default=0)


def root_params(spec: ModelSpec) -> int:
    """The parameters outside the decoder layers: FSDP2's root unit (embeddings, LM head, final norm)."""
    return sum(t.numel for t in spec.tensors if t.layer is None)


def _trainable(spec: ModelSpec, options: TrainingOptions):
    from planner.trainable import trainable_tensors

    return trainable_tensors(spec, options)


def _largest_layer_gradient_bytes(spec: ModelSpec, options: TrainingOptions) -> int:
    from planner.static_memory import _layer_prefix

    per_layer: dict[str, int] = {}
    for t in _trainable(spec, options):
        prefix = _layer_prefix(t.name)
        if prefix is not None:
            per_layer[prefix] = per_layer.get(prefix, 0) + t.numel * dtype_bytes(t.dtype)
    return max(per_layer.values(), default=0)


def nccl_component(n: int) -> Component:
    size = NCCL_TWO_GPUS_BYTES if n == 2 else NCCL_BYTES
    return Component("sharding.nccl", size,
                     f"NCCL's channel and proxy buffers, allocated by NCCL outside PyTorch's allocator: {size / 1e6:.0f} MB per GPU measured "
                     f"for one communicator of {'2' if n == 2 else 'more than 2'} GPUs (NVIDIA/nccl#964, 4 x A100 with NVLink); more channels "
                     "or communicators take more (nccl#1685), so this is one measurement, not a bound")


def _deepspeed_components(spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    n, stage = options.num_gpus, options.parallelism
    ds = deepspeed_settings(spec, options)
    settings = "; ".join(ds.sources)
    low = dtype_bytes(options.effective_weights_dtype)
    trainable = sum(t.numel for t in _trainable(spec, options))
    share = math.ceil(trainable / n)
    out: list[Component] = []
    if stage in ("zero1", "zero2"):
        buckets = 2 if ds.overlap_comm else 1
        out.append(Component("temporary.grad_reduce", buckets * ds.reduce_bucket_size * low,
                             f"DeepSpeed's reduce (ipg) bucket{'s' if buckets > 1 else ''}: {buckets} x reduce_bucket_size elements in "
                             f"{options.effective_weights_dtype}, allocated at each backward's start (stage_1_and_2.py setup_buckets"
                             f"{', double buffers for overlap_comm' if buckets > 1 else ''}) and freed after it; {settings}"))
        if options.offload == "none":
            out.append(Component("temporary.zero_step", share * MASTER_BYTES,
                                 f"at the step, this GPU's gradient partition in fp32 ({share:,} elements; stage_1_and_2.py single_grad_partition); "
                                 "the 16-bit parameters are then all-gathered into their flat buffer in place (all_gather_into_tensor), "
                                 f"so allgather_bucket_size ({ds.allgather_bucket_size:,}) allocates nothing"))
        return out
    # ZeRO-3
    out.append(Component("sharding.ipg_bucket", ds.reduce_bucket_size * low,
                         f"DeepSpeed ZeRO-3's reduce (ipg) bucket: reduce_bucket_size elements in {options.effective_weights_dtype}, allocated "
                         f"once at init and kept (stage3.py); {settings}"))
    # a bucket holds at most the trainable parameters' gradients (LoRA's are few)
    in_flight = (2 if ds.overlap_comm else 1) * min(ds.reduce_bucket_size, trainable) * low
    out.append(Component("temporary.grad_reduce", in_flight,
                         "a bucket's reduce-scatter flattens its gradients into one more bucket-sized buffer (reduce_scatter_coalesced)"
                         + ("; with overlap_comm it runs on its own stream while the next bucket's gradients pile up: one bucket more in flight"
                            if ds.overlap_comm else "")))
    if options.offload == "none":
        fp32_grads = min(share, DEEPSPEED_SUB_GROUP_SIZE) * MASTER_BYTES
        out.append(Component("sharding.fp32_grad_partition", fp32_grads,
                             f"DeepSpeed ZeRO-3's fp32 gradient buffer for the largest optimizer sub-group (min of this GPU's {share:,} trainable "
                             f"elements and sub_group_size {DEEPSPEED_SUB_GROUP_SIZE:.0e}), kept from init (stage3.py initialize_optimizer_states)"))
    if options.offload != "params":
        persistent = [t for t in spec.tensors if t.numel <= ds.param_persistence_threshold]
        whole = sum(t.numel for t in persistent)
        extra = whole * low - math.ceil(whole / n) * low
        if extra > 0:
            out.append(Component("sharding.persistent_params", extra,
                                 f"{len(persistent):,} parameters of at most stage3_param_persistence_threshold "
                                 f"({ds.param_persistence_threshold:,}) elements ({whole:,} in all) stay whole on every GPU (beyond their 1/{n} share)"))
    candidates = [t.numel for t in spec.tensors if t.numel > ds.param_persistence_threshold]
    largest = max(candidates, default=0)
    total = sum(candidates)
    live = min(total, max(largest, min(largest + ds.prefetch_bucket_size, ds.max_live_parameters)))
    out.append(Component("temporary.gathered_params", live * low,
                         f"ZeRO-3 gathers each module's parameters for its forward and backward: the largest ({largest:,} elements) and up to "
                         f"stage3_prefetch_bucket_size ({ds.prefetch_bucket_size:,}) prefetched ahead, within stage3_max_live_parameters "
                         f"({ds.max_live_parameters:,}) and the model's {total:,} partitioned elements"))
    return out


def _stored_unit_bytes(spec: ModelSpec, options: TrainingOptions, in_layers: bool, dtype: str) -> int:
    """The largest decoder layer's (in_layers) or the root's parameters as stored, the bytes an
    all-gather moves: bitsandbytes' 4-bit weights packed (two values a byte, in their quant_storage
    parameter), int8 one byte each, the rest and the PEFT adapters the unit holds in `dtype` (FSDP1's
    flat parameter holds one dtype; the traces cast the adapters to it). The quantization constants
    are no parameters and are never gathered (QUANT_CONSTANTS_WHOLE)."""
    from planner.static_memory import _layer_prefix

    quant = options.effective_quantization
    elem = dtype_bytes(dtype)
    units: dict[str | None, int] = {}
    layer_prefixes = set()
    for t in spec.tensors:
        prefix = _layer_prefix(t.name) if t.layer is not None else None
        layer_prefixes.add(prefix)
        if (prefix is not None) != in_layers:
            continue
        if quant in ("nf4", "fp4") and t.quantizable:
            size = packed_4bit_bytes(t.numel)
        elif quant == "int8" and t.quantizable:
            size = t.numel
        else:
            size = t.numel * elem
        units[prefix] = units.get(prefix, 0) + size
    for t in _trainable(spec, options):
        if t.base:
            continue  # a base tensor is counted above
        prefix = _layer_prefix(t.name)
        prefix = prefix if prefix in layer_prefixes else None
        if (prefix is not None) == in_layers:
            units[prefix] = units.get(prefix, 0) + t.numel * elem
    return max(units.values(), default=0)


def _fsdp_components(spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    dtype = options.effective_weights_dtype
    layer = _stored_unit_bytes(spec, options, in_layers=True, dtype=dtype)
    root = _stored_unit_bytes(spec, options, in_layers=False, dtype=dtype)
    stored = " as stored (4-bit weights packed)" if options.effective_quantization != "none" else ""
    out = [
        Component("temporary.gathered_params", GATHERED_LAYERS * layer,
                  f"FSDP2 (fsdp_version 2: fully_shard): {GATHERED_LAYERS} decoder layers' parameters unsharded at a time{stored} (the one "
                  "computing and the next one's all-gather output; traced, planner/sharded_trace.py)"),
        Component("temporary.gather_copy", FSDP_COPY_LAYERS * layer,
                  "FSDP2: one more layer's worth while an all-gather's flat output is copied into the unsharded parameters, and in backward "
                  "the reduce-scatter input of a layer's gradients (traced)"),
        Component("temporary.gathered_root", root,
                  f"FSDP2's root unit ({root_params(spec):,} parameters: embeddings, LM head, final norm) stays unsharded from the forward to "
                  "the end of the backward: the root is not resharded after forward (traced)"),
    ]
    grads = _largest_layer_gradient_bytes(spec, options)
    if grads:
        out.append(Component("temporary.grad_reduce", grads,
                             "FSDP2: one decoder layer's unsharded gradients, from its backward until foreach_reduce has copied them into the "
                             "reduce-scatter input"))
    return out


def _fsdp1_unsharded_bytes(spec: ModelSpec, options: TrainingOptions, in_layers: bool) -> int:
    """The padded unsharded flat parameter of the largest decoder-layer unit (in_layers) or of the
    root unit, as FSDP1 holds it: the tensors as stored, the rest in the param_dtype."""
    largest = _stored_unit_bytes(spec, options, in_layers, fsdp1_param_dtype(options))
    # FlatParamHandle.shard pads the flat parameter to a multiple of the world size
    return math.ceil(largest / options.num_gpus) * options.num_gpus


def fsdp1_param_dtype(options: TrainingOptions) -> str:
    """The dtype FSDP1 unshards in: accelerate's mixed-precision policy (set_mixed_precision) casts
    fp32 shards to the 16-bit compute dtype; otherwise the weights' own."""
    if options.effective_weights_dtype == "fp32" and options.precision != "fp32":
        return options.precision
    return options.effective_weights_dtype


def _fsdp1_components(spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    n = options.num_gpus
    unit = _fsdp1_unsharded_bytes(spec, options, in_layers=True)
    root = _fsdp1_unsharded_bytes(spec, options, in_layers=False)
    param_dtype = fsdp1_param_dtype(options)
    cast = param_dtype != options.effective_weights_dtype
    why = ("FSDP1 (fsdp_version 1: FullyShardedDataParallel, accelerate's FSDP plugin's and the HF Trainer's default"
           + ("" if "fsdp_version" in options.model_fields_set else ", not given") + ")")
    out = [
        Component("temporary.gathered_params", FSDP1_GATHERED_UNITS * unit,
                  f"{why}: {FSDP1_GATHERED_UNITS} decoder-layer units' padded unsharded flat parameters in {param_dtype} at a time in "
                  "backward, the one computing and the next one's all-gather (BACKWARD_PRE: _pre_backward_hook -> _prefetch_handle); "
                  "one in forward (no forward prefetch); all-gathered straight into the flat parameter, no copy-out "
                  "(_flat_param.py unshard; traced, planner/sharded_trace.py trace_fsdp1)"),
        Component("temporary.gathered_root", root,
                  f"FSDP1's root unit ({root_params(spec):,} parameters: embeddings, LM head, final norm) unsharded from the forward to "
                  "the end of the backward: _post_forward_reshard does not free the root's (traced)"),
    ]
    staged = []
    if options.offload == "params":
        staged.append("the shard copied from the host (pre_unshard -> flat_param_to)")
    if cast:
        staged.append(f"the shard cast to {param_dtype} (_use_low_precision_shard)")
    if staged:
        out.append(Component("temporary.gather_copy", math.ceil(unit / n) * len(staged),
                             f"FSDP1: the all-gather's input on the GPU, {' and '.join(staged)}: 1/{n} of a unit each, freed once gathered"))
    grads = _largest_layer_gradient_bytes(spec, options)
    if grads and cast:
        grads = grads * dtype_bytes(param_dtype) // MASTER_BYTES
    if grads:
        out.append(Component("temporary.grad_reduce", FSDP1_GRADIENT_COPIES * grads,
                             "FSDP1: one unit's parameter gradients and their concatenation into its unsharded flat gradient (the views' "
                             "split backward), which _post_backward_hook reduce-scatters into the sharded gradient (_reduce_grad) and frees"))
    return out


# Methods whose decoder-layer units FSDP1 holds frozen: PEFT's fsdp_auto_wrap_policy (the HF
# Trainer's for a PEFT model) wraps every leaf with a trainable weight, LoRA's A and B and DoRA's
# magnitude, as a unit of its own; IA3's vectors and freeze's layers stay in the layer's unit
FSDP1_FROZEN_LAYER_METHODS = ("lora", "qlora", "dora")


def fsdp1_held_layer_inputs(options: TrainingOptions, dynamic: list[Component]) -> tuple[list[Component], str | None]:
    """The layer inputs FSDP1 holds to the end of backward under a reentrant checkpoint around its
    units (reentrant_checkpoint_around_fsdp_unit), and a note when the option is given where it
    changes nothing.

    torch's FSDP1 registers, in a frozen unit's pre-forward under grad mode, a multi-grad hook on the
    unit's inputs that need a gradient (_register_post_backward_reshard_only_hook, torch 2.4 to
    2.13), and removes it only in the end-of-backward callback (_finalize_params). Around the unit,
    a reentrant checkpoint's forward runs without grad and its recompute with it, on a detached copy
    of the checkpointed input; the hook's closure keeps that copy's AccumulateGrad, which keeps the
    copy and the gradient the recompute's backward gives it. So every layer's input and its
    gradient live until the backward ends: by the first layer's backward, the other layers'
    checkpoints and as many gradients of the same size. Measured on CPU over a fake process group
    (tests/test_sharded.py): the peak grows by one layer input per layer, and by one more (the first
    layer's input gradient); inside the unit, or non-reentrant, it does not grow."""
    if not options.reentrant_checkpoint_around_fsdp_unit:
        return [], None
    applies = {
        "parallelism fsdp on more than one GPU": options.parallelism == "fsdp" and options.num_gpus > 1,
        "fsdp_version 1": options.fsdp_version == 1,
        "gradient checkpointing": options.gradient_checkpointing,
        f"a method whose layer units are frozen ({', '.join(FSDP1_FROZEN_LAYER_METHODS)})": options.method in FSDP1_FROZEN_LAYER_METHODS,
    }
    missing = [what for what, holds in applies.items() if not holds]
    if missing:
        return [], (f"reentrant_checkpoint_around_fsdp_unit changes nothing here: FSDP1's hold on the layer inputs needs "
                    f"{' and '.join(missing)}")
    checkpoints = sum(c.bytes for c in dynamic if c.name == "activations.checkpoints")
    first_input = sum(c.bytes for c in dynamic if c.name == "activations.first_layer_input")
    return [Component("temporary.held_layer_inputs", 2 * checkpoints + first_input,
                      "FSDP1 under a reentrant checkpoint around each unit (transformers before 4.52): the reshard-only hook on each "
                      "frozen unit's recomputed input holds that input and its gradient to the end of backward, so by the first layer's "
                      f"backward the other layers' checkpoints ({checkpoints / (1 << 30):.2f} GiB), their input gradients as much again and "
                      "the first layer's input gradient are alive (_register_post_backward_reshard_only_hook, removed in _finalize_params; "
                      "measured on CPU)")], None


def fsdp_assumption(options: TrainingOptions) -> str | None:
    """Which FSDP a sharded plan assumed, and why: one line for the plan's assumptions."""
    if options.parallelism != "fsdp" or options.num_gpus <= 1:
        return None
    given = "fsdp_version" in options.model_fields_set
    if options.fsdp_version == 1:
        return ("FSDP1 (FullyShardedDataParallel, flat parameters per unit)" + (", given" if given else
                ": fsdp_version not given, and accelerate's FSDP plugin and the HF Trainer default to 1; fsdp_version 2 plans fully_shard"))
    return "FSDP2 (fully_shard, per-parameter sharding), fsdp_version 2" + (", given" if given else "")


def per_gpu_static(components: list[Component], spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    n = options.num_gpus
    strategy = options.parallelism
    out: list[Component] = []
    for c in components:
        family = c.family
        if family == "optimizer_state" and options.offload in ("optimizer", "params"):
            out.append(Component(c.name, 0, f"{c.note}; offloaded to host memory (costs host RAM, not GPU memory)"))
        elif family == "optimizer_state" and strategy in SHARDS_OPTIMIZER and n > 1:
            out.append(_shard(c, n, f"{strategy} shards optimizer state"))
        elif family == "gradients" and strategy in SHARDS_GRADIENTS and n > 1:
            out.append(_shard(c, n, f"{strategy} shards gradients"))
        elif c.name == "weights.quant_constants" and strategy in SHARDS_PARAMS and n > 1:
            out.append(Component(c.name, c.bytes, f"{c.note}; {QUANT_CONSTANTS_WHOLE}"))
        elif family == "weights" and strategy in SHARDS_PARAMS and n > 1:
            if options.offload == "params":
                out.append(Component(c.name, 0, f"{c.note}; parameter shards offloaded to host memory"))
            else:
                out.append(_shard(c, n, f"{strategy} shards parameters"))
        else:
            out.append(c)
    if n <= 1:
        return out
    if strategy in ZERO_STAGES:
        out.extend(_deepspeed_components(spec, options))
    elif strategy == "fsdp" and options.fsdp_version == 1:
        out.extend(_fsdp1_components(spec, options))
    elif strategy == "fsdp":
        out.extend(_fsdp_components(spec, options))
    elif strategy == "ddp":
        grads = sum(c.bytes for c in components if c.family == "gradients")
        out.append(Component("gradients.ddp_buckets", grads, "DDP's all-reduce buckets: a second copy of the gradients (gradient_as_bucket_view=False)"))
    out.append(nccl_component(n))
    return out
