"""The program a launched run executes: `python -m launcher.entry RUN_DIR`.

It reads RUN_DIR/spec.json and RUN_DIR/trl.yaml (parsed by TRL's own TrlParser, the same file
`vramplan export --format trl` writes), builds the stage's TRL trainer with PEFT and bitsandbytes as
the plan says, and reports through events.jsonl. Exit codes: 0 done (or stopped on request, with a
checkpoint), 3 CUDA out of memory, 4 a full disk (ENOSPC/EDQUOT), 1 any other error.

What ends a run is said in its error event in the user's terms (`explain`): a reason (oom,
host_oom, disk_full, data_error, missing_package, nan_loss; none for another error), a one-line summary and a
hint, which the supervisor keeps as the run's reason, message and hint. A data error is located by
reading the dataset again with launcher/preflight.py, which names the file, the line and the fix.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import signal
import sys
import traceback
from pathlib import Path

from launcher.run_report import (
    EXIT_DISK_FULL,
    EXIT_OOM,
    emit_plain,
    is_oom,
    library_versions,
)

GIB = 1 << 30
# import names whose pip package is named otherwise
PIP_NAMES = {"flash_attn": "flash-attn", "liger_kernel": "liger-kernel", "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow",
             "google": "protobuf", "sentencepiece": "sentencepiece", "deepspeed": "deepspeed", "bitsandbytes": "bitsandbytes"}
# the exceptions `datasets`, pyarrow and a trainer's preprocessing raise for rows they cannot take
DATA_ERRORS = ("DatasetGenerationError", "ArrowInvalid", "ArrowTypeError", "JSONDecodeError", "KeyError", "DatasetNotFoundError",
               "EmptyDatasetError", "SchemaInferenceError", "CastError", "StopIteration", "IndexError", "TypeError", "ValueError")


def _environment(spec: dict) -> None:
    # set before torch is imported: the allocator reads it once, at its first allocation
    if spec.get("allocator") == "expandable_segments":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    for name in ("HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK", "DISABLE_MLFLOW_INTEGRATION"):
        os.environ[name] = "1"
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def completion_length(completions, **kwargs) -> list[float]:
    """A built-in reward for smoke runs: longer completions score higher (scaled to about 0..1)."""
    out = []
    for completion in completions:
        text = completion if isinstance(completion, str) else " ".join(m.get("content", "") for m in completion)
        out.append(min(len(text), 512) / 512)
    return out


def _reward_funcs(settings: dict) -> list:
    from trl import rewards

    funcs: list = []
    for name in settings.get("reward_funcs") or []:
        funcs.append(completion_length if name == "completion_length" else getattr(rewards, name))
    if settings.get("reward_model"):
        funcs.append(settings["reward_model"])  # TRL loads a model id or path as a reward model
    return funcs


def _parse(stage: str, config_path: Path):
    import importlib

    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from launcher.exports import TRAINERS

    module_name, config_name, trainer_name = TRAINERS[stage]
    module = importlib.import_module(module_name)
    config_cls, trainer_cls = getattr(module, config_name), getattr(module, trainer_name)
    parser = TrlParser((ScriptArguments, config_cls, ModelConfig, DatasetMixtureConfig))
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(args=["--config", str(config_path)])
    return trainer_cls, script_args, training_args, model_args, dataset_args


def _dataset(script_args, dataset_args):
    from datasets import load_dataset
    from trl import get_dataset

    if dataset_args.datasets:
        # each DatasetConfig names its split already; the mixture is returned as "train"
        return get_dataset(dataset_args)["train"]
    return load_dataset(script_args.dataset_name, name=script_args.dataset_config)[script_args.dataset_train_split]


class PathOutsideRoots(Exception):
    """A path of a served run leads outside the server's roots when the trainer opens it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def confine_at_use(spec: dict) -> dict[str, str]:
    """The run's paths resolved now, when the trainer is about to open them: {field: resolved path}.
    A served run (spec["confine_to"]: the server's roots) must still find its model directory, its
    dataset, its reward model and its output_dir inside them, symlinks followed; PathOutsideRoots
    otherwise (a path swapped for a symlink between the launch's 201 and the start). The trainer
    then opens the resolved paths, not the names. The CLI's own runs (no roots) are not confined."""
    roots = [Path(root) for root in spec.get("confine_to") or ()]
    if not roots:
        return {}
    checks = []
    if (spec.get("model") or {}).get("kind") == "directory":
        checks.append(("model", spec["model"]["location"], True))
    if (spec.get("dataset") or {}).get("kind") in ("file", "directory"):
        checks.append(("dataset", spec["dataset"]["location"], True))
    reward = (spec.get("settings") or {}).get("reward_model")
    if isinstance(reward, str) and os.path.isabs(reward):
        checks.append(("reward_model", reward, True))
    checks.append(("output_dir", spec["output_dir"], False))
    found = {}
    shown = ", ".join(map(str, roots))
    for field, text, must_exist in checks:
        try:
            resolved = Path(text).resolve(strict=must_exist)
        except FileNotFoundError:
            raise PathOutsideRoots(field, f"{field} {text} no longer exists") from None
        except (OSError, RuntimeError) as exc:
            raise PathOutsideRoots(field, f"{field} {text} cannot be resolved: {exc}") from None
        if not _inside(resolved, roots):
            raise PathOutsideRoots(field, f"{field} {text} now leads to {resolved}, outside the server's roots ({shown}); "
                                          "nothing was read or written there")
        found[field] = str(resolved)
    return found


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_at(where: dict[str, str], spec: dict, script_args, training_args, model_args, dataset_args) -> None:
    """Point the parsed config at the resolved paths (the same as the names unless a symlink sits in them)."""
    if "model" in where and model_args.model_name_or_path == spec["model"]["location"]:
        model_args.model_name_or_path = where["model"]
    if "dataset" in where:
        location = spec["dataset"]["location"]
        if script_args.dataset_name == location:
            script_args.dataset_name = where["dataset"]
        for config in dataset_args.datasets or []:
            if getattr(config, "data_files", None) == location:
                config.data_files = where["dataset"]
            if getattr(config, "path", None) == location:
                config.path = where["dataset"]
    if "output_dir" in where:
        training_args.output_dir = where["output_dir"]


