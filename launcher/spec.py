"""LaunchSpec: everything a run needs, made from a plan plus the run's own settings. Pure data.

The plan decides the model, method, stage, precision, batch, sequence length, checkpointing, GPUs
and parallelism; RunSettings add what a plan does not know (dataset, output, steps, learning rate).
The spec is written as spec.json into the run directory and is the only input of the trainer
entry, so what was planned, what was rendered and what ran cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from planner.errors import PlanInputError

SPEC_VERSION = 1
# Stages the trainer entry runs. PPO is planned but not launched: TRL removed its PPO trainer.
LAUNCHABLE_STAGES = ("sft", "dpo", "kto", "orpo", "simpo", "reward", "rloo", "grpo")
# Methods TRL's ModelConfig expresses (use_peft, use_dora, load_in_4bit/8bit); the others are planned only.
LAUNCHABLE_METHODS = ("full", "lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning")
# what TRL's config file (and axolotl's, LLaMA-Factory's) can say: IA3 and prompt learning are
# launched by the entry, which builds PEFT's config itself (launcher/entry.py peft_config_for)
EXPORTABLE_METHODS = ("full", "lora", "qlora", "dora")
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Reward functions a GRPO/RLOO run may name: TRL's own, by name. A run never imports code it was given.
BUILTIN_REWARDS = ("accuracy_reward", "think_format_reward", "reasoning_accuracy_reward", "completion_length")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
# Variables a run may receive from the launching environment; everything else is dropped, so a
# token in the server's environment reaches a run only when it is on this list.
ENV_ALLOWLIST = (
    "PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "XDG_CACHE_HOME", "CUDA_HOME",
    "LD_LIBRARY_PATH", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "VIRTUAL_ENV", "PYTHONPATH",
)
SECRET_ENV = ("HF_TOKEN",)
# transformers' schedulers that need no arguments of their own
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
# What a run takes from the advice (planner.advisor.run_defaults) where its user gave none: plan
# options (they move memory, so they are settled before the plan) and run settings
ADVISED_OPTIONS = ("gradient_accumulation_steps", "lora_alpha", "lora_dropout")
ADVISED_SETTINGS = ("learning_rate", "epochs", "warmup_steps", "lr_scheduler_type")


class RunSettings(BaseModel):
    """What a run needs beyond the plan. Bounded, so a request can never name a command."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dataset: str = Field(min_length=1, max_length=4096, description="a local JSONL/JSON/Parquet/CSV file or directory, or a hub dataset id")
    dataset_split: str = Field(default="train", max_length=64, pattern=r"^[A-Za-z0-9_.\-\[\]:%]+$")
    output_dir: str | None = Field(default=None, max_length=4096, description="default: the run directory's output/")
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    epochs: float | None = Field(default=None, gt=0, le=10_000)
    learning_rate: float | None = Field(default=None, gt=0, le=1, description="default: the advice's for the method and stage (LoRA SFT 2e-4)")
    warmup_steps: float | None = Field(default=None, ge=0, le=10_000_000, description="steps, or below 1 a fraction of the steps (transformers' warmup_steps); default: the advice's 0.03")
    lr_scheduler_type: Literal[LR_SCHEDULERS] | None = Field(default=None, description="default: the advice's cosine")  # type: ignore[valid-type]
    save_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    logging_steps: int = Field(default=1, ge=1, le=1_000_000)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    reward_funcs: list[Literal[BUILTIN_REWARDS]] = Field(default_factory=list, max_length=8)  # type: ignore[valid-type]
    reward_model: str | None = Field(default=None, max_length=4096)
    step_sleep_s: float = Field(default=0.0, ge=0, le=60, description="pause after each step (tests and demos: makes a tiny run long enough to watch)")

    @model_validator(mode="before")
    @classmethod
    def _accumulation_is_the_plans(cls, data):
        # gradient_accumulation_steps moved to the plan's options (it moves memory): a run stored
        # before still reads (LaunchSpec moves the value into its options)
        # (RunSettings' own: a launch request, which holds the plan options too, keeps the value)
        if cls is RunSettings and isinstance(data, dict) and "gradient_accumulation_steps" in data:
            data = {k: v for k, v in data.items() if k != "gradient_accumulation_steps"}
        return data

    @field_validator("reward_funcs", mode="before")
    @classmethod
    def _split_rewards(cls, value):
        if isinstance(value, str):  # a CLI flag: comma-separated names
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _one_length(self):
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give max_steps or epochs, not both")
        return self


class DatasetRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["file", "directory", "hub"]
    location: str  # an absolute path, or a hub id
    loader: str | None = None  # datasets' builder for a file: json, parquet, csv, arrow


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["directory", "hub"]
    location: str


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    num_processes: int = Field(ge=1, le=4096)
    num_nodes: int = Field(default=1, ge=1, le=1024)
    device: Literal["cuda", "cpu"] = "cuda"
    gpus: tuple[str, ...] = ()  # NVML UUIDs chosen at admission (local); empty: the backend decides


class MergeJob(BaseModel):
    """What a merge run (LaunchSpec.task "merge") needs beyond the spec: the adapter merged into the
    spec's model (PEFT) or mergekit's config over the spec's model and the others, and the plan's
    figures its measurement is held to (planner.merge.MergePlan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    engine: Literal["peft", "mergekit"] = "peft"
    adapter: str | None = Field(default=None, max_length=4096)  # PEFT: the adapter's directory, absolute
    mergekit_config: dict | None = None  # mergekit: its YAML's keys, every model an absolute directory
    low_cpu_memory: bool = False
    out_shard_bytes: int = Field(default=5 * 10**9, gt=0)
    dtype: Literal["bfloat16", "float16", "float32"]
    max_shard_size: str = Field(pattern=r"^[0-9]{1,9}MB$")
    host_planned_bytes: int = Field(ge=0)  # MergePlan.host_merge_bytes: the upper end, above the imported runtime
    host_floor_bytes: int = Field(ge=0)  # MergePlan.host_floor_bytes: the model and adapter


class LaunchSpec(BaseModel):
    """One run, fully decided. Serialised as the run directory's spec.json. A training run by
    default; task "merge" is a PEFT merge (launcher/merge_job.py), whose dataset is its adapter's
    directory and whose `merge` holds the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _accumulation_into_options(cls, data):
        # a run stored when gradient_accumulation_steps was a run setting keeps its value, in the
        # plan's options where it now lives
        if isinstance(data, dict) and isinstance(data.get("settings"), dict) and "gradient_accumulation_steps" in data["settings"]:
            options = dict(data.get("options") or {})
            options.setdefault("gradient_accumulation_steps", data["settings"]["gradient_accumulation_steps"])
            data = {**data, "options": options}
        return data

    spec_version: int = SPEC_VERSION
    run_id: str
    stage: str
    method: str
    model: ModelRef
    dataset: DatasetRef
    settings: RunSettings
    options: dict[str, Any]  # the plan's TrainingOptions, as JSON
    plan: dict[str, Any]  # Plan.to_dict() at launch: the prediction travels with the run
    plan_hash: str
    predicted_peak_bytes: int  # per GPU, the plan's central figure
    predicted_high_bytes: int  # per GPU, the band's high end: what admission holds free memory to
    resources: Resources
    allocator: Literal["default", "expandable_segments"]
    output_dir: str
    resume_from: str | None = None  # a checkpoint directory inside output_dir
    attempt: int = 1
    advised: dict[str, Any] = Field(default_factory=dict)  # name -> value the advice set (its user gave none); the doors show them
    # a served run's roots (launcher/paths.py): the trainer confines the model, the dataset and output_dir to them again when it
    # opens them (launcher/entry.py confine_at_use), so a path swapped for a symlink after the launch was accepted leads nowhere
    confine_to: tuple[str, ...] = ()
    task: Literal["train", "merge"] = "train"
    merge: MergeJob | None = None

    @model_validator(mode="after")
    def _merge_has_its_job(self):
        if (self.task == "merge") != (self.merge is not None):
            raise ValueError("a merge run has a merge job, and only a merge run")
        return self

    def with_advised(self, advised: dict[str, Any]) -> LaunchSpec:
        return self.model_copy(update={"advised": dict(advised)})

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{32}", value):
            raise ValueError("a run id is 32 hex digits")
        return value

    def alloc_conf(self) -> str | None:
        """PYTORCH_CUDA_ALLOC_CONF as the plan assumed it."""
        return "expandable_segments:True" if self.allocator == "expandable_segments" else None


