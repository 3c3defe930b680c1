"""build_plan: ModelSpec + TrainingOptions -> Plan, the one object every shell shows.

The peak is taken over the phases of a training step, because not everything is alive at once:
- `generation` (GRPO, RLOO, PPO): the rollout's KV cache, before the training forward;
- `forward_end` (DoRA): every saved activation and the last adapted Linear's DoRA temporaries,
  before the loss exists;
- `backward_start`: optimizer state (from step 2 on) and every saved activation, with the loss
  backward's buffers, but no gradients yet (they are freed before each forward). Under
  checkpointing no layer is recomputed yet: the last layer's recomputation begins once the loss
  backward has freed its buffers (14 checkpointed H100 runs were 2.5-12.5% over in allocated
  memory with it counted here, -3.3% to +2.3% without);
- `backward_layers`: the last decoder layer's backward, right after the loss's: every saved
  activation (or the checkpoints and the layer recomputed) and the gradients that layer's
  backward holds at once, with the gradients outside the layers (LM head, embeddings, final
  norm), produced just before;
- `recompute_forward` (DoRA): the same, while the first layer's forward is recomputed with its
  DoRA temporaries, before its backward's gradients exist;
- `backward_end`: all gradients, with the first layer's checkpointed input (the others are freed by
  then), that layer recomputed and its backward's gradients;
- `optimizer_step`: gradients and optimizer state, activations freed.
The plan's components are those of the phase with the highest total, so they sum to the peak.

That peak is the central figure: what a card with room to spare reserves. Around it a plan
carries a band, `peak_low_bytes` to `peak_high_bytes`, from the calibration's leave-one-out errors
(planner/runtime.py). A smaller card can still run the step: before it raises out of memory, the
allocator releases its cached segments and retries, so a simulated step also gives the least
memory it runs in (`runs_within_*`: the peak less `allocator_release_bytes`). The verdict asks
whether the step runs: "fits" when even the high end of that is within the usable memory, "tight"
when the usable memory falls inside the band, "does not fit" when it is below the low end. Errors are
not symmetric: an over-estimate wastes a little memory, an under-estimate is an out-of-memory
error, so `fits` is true only for "fits".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from gpu_catalog.catalog import GPU, MIB, lookup_gpu
from planner.activations import (
    activation_components,
    dora_weight_norm_bytes,
    fused_split_grad_bytes,
    layer_backward_bytes,
    peft_method_notes,
    training_tokens,
)
from planner.catalog import spec_note
from planner.components import Component
from planner.dtypes import dtype_bytes
from planner.errors import PlanInputError
from planner.hardware import apply_hardware_rules
from planner.logits import logits_components
from planner.options import TrainingOptions, check_consistency
from planner.parallel import SHARDS_OPTIMIZER, fsdp1_held_layer_inputs, fsdp_assumption, per_gpu_static
from planner.precision import precision_mode
from planner.runtime import (
    band_bytes,
    band_constants,
    calibration,
    reserve_inputs,
    runtime_components,
    simulated_runtime_components,
    step_gradients_bytes,
)
from planner.spec import ModelSpec
from planner.stages import stage_components
from planner.static_memory import static_components
from planner.step_trace import (
    SimulatedStep,
    model_unsupported_reason,
    simulated_for,
    simulation_memoized,
    unsupported_reason,
)
from planner.trainable import TOKEN_DELTA, fused_expert_dropout, input_embedding, parameter_counts, trainable_tensors
from planner.versions import MODELLED_VERSIONS

GIB = 1 << 30
DEFAULT_GPU = "H100"

# Defaults worth telling the user about when they were not given.
_ANNOUNCED_DEFAULTS = ("method", "stage", "batch_size", "seq_len", "precision", "optimizer", "gradient_checkpointing", "trainer", "attention")

# Which component families are alive in each phase (prefix match on the name).
PHASES = {
    "generation": ("weights", "optimizer_state", "gradients.ddp_buckets", "temporary.dequantized_layer", "temporary.generation_prefill",
                   "reference_model", "reward_model", "value_model", "kv_cache", "runtime"),
    # the end of the forward: every activation saved, the last adapted Linear's DoRA temporaries
    # alive, the loss not yet computed
    "forward_end": ("weights", "optimizer_state", "activations", "temporary.autocast_cache", "temporary.dequantized_layer",
                    "temporary.dora_weight_norm", "temporary.gathered_params", "gradients.ddp_buckets",
                    "reference_model", "reward_model", "value_model", "kv_cache.vllm", "runtime"),
    "backward_start": ("weights", "optimizer_state", "activations.layers", "activations.checkpoints", "activations.first_layer_input",
                       "activations.outside_layers",
                       "logits", "temporary.loss_backward", "temporary.autocast_cache", "temporary.dequantized_layer",
                       "temporary.gathered_params", "gradients.ddp_buckets",
                       "reference_model", "reward_model", "value_model", "kv_cache.vllm", "runtime"),
    "backward_layers": ("weights", "optimizer_state", "gradients.outside_layers", "activations", "temporary.layer_backward", "temporary.fused_split_grad",
                        "temporary.reentrant_input_grad",
                        "temporary.autocast_cache", "temporary.dequantized_layer", "temporary.gathered_params", "gradients.ddp_buckets",
                        "reference_model", "reward_model", "value_model", "kv_cache.vllm", "runtime"),
    # DoRA under checkpointing: the first layer's recomputed forward, its weight-norm temporaries
    # alive before that layer's backward begins
    "recompute_forward": ("weights", "optimizer_state", "gradients", "activations.first_layer_input", "activations.recompute",
                          "temporary.dequantized_layer", "temporary.dora_weight_norm", "temporary.gathered_params", "temporary.held_layer_inputs",
                          "temporary.reentrant_input_grad",
                          "reference_model", "reward_model", "value_model", "kv_cache.vllm", "runtime"),
    "backward_end": ("weights", "optimizer_state", "gradients", "activations.first_layer_input", "activations.recompute",
                     "temporary.layer_backward", "temporary.fused_split_grad", "temporary.trainable_tokens", "temporary.held_layer_inputs",
                     "temporary.reentrant_input_grad",
                     "temporary.dequantized_layer", "temporary.gathered_params",
                     "reference_model", "reward_model", "value_model", "kv_cache.vllm", "runtime"),
    "optimizer_step": ("weights", "optimizer_state", "gradients", "temporary.gathered_params", "temporary.optimizer_step",
                       "reference_model", "reward_model", "value_model", "kv_cache.vllm", "runtime"),
}


# With gradient accumulation the gradients are set to None only after the optimizer step, so from
# the second micro-batch on every gradient of the previous ones is alive through these phases
ACCUMULATING_PHASES = ("forward_end", "backward_start", "backward_layers")


# A sharded run's buffers (planner/parallel.py): "sharding" (NCCL's, ZeRO-3's kept ones) in every
# phase; FSDP2's root and all-gather copy while parameters are in use; the gradient reduction's
# buckets and unsharded gradients in backward; ZeRO-1/2's fp32 gradient partition at the step
_GATHERING = ("sharding", "temporary.gathered_root", "temporary.gather_copy")
SHARDED_PHASES = {
    "generation": ("sharding",),
    "forward_end": _GATHERING,
    "backward_start": _GATHERING,
    "backward_layers": _GATHERING + ("temporary.grad_reduce",),
    "recompute_forward": _GATHERING + ("temporary.grad_reduce",),
    "backward_end": _GATHERING + ("temporary.grad_reduce",),
    "optimizer_step": ("sharding", "temporary.zero_step"),
}


def _phases(options: TrainingOptions) -> dict[str, tuple[str, ...]]:
    phases = {phase: families + SHARDED_PHASES[phase] for phase, families in PHASES.items()}
    if options.gradient_accumulation_steps <= 1:
        return phases
    return {phase: families + ("gradients",) if phase in ACCUMULATING_PHASES else families for phase, families in phases.items()}


@dataclass(frozen=True)
class GpuTarget:
    name: str
    memory_bytes: int
    count: int
    compute_capability: str | None = None  # unknown for a custom memory size
    vendor: str | None = None  # None for a custom memory size
    # gpu_memory_gib was given: the memory is the user's, the name (if any) only the hardware's
    custom_memory: bool = False

    @property
    def label(self) -> str:
        """What the verdict is against, as a user reads it: a named GPU with a custom memory size
        says so, so "usable on H100" never stands for 20 GiB."""
        if not self.custom_memory:
            return self.name
        size = f"{self.memory_bytes / GIB:g} GiB"
        return size if self.name == "custom" else f"{self.name} with {size} (gpu_memory_gib)"


@dataclass(frozen=True)
class Plan:
    model_name: str
    params: dict[str, int]
    gpu: GpuTarget
    components: tuple[Component, ...]  # the peak phase's components
    all_components: tuple[Component, ...]  # every component of every phase (runtime at the peak's size)
    options: TrainingOptions
    precision_mode: str
    peak_phase: str
    phase_totals: dict[str, int]
    assumptions: tuple[str, ...] = field(default=())
    # where the allocator's reserve came from: the calibrated "formula", or "simulated" (step_trace)
    reserve_source: str = "formula"
    # the model can be traced (not a mixture of experts): with supported options, it could be simulated
    model_traceable: bool = True
    # added to the band's high end for simulated parts no GPU run has checked (unmeasured_parts)
    unmeasured_allowance_bytes: int = 0
    # what the allocator gives back on a card too small for its reserved peak, releasing its cached
    # segments and retrying before it would run out of memory (the simulated step's replay)
    allocator_release_bytes: int = 0
    # how this plan's trace was had (seconds, read from the trace cache): not the plan's content, so
    # two doors that traced the same step at different times give the same plan beside it
    trace: dict | None = None

    @property
    def peak_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu.memory_bytes * (1 - self.options.headroom))

    @cached_property
    def _band(self) -> tuple[int, int]:
        return band_bytes(self.components, simulated=self.band_source == "simulated", gradients_bytes=step_gradients_bytes(self.all_components),
                          allowance_bytes=self.unmeasured_allowance_bytes)

    @property
    def peak_low_bytes(self) -> int:
        """The band's low end: the central peak less the calibration's largest over-prediction."""
        return self._band[0]

    @property
    def peak_high_bytes(self) -> int:
        """The band's high end: the central peak plus the calibration's largest under-prediction."""
        return self._band[1]

    @property
    def band_source(self) -> str:
        """Whose errors the band comes from: the simulation's, or the formula's."""
        return "simulated" if self.reserve_source == "simulated" else "formula"

    @property
    def unmeasured_parts(self) -> list[str]:
        return unmeasured_parts(self.reserve_source, self.options)

    @property
    def could_simulate(self) -> bool:
        """The formula gave the reserve, and the trace could simulate it for a narrower band."""
        return self.reserve_source == "formula" and self.model_traceable and unsupported_reason(self.options) is None

    @property
    def runs_within_bytes(self) -> int:
        """The least memory the step runs in: the peak a larger card shows, less what the allocator
        releases and retries with where the driver has no more."""
        return self.peak_bytes - self.allocator_release_bytes

    @property
    def runs_within_low_bytes(self) -> int:
        return self.peak_low_bytes - self.allocator_release_bytes

    @property
    def runs_within_high_bytes(self) -> int:
        return self.peak_high_bytes - self.allocator_release_bytes

    @property
    def verdict(self) -> str:
        """Does the step run within the usable memory: "fits" (the high end of the least memory it
        runs in is within it), "tight" (the usable memory falls inside that band) or "does not
        fit" (it is below the low end). Without a simulated step that is the reserved peak's band."""
        if self.runs_within_high_bytes <= self.usable_bytes:
            return "fits"
        if self.runs_within_low_bytes <= self.usable_bytes:
            return "tight"
        return "does not fit"

    @property
    def fits(self) -> bool:
        """Only when the high end fits: a tight plan is not said to fit."""
        return self.verdict == "fits"

    def check_dict(self) -> dict:
        """The short answer (`vramplan check --json`, POST /api/v1/check): one shape for both."""
        return {
            "fits": self.fits,
            "verdict": self.verdict,
            "peak_bytes": self.peak_bytes,
            "peak_low_bytes": self.peak_low_bytes,
            "peak_high_bytes": self.peak_high_bytes,
            "usable_bytes": self.usable_bytes,
            "headroom_bytes": self.usable_bytes - self.peak_bytes,
            "gpu": {"name": self.gpu.name, "label": self.gpu.label, "memory_bytes": self.gpu.memory_bytes, "count": self.gpu.count},
            "model": self.model_name,
            "reserve_source": self.reserve_source,
            "band_source": self.band_source,
            "unmeasured_parts": self.unmeasured_parts,
            "unmeasured_allowance_bytes": self.unmeasured_allowance_bytes,
            **self._runs_within_dict(),
        }

    def _runs_within_dict(self) -> dict:
        return {
            "runs_within_bytes": self.runs_within_bytes,
            "runs_within_low_bytes": self.runs_within_low_bytes,
            "runs_within_high_bytes": self.runs_within_high_bytes,
            "allocator_release_bytes": self.allocator_release_bytes,
        }

    def to_dict(self) -> dict:
        return {
            "model": {"name": self.model_name, "params": dict(self.params)},
            "gpu": {"name": self.gpu.name, "label": self.gpu.label, "memory_bytes": self.gpu.memory_bytes, "count": self.gpu.count},
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3),
            "peak_low_bytes": self.peak_low_bytes,
            "peak_high_bytes": self.peak_high_bytes,
            "peak_phase": self.peak_phase,
            "phase_totals": dict(self.phase_totals),
            "usable_bytes": self.usable_bytes,
            "headroom_bytes": self.usable_bytes - self.peak_bytes,
            "fits": self.fits,
            "verdict": self.verdict,
            "precision_mode": self.precision_mode,
            "components": [{"name": c.name, "bytes": c.bytes, "note": c.note} for c in self.components],
            "all_components": [{"name": c.name, "bytes": c.bytes, "note": c.note} for c in self.all_components],
            "assumptions": list(self.assumptions),
            "options": self.options.model_dump(mode="json"),
            "library_versions": dict(MODELLED_VERSIONS),
            "calibration": calibration().name,
            "reserve_source": self.reserve_source,
            "band_source": self.band_source,
            "unmeasured_parts": self.unmeasured_parts,
            "unmeasured_allowance_bytes": self.unmeasured_allowance_bytes,
            "could_simulate": self.could_simulate,
            **self._runs_within_dict(),
            "trace": self.trace,
        }


