"""Each export is accepted by the tool that reads it.

- trl: parsed by TRL's own TrlParser into (ScriptArguments, the stage's config, ModelConfig,
  DatasetMixtureConfig), for every launchable stage and method; the parsed objects carry the plan's
  values. Parsing only: no model is loaded (real launches test that the file runs).
- accelerate: loaded by accelerate's own config loader, then put through the step of
  `accelerate launch --config_file` that turns the file into launch arguments.
- axolotl, llamafactory: checked against the key lists in tests/data/*_keys.json (facts read from
  axolotl 0.21.0's pydantic input-config models and LLaMA-Factory 0.9.5's hparams dataclasses), not
  against the packages themselves, because neither can be installed beside our pinned stack:
  axolotl 0.21.0 needs Python >= 3.12 (we run 3.11; 0.19.0 pins transformers 5.16.1, trl 1.9.0,
  peft 0.20.0, accelerate 1.13.0) and llamafactory 0.9.5 requires transformers <= 5.6.0, trl <= 0.24,
  peft <= 0.18.1, accelerate <= 1.11, datasets <= 4.0. Adding either to the dev extra would change
  existing pins. Installed with --no-deps in a throwaway virtualenv, axolotl's validate_config and
  LLaMA-Factory's HfArgumentParser over its five train dataclasses (and get_train_args) accepted
  every file this module checks; the rules their validators enforce that a key list cannot show
  (a learning rate is required, KTO needs remove_unused_columns false, no bitsandbytes 8-bit AdamW
  under FSDP2, GRPO's generation batch a multiple of num_generations) are asserted here by name.
  The transformers keys LLaMA-Factory passes through are parsed for real by the installed
  transformers' own HfArgumentParser.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

MODEL = "meta-llama/Llama-3.1-8B"
DATA = Path(__file__).parent / "data"
STAGES = ("sft", "dpo", "kto", "orpo", "simpo", "reward", "rloo", "grpo")
METHODS = ("full", "lora", "qlora", "dora")
GENERATING = ("grpo", "rloo")


def make_spec(*, device: str = "cuda", dataset: str = "your-org/your-dataset", settings: dict | None = None, for_export: bool = False, **options):
    """The LaunchSpec of a plan for MODEL with these options (an 80 GiB GPU, so nothing is refused)."""
    from launcher.spec import RunSettings, launch_spec
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    options.setdefault("gpu_memory_gib", 80)
    if options.get("stage") in GENERATING:
        # TRL (and axolotl) need the generation batch to hold whole groups (see the refusal test below)
        options.setdefault("batch_size", 4)
        options.setdefault("num_generations", 4)
    run = {"dataset": dataset, "output_dir": "/tmp/vramplan-export-out", **(settings or {})}
    if options.get("stage") in GENERATING:
        run.setdefault("reward_funcs", ["accuracy_reward"])
    plan = build_plan(load_catalog_spec(MODEL), TrainingOptions(**options))
    return launch_spec(plan, MODEL, RunSettings(**run), device=device, for_export=for_export)


def write(tmp_path: Path, spec, fmt: str) -> Path:
    from launcher.exports import render

    path = tmp_path / f"{fmt}.yaml"
    path.write_text(render(spec, fmt))
    return path


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    return str(path)


# -- trl: TRL's own parser ----------------------------------------------------------------------


def trl_parse(path: Path, stage: str):
    import importlib

    import torch
    from trl import ModelConfig, ScriptArguments, TrlParser
    from trl.scripts.utils import DatasetMixtureConfig

    from launcher.exports import TRAINERS

    module, config_name, _ = TRAINERS[stage]
    config_class = getattr(importlib.import_module(module), config_name)
    args = ["--config", str(path)]
    if not torch.cuda.is_available():
        # the file is for a GPU machine; transformers refuses bf16 without one unless told it is a CPU run
        args += ["--use_cpu", "true"]
    parser = TrlParser((ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig))
    script, config, model, data = parser.parse_args_and_config(args=args)
    return script, config, model, data


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stage", STAGES)
def test_trl_export_parses_with_trls_parser_and_carries_the_plan(tmp_path, stage, method):
    spec = make_spec(stage=stage, method=method, batch_size=4 if stage in GENERATING else 2, seq_len=1024)
    options = spec.options
    script, config, model, _ = trl_parse(write(tmp_path, spec, "trl"), stage)

    assert config.per_device_train_batch_size == options["batch_size"]
    assert config.bf16 is True and config.fp16 is False
    assert config.activation_checkpointing is bool(options["gradient_checkpointing"]) is True
    assert config.model_init_kwargs == {"dtype": "bfloat16"}  # TRL loads fp32 unless told
    assert model.dtype == "bfloat16" and model.model_name_or_path == MODEL
    assert script.dataset_name == "your-org/your-dataset" and script.dataset_train_split == "train"
    if stage in GENERATING:
        assert config.num_generations == options["num_generations"]
        assert config.max_completion_length == options["max_new_tokens"]
        assert config.generation_batch_size % config.num_generations == 0
    else:
        assert config.max_length == options["seq_len"] == 1024
    if method == "full":
        assert model.use_peft is False and model.load_in_4bit is False
    else:
        assert model.use_peft is True
        assert model.lora_r == options["lora_r"] and model.lora_alpha == 2 * options["lora_r"]
        assert model.lora_target_modules == "all-linear"  # ModelConfig unwraps a one-item list, as PEFT wants it
        assert model.use_dora is (method == "dora")
        assert model.load_in_4bit is (method == "qlora")
        if method == "qlora":
            assert model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant is True
        if stage == "reward":
            assert model.lora_task_type == "SEQ_CLS"
    if stage in ("dpo", "kto"):
        assert config.precompute_ref_log_probs is False
    if stage == "simpo":
        assert config.loss_type in ("simpo", ["simpo"]) and config.cpo_alpha == 0.0


def test_trl_export_with_a_local_file_and_run_settings(tmp_path, jsonl):
    spec = make_spec(stage="sft", method="lora", optimizer="adamw_8bit", attention="eager", dataset=jsonl, gradient_accumulation_steps=4,
                     settings={"max_steps": 7, "learning_rate": 3e-4, "save_steps": 5, "seed": 7})
    _, config, model, data = trl_parse(write(tmp_path, spec, "trl"), "sft")
    assert (config.max_steps, config.learning_rate, config.gradient_accumulation_steps, config.save_steps, config.seed) == (7, 3e-4, 4, 5, 7)
    assert config.optim == "adamw_bnb_8bit" and model.attn_implementation == "eager"
    assert [(d.path, d.data_files, d.split) for d in data.datasets] == [("json", jsonl, "train")]


@pytest.mark.parametrize("stage", GENERATING)
def test_the_generation_batch_the_plan_holds_is_the_one_trl_generates(tmp_path, stage):
    # batch_size 2 x steps_per_generation 4: one generate call over 8 completions, two groups of 4
    spec = make_spec(stage=stage, method="lora", batch_size=2, steps_per_generation=4)
    _, config, _, _ = trl_parse(write(tmp_path, spec, "trl"), stage)
    assert config.steps_per_generation == 4 and config.generation_batch_size == 8
    # TRL's rule is on the generation batch, not the micro-batch: without it, 2 completions are no group of 4
    from planner.errors import PlanInputError

    with pytest.raises(PlanInputError, match="multiple of 4"):
        make_spec(stage=stage, method="lora", batch_size=2, steps_per_generation=1)

    # the plan's default micro-batch 1 with num_generations 8: TRL's GRPOConfig/RLOOConfig would refuse a
    # generation batch that is not whole groups; the launcher says so first, naming the option to change
    from launcher.spec import RunSettings, launch_spec
    from planner.catalog import load_catalog_spec
    from planner.errors import PlanInputError
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    plan = build_plan(load_catalog_spec(MODEL), TrainingOptions(stage=stage, method="lora", gpu_memory_gib=80))
    with pytest.raises(PlanInputError, match="must be a multiple of 8") as caught:
        launch_spec(plan, MODEL, RunSettings(dataset="org/d", output_dir="/tmp/o", reward_funcs=["accuracy_reward"]))
    assert caught.value.field == "batch_size"


# -- accelerate: its own loader and the launch step that reads the file ---------------------------

PARALLEL = [("ddp", "none"), ("zero1", "none"), ("zero1", "optimizer"), ("zero2", "none"), ("zero2", "optimizer"),
            ("zero3", "none"), ("zero3", "optimizer"), ("zero3", "params"), ("fsdp", "none"), ("fsdp", "optimizer"), ("fsdp", "params")]


@pytest.mark.parametrize("num_gpus", range(2, 9))
@pytest.mark.parametrize("parallelism,offload", PARALLEL, ids=[f"{p}-{o}" for p, o in PARALLEL])
def test_accelerate_export_loads_with_accelerates_loader(tmp_path, parallelism, offload, num_gpus):
    from accelerate.commands.config.config_args import (
        ClusterConfig,
        load_config_from_file,
    )
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import DistributedType

    spec = make_spec(method="lora", num_gpus=num_gpus, parallelism=parallelism, offload=offload, gradient_accumulation_steps=3)
    path = write(tmp_path, spec, "accelerate")
    config = load_config_from_file(str(path))  # refuses unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.num_processes == num_gpus and config.num_machines == 1 and config.mixed_precision == "bf16"
    offload_optimizer = "cpu" if offload != "none" else "none"
    offload_params = "cpu" if offload == "params" and parallelism == "zero3" else "none"
    if parallelism == "ddp":
        assert config.distributed_type == DistributedType.MULTI_GPU
        assert config.deepspeed_config == {} and config.fsdp_config == {}
    elif parallelism.startswith("zero"):
        assert config.distributed_type == DistributedType.DEEPSPEED
        ds = config.deepspeed_config
        assert ds["zero_stage"] == int(parallelism[-1])
        assert (ds["offload_optimizer_device"], ds["offload_param_device"]) == (offload_optimizer, offload_params)
        assert ds["zero3_init_flag"] is (parallelism == "zero3")
    else:
        assert config.distributed_type == DistributedType.FSDP
        # the FSDP the plan assumed: FSDP1 unless fsdp_version says 2
        assert config.fsdp_config["fsdp_version"] == 1
        assert config.fsdp_config["fsdp_backward_prefetch"] == "BACKWARD_PRE"
        assert config.fsdp_config["fsdp_offload_params"] is (offload != "none")

    # `accelerate launch --config_file` copies each nested key onto its launch argument of that name
    # (fsdp_config keys prefixed fsdp_); a key with no such argument would be dropped silently
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    known = set(vars(args))
    for section in ("deepspeed_config", "fsdp_config"):
        for key in getattr(config, section):
            name = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert name in known, f"{section}.{key} is not an accelerate launch argument"
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == num_gpus
    assert (args.multi_gpu, args.use_deepspeed, args.use_fsdp) == (parallelism == "ddp", parallelism.startswith("zero"), parallelism == "fsdp")
    if parallelism.startswith("zero"):
        assert (args.zero_stage, args.offload_optimizer_device, args.offload_param_device) == (int(parallelism[-1]), offload_optimizer, offload_params)
        assert args.gradient_accumulation_steps == 3
    if parallelism == "fsdp":
        assert int(args.fsdp_version) == 1 and args.fsdp_offload_params is (offload != "none")
        assert args.fsdp_reshard_after_forward == "FULL_SHARD" and args.fsdp_backward_prefetch == "BACKWARD_PRE"


def test_a_plan_without_autocast_trains_in_pure_16_bit_everywhere(tmp_path):
    """autocast false plans PEFT's fp32 input copies (a plain 16-bit loop): every export must run
    it that way, the weights in bf16 and the trainer's mixed precision off."""
    from launcher.exports import accelerate_config, axolotl_config, llamafactory_config

    spec = make_spec(method="lora", autocast=False)
    _, config, model, _ = trl_parse(write(tmp_path, spec, "trl"), "sft")
    assert config.bf16 is False and config.fp16 is False
    assert config.model_init_kwargs == {"dtype": "bfloat16"} and model.dtype == "bfloat16"
    assert accelerate_config(make_spec(method="lora", autocast=False, num_gpus=2))["mixed_precision"] == "no"
    assert axolotl_config(spec)["bf16"] is False and axolotl_config(spec)["bfloat16"] is True
    assert llamafactory_config(spec)["bf16"] is False and llamafactory_config(spec)["pure_bf16"] is True
    # with autocast (the default) the trainer's bf16 is on
    assert accelerate_config(make_spec(method="lora", num_gpus=2))["mixed_precision"] == "bf16"


