"""The spec written as other tools' config files. One description, four renderings.

- trl: the file the launched run executes. The entry parses it with TRL's own TrlParser, and for the
  stages TRL's CLI has (`trl sft|dpo|kto|reward|rloo|grpo --config`) the same file runs there too.
- accelerate: the plan's parallelism (DDP, FSDP2, DeepSpeed ZeRO-1/2/3, CPU offload) for `accelerate launch`.
- axolotl, llamafactory: the same run in those tools' documented keys, for users who train there.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import yaml

from launcher.spec import LaunchSpec, advised_words
from planner.options import effective_quantization_of

FORMATS = ("trl", "accelerate", "axolotl", "llamafactory")
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# planner optimizer -> transformers `optim` name
TRL_OPTIMIZERS = {
    # fused, as the planner assumes (no step temporaries) and as transformers defaults to with torch
    # >= 2.8; the per-tensor loop of adamw_torch holds one more parameter-sized buffer at the step
    "adamw": "adamw_torch_fused",
    "adamw_foreach": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "galore": "galore_adamw",
}
ATTENTION = {"sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}
# The trainer and config classes of each stage (module, config, trainer); ORPO and SimPO (CPO's
# simpo loss) live in trl.experimental in TRL 1.16.
TRAINERS = {
    "sft": ("trl", "SFTConfig", "SFTTrainer"),
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "reward": ("trl", "RewardConfig", "RewardTrainer"),
    "rloo": ("trl", "RLOOConfig", "RLOOTrainer"),
    "grpo": ("trl", "GRPOConfig", "GRPOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "simpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
}


# The loss paths (planner/logits.py) axolotl runs through its plugins, with the key each plugin reads
AXOLOTL_LOSS_PLUGINS = {
    "liger": ("axolotl.integrations.liger.LigerPlugin", "liger_fused_linear_cross_entropy"),
    "cut_cross_entropy": ("axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin", "cut_cross_entropy"),
}


def _loss_implementation(options: dict[str, Any]) -> str:
    return options.get("loss_implementation") or "auto"


def _version_tuple(package: str) -> tuple[int, ...]:
    try:
        text = metadata.version(package)
    except metadata.PackageNotFoundError:
        return ()
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def checkpointing_key() -> str:
    """transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name is a
    deprecated alias until v6). Write the name the installed version reads without a warning."""
    installed = _version_tuple("transformers")
    return "activation_checkpointing" if not installed or installed >= (5, 24) else "gradient_checkpointing"


def _length_settings(spec: LaunchSpec) -> dict[str, Any]:
    settings = spec.settings
    out: dict[str, Any] = {}
    if settings.max_steps is not None:
        out["max_steps"] = settings.max_steps
    else:
        out["num_train_epochs"] = settings.epochs if settings.epochs is not None else 1.0
    return out


def _autocast_dtype(options: dict[str, Any]) -> str | None:
    """The dtype the trainer's autocast runs in ("bf16", "fp16"), or None: fp32 compute, or a plan
    for 16-bit weights without autocast (`autocast: false`), which the trainer gets as bf16/fp16
    off with the weights loaded in 16 bit."""
    if options["precision"] == "fp32" or not options.get("autocast", True):
        return None
    return options["precision"]


def _pure_16_bit(options: dict[str, Any]) -> bool:
    """16-bit weights trained without autocast: the tools' own pure bf16/fp16 modes."""
    return options["precision"] != "fp32" and _autocast_dtype(options) is None


def _fsdp(spec: LaunchSpec) -> bool:
    return spec.resources.num_processes > 1 and spec.options["parallelism"] == "fsdp" and spec.resources.device == "cuda"