def build_trainer(spec: dict, run_dir: Path, callbacks: list, phase: list | None = None):
    from trl import get_peft_config, get_quantization_config

    phase = phase if phase is not None else ["setup"]  # what is being done: the entry names a failure by it
    stage = spec["stage"]
    trainer_cls, script_args, training_args, model_args, dataset_args = _parse(stage, run_dir / "trl.yaml")
    phase[0] = "paths"
    where = confine_at_use(spec)  # at the moment of use, not only when the request arrived
    _open_at(where, spec, script_args, training_args, model_args, dataset_args)
    before = _file_identity(where["dataset"]) if "dataset" in where else None
    phase[0] = "data"
    train_dataset = _dataset(script_args, dataset_args)
    if "dataset" in where:
        phase[0] = "paths"
        again = confine_at_use(spec)  # the file read must be the one checked: a swap while it was read is refused too
        if again.get("dataset") != where["dataset"] or _file_identity(where["dataset"]) != before:
            raise PathOutsideRoots("dataset", f"dataset {spec['dataset']['location']} was replaced while it was read")
    phase[0] = "trainer"
    kwargs = {
        "model": model_args.model_name_or_path,
        "args": training_args,
        "train_dataset": train_dataset,
        "peft_config": get_peft_config(model_args),
        "callbacks": callbacks,
    }
    own = peft_config_for(spec["options"])
    if own is not None:
        kwargs["peft_config"] = own
    if kwargs["peft_config"] is not None:
        # LoraConfig's, which TRL's config file has no keys for
        if spec["options"].get("ensure_weight_tying"):
            kwargs["peft_config"].ensure_weight_tying = True
        if spec["options"].get("trainable_token_indices"):
            kwargs["peft_config"].trainable_token_indices = list(spec["options"]["trainable_token_indices"])
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "quantization_config": quantization}
        if spec["resources"]["device"] == "cuda":
            from trl import get_kbit_device_map

            training_args.model_init_kwargs["device_map"] = get_kbit_device_map()
    if quantization is not None and spec["options"].get("prepare_model_for_kbit_training"):
        kwargs["model"] = _kbit_prepared_model(model_args.model_name_or_path, training_args)
    if stage in ("grpo", "rloo"):
        kwargs["reward_funcs"] = _reward_funcs(spec["settings"])
    return trainer_cls(**kwargs), training_args