def new_run_id() -> str:
    return uuid.uuid4().hex


def options_hash(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def resolve_dataset(dataset: str, must_exist: bool = True) -> DatasetRef:
    """A file, a directory or a hub id. An export is a file for another machine, so its paths need
    not exist here (must_exist=False); a launch reads them now."""
    path = Path(dataset).expanduser()
    if not must_exist and not path.exists() and (dataset.startswith((".", "/", "~")) or path.suffix.lower() in DATASET_SUFFIXES):
        loader = DATASET_SUFFIXES.get(path.suffix.lower())
        return DatasetRef(kind="file" if loader else "directory", location=dataset, loader=loader)  # as given: the other machine's path
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            return DatasetRef(kind="directory", location=str(path))
        loader = DATASET_SUFFIXES.get(path.suffix.lower())
        if loader is None:
            raise PlanInputError("dataset", f"{path.name}: a dataset file ends in {', '.join(DATASET_SUFFIXES)}")
        return DatasetRef(kind="file", location=str(path), loader=loader)
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix.lower() in DATASET_SUFFIXES:
        raise PlanInputError("dataset", f"{dataset}: no such file or directory")
    if not HUB_ID.fullmatch(dataset):
        raise PlanInputError("dataset", f"{dataset!r} is neither an existing path nor a hub dataset id (owner/name)")
    return DatasetRef(kind="hub", location=dataset)


def resolve_model_ref(model: str, spec_name: str) -> ModelRef:
    """Where the run loads weights from. A plan can come from a bare config.json; a run cannot."""
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            raise PlanInputError("model", f"{model} is a config file: a run needs the model's weights, so give its directory or hub id")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise PlanInputError("model", f"{model} holds no weights (*.safetensors or *.bin): a run needs them")
        return ModelRef(kind="directory", location=str(path.resolve()))
    hub_id = spec_name if HUB_ID.fullmatch(spec_name or "") and "/" in (spec_name or "") else model
    if not HUB_ID.fullmatch(hub_id):
        raise PlanInputError("model", f"{model!r} is neither a model directory nor a hub id")
    return ModelRef(kind="hub", location=hub_id)


def check_launchable(options: dict[str, Any], settings: RunSettings, for_export: bool = False) -> None:
    """Refuses, naming the field, what the launcher cannot run; `for_export`: a file for another
    tool (axolotl, LLaMA-Factory), which may express more loss paths than TRL's trainers run."""
    stage, method = options["stage"], options["method"]
    if stage == "ppo":
        raise PlanInputError("stage", "ppo cannot be launched: TRL 1.16 has no PPO trainer (it was removed); use grpo or rloo, or run OpenRLHF/veRL with the exported plan")
    if stage not in LAUNCHABLE_STAGES:
        raise PlanInputError("stage", f"{stage} cannot be launched")
    if method not in LAUNCHABLE_METHODS:
        raise PlanInputError("method", f"{method} is planned but not launched (the launcher runs {', '.join(LAUNCHABLE_METHODS)})")
    if for_export and method not in EXPORTABLE_METHODS:
        raise PlanInputError("method", f"{method} has no place in TRL's, axolotl's or LLaMA-Factory's config files (they express "
                                       f"{', '.join(EXPORTABLE_METHODS)}): launch it with vramplan launch, whose trainer entry builds PEFT's config")
    if method == "prefix_tuning" and options.get("gradient_checkpointing"):
        raise PlanInputError("gradient_checkpointing", "prefix tuning fails with gradient checkpointing under transformers 5 (the recomputed "
                                                       "forward's attention mask misses the prefix's key/value length): plan it with "
                                                       "--no-gradient-checkpointing")
    if options.get("trainer") == "hf":
        raise PlanInputError("trainer", "launched runs use TRL's trainers; plan with trainer trl")
    if not for_export and options.get("loss_implementation", "auto") not in ("auto", "trl_fused"):
        raise PlanInputError("loss_implementation", f"launched runs use TRL's fused LM head; {options['loss_implementation']} is planned but not launched "
                                                    "(export the plan for axolotl or llamafactory)")
    if not for_export and options.get("autocast_adapter_dtype") is False and not (options.get("parallelism") == "zero3" and options.get("method") != "qlora"):
        raise PlanInputError("autocast_adapter_dtype", "TRL 1.16's trainers keep PEFT's fp32 adapters (they turn autocast_adapter_dtype off only "
                                                       "under ZeRO-3 for an unquantized base): launch with it on, or export the plan")
    if not for_export and options.get("peft_module_casting_to_bf16"):
        raise PlanInputError("peft_module_casting_to_bf16", "peft_module_casting_to_bf16 is what TRL 0.x's SFTTrainer ran; TRL 1.16's trainers, "
                                                            "which the launcher runs, do not: launch with it off (prepare_model_for_kbit_training alone)")
    if options.get("reentrant_checkpoint_around_fsdp_unit"):
        raise PlanInputError("reentrant_checkpoint_around_fsdp_unit", "a reentrant checkpoint around FSDP1's units is what transformers before "
                                                                      "4.52 ran; the launcher's transformers 5.24, and the trainers the exports "
                                                                      "are for, checkpoint inside each unit, which holds no layer inputs: plan with it off")
    if options.get("prepare_model_for_kbit_training") and stage == "reward":
        raise PlanInputError("prepare_model_for_kbit_training", "the launcher calls prepare_model_for_kbit_training on a causal LM it loads "
                                                                "for TRL; a reward model is loaded by TRL's RewardTrainer: leave it off")
    if options.get("prepare_model_for_kbit_training") and options.get("parallelism") in ("zero3", "fsdp") and options.get("num_gpus", 1) > 1:
        raise PlanInputError("prepare_model_for_kbit_training", "sharded QLoRA (FSDP, ZeRO-3) flattens parameters of one dtype: TRL skips "
                                                                "prepare_model_for_kbit_training there, and so does the launcher: leave it off")
    if stage in ("grpo", "rloo") and not settings.reward_funcs and not settings.reward_model:
        raise PlanInputError("reward_funcs", f"{stage} needs a reward: name a built-in ({', '.join(BUILTIN_REWARDS)}) or a reward model")
    if stage not in ("grpo", "rloo") and (settings.reward_funcs or settings.reward_model):
        raise PlanInputError("reward_funcs", f"{stage} takes no reward functions")


def with_advice(model_spec, options, settings: RunSettings, rows: int | None = None):
    """(options, settings, advised): every advised value its user did not give, from the advice for
    the run's method and stage (planner.advisor.run_defaults; `rows`: the dataset's, when read),
    and the name -> value of what the advice set, for the doors to show. A value the user gave stays.
    `model_spec`: the planner's ModelSpec; `options`: its TrainingOptions."""
    from planner.advisor import run_defaults
    from planner.options import TrainingOptions

    defaults = run_defaults(model_spec, options, rows)
    advised_options = {k: defaults[k] for k in ADVISED_OPTIONS if k in defaults and k not in options.model_fields_set}
    advised_settings = {k: defaults[k] for k in ADVISED_SETTINGS if k in defaults and k not in settings.model_fields_set}
    if settings.max_steps is not None:
        advised_settings.pop("epochs", None)  # steps given: the run's length is the user's
    if advised_options:
        options = TrainingOptions.model_validate({**options.model_dump(include=options.model_fields_set), **advised_options})
    if advised_settings:
        settings = RunSettings.model_validate({**settings.model_dump(include=settings.model_fields_set), **advised_settings})
    return options, settings, {**advised_settings, **advised_options}


def advised_words(advised: dict[str, Any], method: str, stage: str) -> str:
    """One line for the doors: "from the advice for lora sft: learning_rate 0.0002, ..."."""
    shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in advised.items())
    return f"from the advice for {method} {stage}: {shown}" if shown else ""