def test_fsdp_run_turns_checkpointing_on_in_one_place_only():
    from launcher.exports import accelerate_config, trl_config

    spec = make_spec(method="lora", num_gpus=4, parallelism="fsdp", gradient_checkpointing=True)
    # transformers' Trainer raises when both are on: FSDP's own checkpointing does it, once
    assert accelerate_config(spec)["fsdp_config"]["fsdp_activation_checkpointing"] is True
    assert trl_config(spec)["activation_checkpointing"] is False


def test_qlora_under_sharding_stores_4bit_weights_in_the_compute_dtype():
    from launcher.exports import trl_config

    assert trl_config(make_spec(method="qlora", num_gpus=4, parallelism="zero3"))["bnb_4bit_quant_storage"] == "bfloat16"
    assert "bnb_4bit_quant_storage" not in trl_config(make_spec(method="qlora"))


def test_accelerate_export_refuses_one_process():
    from launcher.exports import render

    with pytest.raises(ValueError, match="one process needs no accelerate config"):
        render(make_spec(method="lora"), "accelerate")


# -- axolotl and LLaMA-Factory: their documented keys ---------------------------------------------

KIND = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict", type(None): "null"}


def check_value(where: str, value, entry: dict) -> None:
    """`value` is of a kind the field's annotation allows, or one of its choices."""
    kind = KIND[type(value)]
    allowed = set(entry["type"])
    if "choices" in entry and value in entry["choices"]:
        return
    if "any" in allowed or kind in allowed or (kind == "int" and "float" in allowed):
        return
    choices = f" or one of {entry['choices']}" if "choices" in entry else ""
    pytest.fail(f"{where}: {value!r} is {kind}; the source allows {sorted(allowed)}{choices}")


