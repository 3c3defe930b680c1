"""`slurm`: the run as an sbatch job, on the cluster a lab already has. No Python dependency: the
four commands (sbatch, squeue, scontrol, scancel), each with a timeout.

The job script starts one shim per node with `srun`; on a multi-node plan each node runs
`accelerate launch` with the plan's config, its machine rank from SLURM_NODEID and the rendezvous on
the job's first node. The run directory must be on a filesystem the nodes share: events, logs and the
exit record are written there, so the run's end is known without `sacct` (clusters without
accounting exist) and after `scontrol` has forgotten the job.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from launcher.allowlists import python_interpreter
from launcher.backend import (
    API_VERSION,
    Handle,
    Health,
    LaunchError,
    LogChunk,
    Observation,
    Reason,
    Rendered,
    RunState,
)
from launcher.exports import accelerate_config
from launcher.run_files import (
    ACCELERATE_MODULE,
    ENTRY_MODULE,
    EXIT_OOM,
    LOG_FILE,
    SHIM_MODULE,
    STOP_FILE,
    read_exit,
    read_log_file,
    rendered_spec,
    run_environment,
    run_files,
    shown_environment,
    write_files,
    yaml_text,
)
from launcher.spec import SECRET_ENV, LaunchSpec

COMMAND_TIMEOUT_S = 30
RENDEZVOUS_PORT = 29500
# Slurm's job states (squeue %T / scontrol JobState) -> the run's state and reason
STATES: dict[str, tuple[RunState, Reason | None]] = {
    "PENDING": (RunState.STARTING, None),
    "CONFIGURING": (RunState.STARTING, None),
    "REQUEUED": (RunState.STARTING, None),
    "REQUEUE_HOLD": (RunState.STARTING, None),
    "REQUEUE_FED": (RunState.STARTING, None),
    "RESV_DEL_HOLD": (RunState.STARTING, None),
    "RUNNING": (RunState.RUNNING, None),
    "COMPLETING": (RunState.RUNNING, None),
    "SUSPENDED": (RunState.RUNNING, None),
    "STOPPED": (RunState.RUNNING, None),
    "SIGNALING": (RunState.RUNNING, None),
    "STAGE_OUT": (RunState.RUNNING, None),
    "RESIZING": (RunState.RUNNING, None),
    "COMPLETED": (RunState.SUCCEEDED, None),
    "CANCELLED": (RunState.CANCELLED, Reason.CANCELLED_BY_USER),
    "FAILED": (RunState.FAILED, Reason.EXIT_NONZERO),
    "TIMEOUT": (RunState.FAILED, Reason.TIMEOUT),
    "DEADLINE": (RunState.FAILED, Reason.TIMEOUT),
    "OUT_OF_MEMORY": (RunState.FAILED, Reason.HOST_OOM),
    "PREEMPTED": (RunState.FAILED, Reason.PREEMPTED),
    "NODE_FAIL": (RunState.FAILED, Reason.NODE_FAIL),
    "BOOT_FAIL": (RunState.FAILED, Reason.NODE_FAIL),
    "SPECIAL_EXIT": (RunState.FAILED, Reason.EXIT_NONZERO),
    "REVOKED": (RunState.CANCELLED, Reason.CANCELLED_BY_USER),
}
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class SlurmOptions(BaseModel):
    """Bounded: a request can name a partition and an account, never an sbatch line of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    partition: str | None = Field(default=None, pattern=NAME.pattern)
    account: str | None = Field(default=None, pattern=NAME.pattern)
    qos: str | None = Field(default=None, pattern=NAME.pattern)
    time_limit: str = Field(default="24:00:00", pattern=r"^(\d{1,3}-)?\d{1,3}(:\d{2}){0,2}$", description="sbatch --time: [D-]HH[:MM[:SS]] or minutes")
    gpus_per_node: int | None = Field(default=None, ge=1, le=16, description="default: the plan's GPUs, up to 8 a node")
    cpus_per_task: int | None = Field(default=None, ge=1, le=256, description="default: the partition's")
    signal_before_end_s: int = Field(default=300, ge=30, le=3600, description="SIGTERM this long before the time limit: the run checkpoints and stops")
    grace_period_s: float = Field(default=120.0, ge=1, le=3600)
    python: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_./\-]{1,512}$",
                               description="the nodes' Python with vramplan installed (default: this one, on a shared filesystem)")

    @field_validator("python")
    @classmethod
    def _a_python(cls, value: str | None) -> str | None:
        return None if value is None else python_interpreter(value)  # never /bin/sh: the sbatch line execs it