def resolve_gpu(options: TrainingOptions) -> tuple[GpuTarget, list[str]]:
    notes: list[str] = []
    if options.gpu_memory_gib is not None:
        name = options.gpu or "custom"
        if options.gpu:
            notes.append(f"planned against gpu_memory_gib {options.gpu_memory_gib:g} GiB, not {options.gpu}'s own memory")
        return GpuTarget(name, int(options.gpu_memory_gib * GIB), options.num_gpus, custom_memory=True), notes
    if options.gpu is not None and options.gpu.strip().lower() == "auto":
        from gpu_catalog.detect import detect

        found = detect()
        if not found.gpus:
            raise PlanInputError("gpu", f"auto: {found.reason}; name a GPU (e.g. 'RTX 4090') or give gpu_memory_gib")
        first = found.gpus[0]
        count = options.num_gpus if "num_gpus" in options.model_fields_set else len(found.gpus)
        notes.append(
            f"GPU detected by NVML: {first.name}, planned against the {first.free_bytes / GIB:.2f} GiB free now "
            f"of {first.total_bytes / GIB:.2f} GiB"
        )
        return GpuTarget(first.name, first.free_bytes, count, first.compute_capability, "nvidia"), notes
    match = lookup_gpu(options.gpu or DEFAULT_GPU)
    gpu: GPU = match.gpu
    if options.gpu is None:
        notes.append(f"GPU {gpu.name} ({gpu.memory_mib:,} MiB), not given")
    elif match.note:
        notes.append(match.note)
    return GpuTarget(gpu.name, gpu.memory_mib * MIB, options.num_gpus, gpu.compute_capability, gpu.vendor), notes


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
    if options.trainer == "trl" and options.weights_dtype is None:
        out.append(f"TRL loads a model given by name in float32 unless model_init_kwargs sets dtype; planned for dtype={options.effective_weights_dtype} passed by the launcher")
    if options.precision != "fp32":
        if options.effective_autocast:
            out.append(f"the forward runs under {options.precision} autocast, as the transformers Trainer, TRL and accelerate run it"
                       + ("; a plain loop over 16-bit weights without it is autocast false" if "autocast" not in given else ""))
        else:
            out.append(f"no autocast: a plain loop over {options.effective_weights_dtype} weights (PEFT's fp32 adapters save fp32 copies of their inputs)")
    if options.prepare_model_for_kbit_training and options.effective_quantization == "none":
        # a search or the advice compares unquantized methods with the same options: planned as asked, and said
        out.append("prepare_model_for_kbit_training is for a quantized base and changes nothing planned here; on this unquantized "
                   f"base PEFT's function would cast every {options.effective_weights_dtype} weight to fp32: plan that as weights_dtype fp32")
    if options.effective_quantization != "none":
        if options.prepare_model_for_kbit_training:
            out.append("PEFT's prepare_model_for_kbit_training casts the unquantized weights (embeddings, lm_head, norms) to fp32, so the "
                       "residual stream, every checkpointed layer input and the quantized layers' outputs are fp32 too")
        else:
            out.append("the unquantized weights stay in " + options.effective_weights_dtype + ", as TRL 1.16's SFT, DPO and GRPO trainers "
                       "leave them; a script that calls PEFT's prepare_model_for_kbit_training (QLoRA tutorials, older TRL releases' SFTTrainer, "
                       "trl.experimental's ORPO and CPO) upcasts them and the residual stream to fp32: set prepare_model_for_kbit_training")
    if options.gradient_accumulation_steps > 1:
        out.append(f"gradient accumulation {options.gradient_accumulation_steps}: from the second micro-batch on, the gradients of the "
                   "previous ones stay allocated through the forward and backward (they are freed after the optimizer step)")
    if options.generates:
        out.append(f"{options.stage}: seq len {options.seq_len} is the prompt; {options.max_new_tokens} new tokens per completion")
    return out