def peft_config_for(options: dict):
    """PEFT's config for the methods TRL's config file cannot express, as the plan counted them
    (planner/trainable.py): IA3 on lora_targets (all-linear: PEFT's default for the architecture)
    with feedforward_modules (None: PEFT's default) and modules_to_save, prompt and prefix tuning with
    num_virtual_tokens. None for the LoRA family and full fine-tuning, which trl.yaml carries."""
    method = options.get("method")
    if method == "ia3":
        from peft import IA3Config

        targets = options.get("lora_targets", "all-linear")
        return IA3Config(task_type="CAUSAL_LM", target_modules=None if targets == "all-linear" else list(targets),
                         feedforward_modules=options.get("feedforward_modules"), modules_to_save=options.get("modules_to_save"))
    if method == "prompt_tuning":
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(options.get("num_virtual_tokens", 20)))
    if method == "prefix_tuning":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(options.get("num_virtual_tokens", 20)))
    return None


def _kbit_prepared_model(location: str, training_args):
    """The plan assumed PEFT's prepare_model_for_kbit_training, which TRL 1.16's trainers no longer
    call: the model loaded as the trainer would load it (TRL's own loader, the same init kwargs),
    then prepared, before the trainer adds the adapters."""
    from peft import prepare_model_for_kbit_training
    from trl.trainer.utils import create_model_from_path

    init = dict(training_args.model_init_kwargs or {})
    init["trust_remote_code"] = False  # never code from a checkpoint
    model = create_model_from_path(location, **init)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(training_args.gradient_checkpointing),
                                           gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs or {})


def _disk_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in the exception's chain (torch and safetensors wrap it), else None."""
    import errno

    seen, chain = set(), exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT):
            return chain
        if "No space left on device" in str(chain) and not isinstance(chain, OSError):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        chain = chain.__cause__ or chain.__context__
    return None