def launch_spec(plan, model: str, settings: RunSettings, *, run_id: str | None = None, runs_root: Path | None = None,
                device: Literal["cuda", "cpu"] = "cuda", gpus: tuple[str, ...] = (), resume_from: str | None = None, attempt: int = 1,
                for_export: bool = False) -> LaunchSpec:
    """The spec for one run of `plan` (a planner.plan.Plan); `for_export` accepts a dataset path that
    exists only on the machine the exported file is for."""
    plan_dict = plan.to_dict()
    options = plan_dict["options"]
    check_launchable(options, settings, for_export)
    run_id = run_id or new_run_id()
    if settings.output_dir is not None and for_export:
        output_dir = settings.output_dir  # as given, relative paths included: the file runs elsewhere
    elif settings.output_dir is not None:
        output_dir = str(Path(settings.output_dir).expanduser().resolve())
    elif runs_root is not None:
        output_dir = str((runs_root / run_id / "output").resolve())
    else:
        raise PlanInputError("output_dir", "give an output directory")
    num_processes = plan.gpu.count if device == "cuda" else max(1, len(gpus) or plan.gpu.count)
    if options["stage"] in ("grpo", "rloo"):
        group = options["num_generations"]
        steps_per_generation = options.get("steps_per_generation") or options.get("gradient_accumulation_steps", 1)
        completions = options["batch_size"] * num_processes * steps_per_generation
        if completions % group:
            # TRL scores whole groups of completions per prompt: its generation batch (batch_size x
            # GPUs x steps_per_generation, which the plan's KV cache holds) must hold whole groups
            raise PlanInputError("batch_size", f"{options['stage']} scores num_generations ({group}) completions per prompt together, and TRL needs "
                                 f"whole groups in a generation batch: batch_size x GPUs x steps_per_generation ({completions}) must be a "
                                 f"multiple of {group}; use --batch-size {group} or a smaller --num-generations (at least 2)")
    return LaunchSpec(
        run_id=run_id,
        stage=options["stage"],
        method=options["method"],
        model=resolve_model_ref(model, plan.model_name),
        dataset=resolve_dataset(settings.dataset, must_exist=not for_export),
        settings=settings,
        options=options,
        plan=plan_dict,
        plan_hash=options_hash(options),
        predicted_peak_bytes=plan.peak_bytes,
        predicted_high_bytes=getattr(plan, "peak_high_bytes", plan.peak_bytes),
        resources=Resources(num_processes=num_processes, device=device, gpus=gpus),
        allocator=options.get("allocator", "default"),
        output_dir=output_dir,
        resume_from=resume_from,
        attempt=attempt,
    )


