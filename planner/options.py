"""TrainingOptions: the user's choices, validated once, with the field and reason on error.

Option names are the contract (docs/cli.md): CLI flags use dashes, JSON fields underscores.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from planner.errors import PlanInputError

Method = Literal["full", "lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "freeze"]
Stage = Literal["sft", "dpo", "kto", "orpo", "simpo", "reward", "rloo", "ppo", "grpo"]
Parallelism = Literal["ddp", "zero1", "zero2", "zero3", "fsdp"]
Offload = Literal["none", "optimizer", "params"]
Dtype = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_foreach", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd", "galore"]
# the optimizers bitsandbytes implements (8-bit states, paged states)
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
Attention = Literal["sdpa", "flash", "eager"]
Trainer = Literal["trl", "hf"]
# how the loss is computed from the last hidden states: auto is the trainer's own (TRL's fused LM
# head for trl, transformers' fp32-upcast loss for hf); the rest name a library's or a path's
LossImplementation = Literal["auto", "fp32_upcast", "fp32_upcast_shifted", "no_upcast", "liger", "cut_cross_entropy", "trl_fused"]
Quantization = Literal["none", "int8", "nf4", "fp4"]
Allocator = Literal["default", "expandable_segments"]
PackingStrategy = Literal["bfd", "bfd_split", "wrapped"]
Padding = Literal["none", "longest"]
# what a batch looks like to the model: fixed-length rows without padding (no mask), rows padded
# to the longest with an attention mask, or one padding-free row of packed sequences
BatchLayout = Literal["fixed", "padded", "padding_free"]

ADAPTER_METHODS = ("lora", "qlora", "dora")
# TRL 1.16 config defaults: GRPO and RLOO drop the reference model at beta 0.
STAGE_DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "grpo": 0.0, "rloo": 0.05, "ppo": 0.05}
MAX_LORA_TARGETS = 64
MAX_TARGET_NAME = 200
PEFT_METHODS = ("lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning")
# the DeepSpeed keys transformers' HfTrainerDeepSpeedConfig and accelerate fill in when "auto"
DEEPSPEED_AUTO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
MAX_DEEPSPEED_COUNT = 10**15


class TrainingOptions(BaseModel):
    """Every choice a plan depends on. Defaults are what a careful user would pick first."""

    # Infinity and NaN parse as floats (JSON extensions, argparse) but no option can be either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    method: Method = "lora"
    stage: Stage = "sft"
    gpu: str | None = Field(default=None, max_length=100)
    # below 0.5 GiB not even the CUDA context fits; the field exists for real cards
    gpu_memory_gib: float | None = Field(default=None, ge=0.5, le=4096)
    num_gpus: int = Field(default=1, ge=1, le=4096)
    parallelism: Parallelism = "ddp"
    offload: Offload = "none"
    batch_size: int = Field(default=1, ge=1, le=65536)
    # micro-batches per optimizer step (the Trainer's and TRL's name): from the second on, the
    # gradients of the previous ones stay allocated through the forward and backward
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=65536)
    seq_len: int = Field(default=2048, ge=1, le=10_000_000)
    gradient_checkpointing: StrictBool = True
    precision: Dtype = "bf16"
    # the forward under torch.autocast when the compute dtype is 16-bit, as the transformers
    # Trainer, TRL and accelerate run it; false for a plain loop over 16-bit weights, where PEFT's
    # fp32 adapters then save fp32 copies of their inputs (twice the bytes)
    autocast: StrictBool = True
    weights_dtype: Dtype | None = None
    quantization: Quantization | None = None
    double_quant: StrictBool = True
    # get_peft_model's autocast_adapter_dtype: PEFT (0.12 on) keeps LoRA, DoRA and IA3 weights in
    # fp32 whatever the base dtype; false leaves them in the base's dtype (what PEFT up to 0.11 did,
    # and what TRL passes under ZeRO-3 for an unquantized base)
    autocast_adapter_dtype: StrictBool = True
    # PEFT's prepare_model_for_kbit_training, which QLoRA tutorials, older TRL trainers (SFTTrainer
    # in older releases, on one GPU) and TRL 1.16's ORPO and CPO call: it casts every 16-bit parameter
    # bitsandbytes left unquantized (embeddings, LM head, norms) to fp32, so the embedding's output,
    # and with it the residual stream, is fp32 (bitsandbytes' Linear layers hand back their input's
    # dtype). TRL 1.16's SFT, DPO and GRPO trainers do not call it
    prepare_model_for_kbit_training: StrictBool = False
    # TRL's peft_module_casting_to_bf16, which TRL 0.x's SFTTrainer (0.13, for one) ran after it
    # under bf16: embeddings and lm_head back to bf16, norms kept in fp32 (whose output, fp32 weight
    # times a bf16 input, is fp32: the stream is fp32 from the first layer's output on)
    peft_module_casting_to_bf16: StrictBool = False
    trainer: Trainer = "trl"
    # the loss path, a trainer setting (planner/logits.py): fp32_upcast is transformers' loss,
    # fp32_upcast_shifted transformers 4.46-4.48's (a shifted copy of the upcast logits),
    # no_upcast cross-entropy on compute-dtype logits, liger Liger's fused linear cross-entropy
    # (the Trainer's use_liger_kernel), cut_cross_entropy Apple's Cut Cross-Entropy, trl_fused TRL's head
    loss_implementation: LossImplementation = "auto"
    optimizer: Optimizer = "adamw"
    sgd_momentum: float = Field(default=0.0, ge=0, lt=1)
    galore_rank: int = Field(default=128, ge=1, le=65536)
    lora_r: int = Field(default=16, ge=1, le=65536)
    lora_alpha: float | None = Field(default=None, gt=0)
    lora_targets: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_TARGET_NAME)]], Field(min_length=1, max_length=MAX_LORA_TARGETS)] | Literal["all-linear"] = "all-linear"
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    num_virtual_tokens: int = Field(default=20, ge=1, le=65536)
    # IA3Config.feedforward_modules: the targets whose vector scales the input (in_features) rather
    # than the output; None is PEFT's per-architecture default, which PEFT applies to named targets too
    feedforward_modules: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_TARGET_NAME)]], Field(max_length=MAX_LORA_TARGETS)] | None = None
    # PEFT's modules_to_save (TRL's lora_modules_to_save; TRL's SFTTrainer adds lm_head itself when a
    # chat template adds tokens): whole modules trained beside the adapters, each through a trainable
    # copy PEFT makes of it (ModulesToSaveWrapper), in the module's own dtype. ensure_weight_tying
    # (PEFT's LoraConfig) keeps a tied model's embedding and lm_head copies one tensor
    modules_to_save: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_TARGET_NAME)]], Field(max_length=MAX_LORA_TARGETS)] | None = None
    ensure_weight_tying: StrictBool = False
    # LoraConfig's trainable_token_indices on the input embedding (TRL's SFTTrainer sets it for the
    # tokens a chat template adds): the listed rows train, as a small delta PEFT writes into a copy
    # of the whole embedding matrix at each forward
    trainable_token_indices: Annotated[list[Annotated[int, Field(ge=0, le=10_000_000)]], Field(min_length=1, max_length=65536)] | None = None
    freeze_trainable_layers: int = Field(default=2, ge=1, le=1024)
    attention: Attention = "sdpa"
    # how a batch's sequences are laid out (planner/activations.py plans each; the plan's assumptions
    # say which). TRL's SFTConfig names: packing (with packing_strategy) and padding_free; packing
    # with bfd or bfd_split turns padding_free on, as TRL does: one flattened row, position_ids per
    # sequence, no attention mask. padding names the data, which no trainer setting does: "none" (the
    # default) is every sequence seq_len long, so the collator's mask is all ones and transformers
    # drops it; "longest" pads each batch to its longest sequence, and the mask stays
    packing: StrictBool = False
    packing_strategy: PackingStrategy = "bfd"
    padding_free: StrictBool = False
    padding: Padding = "none"
    # PYTORCH_CUDA_ALLOC_CONF: the default caching allocator, or expandable_segments:True
    allocator: Allocator = "default"
    # the allocator's reserve from a replay of this run's traced allocations (planner/step_trace.py,
    # seconds per plan) instead of the calibrated formula; where the trace cannot stand in for the
    # run, the plan says why and keeps the formula. None (not asked): the planner uses the formula,
    # and a single plan's entry (CLI plan/check, API plan/check, the page, a launch) turns it on
    # (request.single_plan_options): searches and advice plan too many candidates to trace each
    simulate_allocator: StrictBool | None = None
    # DeepSpeed's zero_optimization settings, by DeepSpeed's names (planner/parallel.py): None is
    # DeepSpeed's own default (what accelerate's config without a DeepSpeed file runs), "auto" the
    # value transformers' and accelerate's integration fills in from the model's hidden_size
    # (reduce_bucket_size hidden^2, stage3_prefetch_bucket_size 0.9 hidden^2,
    # stage3_param_persistence_threshold 10 hidden); a number is a count of elements
    reduce_bucket_size: int | str | None = None
    allgather_bucket_size: int | str | None = None
    # None is DeepSpeed's default: on for ZeRO-3, off for ZeRO-1 and 2
    overlap_comm: StrictBool | None = None
    stage3_prefetch_bucket_size: int | str | None = None
    stage3_param_persistence_threshold: int | str | None = None
    stage3_max_live_parameters: int | str | None = None
    # FSDP's implementation under parallelism fsdp (planner/parallel.py): 1 FullyShardedDataParallel
    # (accelerate's FSDP plugin's and the HF Trainer's default), 2 fully_shard
    fsdp_version: int = Field(default=1, ge=1, le=2)
    # gradient_checkpointing_kwargs' use_reentrant (LLaMA-Factory's use_reentrant_gc, true by default
    # there; false is the HF Trainer's and TRL's default under transformers 5): a reentrant
    # checkpoint's backward recomputes the layer on a detached copy of its input, fills that copy's
    # gradient and hands it on, one layer input more in backward (planner/activations.py)
    use_reentrant: StrictBool = False
    # transformers before 4.52 with gradient_checkpointing_kwargs use_reentrant true (their default):
    # the model's layer loop checkpoints each decoder layer's __call__, which under FSDP1 is the
    # unit's, so the unit's pre-forward runs in the recompute; with the unit's parameters frozen
    # (PEFT's wrap policy puts the adapters in units of their own) it hooks the recompute's detached
    # input, and the hook holds that input and its gradient until the end of backward
    # (planner/parallel.py fsdp1_held_layer_inputs). transformers 4.52 on checkpoints inside the unit
    reentrant_checkpoint_around_fsdp_unit: StrictBool = False
    num_generations: int = Field(default=8, ge=1, le=1024)
    # GRPOConfig's steps_per_generation: one generate call covers this many micro-batches
    # (batch_size x steps_per_generation completions at once); None is TRL's default, the
    # gradient accumulation steps
    steps_per_generation: int | None = Field(default=None, ge=1, le=1024)
    max_new_tokens: int = Field(default=512, ge=1, le=1_000_000)
    headroom: float = Field(default=0.05, ge=0, lt=1)
    # alignment stages
    beta: float | None = Field(default=None, ge=0, le=100)
    precompute_ref_log_probs: StrictBool = False
    use_vllm: StrictBool = False
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0, lt=1)

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split_targets(cls, value):
        if isinstance(value, str):
            if value.strip().lower() == "all-linear":
                return "all-linear"
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one module name, or all-linear")
            if not all(isinstance(v, str) for v in value):
                raise ValueError("module names are strings")
            # matching costs layers x names: a bounded, de-duplicated list keeps a plan quick
            value = list(dict.fromkeys(v.strip() for v in value if v.strip()))
            if len(value) > MAX_LORA_TARGETS:
                raise ValueError(f"at most {MAX_LORA_TARGETS} distinct module names (a model has a few dozen Linear names)")
            too_long = next((v for v in value if len(v) > MAX_TARGET_NAME), None)
            if too_long is not None:
                raise ValueError(f"module name {too_long[:40]!r}... is over {MAX_TARGET_NAME} characters")
        return value

    @field_validator("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                     "stage3_max_live_parameters", mode="before")
    @classmethod
    def _deepspeed_count(cls, value, info):
        # a count of elements, as DeepSpeed takes it (5e8 included), or "auto" where the HF
        # integration fills the key in
        if value is None:
            return None
        auto = info.field_name in DEEPSPEED_AUTO_KEYS
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                if not auto:
                    raise ValueError("transformers and accelerate fill in only reduce_bucket_size, stage3_prefetch_bucket_size and "
                                     "stage3_param_persistence_threshold from the model; give a number of elements")
                return "auto"
            try:
                value = float(text)
            except ValueError:
                raise ValueError("a number of elements" + (" or auto" if auto else "")) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
            raise ValueError("a number of elements" + (" or auto" if auto else ""))
        if value < 0 or value != int(value) or value > MAX_DEEPSPEED_COUNT:
            raise ValueError(f"a whole number of elements from 0 to {MAX_DEEPSPEED_COUNT:.0e}")
        return int(value)

    @field_validator("trainable_token_indices", mode="before")
    @classmethod
    def _split_token_indices(cls, value):
        # a comma list of token ids, as the CLI and the page give it
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()] or None
        return value

    @field_validator("feedforward_modules", "modules_to_save", mode="before")
    @classmethod
    def _split_feedforward(cls, value):
        # a comma list as lora_targets takes; empty is PEFT's [] (no feed-forward modules, none to save)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = list(dict.fromkeys(v.strip() for v in value if v.strip()))
        return value

    # -- resolved choices --------------------------------------------------------------
    @property
    def effective_weights_dtype(self) -> str:
        """The dtype the (unquantized part of the) model is loaded in."""
        if self.weights_dtype is not None:
            return self.weights_dtype
        return self.precision

    @property
    def kbit_prepared(self) -> bool:
        """PEFT's prepare_model_for_kbit_training runs on a quantized base."""
        return self.prepare_model_for_kbit_training and self.effective_quantization != "none"

    @property
    def residual_stream_dtype(self) -> str:
        """The dtype of the hidden states between layers and of the unquantized weights other than
        the embeddings and lm_head (norms, routers): as loaded, or fp32 once
        prepare_model_for_kbit_training has cast every 16-bit weight up (bitsandbytes' layers hand
        their output back in their input's dtype, so the stream stays fp32)."""
        return "fp32" if self.kbit_prepared else self.effective_weights_dtype

    @property
    def embedding_dtype(self) -> str:
        """The dtype of the embeddings and lm_head, so of the first layer's input: fp32 after
        prepare_model_for_kbit_training, unless TRL's peft_module_casting_to_bf16 cast them back."""
        return "fp32" if self.kbit_prepared and not self.peft_module_casting_to_bf16 else self.effective_weights_dtype

    @property
    def effective_quantization(self) -> str:
        return effective_quantization_of(self.method, self.quantization)

    @property
    def effective_steps_per_generation(self) -> int:
        """Micro-batches one generation covers: TRL's GRPO and RLOO; 1 for the other stages."""
        if self.stage not in ("grpo", "rloo"):
            return 1
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def effective_beta(self) -> float:
        """The KL/temperature coefficient: TRL's default for the stage unless given."""
        if self.beta is not None:
            return self.beta
        return STAGE_DEFAULT_BETA.get(self.stage, 0.0)

    @property
    def effective_use_reentrant(self) -> bool:
        """Whether the checkpoint is reentrant: asked for (use_reentrant, or the reentrant checkpoint
        around FSDP1's units), or forced by TRL 1.16, whose trainers set use_reentrant for a PEFT model
        under ZeRO-3 with gradient checkpointing (PEFT + ZeRO-3 needs it, trl#2514)."""
        if not self.gradient_checkpointing:
            return False
        return self.use_reentrant or self.reentrant_checkpoint_around_fsdp_unit or self.trl_forces_reentrant

    @property
    def trl_forces_reentrant(self) -> bool:
        """TRL's trainers (its SFT trainer, or any alignment stage's) set use_reentrant for a PEFT
        model under ZeRO-3 on several GPUs, whatever the option says."""
        in_trl = self.trainer == "trl" or self.stage != "sft"
        return in_trl and self.parallelism == "zero3" and self.num_gpus > 1 and self.method in PEFT_METHODS

    @property
    def effective_loss_implementation(self) -> str:
        """The loss path: the one asked for, or the trainer's own (auto)."""
        if self.loss_implementation != "auto":
            return self.loss_implementation
        return "fp32_upcast" if self.trainer == "hf" else "trl_fused"

    @property
    def batch_layout(self) -> str:
        """fixed, padded or padding_free: what the collator hands the model (TRL 1.16's
        SFTTrainer: padding_free, or packing with a bfd strategy, flattens the batch; wrapped
        packing cuts fixed-length rows; otherwise rows padded to the longest, with a mask)."""
        if self.padding_free or (self.packing and self.packing_strategy != "wrapped"):
            return "padding_free"
        if self.packing or self.padding == "none":
            return "fixed"
        return "padded"

    @property
    def effective_autocast(self) -> bool:
        """Whether the forward runs under autocast: only a 16-bit compute dtype has one."""
        return self.autocast and self.precision != "fp32"

    @property
    def generates(self) -> bool:
        return self.stage in ("grpo", "rloo", "ppo")

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r


