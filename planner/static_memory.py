"""Static memory: weights, gradients and optimizer state, to the byte.

Each function mirrors what the real stack allocates (transformers + bitsandbytes loading, PEFT
adapters, the torch/bitsandbytes/transformers optimizers after their first step); the tests hold
it equal to the bytes a real tiny model holds on CPU.
"""

from __future__ import annotations

import math
import re

from planner.components import Component
from planner.dtypes import (
    dtype_bytes,
    int8_constants_bytes,
    packed_4bit_bytes,
    quant_constants_4bit_bytes,
)
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.precision import precision_mode
from planner.spec import ModelSpec
from planner.trainable import TOKEN_DELTA, TrainableTensor, trainable_tensors

# bitsandbytes 8-bit optimizers keep tensors below this size in fp32 state.
BNB_MIN_8BIT_SIZE = 4096
BNB_OPTIMIZER_BLOCKSIZE = 256
# two shared 256-entry fp32 quantization maps per 8-bit optimizer (signed and unsigned)
BNB_QMAP_BYTES = 2 * 256 * 4
# torch's AdamW keeps its step count as a 0-d fp32 tensor per parameter
TORCH_STEP_BYTES = 4
# transformers' Adafactor keeps a 0-d fp32 RMS per parameter
ADAFACTOR_RMS_BYTES = 4


def weights_components(spec: ModelSpec, options: TrainingOptions, adapters: list[TrainableTensor]) -> list[Component]:
    dtype = options.residual_stream_dtype
    quant = options.effective_quantization
    elem = dtype_bytes(dtype)
    head_elem = dtype_bytes(options.embedding_dtype)
    base_bytes = 0
    constants = 0
    quantized_params = 0
    # a quantized Linear's bias is cast back to the compute dtype by its first forward
    # (Linear4bit.forward), undoing prepare_model_for_kbit_training's upcast of it
    recast_biases = {t.module for t in spec.tensors if t.quantizable} if dtype != options.effective_weights_dtype and quant in ("nf4", "fp4") else set()
    loaded_elem = dtype_bytes(options.effective_weights_dtype)
    for t in spec.tensors:
        if quant in ("nf4", "fp4") and t.quantizable:
            base_bytes += packed_4bit_bytes(t.numel)
            constants += quant_constants_4bit_bytes(t.numel, options.double_quant)
            quantized_params += t.numel
        elif quant == "int8" and t.quantizable:
            base_bytes += t.numel
            constants += int8_constants_bytes(t.shape[0])
            quantized_params += t.numel
        elif t.module in recast_biases:
            base_bytes += t.numel * loaded_elem
        elif t.role in ("embedding", "lm_head"):
            base_bytes += t.numel * head_elem
        else:
            base_bytes += t.numel * elem
    kept = spec.total_params - quantized_params
    if quant == "none":
        note = f"{spec.total_params:,} parameters in {dtype}"
    else:
        note = (
            f"{quantized_params:,} Linear parameters in {quant} ({'0.5' if quant != 'int8' else '1'} byte each); "
            f"{kept:,} in {dtype} (embeddings, lm_head, norms, routers and experts stay unquantized"
            + ("; prepare_model_for_kbit_training upcast them from " + options.effective_weights_dtype if dtype != options.effective_weights_dtype else "")
            + ("; peft_module_casting_to_bf16 cast the embeddings and lm_head back" if options.embedding_dtype != dtype else "")
            + ")"
        )
    out = [Component("weights.base", base_bytes, note)]
    if constants:
        what = (
            f"{quant} absmax per 64-value block"
            + (", double-quantized to 8 bit with an fp32 absmax per 256 blocks" if options.double_quant and quant != "int8" else "")
            + ", plus per-layer code tables"
            if quant != "int8"
            else "one fp32 scale per output row"
        )
        out.append(Component("weights.quant_constants", constants, what))
    copies = [t for t in adapters if t.saved_copy]
    adapters = [t for t in adapters if not t.saved_copy]
    if adapters:
        dtypes = sorted({t.dtype for t in adapters})
        out.append(Component("weights.adapter", tensor_bytes(adapters), f"{sum(t.numel for t in adapters):,} adapter parameters in {'/'.join(dtypes)}"))
    token_deltas = [t for t in adapters if t.name.endswith(TOKEN_DELTA)]
    if token_deltas:
        # PEFT keeps the listed rows' original values beside the delta, a buffer in the delta's dtype
        out.append(Component("weights.trainable_tokens_original", tensor_bytes(token_deltas),
                             f"the {token_deltas[0].shape[0]:,} trained tokens' original embedding rows, which PEFT keeps to undo a merge"))
    if copies:
        names = ", ".join(t.name.split(".modules_to_save.")[0] for t in copies)
        out.append(Component("weights.modules_to_save", tensor_bytes(copies),
                             f"PEFT's trainable copies of {names} (modules_to_save), {sum(t.numel for t in copies):,} parameters in "
                             f"{'/'.join(sorted({t.dtype for t in copies}))}, beside the frozen originals"))
    return out