def _optimizer_step_temporary(spec: ModelSpec, options: TrainingOptions) -> Component:
    """Fused and 8-bit AdamW update in place; the per-tensor loops of Adafactor and GaLore build
    fp32 temporaries the size of the tensor being updated (two at a time for the largest)."""
    if options.optimizer in ("adafactor", "galore"):
        largest = max((t.numel for t in trainable_tensors(spec, options)), default=0)
        return Component("temporary.optimizer_step", 2 * largest * 4, f"{options.optimizer} updates one tensor at a time through fp32 temporaries of its size")
    if options.optimizer == "adamw_foreach":
        # torch's multi-tensor AdamW (its default on CUDA without fused=True; transformers' adamw_torch)
        # takes the square root of every exp_avg_sq at once: one more buffer the size of that state
        sqrt_bytes = sum(t.numel * dtype_bytes(t.dtype) for t in trainable_tensors(spec, options))
        if options.offload in ("optimizer", "params"):
            return Component("temporary.optimizer_step", 0, "multi-tensor AdamW steps on the host with the offloaded state")
        if options.parallelism in SHARDS_OPTIMIZER and options.num_gpus > 1:
            # each rank steps its own shard of the state, so the buffer is a shard's size
            return Component("temporary.optimizer_step", math.ceil(sqrt_bytes / options.num_gpus),
                             f"multi-tensor (foreach) AdamW: sqrt(exp_avg_sq) of this GPU's 1/{options.num_gpus} of the state at once")
        return Component("temporary.optimizer_step", sqrt_bytes, "multi-tensor (foreach) AdamW: sqrt(exp_avg_sq) of every trainable tensor at once")
    return Component("temporary.optimizer_step", 0, f"{options.optimizer} updates in place (fused or in-kernel): no step temporaries")