def trl_config(spec: LaunchSpec) -> dict[str, Any]:
    """TRL/transformers field names (ScriptArguments, the stage's config, ModelConfig, DatasetMixtureConfig)."""
    options, settings = spec.options, spec.settings
    method, stage = spec.method, spec.stage
    loss = _loss_implementation(options)
    if loss not in ("auto", "trl_fused"):
        # TRL 1.16's trainers always patch in their fused LM head; with use_liger_kernel they apply
        # Liger's layer kernels only and refuse its fused linear cross-entropy
        elsewhere = {"liger": "export axolotl or llamafactory", "cut_cross_entropy": "export axolotl",
                     "fp32_upcast": "export axolotl or llamafactory, whose SFT trainers run transformers' loss",
                     "fp32_upcast_shifted": "export axolotl or llamafactory, whose SFT trainers run the loss of the transformers they run with "
                                            "(4.46-4.48 for this path)"}.get(loss, "no export format here expresses it")
        raise ValueError(f"loss_implementation {loss} cannot be expressed in the trl file: TRL 1.16's trainers compute the loss with their "
                         f"fused LM head (use_liger_kernel there applies Liger's layer kernels only); {elsewhere}, or plan loss_implementation trl_fused")
    weights_dtype = TORCH_DTYPES[options.get("weights_dtype") or options["precision"]]
    config: dict[str, Any] = {
        # ModelConfig
        "model_name_or_path": spec.model.location,
        "dtype": weights_dtype,
        "attn_implementation": ATTENTION[options["attention"]],
        # ScriptArguments / DatasetMixtureConfig
        "dataset_train_split": settings.dataset_split,
        # the stage's config (a transformers TrainingArguments)
        "output_dir": spec.output_dir,
        "per_device_train_batch_size": options["batch_size"],
        "gradient_accumulation_steps": options.get("gradient_accumulation_steps", 1),
        "logging_steps": settings.logging_steps,
        "save_strategy": "steps",
        "save_steps": settings.save_steps or 500,
        "seed": settings.seed,
        "optim": TRL_OPTIMIZERS[options["optimizer"]],
        "bf16": _autocast_dtype(options) == "bf16",
        "fp16": _autocast_dtype(options) == "fp16",
        # under FSDP the accelerate config checkpoints (fsdp_activation_checkpointing); transformers
        # refuses both at once
        checkpointing_key(): bool(options["gradient_checkpointing"]) and not _fsdp(spec),
        # TRL loads a model in fp32 unless told: the plan's weights dtype, said where TRL reads it
        "model_init_kwargs": {"dtype": weights_dtype},
        "report_to": "none",
        "disable_tqdm": True,
        **_length_settings(spec),
    }
    if options.get("use_reentrant") and options["gradient_checkpointing"]:
        if _fsdp(spec):
            raise ValueError("use_reentrant cannot be expressed in the trl file under FSDP: the accelerate config checkpoints there "
                             "(fsdp_activation_checkpointing), non-reentrant; plan with use_reentrant off")
        # TRL 1.16 keeps a given value (it defaults it to false only under transformers before 5)
        config[checkpointing_key() + "_kwargs"] = {"use_reentrant": True}
    if settings.learning_rate is not None:
        config["learning_rate"] = settings.learning_rate
    if settings.warmup_steps is not None:
        config["warmup_steps"] = settings.warmup_steps  # transformers 5: below 1, a fraction of the steps
    if settings.lr_scheduler_type is not None:
        config["lr_scheduler_type"] = settings.lr_scheduler_type
    if spec.dataset.kind == "hub":
        config["dataset_name"] = spec.dataset.location
    elif spec.dataset.kind == "file":
        config["datasets"] = [{"path": spec.dataset.loader, "data_files": spec.dataset.location, "split": settings.dataset_split}]
    else:
        config["datasets"] = [{"path": spec.dataset.location, "split": settings.dataset_split}]
    if spec.resources.device == "cpu":
        config["use_cpu"] = True
    if options["optimizer"] == "galore":
        config["optim_target_modules"] = [r".*attn.*", r".*mlp.*"]
        config["optim_args"] = f"rank={options['galore_rank']}"
    if options["optimizer"] == "sgd" and options.get("sgd_momentum"):
        config["optim_args"] = f"momentum={options['sgd_momentum']}"
    if method in ("lora", "qlora", "dora"):
        targets = options["lora_targets"]
        config.update(
            use_peft=True,
            lora_r=options["lora_r"],
            lora_alpha=int(options["lora_alpha"]) if options.get("lora_alpha") else 2 * options["lora_r"],
            lora_dropout=options["lora_dropout"],
            lora_target_modules=["all-linear"] if targets == "all-linear" else list(targets),
            use_dora=method == "dora",
        )
        if options.get("modules_to_save"):
            config["lora_modules_to_save"] = list(options["modules_to_save"])
        if stage == "reward":
            config["lora_task_type"] = "SEQ_CLS"
    quantization = effective_quantization_of(method, options.get("quantization"))
    if quantization in ("nf4", "fp4"):
        config.update(load_in_4bit=True, bnb_4bit_quant_type=quantization, use_bnb_nested_quant=bool(options["double_quant"]))
        if spec.resources.num_processes > 1 and options["parallelism"] in ("zero3", "fsdp"):
            # sharding flattens parameters of one dtype: the packed 4-bit bytes must be stored as the
            # compute dtype to be sharded with the rest (same bytes, so the plan is unchanged)
            config["bnb_4bit_quant_storage"] = weights_dtype
    elif quantization == "int8":
        config["load_in_8bit"] = True
    if stage in ("sft", "dpo", "kto", "reward", "orpo", "simpo"):
        config["max_length"] = options["seq_len"]
    if stage == "sft" and options.get("packing"):
        config.update(packing=True, packing_strategy=options.get("packing_strategy") or "bfd")
    if stage == "sft" and options.get("padding_free"):
        if not options.get("packing"):
            # SFTTrainer raises on padding_free without packing while max_length is set (it would not truncate)
            raise ValueError("TRL 1.16 refuses padding_free without packing while max_length is set; plan packing (strategy bfd, which "
                             "turns padding_free on) for the trl file")
        config["padding_free"] = True
    if stage in ("dpo", "kto", "orpo", "simpo", "grpo", "rloo"):
        beta = options.get("beta")
        if beta is not None:
            config["beta"] = beta
    if stage in ("dpo", "kto"):
        config["precompute_ref_log_probs"] = bool(options["precompute_ref_log_probs"])
    if stage == "simpo":
        # SimPO is CPO's simpo loss without the SFT term
        config.update(loss_type="simpo", cpo_alpha=0.0)
        config.setdefault("beta", 2.0)
    if stage in ("grpo", "rloo"):
        config.update(num_generations=options["num_generations"], max_completion_length=options["max_new_tokens"])
        if options.get("steps_per_generation"):
            # the generation batch the plan's KV cache holds (TRL's default: the accumulation steps)
            config["steps_per_generation"] = options["steps_per_generation"]
        if options["use_vllm"]:
            config.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=options["vllm_gpu_memory_utilization"])
    return config