def check_keys(where: str, data: dict, fields: dict) -> None:
    for key, value in data.items():
        assert key in fields, f"{where}.{key} is not a documented key"
        assert "deprecated" not in fields[key], f"{where}.{key} is deprecated: {fields[key]['deprecated']}"
        check_value(f"{where}.{key}", value, fields[key])
    missing = [k for k, e in fields.items() if e.get("required") and k not in data]
    assert not missing, f"{where}: required keys missing: {missing}"


@pytest.fixture(scope="module")
def axolotl_keys():
    return json.loads((DATA / "axolotl_keys.json").read_text())


@pytest.fixture(scope="module")
def llamafactory_keys():
    return json.loads((DATA / "llamafactory_keys.json").read_text())


def test_key_lists_name_their_source(axolotl_keys, llamafactory_keys):
    assert axolotl_keys["source"]["package"].startswith("axolotl 0.21.0")
    assert llamafactory_keys["source"]["package"].startswith("llamafactory 0.9.5")
    assert len(axolotl_keys["models"]["AxolotlInputConfig"]) > 300 and len(llamafactory_keys["classes"]) == 5


# the variants every format is checked on: each stage and method, then parallelism, optimizer,
# quantization, precision and attention choices
VARIANTS = [{"stage": s, "method": m, "beta": 0.2 if s in ("dpo", "kto", "orpo", "simpo") else None} for s in STAGES for m in METHODS] + [
    {"stage": "sft", "method": "lora", "num_gpus": 4, "parallelism": "zero1", "offload": "optimizer"},
    {"stage": "sft", "method": "lora", "num_gpus": 4, "parallelism": "zero2", "offload": "none", "lora_targets": ["q_proj", "v_proj"]},
    {"stage": "dpo", "method": "qlora", "num_gpus": 8, "parallelism": "zero3", "offload": "params"},
    {"stage": "sft", "method": "full", "num_gpus": 8, "parallelism": "zero3", "offload": "optimizer", "optimizer": "paged_adamw_32bit"},
    {"stage": "sft", "method": "lora", "num_gpus": 4, "parallelism": "fsdp", "offload": "optimizer", "optimizer": "adamw_8bit", "attention": "flash"},
    {"stage": "sft", "method": "full", "num_gpus": 2, "parallelism": "fsdp", "offload": "none", "precision": "fp32", "weights_dtype": "fp32"},
    {"stage": "sft", "method": "lora", "num_gpus": 2, "parallelism": "ddp"},
    {"stage": "sft", "method": "qlora", "quantization": "fp4", "double_quant": False},
    {"stage": "sft", "method": "lora", "quantization": "int8"},
    {"stage": "sft", "method": "full", "optimizer": "galore"},
    {"stage": "sft", "method": "full", "optimizer": "sgd", "sgd_momentum": 0.9},
    {"stage": "sft", "method": "full", "optimizer": "adafactor"},
    {"stage": "dpo", "method": "lora", "optimizer": "paged_adamw_8bit", "attention": "eager", "gradient_checkpointing": False, "precision": "fp16", "weights_dtype": "fp16"},
    {"stage": "sft", "method": "lora", "autocast": False},
]