def tensor_bytes(tensors: list[TrainableTensor]) -> int:
    """Their bytes, each in its dtype (a gradient is its parameter's size and dtype)."""
    return sum(t.numel * dtype_bytes(t.dtype) for t in tensors)


def _adamw(tensors: list[TrainableTensor]) -> int:
    return sum(2 * t.numel * dtype_bytes(t.dtype) + TORCH_STEP_BYTES for t in tensors)


def _adam_8bit(tensors: list[TrainableTensor]) -> int:
    total = 0
    any_quantized = False
    for t in tensors:
        if t.numel >= BNB_MIN_8BIT_SIZE:
            any_quantized = True
            total += 2 * t.numel + 2 * math.ceil(t.numel / BNB_OPTIMIZER_BLOCKSIZE) * 4
        else:
            total += 2 * t.numel * 4
    return total + (BNB_QMAP_BYTES if any_quantized else 0)


def _adafactor(tensors: list[TrainableTensor]) -> int:
    total = 0
    for t in tensors:
        if len(t.shape) >= 2:
            row = math.prod(t.shape[:-1])
            col = math.prod(t.shape[:-2]) * t.shape[-1]
            total += (row + col) * 4
        else:
            total += t.numel * 4
        total += ADAFACTOR_RMS_BYTES
    return total


def galore_targets(tensors: list[TrainableTensor], spec: ModelSpec) -> set[str]:
    """GaLore projects the 2-D weights of the Linear layers in the blocks (attention and MLP)."""
    linear_weights = {f"{lin.name}.weight" for lin in spec.linears() if lin.role != "lm_head"}
    return {t.name for t in tensors if t.name in linear_weights and len(t.shape) == 2}


def _galore(tensors: list[TrainableTensor], spec: ModelSpec, rank: int) -> int:
    projected = galore_targets(tensors, spec)
    total = 0
    for t in tensors:
        elem = dtype_bytes(t.dtype)
        if t.name in projected:
            rows, cols = t.shape
            short, long = min(rows, cols), max(rows, cols)
            r = min(rank, short)
            # For fp32 weights galore_torch keeps a slice of the SVD factor as a view, which holds
            # the whole (short x short) factor alive; other dtypes copy out just the r rows.
            projector = short * short if t.dtype == "fp32" else r * short
            # plus Adam moments of the projected gradient (long side x r)
            total += (projector + 2 * r * long) * elem
        else:
            total += 2 * t.numel * elem
    return total


