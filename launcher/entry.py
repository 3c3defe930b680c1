"""The program a launched run executes: `python -m launcher.entry RUN_DIR`.

It reads RUN_DIR/spec.json and RUN_DIR/trl.yaml (parsed by TRL's own TrlParser, the same file
`vramplan export --format trl` writes), builds the stage's TRL trainer with PEFT and bitsandbytes as
the plan says, and reports through events.jsonl. Exit codes: 0 done (or stopped on request, with a
checkpoint), 3 CUDA out of memory, 1 any other error.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import traceback
from pathlib import Path

EXIT_OOM = 3


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


def build_trainer(spec: dict, run_dir: Path, callbacks: list):
    from trl import get_peft_config, get_quantization_config

    stage = spec["stage"]
    trainer_cls, script_args, training_args, model_args, dataset_args = _parse(stage, run_dir / "trl.yaml")
    kwargs = {
        "model": model_args.model_name_or_path,
        "args": training_args,
        "train_dataset": _dataset(script_args, dataset_args),
        "peft_config": get_peft_config(model_args),
        "callbacks": callbacks,
    }
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "quantization_config": quantization}
        if spec["resources"]["device"] == "cuda":
            from trl import get_kbit_device_map

            training_args.model_init_kwargs["device_map"] = get_kbit_device_map()
    if stage in ("grpo", "rloo"):
        kwargs["reward_funcs"] = _reward_funcs(spec["settings"])
    return trainer_cls(**kwargs), training_args


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0]).resolve()
    spec = json.loads((run_dir / "spec.json").read_text())
    # a run killed after its grace period first gets SIGUSR1: every thread's stack goes to the log,
    # so a hang says where it hung
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _environment(spec)

    from launcher.events import EventWriter, LaunchCallback, MemoryProbe, StopFlag

    writer = EventWriter(run_dir, spec["run_id"])
    probe = None
    try:

        probe = MemoryProbe()
        stop = StopFlag(run_dir)
        writer.emit("start", pid=os.getpid(), stage=spec["stage"], method=spec["method"], attempt=spec.get("attempt", 1), versions=_versions())
        callback = LaunchCallback(writer, probe, stop, spec["settings"].get("step_sleep_s", 0.0))
        trainer, training_args = build_trainer(spec, run_dir, [callback])
        trainer.train(resume_from_checkpoint=spec.get("resume_from"))
        if not callback.stopping:
            trainer.save_model(training_args.output_dir)
        writer.emit("end", status="stopped" if callback.stopping else "completed", step=trainer.state.global_step,
                    **(probe.sample() if probe else {}))
        code = 0
    except BaseException as exc:
        oom = _is_oom(exc)
        sample = probe.sample() if probe is not None and not isinstance(exc, KeyboardInterrupt) else {}
        writer.emit("error", kind="oom" if oom else "exception", type=type(exc).__name__, message=str(exc)[:2000], **sample)
        traceback.print_exc()
        code = EXIT_OOM if oom else 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # else rank 0 aborts at exit and the launcher reports a failure
    except Exception:
        pass
    _leave_if_distributed(code)
    return code


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


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
    sys.exit(main())