def variant_id(v: dict) -> str:
    return "-".join(str(x) if not isinstance(x, list) else "+".join(x) for x in v.values() if x is not None)


def variant_spec(variant: dict, dataset: str, index: int):
    options = {k: v for k, v in variant.items() if v is not None}
    # alternate the run settings: steps or epochs, a learning rate or none, a local file or a hub id
    settings = {"max_steps": 10, "save_steps": 50} if index % 2 else {"epochs": 2.0}
    if index % 3:
        settings["learning_rate"] = 2e-4
    return make_spec(dataset=dataset if index % 4 == 0 else "org/data", settings=settings, **options)


def transformers_optimizers() -> set[str]:
    from transformers.training_args import OptimizerNames

    return {o.value for o in OptimizerNames}


@pytest.mark.parametrize("index,variant", list(enumerate(VARIANTS)), ids=[variant_id(v) for v in VARIANTS])
def test_axolotl_export_uses_documented_keys(tmp_path, jsonl, axolotl_keys, index, variant):
    from launcher.exports import render

    spec = variant_spec(variant, jsonl, index)
    if spec.stage in ("reward", "rloo"):
        with pytest.raises(ValueError, match="axolotl has no"):
            render(spec, "axolotl")
        return
    data = yaml.safe_load(write(tmp_path, spec, "axolotl").read_text())
    models, values = axolotl_keys["models"], axolotl_keys["values"]
    check_keys("axolotl", data, models["AxolotlInputConfig"])
    # its validate_config reads each dataset as the model of the stage's kind
    dataset_model = {"dpo": "DPODataset", "simpo": "DPODataset", "kto": "KTODataset"}.get(data.get("rl"), "SFTDataset")
    for i, item in enumerate(data["datasets"]):
        check_keys(f"axolotl.datasets[{i}]", item, models[dataset_model])
    if "fsdp_config" in data:
        check_keys("axolotl.fsdp_config", data["fsdp_config"], models["FSDPConfig"])
    if "trl" in data:
        check_keys("axolotl.trl", data["trl"], models["TRLConfig"])
    # values the source constrains beyond the annotation
    assert data["attn_implementation"] in values["attn_implementation"]
    assert data["optimizer"] in transformers_optimizers() | set(values["custom_optimizers"])
    assert data.get("adapter") in (None, "lora", "qlora")
    # rules its validators enforce (utils/schemas/validation.py, config.py)
    assert data["learning_rate"] > 0
    if data.get("rl") == "kto":
        assert data["remove_unused_columns"] is False
    if "fsdp_config" in data:
        assert data["fsdp_version"] == 1  # the plan's default: FSDP1

    if data.get("rl") == "grpo":
        assert data["micro_batch_size"] * data["gradient_accumulation_steps"] % data["trl"]["num_generations"] == 0
    assert not ("deepspeed" in data and "fsdp_config" in data)
    # the plan's values, under axolotl's names
    options = spec.options
    assert (data["sequence_len"], data["micro_batch_size"]) == (options["seq_len"], options["batch_size"])
    assert data["gradient_checkpointing"] is bool(options["gradient_checkpointing"])
    if spec.method in ("lora", "qlora", "dora"):
        assert data["lora_r"] == options["lora_r"]
        assert data.get("peft_use_dora", False) is (spec.method == "dora")
        assert data.get("load_in_4bit", False) is (spec.method == "qlora")
    if "deepspeed" in data:
        zero = data["deepspeed"]["zero_optimization"]
        assert zero["stage"] == int(options["parallelism"][-1])
        assert ("offload_optimizer" in zero) is (options["offload"] != "none")
        assert ("offload_param" in zero) is (options["offload"] == "params" and zero["stage"] == 3)