def accelerate_config(spec: LaunchSpec) -> dict[str, Any] | None:
    """accelerate's ClusterConfig keys for the plan's parallelism; None for one process."""
    resources, options = spec.resources, spec.options
    if resources.num_processes * resources.num_nodes <= 1:
        return None
    parallelism, offload = options["parallelism"], options["offload"]
    mixed = _autocast_dtype(options) or "no"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "machine_rank": 0,
        "num_machines": resources.num_nodes,
        "num_processes": resources.num_processes * resources.num_nodes,
        "mixed_precision": mixed,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
        "debug": False,
    }
    if resources.device == "cpu" or parallelism == "ddp":
        # accelerate starts several processes through torchrun only for MULTI_GPU; its MULTI_CPU
        # expects mpirun. A CPU run (the trainer's use_cpu) then forms a gloo group in each process.
        config["distributed_type"] = "MULTI_GPU"
    elif parallelism in ("zero1", "zero2", "zero3"):
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": int(parallelism[-1]),
            "offload_optimizer_device": "cpu" if offload in ("optimizer", "params") else "none",
            "offload_param_device": "cpu" if offload == "params" and parallelism == "zero3" else "none",
            "zero3_init_flag": parallelism == "zero3",
            "gradient_accumulation_steps": spec.options.get("gradient_accumulation_steps", 1),
        }
    else:  # fsdp, full sharding, in the version the plan assumed (planner/parallel.py)
        version = options.get("fsdp_version", 1)
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": version,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_offload_params": offload != "none",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            # FSDP2 takes a bool, FSDP1 a sharding strategy (accelerate refuses the other form)
            "fsdp_reshard_after_forward": True if version == 2 else "FULL_SHARD",
            "fsdp_activation_checkpointing": bool(options["gradient_checkpointing"]),
        }
        if version == 1:
            # the FSDP1 plan prefetches the next unit in backward; without the key accelerate
            # prefetches nothing. A decoder layer mixes frozen and trained parameters under PEFT,
            # which FSDP1's flat parameters take only with use_orig_params
            config["fsdp_config"] |= {"fsdp_backward_prefetch": "BACKWARD_PRE", "fsdp_use_orig_params": True}
    return config