def merge_launch_spec(plan, base: str, adapter: str | None, output_dir: str, *, run_id: str | None = None,
                      mergekit_config: dict | None = None) -> LaunchSpec:
    """The spec of a merge run: `plan` a planner.merge.MergePlan for this adapter, or for mergekit's
    `mergekit_config` over `base` and the other models it names (app/merge_run.py checked the models,
    the adapter and the output first). On the CPU the prediction is the host peak above the imported
    runtime, which the run measures; with CUDA, the GPU's peak. Its "dataset" is the adapter, or the
    second model of a mergekit merge."""
    o = plan.options
    predicted = plan.device_peak_bytes if o.device == "cuda" else plan.host_merge_bytes
    mergekit = mergekit_config is not None
    if mergekit:
        from planner.merge import mergekit_models

        second = next((m for m in mergekit_models(mergekit_config) if m != str(base)), str(base))
    inputs = second if mergekit else str(adapter)
    return LaunchSpec(
        run_id=run_id or new_run_id(),
        stage="merge",
        method=o.method if mergekit else o.adapter,
        model=ModelRef(kind="directory", location=str(base)),
        dataset=DatasetRef(kind="directory", location=inputs),
        settings=RunSettings(dataset=inputs, output_dir=str(output_dir), device=o.device),
        options=o.model_dump(mode="json"),
        plan=plan.to_dict(),
        plan_hash=options_hash(o.model_dump(mode="json")),
        predicted_peak_bytes=predicted,
        predicted_high_bytes=predicted,
        resources=Resources(num_processes=1, device=o.device),
        allocator="default",
        output_dir=str(output_dir),
        task="merge",
        merge=MergeJob(engine="mergekit" if mergekit else "peft", adapter=None if mergekit else str(adapter), mergekit_config=mergekit_config,
                       low_cpu_memory=o.low_cpu_memory, out_shard_bytes=int(o.out_shard_size_gb * 10**9),
                       dtype=o.dtype, max_shard_size=f"{int(o.out_shard_size_gb * 1000)}MB",
                       host_planned_bytes=plan.host_merge_bytes, host_floor_bytes=plan.host_floor_bytes),
    )