def _root_import_error(exc: BaseException) -> ImportError:
    """The ImportError that started it: transformers re-raises a missing package as "Could not import module X"."""
    seen, chain = set(), exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, ModuleNotFoundError) and chain.name:
            return chain
        chain = chain.__cause__ or chain.__context__
    return exc  # type: ignore[return-value]


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _missing_package(exc: ImportError) -> str:
    """The pip package an ImportError asks for."""
    text = str(exc)
    module = (exc.name or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if not module:
        if "FlashAttention2" in text or "flash_attn" in text:
            module = "flash_attn"
        elif found := re.search(r"pip install (?:-U )?['\"`]?([A-Za-z0-9_.\-\[\]]+)", text):
            return found.group(1)
        elif found := re.search(r"requires the ([A-Za-z0-9_\-]+) library", text) or re.search(r"No module named '([A-Za-z0-9_]+)", text):
            module = found.group(1)
        elif found := re.search(r"\b(bitsandbytes|peft|deepspeed|liger[_-]kernel|accelerate|trl|datasets)\b", text):
            module = found.group(1)
    module = module or (exc.name or "").split(".")[0]
    return PIP_NAMES.get(module, module.replace("_", "-")) if module else ""


def _data_problem(spec: dict) -> str | None:
    """The dataset's first problem as launcher/preflight.py words it (file, line, fix), or None when it finds none."""
    from launcher.preflight import check_dataset
    from planner.errors import PlanInputError

    dataset = spec.get("dataset") or {}
    try:
        check_dataset(dataset.get("location", ""), spec["stage"], kind=dataset.get("kind"), model=(spec.get("model") or {}).get("location"),
                      split=spec["settings"].get("dataset_split", "train"))
    except PlanInputError as exc:
        return f"dataset {exc.reason}"
    except Exception:  # the check itself failed: the trainer's own words stand
        return None
    return None


def explain(exc: BaseException, phase: str, spec: dict, sample: dict | None = None) -> dict:
    """What ended the run, for its error event: {"reason", "summary", "hint"} (reason None: another error).
    `phase`: what the entry was doing (data, trainer, train); `sample`: the MemoryProbe's numbers then."""
    try:
        from launcher.events import NonFiniteLoss
    except ImportError:  # what is missing may be what events.py imports (torch, transformers)
        NonFiniteLoss = ()  # noqa: N806

    sample = sample or {}
    logs = "the run's log has the traceback (vramplan runs logs ID)"
    if isinstance(exc, PathOutsideRoots):
        return {"reason": "path_outside_roots", "summary": str(exc),
                "hint": f"{exc.field} was changed after the launch was accepted (a symlink out of the server's roots?); "
                        "put the real file or directory back inside the roots and launch again"}
    if is_oom(exc):
        tried = re.search(r"Tried to allocate ([0-9.]+ [KMGT]i?B)", str(exc))
        measured = sample.get("max_memory_reserved")
        predicted = spec.get("predicted_peak_bytes")
        parts = [f"CUDA out of memory{f' (tried to allocate {tried.group(1)})' if tried else ''}"]
        if measured is not None and predicted:
            parts.append(f"{measured / GIB:.2f} GiB reserved when it failed, against the plan's {predicted / GIB:.2f} GiB")
        return {"reason": "oom", "summary": ": ".join(parts),
                "hint": "lower --batch-size or --seq-len (raise --gradient-accumulation-steps to keep the batch), turn on --gradient-checkpointing, "
                        "or plan for a larger GPU; the failure is kept beside its prediction (vramplan runs export)"}
    disk = _disk_error(exc)
    if disk is not None:
        where = f" writing {disk.filename}" if disk.filename else ""
        return {"reason": "disk_full", "summary": f"the disk filled{where}: {os.strerror(disk.errno)}",
                "hint": "free space on the disk that holds the run's directory and output_dir (or point output_dir elsewhere), "
                        "then resume the run from its last checkpoint"}
    if isinstance(exc, MemoryError):
        return {"reason": "host_oom", "summary": "the machine ran out of CPU memory",
                "hint": "give the run a machine with more RAM, offload less (--offload none), or plan a smaller batch"}
    if isinstance(exc, ImportError):
        exc = _root_import_error(exc)
        package = _missing_package(exc)
        return {"reason": "missing_package", "summary": f"a package is missing: {package or _first_line(exc)}" + (f" ({_first_line(exc, 200)})" if package else ""),
                "hint": f"pip install {package} in the run's environment, then launch again" if package else f"install what it names; {logs}"}
    if isinstance(exc, NonFiniteLoss):
        rate = f" (now {exc.learning_rate:g})" if exc.learning_rate else ""
        return {"reason": "nan_loss", "summary": str(exc) + ("" if exc.what == "loss" else ": the loss is no longer a number"),
                "hint": f"lower the learning rate{rate}, train in bf16 rather than fp16, keep gradient clipping on (max_grad_norm), "
                        "and check the data for empty or broken rows"}
    if phase == "data" or (phase in ("trainer", "train") and type(exc).__name__ in DATA_ERRORS):
        located = _data_problem(spec)
        if located is not None:
            return {"reason": "data_error", "summary": located, "hint": "fix the dataset, then launch again (vramplan launch --dry-run checks it first)"}
        if phase == "data":
            return {"reason": "data_error", "summary": f"the dataset could not be loaded: {type(exc).__name__}: {_first_line(exc)}",
                    "hint": f"check the dataset's path, format and split; {logs}"}
    return {"reason": None, "summary": f"{type(exc).__name__}: {_first_line(exc)}" if str(exc).strip() else type(exc).__name__, "hint": logs}


# bitsandbytes' CPU backend logs at import, in every run, that it could not load an optional kernel
# from the `kernels` package; it falls back to its own and nothing is wrong. That record alone is
# dropped, so a run's log starts with the run.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernels_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BNB_KERNELS_MESSAGE)


def quiet_optional_kernels() -> None:
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if _not_the_kernels_notice not in logger.filters:
        logger.addFilter(_not_the_kernels_notice)


def uses_bitsandbytes(options: dict) -> bool:
    """Its quantized weights (every quantization the planner has is bitsandbytes') or its 8-bit and
    paged optimizers."""
    from planner.options import BITSANDBYTES_OPTIMIZERS, effective_quantization_of

    return (effective_quantization_of(options.get("method"), options.get("quantization")) != "none"
            or options.get("optimizer") in BITSANDBYTES_OPTIMIZERS)


def leave_bitsandbytes_unloaded(options: dict) -> None:
    """A run that uses nothing of bitsandbytes does not import it. PEFT and TRL import it whenever it is
    installed, and its import compiles kernels with torch.compile: 2.5 s of every run's start on CPU
    (seen with bitsandbytes 0.50.2). A None in sys.modules makes their availability checks say "not
    installed" (importlib.util.find_spec answers None for it) and leaves the rest of the run alone."""
    if not uses_bitsandbytes(options) and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0]).resolve()
    spec = json.loads((run_dir / "spec.json").read_text())
    quiet_optional_kernels()  # before anything imports bitsandbytes
    # a run killed after its grace period first gets SIGUSR1: every thread's stack goes to the log,
    # so a hang says where it hung
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _environment(spec)
    if spec.get("task") == "merge":
        from launcher.merge_job import run_launched

        return run_launched(spec, run_dir)

    leave_bitsandbytes_unloaded(spec.get("options") or {})
    try:
        from launcher.events import EventWriter, LaunchCallback, MemoryProbe, StopFlag
    except BaseException as exc:  # torch or transformers (or what they import) is missing: say so without them
        said = explain(exc, "setup", spec)
        traceback.print_exc()
        print(f"vramplan: the run failed: {said['summary']}\nvramplan: hint: {said['hint']}", file=sys.stderr, flush=True)
        emit_plain(run_dir, spec["run_id"], "error", kind="exception", type=type(exc).__name__, message=str(exc)[:2000], phase="setup", **said)
        return 1

    writer = EventWriter(run_dir, spec["run_id"])
    probe = None
    phase = ["setup"]
    try:

        probe = MemoryProbe()
        stop = StopFlag(run_dir)
        writer.emit("start", pid=os.getpid(), stage=spec["stage"], method=spec["method"], attempt=spec.get("attempt", 1), versions=library_versions())
        callback = LaunchCallback(writer, probe, stop, spec["settings"].get("step_sleep_s", 0.0))
        trainer, training_args = build_trainer(spec, run_dir, [callback], phase)
        phase[0] = "train"
        trainer.train(resume_from_checkpoint=spec.get("resume_from"))
        if not callback.stopping:
            trainer.save_model(training_args.output_dir)
        writer.emit("end", status="stopped" if callback.stopping else "completed", step=trainer.state.global_step,
                    **(probe.sample() if probe else {}))
        code = 0
    except BaseException as exc:
        oom = is_oom(exc)
        sample = probe.sample() if probe is not None and not isinstance(exc, KeyboardInterrupt) else {}
        said = {}
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            try:
                said = explain(exc, phase[0], spec, sample)
            except Exception:  # explaining must never hide the error itself
                said = {}
        try:  # on a full disk the log and the events cannot be written: the exit code still says why
            traceback.print_exc()
            if said:
                print(f"vramplan: the run failed: {said['summary']}\nvramplan: hint: {said['hint']}", file=sys.stderr, flush=True)
        except OSError:
            pass
        try:
            writer.emit("error", kind="oom" if oom else "exception", type=type(exc).__name__, message=str(exc)[:2000], phase=phase[0], **said, **sample)
        except OSError:
            pass
        code = EXIT_OOM if oom else EXIT_DISK_FULL if said.get("reason") == "disk_full" else 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # else rank 0 aborts at exit and the launcher reports a failure
    except Exception:
        pass
    _leave_if_distributed(code)
    return code


def _leave_if_distributed(code: int) -> None:
    """Under several processes, exit here, while the trainer is still referenced. A rank sometimes hung
    for good in the C++ destructors that run when main's frame is torn down (seen on CPU with gloo, in
    1 of 3 two-process runs), after the run's end was written and the group destroyed. Nothing is left
    to do, so leave without tearing down."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a full disk under the log: Python would exit 120 on its own failed flush, hiding the code
        os._exit(exit_code)
    sys.exit(exit_code)