def optimizer_components(spec: ModelSpec, options: TrainingOptions, trainables: list[TrainableTensor]) -> list[Component]:
    opt = options.optimizer
    mode = precision_mode(options)
    if opt == "galore" and options.method not in ("full", "freeze"):
        raise PlanInputError("optimizer", "galore projects full weight gradients; use it with method full or freeze")
    count = sum(t.numel for t in trainables)
    if mode.fp32_master_in_optimizer:
        # DeepSpeed's optimizer works on fp32 flat partitions: master copy plus fp32 state.
        master = count * 4
        state = {"adamw": 8, "adamw_foreach": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "sgd": 4 if options.sgd_momentum else 0}
        per_param = state.get(opt)
        if per_param is None:
            raise PlanInputError("optimizer", f"{opt} is not modelled under DeepSpeed mixed precision; use adamw, 8-bit adamw or sgd")
        return [
            Component("optimizer_state.master_weights", master, f"fp32 master copy of {count:,} trainable parameters ({mode.description})"),
            Component("optimizer_state", count * per_param, f"{opt} state in fp32 on the master copy"),
        ]
    if opt in ("adamw", "adamw_foreach"):
        return [
            Component(
                "optimizer_state", _adamw(trainables), "AdamW: exp_avg and exp_avg_sq in the parameter dtype, plus an fp32 step per tensor",
                replicated_bytes=TORCH_STEP_BYTES * len(trainables),
            )
        ]
    if opt in ("adamw_8bit", "paged_adamw_8bit"):
        paged = ", paged (evicted to host memory under pressure)" if opt.startswith("paged") else ""
        return [
            Component(
                "optimizer_state",
                _adam_8bit(trainables),
                f"8-bit AdamW{paged}: two uint8 states with an fp32 absmax per 256 values; tensors under 4096 values keep fp32 state",
            )
        ]
    if opt == "paged_adamw_32bit":
        return [Component("optimizer_state", sum(8 * t.numel for t in trainables), "paged 32-bit AdamW: two fp32 states per parameter, paged to host memory under pressure")]
    if opt == "adafactor":
        return [Component("optimizer_state", _adafactor(trainables), "Adafactor: factored fp32 second moments (row + column) for matrices, full for vectors; no first moment")]
    if opt == "sgd":
        if not options.sgd_momentum:
            return [Component("optimizer_state", 0, "SGD without momentum keeps no state")]
        return [Component("optimizer_state", sum(t.numel * dtype_bytes(t.dtype) for t in trainables), "SGD momentum buffer in the parameter dtype")]
    if opt == "galore":
        return [
            Component(
                "optimizer_state",
                _galore(trainables, spec, options.galore_rank),
                f"GaLore AdamW, rank {options.galore_rank}: projector and Adam moments in the low-rank space for block Linear weights, full AdamW state elsewhere",
            )
        ]
    raise PlanInputError("optimizer", f"unknown optimizer {opt!r}")  # pragma: no cover


# Options that only move activations, extra models or the GPU, never static memory.
_NOT_STATIC = frozenset({
    "batch_size", "seq_len", "gradient_checkpointing", "attention", "num_generations", "max_new_tokens", "headroom",
    "gpu", "gpu_memory_gib", "num_gpus", "offload", "stage", "trainer", "beta", "precompute_ref_log_probs",
    "use_vllm", "vllm_gpu_memory_utilization", "gradient_accumulation_steps", "loss_implementation",
    "padding", "packing", "packing_strategy", "padding_free",
    # sharding's buffers and gathers are planner/parallel.py's, on top of these unsharded states
    "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "fsdp_version", "reentrant_checkpoint_around_fsdp_unit", "use_reentrant", "steps_per_generation",
    "stage3_max_live_parameters",
})


def static_components(spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    """Weights, gradients and optimizer state, memoized per spec: a search varies batch and
    sequence length over one model and must not walk its tensors again each time."""
    key = tuple(
        (name, tuple(value) if isinstance(value, list) else value)
        for name, value in options
        if name not in _NOT_STATIC
    )
    return list(spec.memoized(("static",) + key, lambda: tuple(_static_components(spec, options))))


_LAYER_INDEX = re.compile(r"^(.*?\.\d+\.)")


def _layer_prefix(name: str) -> str | None:
    """'model.layers.3.' of 'model.layers.3.mlp.up_proj.lora_A': the name up to its first index."""
    match = _LAYER_INDEX.match(name)
    return match.group(1) if match else None


def gradient_components(spec: ModelSpec, trainables) -> list[Component]:
    """One gradient per trainable parameter, in two parts: the decoder layers', and the rest's
    (embeddings, LM head, final norm, a prompt), which exist from the LM head's backward on,
    before the layers' backward begins."""
    prefixes = spec.memoized(("layer_prefixes",), lambda: frozenset(_layer_prefix(t.name) for t in spec.tensors if t.layer is not None))
    inside, outside = [], []
    for t in trainables:
        (inside if _layer_prefix(t.name) in prefixes else outside).append(t)
    parts = (("gradients.layers", inside, "of the decoder layers"),
             ("gradients.outside_layers", outside, "outside the decoder layers (embeddings, LM head, final norm, prompt, modules_to_save copies)"))
    out = [
        Component(name, tensor_bytes(part), f"one gradient per trainable parameter {where} ({sum(t.numel for t in part):,}) in {'/'.join(sorted({t.dtype for t in part}))}")
        for name, part, where in parts
        if part
    ]
    return out or [Component("gradients.layers", 0, "no trainable parameters")]


def _static_components(spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    trainables = trainable_tensors(spec, options)
    adapters = [t for t in trainables if not t.base]
    out = weights_components(spec, options, adapters)
    out.extend(gradient_components(spec, trainables))
    out.extend(optimizer_components(spec, options, trainables))
    return out