# the plan's DeepSpeed settings (planner/parallel.py), written under DeepSpeed's own names where given;
# left out, DeepSpeed's defaults apply, as the plan assumes
DEEPSPEED_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "stage3_prefetch_bucket_size",
                  "stage3_param_persistence_threshold", "stage3_max_live_parameters")


def deepspeed_json(zero_stage: int, offload: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A DeepSpeed config for the plan's ZeRO stage and offload, with the rest left to the trainer ("auto")."""
    zero: dict[str, Any] = {"stage": zero_stage}
    for key in DEEPSPEED_KEYS:
        value = (options or {}).get(key)
        if value is not None and (zero_stage == 3 or not key.startswith("stage3_")):
            zero[key] = value  # "auto" is filled in by transformers' HfTrainerDeepSpeedConfig from hidden_size
    if offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "params" and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto", "zero_allow_untested_optimizer": True}


def _warmup_and_schedule(settings, scheduler_key: str) -> dict[str, Any]:
    """Warmup and schedule for tools on transformers 4's names (axolotl, LLaMA-Factory): a fraction
    is warmup_ratio there, whole steps warmup_steps."""
    out: dict[str, Any] = {}
    if settings.warmup_steps is not None:
        out["warmup_ratio" if settings.warmup_steps < 1 else "warmup_steps"] = settings.warmup_steps if settings.warmup_steps < 1 else int(settings.warmup_steps)
    if settings.lr_scheduler_type is not None:
        out[scheduler_key] = settings.lr_scheduler_type
    return out


def axolotl_config(spec: LaunchSpec) -> dict[str, Any]:
    """Axolotl's documented keys (its input config schema, axolotl 0.21: utils/schemas/*.py)."""
    options, settings = spec.options, spec.settings
    rl = {"dpo": "dpo", "kto": "kto", "orpo": "orpo", "simpo": "simpo", "grpo": "grpo"}.get(spec.stage)
    if spec.stage in ("reward", "rloo"):
        raise ValueError(f"axolotl has no {spec.stage} stage in its documented keys; export trl instead")
    config: dict[str, Any] = {
        "base_model": spec.model.location,
        # ds_type is a key of its SFT datasets (its DPO/SimPO and KTO datasets infer the file type from the extension)
        "datasets": [{"path": spec.dataset.location, **({"ds_type": spec.dataset.loader} if spec.dataset.loader and spec.stage not in ("dpo", "kto", "simpo") else {}),
                      "split": settings.dataset_split}],
        "output_dir": spec.output_dir,
        "sequence_len": options["seq_len"],
        "micro_batch_size": options["batch_size"],
        "gradient_accumulation_steps": options.get("gradient_accumulation_steps", 1),
        "gradient_checkpointing": bool(options["gradient_checkpointing"]),
        # said either way: the plan's checkpoint, whatever axolotl's own default
        "gradient_checkpointing_kwargs": {"use_reentrant": bool(options.get("use_reentrant"))},
        "optimizer": TRL_OPTIMIZERS[options["optimizer"]],
        "bf16": _autocast_dtype(options) == "bf16",
        "fp16": _autocast_dtype(options) == "fp16",
        "seed": settings.seed,
        "logging_steps": settings.logging_steps,
        # the boolean flags (flash_attention, sdp_attention) are deprecated aliases since 0.21
        "attn_implementation": ATTENTION[options["attention"]],
        # axolotl requires a learning rate; TRL's default for the stage, as the trl export trains with
        "learning_rate": settings.learning_rate or {"sft": 2e-5}.get(spec.stage, 1e-6),
    }
    if settings.max_steps is not None:
        config["max_steps"] = settings.max_steps
    else:
        config["num_epochs"] = settings.epochs or 1.0
    if settings.save_steps is not None:
        config["save_steps"] = settings.save_steps
    config.update(_warmup_and_schedule(settings, "lr_scheduler"))
    if options["optimizer"] == "galore":  # transformers' GaLore needs its target modules
        config.update(optim_target_modules=[r".*attn.*", r".*mlp.*"], optim_args=f"rank={options['galore_rank']}")
    if options["optimizer"] == "sgd" and options.get("sgd_momentum"):
        config["optim_args"] = f"momentum={options['sgd_momentum']}"
    if _pure_16_bit(options):
        # axolotl's pure 16-bit load, without AMP
        config["bfloat16" if options["precision"] == "bf16" else "float16"] = True
    if options.get("packing") or options.get("padding_free"):
        # axolotl's padding-free batching is its multipack sampler (varlen flash attention); it has no wrapped strategy
        if options.get("packing_strategy", "bfd") == "wrapped" or not options.get("packing"):
            raise ValueError("axolotl expresses packed batches as sample_packing (best-fit, padding-free) only; export trl for "
                             "wrapped packing or padding_free without packing")
        config["sample_packing"] = True
    if rl:
        config["rl"] = rl
        if options.get("beta") is not None:
            config["rl_beta"] = options["beta"]
    loss = _loss_implementation(options)
    if loss in AXOLOTL_LOSS_PLUGINS:
        if loss == "cut_cross_entropy" and _autocast_dtype(options) is None:
            raise ValueError("axolotl runs Cut Cross-Entropy only with bf16 or fp16 mixed precision on; plan with autocast on")
        plugin, key = AXOLOTL_LOSS_PLUGINS[loss]
        config.update(plugins=[plugin], **{key: True})  # the loss alone: none of Liger's layer kernels, which the plan does not model
    elif loss in ("no_upcast", "trl_fused"):
        raise ValueError(f"axolotl has no key for loss_implementation {loss} (its SFT loss is transformers', fp32_upcast); export trl"
                         + (" for TRL's fused head" if loss == "trl_fused" else ", or plan another loss path"))
    if spec.stage == "kto":
        config["remove_unused_columns"] = False  # axolotl refuses KTO without it
    if spec.stage == "grpo":
        # the group the plan's KV cache holds; reward functions by import path (TRL's own)
        config["trl"] = {"num_generations": options["num_generations"], "max_completion_length": options["max_new_tokens"],
                         "reward_funcs": [f"trl.rewards.{name}" for name in settings.reward_funcs if name != "completion_length"]
                         + ([settings.reward_model] if settings.reward_model else [])}
        if options.get("steps_per_generation"):
            # axolotl names the generation batch in completions across processes, as TRL's generation_batch_size
            config["trl"]["generation_batch_size"] = options["batch_size"] * spec.resources.num_processes * options["steps_per_generation"]
    if spec.method in ("lora", "qlora", "dora"):
        targets = options["lora_targets"]
        config.update(adapter="qlora" if spec.method == "qlora" else "lora", lora_r=options["lora_r"],
                      lora_alpha=int(options["lora_alpha"]) if options.get("lora_alpha") else 2 * options["lora_r"],
                      lora_dropout=options["lora_dropout"])
        if targets == "all-linear":
            config["lora_target_linear"] = True
        else:
            config["lora_target_modules"] = list(targets)
        if spec.method == "dora":
            config["peft_use_dora"] = True
        if options.get("modules_to_save"):
            config["lora_modules_to_save"] = list(options["modules_to_save"])
        if options.get("ensure_weight_tying"):
            config["peft_ensure_weight_tying"] = True
        if options.get("trainable_token_indices"):
            config["peft_trainable_token_indices"] = list(options["trainable_token_indices"])
        if spec.method == "qlora":
            config["load_in_4bit"] = True
            config["bnb_config_kwargs"] = {"bnb_4bit_quant_type": options.get("quantization") or "nf4",
                                           "bnb_4bit_use_double_quant": bool(options["double_quant"])}
        elif options.get("quantization") == "int8":
            config["load_in_8bit"] = True
    if spec.resources.num_processes > 1:
        parallelism, offload = options["parallelism"], options["offload"]
        if parallelism.startswith("zero"):
            # inline (the key takes a path or the JSON itself): axolotl's deepspeed_configs/ has no file
            # for most stage and offload pairs (its zero2.json offloads the optimizer)
            config["deepspeed"] = deepspeed_json(int(parallelism[-1]), offload, options)
        elif parallelism == "fsdp":
            version = options.get("fsdp_version", 1)
            config["fsdp_version"] = version
            config["fsdp_config"] = {"offload_params": options["offload"] != "none", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                     "state_dict_type": "SHARDED_STATE_DICT"}
            if version == 2:
                if config["optimizer"] == "adamw_bnb_8bit":
                    config["optimizer"] = "adamw_torch_8bit"  # axolotl refuses bitsandbytes' 8-bit AdamW under FSDP2
                config["fsdp_config"]["reshard_after_forward"] = True
            # FSDP1: axolotl 0.21's FSDPConfig has no prefetch or sharding-strategy key, so its
            # defaults apply (full sharding, no backward prefetch: at most what the plan holds)
    return config


def llamafactory_config(spec: LaunchSpec) -> dict[str, Any]:
    """LLaMA-Factory's documented YAML keys (examples/train_lora/*.yaml)."""
    options, settings = spec.options, spec.settings
    stage = {"sft": "sft", "dpo": "dpo", "kto": "kto", "orpo": "dpo", "simpo": "dpo", "reward": "rm"}.get(spec.stage)
    if stage is None:
        raise ValueError(f"LLaMA-Factory has no {spec.stage} stage; export trl instead")
    config: dict[str, Any] = {
        "model_name_or_path": spec.model.location,
        "stage": stage,
        "do_train": True,
        "finetuning_type": "full" if spec.method == "full" else "lora",
        "dataset": spec.dataset.location,
        "cutoff_len": options["seq_len"],
        "output_dir": spec.output_dir,
        "per_device_train_batch_size": options["batch_size"],
        "gradient_accumulation_steps": options.get("gradient_accumulation_steps", 1),
        "logging_steps": settings.logging_steps,
        "save_steps": settings.save_steps or 500,
        "bf16": _autocast_dtype(options) == "bf16",
        "fp16": _autocast_dtype(options) == "fp16",
        "seed": settings.seed,
        "optim": TRL_OPTIMIZERS[options["optimizer"]],
        "flash_attn": {"flash": "fa2", "sdpa": "sdpa", "eager": "disabled"}[options["attention"]],
        "disable_gradient_checkpointing": not options["gradient_checkpointing"],
        # LLaMA-Factory checkpoints reentrant unless told (use_reentrant_gc defaults to true there)
        "use_reentrant_gc": bool(options.get("use_reentrant")),
        "report_to": "none",
    }
    if options.get("packing") or options.get("padding_free"):
        raise ValueError("LLaMA-Factory's packing and neat_packing are not TRL's packing or padding_free (not planned here); export trl")
    if _pure_16_bit(options):
        if options["precision"] != "bf16":
            raise ValueError("LLaMA-Factory trains fp16 only with autocast (AMP); export trl, or plan with autocast on")
        config["pure_bf16"] = True
    if options["optimizer"] == "galore":
        if spec.method != "full":
            raise ValueError("LLaMA-Factory runs GaLore with full fine-tuning only; export trl instead")
        # its own GaLore keys (transformers' galore_adamw would need optim_target_modules, which it does not pass)
        config.update(optim="adamw_torch", use_galore=True, galore_target="all", galore_rank=options["galore_rank"])
    if options["optimizer"] == "sgd" and options.get("sgd_momentum"):
        config["optim_args"] = f"momentum={options['sgd_momentum']}"
    loss = _loss_implementation(options)
    if loss == "liger":
        # LLaMA-Factory applies Liger's fused linear cross-entropy for sft (and Liger's layer kernels with it)
        config["enable_liger_kernel"] = True
    elif loss not in ("auto", "fp32_upcast", "fp32_upcast_shifted"):
        raise ValueError(f"LLaMA-Factory has no key for loss_implementation {loss} (its SFT loss is transformers', fp32_upcast); "
                         + ("export trl" if loss == "trl_fused" else "export axolotl" if loss == "cut_cross_entropy" else "plan another loss path"))
    if spec.stage in ("orpo", "simpo"):
        config["pref_loss"] = spec.stage
    if options.get("beta") is not None and spec.stage in ("dpo", "kto", "orpo", "simpo"):
        config["pref_beta"] = options["beta"]
    config.update(_length_settings(spec))  # transformers' names, as in the trl file
    if settings.learning_rate is not None:
        config["learning_rate"] = settings.learning_rate
    config.update(_warmup_and_schedule(settings, "lr_scheduler_type"))
    if spec.method in ("lora", "qlora", "dora"):
        targets = options["lora_targets"]
        config.update(lora_rank=options["lora_r"], lora_alpha=int(options["lora_alpha"]) if options.get("lora_alpha") else 2 * options["lora_r"],
                      lora_dropout=options["lora_dropout"], lora_target="all" if targets == "all-linear" else ",".join(targets))
        if spec.method == "dora":
            config["use_dora"] = True
        if spec.method == "qlora":
            config["quantization_bit"] = 4
            config["quantization_method"] = "bnb"
            config["quantization_type"] = options.get("quantization") or "nf4"
            config["double_quantization"] = bool(options["double_quant"])
        elif options.get("quantization") == "int8":
            config.update(quantization_bit=8, quantization_method="bnb")
        if options.get("modules_to_save"):
            config["additional_target"] = ",".join(options["modules_to_save"])
        for name, axolotl_key in (("ensure_weight_tying", "peft_ensure_weight_tying"), ("trainable_token_indices", "peft_trainable_token_indices")):
            if options.get(name):
                raise ValueError(f"LLaMA-Factory has no key for PEFT's {name}: export axolotl ({axolotl_key}), or launch the plan")
    if spec.resources.num_processes > 1 and options["parallelism"].startswith("zero"):
        # inline (transformers' `deepspeed` takes a path or the JSON itself): examples/deepspeed/ has no
        # ZeRO-1 file and no ZeRO-3 file that offloads the optimizer alone
        config["deepspeed"] = deepspeed_json(int(options["parallelism"][-1]), options["offload"], options)
    return config


# The dataset an export names when none was given: an example, said as such in the file
PLACEHOLDER_DATASET = "your-org/your-dataset"
# where each format names its dataset, for the placeholder's note
DATASET_KEYS = {"trl": "dataset_name", "axolotl": "datasets[0].path", "llamafactory": "dataset"}


def export_notes(spec: LaunchSpec, fmt: str, given: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """What the file holds that nobody chose for it: placeholders to replace ("placeholder: set
    dataset_name ..."), assumptions (the precision when none was given: bf16) and the advice's
    values. `given`: the plan options and run settings its user named."""
    notes = []
    if spec.dataset.location == PLACEHOLDER_DATASET and fmt in DATASET_KEYS:
        notes.append(f"placeholder: set {DATASET_KEYS[fmt]} ({PLACEHOLDER_DATASET} is an example; give --dataset)")
    if "precision" not in given and spec.options["precision"] == "bf16":
        notes.append("assumed: bf16 compute (no precision given); a GPU without bf16 (before Ampere) needs --precision fp16")
    if spec.options.get("prepare_model_for_kbit_training"):
        if fmt == "trl":
            notes.append("assumed: PEFT's prepare_model_for_kbit_training, which TRL 1.16's trainers do not call from this file; "
                         "`vramplan launch` calls it before the trainer, a script of your own must")
        elif fmt in ("axolotl", "llamafactory"):
            notes.append(f"assumed: PEFT's prepare_model_for_kbit_training (fp32 norms, embeddings and residual stream); whether {fmt} "
                         "calls it is not checked here")
    if spec.options.get("autocast_adapter_dtype") is False and fmt in ("trl", "axolotl", "llamafactory"):
        notes.append("assumed: adapters in the base's dtype (autocast_adapter_dtype false); TRL and current PEFT make them fp32 unless "
                     "get_peft_model is told otherwise")
    if spec.advised:
        notes.append(f"advised: {advised_words(spec.advised, spec.method, spec.stage)} (a flag sets another)")
    return notes


def render(spec: LaunchSpec, fmt: str, notes: list[str] | tuple[str, ...] = ()) -> str:
    """The YAML text of one export format; `notes` (export_notes) as comment lines under the header."""
    if fmt == "trl":
        for name, axolotl_key in (("ensure_weight_tying", "peft_ensure_weight_tying"), ("trainable_token_indices", "peft_trainable_token_indices")):
            if spec.options.get(name):
                # the launcher passes it to PEFT itself (launcher/entry.py); TRL's own config cannot
                raise ValueError(f"TRL's config file has no key for PEFT's {name} (LoraConfig's): export axolotl "
                                 f"({axolotl_key}), or launch the plan, whose trainer entry passes it to PEFT")
        data = trl_config(spec)
    elif fmt == "accelerate":
        data = accelerate_config(spec)
        if data is None:
            raise ValueError("one process needs no accelerate config: the plan is for a single GPU (set num_gpus above 1)")
    elif fmt == "axolotl":
        data = axolotl_config(spec)
    elif fmt == "llamafactory":
        data = llamafactory_config(spec)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    header = (
        f"# vramplan {fmt} export: {spec.plan['model']['name']}, {spec.method} {spec.stage}, "
        f"predicted peak {spec.predicted_peak_bytes / (1 << 30):.2f} GiB per GPU (calibration {spec.plan.get('calibration')})\n"
    )
    return header + "".join(f"# {note}\n" for note in notes) + yaml.safe_dump(data, sort_keys=False)
