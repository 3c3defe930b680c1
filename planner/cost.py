"""Training time and cost: FLOPs from tokens, the GPU's throughput at a stated utilisation.

Per trained token, with N the parameters a token's matmuls touch (MoE: only its routed experts;
the embedding is a lookup, a tied lm_head is a matmul all the same) and A = 2 x layers x
heads x head_dim x sequence length (causal attention's score and value products, forward):
- forward 2N + A;
- backward 4N + 2A when the base trains (gradients for activations and weights); 2N + 2A when it
  is frozen (LoRA, QLoRA, ...: only activation gradients flow, adapters are tiny);
  `freeze` trains the last layers only, so only their share of the backward runs;
- gradient checkpointing runs the forward of every trained layer again in the backward;
- the reference model (DPO, KTO; GRPO/RLOO/PPO with a KL term) adds a forward per token; KTO
  adds the forward of its KL batch; PPO trains a value model as large as the policy and runs a
  reward model forward.
Stages that generate (GRPO, RLOO, PPO) spend most of their time decoding: each new token of a
batch reads every weight once, so a decode step takes the longer of weights / bandwidth and
2N x batch / throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from gpu_catalog.catalog import GPU, gpu_by_name
from planner.options import TrainingOptions
from planner.plan import Plan
from planner.spec import ModelSpec

DEFAULT_UTILIZATION = 0.4  # model FLOPs utilisation a tuned single-node fine-tune reaches


class Workload(BaseModel):
    """How much training: examples (prompts for the generating stages), their length, epochs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_examples: int = Field(ge=1, le=10_000_000_000)
    tokens_per_example: int | None = Field(default=None, ge=1, le=10_000_000)
    epochs: float = Field(default=1.0, gt=0, le=1000)
    utilization: float = Field(default=DEFAULT_UTILIZATION, gt=0, le=1)


@dataclass(frozen=True)
class TimeCost:
    flops: float
    training_seconds: float | None
    generation_seconds: float | None
    hours: float | None
    dollars: float | None
    gpu_name: str
    num_gpus: int
    tflops_per_gpu: float | None
    utilization: float
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "flops": self.flops,
            "hours": None if self.hours is None else round(self.hours, 3),
            "dollars": None if self.dollars is None else round(self.dollars, 2),
            "training_hours": None if self.training_seconds is None else round(self.training_seconds / 3600, 3),
            "generation_hours": None if self.generation_seconds is None else round(self.generation_seconds / 3600, 3),
            "gpu": self.gpu_name,
            "num_gpus": self.num_gpus,
            "tflops_per_gpu": self.tflops_per_gpu,
            "utilization": self.utilization,
            "notes": list(self.notes),
        }


def matmul_params_per_token(spec: ModelSpec) -> int:
    """Parameters one token's matmuls use: no embedding lookup, routed experts only, a tied
    lm_head counted as the matmul it still is."""

    def compute() -> int:
        total = 0
        for t in spec.tensors:
            if t.role == "embedding" or t.role == "norm":
                continue
            if t.role == "expert" and spec.num_experts:
                total += t.numel * spec.experts_per_token // spec.num_experts
            else:
                total += t.numel
        if spec.tie_word_embeddings:
            total += spec.vocab_size * spec.hidden_size
        return total

    return spec.memoized(("matmul_params",), compute)


def training_flops_per_token(spec: ModelSpec, options: TrainingOptions, sequence_tokens: int) -> float:
    n = matmul_params_per_token(spec)
    attention = 2 * spec.num_layers * spec.num_attention_heads * spec.head_dim * sequence_tokens
    forward = 2 * n + attention
    if options.method == "full":
        trained_share, backward = 1.0, 4 * n + 2 * attention
    elif options.method == "freeze":
        trained_share = min(options.freeze_trainable_layers, spec.num_layers) / spec.num_layers
        backward = trained_share * (4 * n + 2 * attention)
    else:
        trained_share, backward = 1.0, 2 * n + 2 * attention
    recompute = trained_share * forward if options.gradient_checkpointing else 0
    extra_forwards = 0
    if options.stage in ("dpo", "kto") and not options.precompute_ref_log_probs:
        extra_forwards += 1  # reference log-probs (a copy, or the base with the adapter disabled)
    if options.stage == "kto":
        extra_forwards += 2  # the KL batch through the policy and the reference
    if options.stage in ("grpo", "rloo", "ppo") and options.effective_beta > 0:
        extra_forwards += 1
    if options.stage == "rloo":
        extra_forwards += 1  # old log-probs, a no-grad pass
    per_token = forward + backward + recompute + extra_forwards * forward
    if options.stage == "ppo":
        per_token += forward + backward + recompute + forward  # value model trained, reward model forward
    return per_token