def test_llamafactory_export_uses_documented_keys_and_transformers_parses_the_rest(tmp_path, jsonl, llamafactory_keys):
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    from launcher.exports import render

    own = {}
    for fields in llamafactory_keys["classes"].values():
        own.update(fields)
    hf_fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    parser = HfArgumentParser(Seq2SeqTrainingArguments)
    for index, variant in enumerate(VARIANTS):
        spec = variant_spec(variant, jsonl, index)
        where = f"llamafactory[{variant_id(variant)}]"
        if spec.stage in ("rloo", "grpo"):
            with pytest.raises(ValueError, match="LLaMA-Factory has no"):
                render(spec, "llamafactory")
            continue
        data = yaml.safe_load(write(tmp_path, spec, "llamafactory").read_text())
        passed = {}
        for key, value in data.items():
            if key in own:
                check_value(f"{where}.{key}", value, own[key])
            else:
                assert key in hf_fields, f"{where}.{key} is neither a LLaMA-Factory nor a transformers training argument"
                passed[key] = value
        # transformers' own parser on the keys LLaMA-Factory hands it (its `deepspeed` needs the
        # deepspeed package to parse, so it is checked by shape below; use_cpu: this machine may have no GPU)
        deepspeed = passed.pop("deepspeed", None)
        (training,) = parser.parse_dict({**passed, "use_cpu": True}, allow_extra_keys=False)
        assert training.optim == data["optim"] in transformers_optimizers()
        options = spec.options
        assert (data["cutoff_len"], training.per_device_train_batch_size) == (options["seq_len"], options["batch_size"])
        assert data["disable_gradient_checkpointing"] is not bool(options["gradient_checkpointing"])
        if spec.method != "full":
            assert data["lora_rank"] == options["lora_r"] and data.get("use_dora", False) is (spec.method == "dora")
            assert data.get("quantization_bit") == (4 if spec.method == "qlora" else 8 if options.get("quantization") == "int8" else None)
            if spec.method == "qlora":
                # the 4-bit type and nesting as planned, with bitsandbytes named (LLaMA-Factory's default method)
                assert (data["quantization_method"], data["quantization_type"]) == ("bnb", options.get("quantization") or "nf4")
                assert data["double_quantization"] is bool(options["double_quant"])
        # LLaMA-Factory's own rules (finetuning_args.py): pref_loss belongs to the dpo stage, GaLore to full tuning
        if "pref_loss" in data:
            assert data["stage"] == "dpo"
        if data.get("use_galore"):
            assert data["finetuning_type"] == "full" and data["optim"] == "adamw_torch"
        if spec.resources.num_processes > 1 and options["parallelism"].startswith("zero"):
            zero = deepspeed["zero_optimization"]
            assert zero["stage"] == int(options["parallelism"][-1])
            assert ("offload_optimizer" in zero) is (options["offload"] != "none")
            assert ("offload_param" in zero) is (options["offload"] == "params" and zero["stage"] == 3)
        else:
            assert deepspeed is None


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_export_writes_the_trl_file(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "run.yaml"
    assert main(["export", MODEL, "--method", "qlora", "--format", "trl", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and f"wrote {out}" in captured.err
    text = out.read_text()
    assert text.startswith("# vramplan trl export: ")
    data = yaml.safe_load(text)
    assert data["model_name_or_path"] == MODEL and data["load_in_4bit"] is True and data["use_peft"] is True


@pytest.mark.parametrize("fmt,stage", [("axolotl", "reward"), ("axolotl", "rloo"), ("llamafactory", "grpo")])
def test_cli_export_of_a_stage_the_format_cannot_express_exits_2_with_one_line(tmp_path, capsys, fmt, stage):
    from app.cli import main

    out = tmp_path / "x.yaml"
    argv = ["export", MODEL, "--stage", stage, "--format", fmt, "--out", str(out)]
    if stage in GENERATING:
        argv += ["--reward-funcs", "accuracy_reward", "--batch-size", "4", "--num-generations", "4"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vramplan: error: ") and "Traceback" not in captured.err
    assert stage in lines[0] and "export trl instead" in lines[0]
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_exports_run_the_fsdp_the_plan_assumed(tmp_path, version):
    """FSDP1 and FSDP2 hold different buffers (planner/parallel.py): the exported run is the one planned."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from launcher.exports import axolotl_config

    spec = make_spec(method="lora", num_gpus=2, parallelism="fsdp", fsdp_version=version)
    path = write(tmp_path, spec, "accelerate")
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "train.py"]))
    assert int(args.fsdp_version) == version
    # accelerate's plugin refuses a bool for FSDP1's reshard setting and a strategy for FSDP2's
    assert args.fsdp_reshard_after_forward == ("FULL_SHARD" if version == 1 else True)
    assert (args.fsdp_backward_prefetch == "BACKWARD_PRE") is (version == 1)
    assert axolotl_config(spec)["fsdp_version"] == version


def test_the_exports_say_which_checkpoint_the_plan_assumed(tmp_path):
    """LLaMA-Factory checkpoints reentrant unless told (use_reentrant_gc defaults to true), which holds
    one layer input more than the plan's default: every export says the plan's choice."""
    from launcher.exports import axolotl_config, llamafactory_config, trl_config

    plain, reentrant = make_spec(method="lora"), make_spec(method="lora", use_reentrant=True)
    assert llamafactory_config(plain)["use_reentrant_gc"] is False and llamafactory_config(reentrant)["use_reentrant_gc"] is True
    assert axolotl_config(plain)["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert axolotl_config(reentrant)["gradient_checkpointing_kwargs"] == {"use_reentrant": True}
    assert not any(key.endswith("checkpointing_kwargs") for key in trl_config(plain))
    _, config, _, _ = trl_parse(write(tmp_path, reentrant, "trl"), "sft")
    assert config.activation_checkpointing_kwargs == {"use_reentrant": True}
    with pytest.raises(ValueError, match="use_reentrant"):
        trl_config(make_spec(method="lora", num_gpus=4, parallelism="fsdp", use_reentrant=True))