def check_consistency(options: TrainingOptions) -> None:
    """Combinations no stack can run; each error names the option to change."""
    quant = options.quantization
    if options.method == "qlora" and quant in ("none", "int8"):
        raise PlanInputError("quantization", "method qlora loads the base in 4 bit; use nf4 or fp4, or method lora")
    if options.ensure_weight_tying and options.method not in ADAPTER_METHODS:
        raise PlanInputError("ensure_weight_tying", f"ensure_weight_tying is LoraConfig's (lora, qlora, dora); {options.method} has none")
    if options.modules_to_save and options.method in ("full", "freeze"):
        raise PlanInputError("modules_to_save", f"method {options.method} trains the base's own weights; modules_to_save is PEFT's, "
                                                "for the adapter methods: leave it empty")
    if options.trainable_token_indices and options.method not in ADAPTER_METHODS:
        raise PlanInputError("trainable_token_indices", f"trainable_token_indices is LoraConfig's (lora, qlora, dora); {options.method} has none")
    if options.modules_to_save and options.method in ("prompt_tuning", "prefix_tuning"):
        # measured: PEFT embeds a prompt method's inputs with the original embedding, so its copy never trains
        raise PlanInputError("modules_to_save", f"modules_to_save is planned for lora, qlora, dora and ia3, not {options.method} "
                                                "(PEFT embeds its inputs with the original embedding, so a copy of it would not train)")
    if options.method in ("full", "freeze") and quant not in (None, "none"):
        raise PlanInputError("method", f"{options.method} trains the base weights, which cannot be {quant}-quantized; use qlora or lora")
    pair = {options.effective_weights_dtype, options.precision}
    if pair == {"bf16", "fp16"}:
        raise PlanInputError("weights_dtype", f"weights in {options.effective_weights_dtype} with {options.precision} compute mixes two 16-bit formats")
    if not options.autocast and options.precision != "fp32" and options.effective_weights_dtype == "fp32":
        raise PlanInputError("autocast", f"fp32 weights with {options.precision} compute is autocast; turn it on, or load the weights in {options.precision}")
    if options.precision == "fp32" and options.effective_weights_dtype != "fp32":
        raise PlanInputError("precision", f"fp32 compute needs fp32 weights, not {options.effective_weights_dtype}")
    loss = options.loss_implementation
    if loss != "auto" and options.stage != "sft":
        own = "a score per sequence" if options.stage == "reward" else "from log-probs, in its own trainer's code"
        raise PlanInputError("loss_implementation", f"stage {options.stage} computes its own loss ({own}); loss_implementation names "
                             "the cross-entropy of sft: leave it auto")
    if loss == "cut_cross_entropy" and (options.effective_weights_dtype == "fp32" or options.precision == "fp32"):
        raise PlanInputError("loss_implementation", "Cut Cross-Entropy's backward takes bf16 or fp16 hidden states and lm_head weights; "
                             "load the weights in bf16 or fp16, or pick another loss path")
    if (options.packing or options.padding_free) and options.stage != "sft":
        field = "packing" if options.packing else "padding_free"
        raise PlanInputError(field, f"{field} is a setting of TRL's SFTConfig; stage {options.stage} batches its own way: leave it off "
                             "(padding longest plans padded batches)")
    if options.steps_per_generation is not None and options.stage not in ("grpo", "rloo"):
        raise PlanInputError("steps_per_generation", f"steps_per_generation is a setting of TRL's GRPO and RLOO trainers; stage {options.stage} "
                             "does not generate that way: leave it unset")
    if options.padding != "none" and (options.packing or options.padding_free):
        raise PlanInputError("padding", "packed or padding-free batches carry no padding: leave padding none")
    if options.peft_module_casting_to_bf16 and not (options.prepare_model_for_kbit_training and options.effective_weights_dtype == "bf16"):
        raise PlanInputError("peft_module_casting_to_bf16", "TRL runs peft_module_casting_to_bf16 after prepare_model_for_kbit_training on a "
                             "base loaded in bf16: set prepare_model_for_kbit_training and bf16, or leave it off")
    if options.kbit_prepared and not options.effective_autocast:
        raise PlanInputError("autocast", "prepare_model_for_kbit_training without autocast is not planned: the upcast model would run "
                             "in fp32 outside bitsandbytes' layers; the Trainer and TRL run it under autocast: turn autocast on")
    if options.num_gpus == 1 and options.parallelism != "ddp":
        raise PlanInputError("parallelism", f"{options.parallelism} shards across GPUs; set num_gpus above 1")


def effective_quantization_of(method: str | None, quantization: str | None) -> str:
    """The base's quantization: as given, else NF4 for QLoRA and none for the other methods (also
    for the options of a run's spec.json, a dict)."""
    if quantization is not None:
        return quantization
    return "nf4" if method == "qlora" else "none"