def estimate_time_cost(spec: ModelSpec, plan: Plan, workload: Workload, gpu: GPU | None = None) -> TimeCost:
    options = plan.options
    gpu = gpu or gpu_by_name(plan.gpu.name)
    notes: list[str] = []
    tokens_each = workload.tokens_per_example or options.seq_len
    if workload.tokens_per_example is None:
        notes.append(f"each example taken as {tokens_each:,} tokens (the sequence length); give tokens_per_example for a closer figure")
    sequences = workload.num_examples * workload.epochs
    if options.stage in ("dpo", "orpo", "simpo", "reward"):
        sequences *= 2  # chosen and rejected
    completions = 0.0
    if options.generates:
        completions = sequences * options.num_generations
        sequence_tokens = tokens_each + options.max_new_tokens
        sequences = completions
        notes.append(f"{options.num_generations} completions of {options.max_new_tokens:,} new tokens per prompt")
    else:
        sequence_tokens = tokens_each
    flops = sequences * sequence_tokens * training_flops_per_token(spec, options, sequence_tokens)

    peak_tflops = None
    if gpu is not None and gpu.bf16_tflops_dense:
        peak_tflops = gpu.bf16_tflops_dense if options.precision != "fp32" else gpu.bf16_tflops_dense / 2
        if options.precision == "fp32":
            notes.append("fp32 compute runs at TF32 rate, taken as half the bf16 rate")
        if not gpu.bf16:
            notes.append(f"{gpu.name} has no bf16: its fp16 tensor rate is used")
    if peak_tflops is None:
        notes.append("no throughput figure for this GPU: time and cost need a catalog GPU")
        return TimeCost(flops, None, None, None, None, plan.gpu.name, plan.gpu.count, None, workload.utilization, tuple(notes))

    per_gpu_rate = peak_tflops * 1e12 * workload.utilization
    training_seconds = flops / (per_gpu_rate * plan.gpu.count)
    generation_seconds = 0.0
    if options.generates and completions:
        generation_seconds = _decode_seconds(spec, plan, gpu, completions, per_gpu_rate)
        notes.append(f"decoding {completions:,.0f} completions takes {generation_seconds / 3600:.2f} h of it")
    if options.method == "qlora":
        notes.append("QLoRA dequantizes each 4-bit weight per matmul: expect it somewhat slower than this")
    if plan.gpu.count > 1:
        notes.append(f"{plan.gpu.count} GPUs assumed to scale linearly")
    seconds = training_seconds + generation_seconds
    hours = seconds / 3600
    dollars = hours * gpu.price_per_hour_usd * plan.gpu.count if gpu.price_per_hour_usd is not None else None
    if dollars is None:
        notes.append(f"no public hourly price for {gpu.name}")
    notes.insert(0, f"{flops:.3g} FLOPs at {workload.utilization:.0%} of {peak_tflops:g} TFLOP/s per GPU")
    return TimeCost(flops, training_seconds, generation_seconds, hours, dollars, gpu.name, plan.gpu.count, peak_tflops, workload.utilization, tuple(notes))


def _decode_seconds(spec: ModelSpec, plan: Plan, gpu: GPU, completions: float, per_gpu_rate: float) -> float:
    options = plan.options
    weight_bytes = sum(c.bytes for c in plan.all_components if c.family == "weights")
    batch = options.batch_size
    step_compute = 2 * matmul_params_per_token(spec) * batch / per_gpu_rate
    step_memory = weight_bytes / (gpu.memory_bandwidth_gbs * 1e9) if gpu.memory_bandwidth_gbs else 0.0
    batches = math.ceil(completions / (batch * plan.gpu.count))
    return batches * options.max_new_tokens * max(step_compute, step_memory)