def _temporaries(spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    out = [_optimizer_step_temporary(spec, options)]
    mode = precision_mode(options)
    if mode.name == "autocast" and options.method in ("full", "freeze"):
        linear = sum(t.numel for t in spec.tensors if t.peft_linear and t.is_weight)
        out.append(
            Component(
                "temporary.autocast_cache",
                linear * dtype_bytes(options.precision),
                f"autocast caches a {options.precision} copy of every trained Linear weight for the step",
            )
        )
    out.append(
        Component(
            "temporary.layer_backward",
            layer_backward_bytes(spec, options),
            "the gradients one decoder layer's backward holds at once (its MLP and attention inputs and outputs; measured on CPU)",
        )
    )
    fused_bytes = fused_split_grad_bytes(spec, options)
    if fused_bytes:
        out.append(
            Component(
                "temporary.fused_split_grad",
                fused_bytes,
                "a fused projection (qkv or gate_up) gathers the gradients of its split outputs into one buffer of its output size in backward (measured on CPU)",
            )
        )
    if any(t.name.endswith(TOKEN_DELTA) for t in trainable_tensors(spec, options)):
        out.append(
            Component(
                "temporary.trainable_tokens",
                input_embedding(spec).numel * dtype_bytes(options.embedding_dtype),
                "PEFT's trainable tokens: a copy of the whole embedding matrix with the trained rows written in, made by the embedding's "
                "forward, and its dense gradient in backward before the rows are picked out (measured on CPU)",
            )
        )
    dora_bytes = dora_weight_norm_bytes(spec, options)
    if dora_bytes:
        out.append(
            Component(
                "temporary.dora_weight_norm",
                dora_bytes,
                "DoRA's forward for the largest adapted Linear: fp32 identity, weight-sized copies for the norm and token x out scaling temporaries, freed after (measured on CPU)",
            )
        )
    if options.effective_quantization in ("nf4", "fp4", "int8"):
        largest = spec.memoized(("largest_quantizable",), lambda: max((t.numel for t in spec.tensors if t.quantizable), default=0))
        out.append(
            Component(
                "temporary.dequantized_layer",
                largest * dtype_bytes(options.precision),
                f"the largest quantized Linear dequantized to {options.precision} for its matmul",
            )
        )
    return out


def _unquantized_experts_note(spec: ModelSpec, options: TrainingOptions) -> str | None:
    """A quantized MoE base whose fused expert parameters bitsandbytes does not quantize."""
    if options.effective_quantization == "none":
        return None
    experts = sum(t.numel for t in spec.tensors if t.role == "expert" and not t.quantizable)
    if not experts:
        return None
    return (f"the experts ({experts / 1e9:.1f} B parameters) are fused 3-D parameters in transformers 5, which bitsandbytes' "
            f"{options.effective_quantization} loading (nn.Linear layers only) leaves in {options.effective_weights_dtype}: most of this "
            "model's weights stay unquantized (under transformers 4 each expert's Linear layers were quantized)")


def _fused_head_buffers(simulated: SimulatedStep, components: list[Component]) -> int:
    # the fused head's whole backward buffers, as if the trace had missed them
    return sum(c.bytes for c in components if c.name == "temporary.loss_backward")


def _default_allocator_beyond(simulated: SimulatedStep, components: list[Component]) -> int:
    return max(0, simulated.default_peaks.peak_reserved - simulated.peaks.peak_reserved) if simulated.default_peaks else 0


def _paged_states_in_pool(simulated: SimulatedStep, components: list[Component]) -> int:
    if simulated.in_pool_peaks is None:
        return 0
    return max(0, simulated.in_pool_peaks.peak_reserved - simulated.peaks.peak_reserved - simulated.outside_allocator_bytes)


def _generation_cache(simulated: SimulatedStep, components: list[Component]) -> int:
    # the cache once more, as if none of the blocks its growth frees were reused
    return sum(c.bytes for c in components if c.name == "kv_cache")


# Parts of a simulated step no GPU run has checked yet (the simulated band was measured for the
# plain transformers loss under the default allocator): (name, applies to these options, what the
# band's high end allows for it, its bytes)
UNMEASURED_PARTS = (
    ("TRL's fused LM head", lambda options: options.effective_loss_implementation == "trl_fused",
     "the fused head's whole backward buffers, as if the trace had missed them", _fused_head_buffers),
    ("expandable segments", lambda options: options.allocator == "expandable_segments",
     "what the default allocator would reserve beyond expandable segments' model", _default_allocator_beyond),
    ("paged optimizer state", lambda options: options.optimizer.startswith("paged_"),
     "what the step would hold with the paged states in the caching allocator's pool", _paged_states_in_pool),
    ("generation's KV cache", lambda options: options.generates and not options.use_vllm,
     "the generation's KV cache once more, as if the allocator reused none of the blocks its growth frees (decode steps between "
     "the first and the last are stood in for)", _generation_cache),
)


def _sharded_qlora(options: TrainingOptions) -> bool:
    return options.num_gpus > 1 and options.parallelism in ("fsdp", "zero3") and options.effective_quantization in ("nf4", "fp4")


# Cases the plan is known to miss and cannot yet plan faithfully, found on published runs (so those
# runs' band coverage is no longer a held-out figure): (name, applies, what the high end allows, its
# bytes), whatever gave the reserve
KNOWN_GAPS = (
    ("sharded QLoRA", _sharded_qlora,
     "a published FSDP1 QLoRA run measured 13% above its plan (bench/published.py AAI-1, a 7B at 512 tokens, whose post reports "
     "3.72 GiB reserved after the FSDP wrap, before any step, against about 2.0 GiB of sharded state: blocks the initialisation leaves "
     "cached, which by a reading of its source the step's allocations on other streams do not reuse), and FMS-8 (a 70B at 2 x 4096) "
     "20% before FSDP1's held layer inputs were planned: a quarter of the central peak", lambda simulated, components: sum(c.bytes for c in components) // 4),
)
ALLOWANCE_FOR = {name: why for name, _, why, _ in UNMEASURED_PARTS + KNOWN_GAPS}
KNOWN_GAP_NAMES = frozenset(name for name, _, _, _ in KNOWN_GAPS)


def unmeasured_parts(reserve_source: str, options: TrainingOptions) -> list[str]:
    simulated = [name for name, applies, _, _ in UNMEASURED_PARTS if applies(options)] if reserve_source == "simulated" else []
    return simulated + [name for name, applies, _, _ in KNOWN_GAPS if applies(options)]


def unmeasured_allowance_bytes(simulated: SimulatedStep | None, options: TrainingOptions, components: list[Component],
                               peak_components: list[Component]) -> int:
    """What the band's high end adds for the unmeasured parts of a simulated step, from all its
    components (for a 13B QLoRA at 2 x 4096 tokens under TRL, 0.41 GiB: 2.4% of the central figure;
    its band is 12.8% of the central figure wide, the formula's 21.8%), and for the known gaps of
    any plan, from its peak phase's."""
    parts = sum(allowance(simulated, components) for _, applies, _, allowance in UNMEASURED_PARTS if applies(options)) if simulated is not None else 0
    return parts + sum(allowance(simulated, peak_components) for _, applies, _, allowance in KNOWN_GAPS if applies(options))


def _band_note(components: list[Component], simulated: bool, gradients_bytes: int, unmeasured: list[str] = (), allowance_bytes: int = 0) -> str:
    cal = calibration()
    if cal.band_runs == 0:
        return f"no band around the peak: calibration {cal.name} carries none (run bench/calibrate.py); the verdict uses the central figure"
    band_low, band_high, gradients_share = band_constants(cal, simulated)
    source = (f"the simulated reserve's largest errors on {cal.simulated_band_runs} measured runs" if simulated and cal.simulated_band_runs
              else f"the largest errors of calibration {cal.name} on {cal.band_runs} measured runs, each predicted by a fit that left it out")
    low, high = band_bytes(components, cal, simulated, gradients_bytes, allowance_bytes)
    gradients = (f" plus {gradients_share:.0%} of the gradients ({gradients_bytes / GIB:.2f} GiB, which fragment the allocator's pool)"
                 if gradients_share and gradients_bytes >= GIB // 16 else "")
    gaps = [part for part in unmeasured if part in KNOWN_GAP_NAMES]
    simulated_parts = [part for part in unmeasured if part not in KNOWN_GAP_NAMES]
    allowance = (f" plus {allowance_bytes / GIB:.2f} GiB for " + " and ".join(
        ([f"{' and '.join(simulated_parts)}, simulated from the code and not yet checked against a GPU run "
          f"({'; '.join(ALLOWANCE_FOR[part] for part in simulated_parts)})"] if simulated_parts else [])
        + [f"{part}, not planned faithfully ({ALLOWANCE_FOR[part]})" for part in gaps]) if unmeasured else "")
    return (f"band {low / GIB:.2f} to {high / GIB:.2f} GiB around the central {sum(c.bytes for c in components) / GIB:.2f} GiB: "
            f"activations, logits, temporaries and the allocator's reserve up to {band_high:.0%} more{gradients}{allowance}, the whole up to "
            f"{-band_low:.0%} less (never below the exact weights, gradients and optimizer state), {source}; "
            "the verdict uses the high end")


def _on_hardware(options: TrainingOptions) -> tuple[TrainingOptions, GpuTarget, list[str]]:
    """The options as the GPU changes them (precision, attention), the GPU, and notes saying so."""
    check_consistency(options)
    gpu, gpu_notes = resolve_gpu(options)
    options, hardware_notes = apply_hardware_rules(options, gpu.name, gpu.compute_capability, gpu.vendor)
    return options, gpu, gpu_notes + hardware_notes


def plan_is_quick(spec: ModelSpec, options: TrainingOptions, config: dict | None = None) -> bool:
    """build_plan will not trace a step: no simulation asked, or it is memoized (or refused at
    once). Raises what build_plan raises for options it refuses."""
    if not options.simulate_allocator:
        return True
    return simulation_memoized(spec, _on_hardware(options)[0], config)


def build_plan(spec: ModelSpec, options: TrainingOptions, config: dict | None = None, tracer=None) -> Plan:
    """`config`, the dict the spec was built from, lets a run other than a catalog model's be
    traced when `simulate_allocator` asks; `tracer` traces in place of step_trace.simulate_step."""
    options, gpu, gpu_notes = _on_hardware(options)
    options, model_notes = fused_expert_dropout(spec, options)
    gpu_notes = gpu_notes + model_notes
    static = static_components(spec, options)
    per_gpu = per_gpu_static(static, spec, options)
    trained_static = sum(c.bytes for c in per_gpu if c.family in ("weights", "gradients", "optimizer_state"))
    extras, stage_notes = stage_components(spec, options, [c for c in per_gpu if c.family == "weights"], trained_static, gpu.memory_bytes)
    tokens = training_tokens(options)
    dynamic = activation_components(spec, options) + logits_components(spec, options, tokens) + _temporaries(spec, options)
    held, held_note = fsdp1_held_layer_inputs(options, dynamic)
    everything = per_gpu + extras + dynamic + held

    tensors_by_phase: dict[str, list[Component]] = {}
    for phase, families in _phases(options).items():
        if phase == "generation" and not any(c.name == "kv_cache" for c in everything):
            continue
        if phase in ("forward_end", "recompute_forward") and not any(c.name == "temporary.dora_weight_norm" for c in everything):
            continue  # without DoRA's forward temporaries, the start of backward holds more
        tensors_by_phase[phase] = [c for c in everything if any(c.name == f or c.name.startswith(f + ".") for f in families)]
    simulated = simulated_for(spec, options, config, tracer) if options.simulate_allocator else None
    if isinstance(simulated, SimulatedStep):
        tensors_at_peak = max(sum(c.bytes for c in members) for members in tensors_by_phase.values())
        peaks = simulated.peaks
        # colocated vLLM's reservation is not in the traced step (it generates in its own memory)
        untraced = sum(c.bytes for c in everything if c.name == "kv_cache.vllm")
        runtime = simulated_runtime_components(peaks.peak_reserved, tensors_at_peak, peaks.allocations, simulated.steps,
                                               outside_allocator_bytes=simulated.outside_allocator_bytes + untraced)
    else:
        # the allocator's reserve is the step's, whichever phase peaks: it keeps what it cached
        runtime = runtime_components(*reserve_inputs(everything), allocator=options.allocator)
    phases = {phase: members + runtime for phase, members in tensors_by_phase.items()}
    totals = {phase: sum(c.bytes for c in members) for phase, members in phases.items()}
    peak_phase = max(totals, key=totals.get)

    assumptions = _assumptions(options) + gpu_notes + stage_notes + peft_method_notes(spec, options)
    sharding_note = fsdp_assumption(options)
    if sharding_note:
        assumptions.append(sharding_note)
    if held_note:
        assumptions.append(held_note)
    experts_note = _unquantized_experts_note(spec, options)
    if experts_note:
        assumptions.append(experts_note)
    variant_note = spec_note(spec)
    if variant_note:
        assumptions.insert(0, variant_note)
    if spec.assumed_sizes:
        assumptions.insert(0, f"the config does not give {', '.join(spec.assumed_sizes)}: planned with transformers' {spec.model_type} defaults")
    if spec.attn_softcap and options.attention != "eager":
        assumptions.append(f"{spec.model_type} soft-caps attention scores, which SDPA cannot do: planned with eager attention")
    allocator_name = "caching allocator with expandable_segments:True" if options.allocator == "expandable_segments" else "default caching allocator"
    if isinstance(simulated, SimulatedStep):
        template = f"; replayed from vramplan's shipped trace template, recorded with {simulated.recorded_with}" if simulated.from_template else ""
        assumptions.append(f"PyTorch's {allocator_name} (PYTORCH_CUDA_ALLOC_CONF), simulated over this run's allocations traced on the meta device "
                           f"({simulated.peaks.allocations:,} in {simulated.steps} steps{template}); CUDA context from calibration {calibration().name}")
    else:
        why_not = f"; no simulation: {simulated}" if isinstance(simulated, str) else ""
        assumptions.append(f"PyTorch's {allocator_name} (PYTORCH_CUDA_ALLOC_CONF), reserve and CUDA context from calibration {calibration().name}{why_not}")
    reserve_source = "simulated" if isinstance(simulated, SimulatedStep) else "formula"
    unmeasured = unmeasured_parts(reserve_source, options)
    allowance = unmeasured_allowance_bytes(simulated if isinstance(simulated, SimulatedStep) else None, options, everything, phases[peak_phase])
    assumptions.append(_band_note(phases[peak_phase], reserve_source == "simulated", step_gradients_bytes(everything), unmeasured, allowance))
    assumptions.append(f"peak during {peak_phase.replace('_', ' ')}; totals by phase (GiB): " + ", ".join(f"{k.replace('_', ' ')} {v / GIB:.2f}" for k, v in totals.items()))
    release = 0
    if isinstance(simulated, SimulatedStep) and simulated.peaks.smallest_capacity is not None:
        release = max(0, simulated.peaks.peak_reserved - simulated.peaks.smallest_capacity)
        if release:
            assumptions.append(f"on a card too small for its reserved peak the allocator releases its cached segments and retries: the step "
                               f"runs in {release / GIB:.2f} GiB less (the replay's least pool; from PyTorch's release_cached_blocks, "
                               "not yet measured on a GPU); the verdict asks whether it runs")
    return Plan(
        model_name=spec.name,
        params=parameter_counts(spec, options),
        gpu=gpu,
        components=tuple(phases[peak_phase]),
        all_components=tuple(everything) + tuple(c for c in phases[peak_phase] if c.family == "runtime"),
        options=options,
        precision_mode=precision_mode(options).name,
        peak_phase=peak_phase,
        phase_totals=totals,
        assumptions=tuple(assumptions),
        reserve_source=reserve_source,
        model_traceable=model_unsupported_reason(spec) is None,
        unmeasured_allowance_bytes=allowance,
        allocator_release_bytes=release,
        trace={"seconds": round(simulated.seconds, 2), "kept_in_trace_cache": simulated.cached,
               "from_template": simulated.from_template} if isinstance(simulated, SimulatedStep) else None,
    )
