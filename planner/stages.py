"""The extra models and buffers of alignment stages, each its own component.

- DPO and KTO keep a frozen reference model, except when the policy is a PEFT adapter (the
  reference is the same model with the adapter disabled) or reference log-probs are precomputed.
- ORPO and SimPO need no reference. Reward training is a sequence classifier on pairs.
- PPO holds policy and value models (both trained), a frozen reference and a frozen reward model,
  and a KV cache for rollouts. TRL 1.16 ships no PPO trainer (OpenRLHF and veRL run it).
- GRPO and RLOO generate `num_generations` completions per prompt: a KV cache for the generation
  batch, and a reference model only when the KL coefficient `beta` is non-zero. With colocated
  vLLM, vLLM reserves its memory fraction of the GPU up front.
"""

from __future__ import annotations

from planner.components import Component
from planner.dtypes import dtype_bytes
from planner.options import PEFT_METHODS, TrainingOptions
from planner.spec import ModelSpec


def frozen_copy_bytes(weights: list[Component]) -> int:
    """A frozen copy of the base model as loaded (quantized if the policy's base is)."""
    return sum(c.bytes for c in weights if c.name in ("weights.base", "weights.quant_constants"))


def generation_dtype(options: TrainingOptions) -> str:
    """The dtype `generate` runs in. TRL generates outside the training forward's autocast, so in
    the model's own dtype: the weights' as loaded (fp32 master weights generate in fp32), or fp32
    once prepare_model_for_kbit_training has cast the stream up (bitsandbytes' layers answer in
    their input's dtype, so the keys and values are fp32 too)."""
    return options.residual_stream_dtype


def kv_cache_bytes(spec: ModelSpec, options: TrainingOptions, sequences: int) -> int:
    # the last new token is sampled and never fed back, so the cache ends one short
    return _keys_and_values_bytes(spec, options, sequences * (options.seq_len + options.max_new_tokens - 1))


def _keys_and_values_bytes(spec: ModelSpec, options: TrainingOptions, tokens: int) -> int:
    return 2 * spec.num_layers * spec.kv_dim * dtype_bytes(generation_dtype(options)) * tokens


def needs_reference(options: TrainingOptions) -> tuple[bool, str]:
    stage = options.stage
    if stage in ("sft", "orpo", "simpo", "reward"):
        return False, ""
    if stage in ("dpo", "kto") and options.precompute_ref_log_probs:
        return False, "reference log-probs precomputed: no reference model during training"
    if stage in ("grpo", "rloo") and options.effective_beta == 0:
        return False, f"{stage} with beta 0: no reference model"
    if options.method in PEFT_METHODS:
        return False, "policy is a PEFT adapter: the reference is the base with the adapter disabled, no copy"
    return True, f"frozen reference copy of the base model ({stage}, beta {options.effective_beta:g})"


def stage_components(spec: ModelSpec, options: TrainingOptions, weights: list[Component], trained_static: int, gpu_memory_bytes: int) -> tuple[list[Component], list[str]]:
    """(components, assumptions) a stage adds on top of the policy's own memory."""
    out: list[Component] = []
    notes: list[str] = []
    frozen = frozen_copy_bytes(weights)
    has_reference, why = needs_reference(options)
    if has_reference:
        out.append(Component("reference_model", frozen, why))
    elif why:
        notes.append(why)
    if options.stage == "ppo":
        notes.append("PPO: TRL 1.16 has no PPO trainer; this plan follows the four-model layout that OpenRLHF and veRL run")
        lm_head = sum(t.numel for t in spec.tensors if t.role == "lm_head") * dtype_bytes(options.embedding_dtype)
        out.append(Component("reward_model", max(frozen - lm_head, 0), "frozen reward model: the base with a scalar head instead of lm_head"))
        out.append(Component("value_model", trained_static, "value model trained like the policy (weights, gradients, optimizer state)"))
    if options.generates:
        if options.use_vllm:
            out.append(
                Component(
                    "kv_cache.vllm",
                    int(options.vllm_gpu_memory_utilization * gpu_memory_bytes),
                    f"colocated vLLM reserves {options.vllm_gpu_memory_utilization:.0%} of the GPU for its weights copy and KV cache",
                )
            )
        else:
            # TRL generates once for steps_per_generation micro-batches (GRPO, RLOO)
            sequences = options.batch_size * options.effective_steps_per_generation
            out.append(
                Component(
                    "kv_cache",
                    kv_cache_bytes(spec, options, sequences),
                    f"generation KV cache in {generation_dtype(options)}: {sequences} sequences x ({options.seq_len} prompt + {options.max_new_tokens} new tokens)"
                    + (f", batch_size {options.batch_size} x steps_per_generation {options.effective_steps_per_generation}"
                       if options.effective_steps_per_generation > 1 else ""),
                )
            )
            prefill = generation_prefill_bytes(spec, options, sequences)
            if prefill:
                out.append(
                    Component(
                        "temporary.generation_prefill",
                        prefill,
                        f"generate's prefill over {sequences} x {options.seq_len} prompt tokens: one layer's forward at a time under no_grad and "
                        "outside autocast (PEFT's fp32 adapters make their outputs fp32 before the cast back), bounded by what that layer "
                        "would save for backward, beside the prompt's keys and values; counted as what it adds above the full cache",
                    )
                )
    return out, notes


def generation_prefill_bytes(spec: ModelSpec, options: TrainingOptions, sequences: int) -> int:
    """What generate's prefill holds above the finished KV cache: a decoder layer's no_grad
    forward over the whole prompt batch, beside the prompt's keys and values, less the cache the
    decode steps go on to fill. TRL generates outside the training forward's autocast, so the
    layer runs in the weights' dtype and PEFT's fp32 adapters upcast their outputs. A real
    GRPOTrainer step on CPU (tests/test_trl_steps.py) peaked there, inside up_proj's LoRA forward,
    117 MB above the weights and cache for 16 x 256 prompt tokens, where the plan had counted the
    cache alone (-63%); 23 MB of that is a CPU-only copy (a bf16 + fp32 add promotes its bf16
    input to an fp32 temporary on CPU; CUDA casts inside the kernel). The bound planned here reads
    +13% on that CPU step, about +29% on the step without the CPU's copy: a safe-side estimate
    until a GPU measures one; the simulated plan traces the prefill op by op."""
    from planner.activations import activation_terms

    # what the layer would save for backward bounds what its no_grad forward holds at once (the
    # measured prefill held 82% of it)
    generating = options.model_copy(update={"autocast": False, "lora_dropout": 0.0, "precision": generation_dtype(options)})
    terms = activation_terms(spec, generating)
    prompt_tokens = sequences * options.seq_len
    layer_forward = prompt_tokens * terms.per_layer_per_token + terms.per_layer_fixed
    prompt_cache = _keys_and_values_bytes(spec, options, prompt_tokens)
    return max(0, prompt_cache + layer_forward - kv_cache_bytes(spec, options, sequences))