def _run(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env, cwd=cwd, check=False)


def layout(spec: LaunchSpec, options: SlurmOptions) -> tuple[int, int]:
    """(nodes, processes per node) for the plan's GPUs."""
    total = spec.resources.num_processes * spec.resources.num_nodes
    per_node = options.gpus_per_node or min(total, 8)
    if total % per_node:
        raise LaunchError(f"the plan's {total} GPUs do not split into nodes of {per_node}; set gpus_per_node to a divisor of {total}")
    return total // per_node, per_node


def job_script(spec: LaunchSpec, run_dir: Path, options: SlurmOptions, env: dict[str, str]) -> str:
    nodes, per_node = layout(spec, options)
    python = shlex.quote(options.python or sys.executable)
    run = shlex.quote(str(run_dir))
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=vramplan-{spec.run_id[:8]}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={options.time_limit}",
        # the run's own SIGTERM handling checkpoints and stops before the time limit kills it
        f"#SBATCH --signal=TERM@{options.signal_before_end_s}",
        f"#SBATCH --output={run}/{LOG_FILE}",
        "#SBATCH --open-mode=append",
    ]
    if spec.resources.device == "cuda":
        lines.append(f"#SBATCH --gres=gpu:{per_node}")
    for flag, value in (("cpus-per-task", options.cpus_per_task), ("partition", options.partition), ("account", options.account), ("qos", options.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += ["", "set -euo pipefail", f"cd {run}"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items()) if name not in SECRET_ENV and name != "CUDA_VISIBLE_DEVICES"]
    entry = f"-m {ENTRY_MODULE} {run}"
    if nodes == 1 and per_node == 1:
        trainer = f"{python} {entry}"
    else:
        lines += [
            # exported: each node's `bash -c` below reads it
            'export head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        ]
        trainer = (f"{python} -m {ACCELERATE_MODULE} --config_file {run}/accelerate.yaml --num_machines {nodes} "
                   f"--num_processes {nodes * per_node} --machine_rank \"$SLURM_NODEID\" --main_process_ip \"$head_node\" "
                   f"--main_process_port {RENDEZVOUS_PORT} {entry}")
    # one task per node; bash -c so that each node expands its own SLURM_NODEID
    inner = f"exec {python} -m {SHIM_MODULE} {run} -- {trainer}"
    lines += ["", f"srun --kill-on-bad-exit=1 --export=ALL bash -c {shlex.quote(inner)}", ""]
    return "\n".join(lines)


class SlurmBackend:
    name: ClassVar[str] = "slurm"
    api_version: ClassVar[int] = API_VERSION
    capabilities: ClassVar[frozenset[str]] = frozenset({"multi_gpu", "multi_node", "graceful_cancel", "reattach", "events_file", "gpu_metrics", "queue"})
    Options: ClassVar[type[BaseModel]] = SlurmOptions

    def check(self) -> Health:
        missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel") if shutil.which(c) is None]
        if missing:
            return Health(False, f"{', '.join(missing)} not on PATH: install Slurm's client commands (Debian: slurm-client) on this machine")
        try:
            result = _run(["sinfo", "-h", "-o", "%P %a %D"]) if shutil.which("sinfo") else None
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Health(False, f"sinfo did not answer: {exc}")
        if result is not None and result.returncode != 0:
            return Health(False, f"the Slurm controller does not answer: {(result.stderr or result.stdout).strip()[:200]}")
        partitions = ", ".join(line.split()[0] for line in (result.stdout.splitlines() if result else []) if line.strip())
        return Health(True, f"Slurm: partitions {partitions or 'unknown'}")

    def render(self, spec: LaunchSpec, run_dir: Path, options: BaseModel) -> Rendered:
        assert isinstance(options, SlurmOptions)
        files = run_files(spec)
        nodes, per_node = layout(spec, options)
        if nodes * per_node > 1:
            accel = accelerate_config(spec) or {}
            accel.update(num_machines=nodes, num_processes=nodes * per_node, rdzv_backend="static", same_network=False)
            files["accelerate.yaml"] = yaml_text(accel)
        env = run_environment(spec)
        files["job.sbatch"] = job_script(spec, run_dir, options, env)
        shown = shown_environment(env)
        where = f"{nodes} node(s) x {per_node} {'GPU' if spec.resources.device == 'cuda' else 'process'}{'s' if per_node > 1 else ''}"
        summary = f"{spec.method} {spec.stage} of {spec.model.location} as an sbatch job on {where}; output in {spec.output_dir}"
        return Rendered(files=files, argv=("sbatch", "--parsable", str(run_dir / "job.sbatch")), env=shown, summary=summary)

    def submit(self, rendered: Rendered, run_dir: Path) -> Handle:
        write_files(run_dir, rendered.files)
        (run_dir / "job.sbatch").chmod(0o700)
        spec = rendered_spec(rendered)
        env = {**run_environment(spec)}  # secrets reach sbatch's environment (--export=ALL), never the script
        try:
            result = _run(list(rendered.argv), env=env, cwd=run_dir)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LaunchError(f"sbatch failed: {exc}") from exc
        if result.returncode != 0:
            raise LaunchError(f"sbatch refused the job: {(result.stderr or result.stdout).strip()[:500]}")
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise LaunchError(f"sbatch printed no job id: {result.stdout.strip()[:200]!r}")
        return Handle(self.name, {"job_id": job_id, "marker": spec.run_id, "submitted_at": time.time()})

    def _slurm_state(self, job_id: str) -> str | None:
        try:
            result = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
            state = result.stdout.strip().split("\n")[0].strip() if result.returncode == 0 else ""
            if state:
                return state
            result = _run(["scontrol", "show", "job", job_id])
        except (OSError, subprocess.TimeoutExpired):
            return "UNREACHABLE"
        match = re.search(r"JobState=(\S+)", result.stdout or "")
        return match.group(1) if match else None

    def poll(self, handle: Handle, run_dir: Path) -> Observation:
        state = self._slurm_state(str(handle.data["job_id"]))
        exit_record = read_exit(run_dir)
        if state == "UNREACHABLE":
            return Observation(None, Reason.BACKEND_UNREACHABLE, message="squeue did not answer")
        if state is None:  # past MinJobAge, no accounting: the run's own record decides
            if exit_record is None:
                return Observation(RunState.LOST, Reason.SERVER_RESTART, None, "Slurm no longer knows the job and the run left no exit record")
            return _from_exit(exit_record)
        run_state, reason = STATES.get(state.split()[0].rstrip("+"), (RunState.RUNNING, None))
        if run_state == RunState.SUCCEEDED and exit_record is not None:
            return _from_exit(exit_record)
        if run_state == RunState.FAILED and exit_record is not None and exit_record.get("exit_code") == EXIT_OOM:
            return Observation(RunState.FAILED, Reason.OOM, EXIT_OOM, "CUDA out of memory")
        if run_state in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED):
            return Observation(run_state, reason, exit_record.get("exit_code") if exit_record else None, f"Slurm job {handle.data['job_id']}: {state}")
        return Observation(run_state)

    def cancel(self, handle: Handle, run_dir: Path) -> None:
        # the stop file, and SIGTERM to the job's steps (not the batch shell): the trainer checkpoints,
        # exits 0 and the job completes; the supervisor knows it was a stop from the run's events
        (run_dir / STOP_FILE).write_text(str(time.time()))
        try:
            _run(["scancel", "--signal=TERM", str(handle.data["job_id"])])
        except (OSError, subprocess.TimeoutExpired):
            pass

    def kill(self, handle: Handle, run_dir: Path) -> None:
        try:
            _run(["scancel", str(handle.data["job_id"])])  # Slurm's process tracking reaches every process
        except (OSError, subprocess.TimeoutExpired):
            pass

    def read_logs(self, handle: Handle | None, run_dir: Path, offset: int, limit: int) -> LogChunk:
        return read_log_file(run_dir, offset, limit)  # sbatch --output is the run directory's train.log


def _from_exit(record: dict) -> Observation:
    code = record.get("exit_code")
    if code == 0:
        return Observation(RunState.SUCCEEDED, exit_code=0)
    if code == EXIT_OOM:
        return Observation(RunState.FAILED, Reason.OOM, code, "CUDA out of memory")
    return Observation(RunState.FAILED, Reason.EXIT_NONZERO, code, f"the trainer exited with code {code}")
