"""What every backend shares: a run's files, its YAML, its environment, its argv and its log.

A run directory holds, whatever backend starts the run:

- ``spec.json``: the LaunchSpec (written by the backend's submit(); the entry reads it);
- ``trl.yaml``: the TRL config the entry runs (the same file ``vramplan export --format trl`` writes);
- ``accelerate.yaml``: when the plan needs ``accelerate launch`` (several processes or a sharding);
- ``train.log`` (LOG_FILE): the run's stdout and stderr;
- ``events.jsonl`` (EVENTS_FILE): what the entry reports, one JSON line per event (or, with
  ``VRAMPLAN_EVENTS_TO_LOG=1``, ``VRAMPLAN_EVENT {json}`` lines in the log for a backend to copy here);
- ``exit.json`` (EXIT_FILE): written atomically by the shim when the trainer ends;
- ``STOP`` (STOP_FILE): written by a graceful cancel; every rank checks it after each step.

The run executes ``python -m launcher.shim RUN_DIR -- python -m launcher.entry RUN_DIR`` (or the
entry under ``accelerate launch``) wherever the backend puts it. The shim records the exit; the entry
exits 0 when done or stopped on request, EXIT_OOM on CUDA out of memory, 1 on any other error.

This module is public: vramplan's own backends (local, slurm, ray) and third-party plugins import
from here, never from another backend's private helpers. It imports nothing heavy (no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from launcher.backend import LogChunk, Rendered
from launcher.exports import trl_config
from launcher.merge_job import MALLOC_ENV
from launcher.run_report import (
    EXIT_OOM,  # re-exported: a run's exit code on CUDA out of memory
)
from launcher.shim import EXIT_FILE  # re-exported: the shim's exit record, exit.json
from launcher.spec import ENV_ALLOWLIST, SECRET_ENV, LaunchSpec

__all__ = [
    "ACCELERATE_MODULE",
    "ENTRY_MODULE",
    "EVENTS_FILE",
    "EVENTS_TO_LOG_ENV",
    "EVENT_LOG_PREFIX",
    "EXIT_FILE",
    "EXIT_OOM",
    "LOG_FILE",
    "MARKER",
    "SHIM_MODULE",
    "STOP_FILE",
    "accelerate_argv",
    "entry_argv",
    "read_exit",
    "read_log_file",
    "rendered_spec",
    "run_environment",
    "run_files",
    "shim_argv",
    "shown_environment",
    "write_files",
    "yaml_text",
]

LOG_FILE = "train.log"
EVENTS_FILE = "events.jsonl"  # launcher.events.EVENTS_FILE (that module imports torch, so it is not imported here)
STOP_FILE = "STOP"  # launcher.events.STOP_FILE
EVENT_LOG_PREFIX = "VRAMPLAN_EVENT "  # launcher.events.LOG_PREFIX
EVENTS_TO_LOG_ENV = "VRAMPLAN_EVENTS_TO_LOG"  # "1": the entry prints its events into the log instead of events.jsonl
# Every process of a run carries VRAMPLAN_RUN_ID=<run id> in its environment: how the local backend's
# kill finds them all (torchrun starts each worker in a session of its own).
MARKER = "VRAMPLAN_RUN_ID"
SHIM_MODULE = "launcher.shim"
ENTRY_MODULE = "launcher.entry"
ACCELERATE_MODULE = "accelerate.commands.launch"


def yaml_text(data) -> str:
    """``data`` as YAML in the order given (how trl.yaml and accelerate.yaml are written)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run_files(spec: LaunchSpec) -> dict[str, str]:
    """The files every backend writes into a run directory: the spec and the TRL file it runs.

    ``{"spec.json": ..., "trl.yaml": ...}``; a backend adds its own (accelerate.yaml, a job script)
    to the dict it returns in Rendered.files.
    """
    if spec.task == "merge":  # no trainer: launcher/merge_job.py reads the spec alone
        return {"spec.json": spec.model_dump_json(indent=2)}
    return {"spec.json": spec.model_dump_json(indent=2), "trl.yaml": yaml_text(trl_config(spec))}


def rendered_spec(rendered: Rendered) -> LaunchSpec:
    """The LaunchSpec back from a render's spec.json (submit() receives only the Rendered)."""
    return LaunchSpec.model_validate_json(rendered.files["spec.json"])


def write_files(run_dir: Path, files: Mapping[str, str], mode: int | None = None) -> None:
    """Write a render's files into the run directory (created if missing); ``mode``: chmod each file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = run_dir / name
        path.write_text(text)
        if mode is not None:
            os.chmod(path, mode)


def run_environment(spec: LaunchSpec, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The run's real environment: the allowed variables of ``source`` (default: this process's),
    the run marker, unbuffered output, the allocator setting, the chosen GPUs (by UUID; none on CPU)
    and a PYTHONPATH that keeps this project importable from the run directory. Secrets included:
    show it with shown_environment(), never as it is."""
    source = dict(os.environ if source is None else source)
    env = {k: v for k, v in source.items() if k in ENV_ALLOWLIST}
    env[MARKER] = spec.run_id
    env["PYTHONUNBUFFERED"] = "1"
    if spec.task == "merge":
        env.update(MALLOC_ENV)
    if spec.alloc_conf():
        env["PYTORCH_CUDA_ALLOC_CONF"] = spec.alloc_conf()
    if spec.resources.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif spec.resources.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.resources.gpus)  # CUDA takes UUIDs here too
    # the run runs from its own directory; the project must stay importable when it is not installed
    project_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH", "")) if p)
    return env


def shown_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment as a dry run shows it (Rendered.env): secrets masked as "***"."""
    return {k: ("***" if k in SECRET_ENV else v) for k, v in env.items()}


def entry_argv(python: str, run_dir: str | Path) -> tuple[str, ...]:
    """``python -m launcher.entry RUN_DIR``: the trainer, one process."""
    return (python, "-m", ENTRY_MODULE, str(run_dir))


def accelerate_argv(python: str, config_file: str | Path, run_dir: str | Path, *launch_args: str) -> tuple[str, ...]:
    """``python -m accelerate.commands.launch --config_file CONFIG [LAUNCH_ARGS] -m launcher.entry RUN_DIR``."""
    return (python, "-m", ACCELERATE_MODULE, "--config_file", str(config_file), *launch_args, "-m", ENTRY_MODULE, str(run_dir))


def shim_argv(python: str, run_dir: str | Path, trainer: Sequence[str]) -> tuple[str, ...]:
    """``python -m launcher.shim RUN_DIR -- TRAINER...``: what a backend starts. The shim runs the
    trainer as its child, ignores SIGTERM/SIGINT itself and writes exit.json when the child ends."""
    return (python, "-m", SHIM_MODULE, str(run_dir), "--", *trainer)


def read_log_file(run_dir: Path, offset: int, limit: int) -> LogChunk:
    """A run's train.log from a byte offset (backends whose log lands in the run directory): at most
    ``limit`` bytes; ``eof`` when fewer came back; an empty chunk at ``offset`` while there is no log."""
    path = run_dir / LOG_FILE
    if not path.exists():
        return LogChunk("", offset, True)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(limit)
    return LogChunk(data.decode("utf-8", "replace"), offset + len(data), len(data) < limit)


def read_exit(run_dir: Path) -> dict | None:
    """The shim's exit record (``exit_code``, ``signal``, ``started_at``, ``finished_at``, ...), or
    None while there is none (or it cannot be read)."""
    try:
        return json.loads((run_dir / EXIT_FILE).read_text())
    except (OSError, ValueError):
        return None
