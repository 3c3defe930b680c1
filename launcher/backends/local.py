"""`local`: the run on this machine. One process, or `accelerate launch` with the plan's config for
several GPUs (or several CPU processes over gloo, for tests). GPUs are named by NVML UUID.

Every process of a run carries VRAMPLAN_RUN_ID in its environment. That is how a kill finds them
all: torchrun starts each worker in a session of its own, so killing the launcher's process group
leaves the workers running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import psutil
from pydantic import BaseModel, ConfigDict, Field

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
from launcher.exports import accelerate_config, trl_config
from launcher.spec import ENV_ALLOWLIST, SECRET_ENV, LaunchSpec

LOG_FILE = "train.log"
EXIT_FILE = "exit.json"
MARKER = "VRAMPLAN_RUN_ID"
EXIT_OOM = 3


class LocalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grace_period_s: float = Field(default=120.0, ge=1, le=3600, description="seconds a cancelled run has to checkpoint and exit before it is killed")


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run_files(spec: LaunchSpec) -> dict[str, str]:
    """The files every backend writes into a run directory: the spec and the TRL file it runs."""
    return {"spec.json": spec.model_dump_json(indent=2), "trl.yaml": _yaml(trl_config(spec))}


def shown_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment as a dry run shows it: secrets masked."""
    return {k: ("***" if k in SECRET_ENV else v) for k, v in env.items()}


def read_log_file(run_dir: Path, offset: int, limit: int) -> LogChunk:
    """A run's train.log from a byte offset (backends whose log lands in the run directory)."""
    path = run_dir / LOG_FILE
    if not path.exists():
        return LogChunk("", offset, True)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(limit)
    return LogChunk(data.decode("utf-8", "replace"), offset + len(data), len(data) < limit)


def run_environment(spec: LaunchSpec, source: dict[str, str] | None = None) -> dict[str, str]:
    source = dict(os.environ if source is None else source)
    env = {k: v for k, v in source.items() if k in ENV_ALLOWLIST}
    env[MARKER] = spec.run_id
    env["PYTHONUNBUFFERED"] = "1"
    if spec.alloc_conf():
        env["PYTORCH_CUDA_ALLOC_CONF"] = spec.alloc_conf()
    if spec.resources.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif spec.resources.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.resources.gpus)  # CUDA takes UUIDs here too
    # the run runs from its own directory; the project must stay importable when it is not installed
    project_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH", "")) if p)
    return env


def _alive(handle: Handle) -> bool:
    """The run's shim is alive: same pid and the same start time (a reused pid is another process)."""
    try:
        proc = psutil.Process(int(handle.data["pid"]))
        return abs(proc.create_time() - float(handle.data["create_time"])) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
        return False


def run_processes(run_id: str) -> list[psutil.Process]:
    """Every process of ours whose environment carries the run's marker."""
    me = os.getuid()
    found = []
    for proc in psutil.process_iter(["pid", "uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != me or proc.pid == os.getpid():
                continue
            if proc.environ().get(MARKER) == run_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class LocalBackend:
    name: ClassVar[str] = "local"
    api_version: ClassVar[int] = API_VERSION
    capabilities: ClassVar[frozenset[str]] = frozenset({"multi_gpu", "graceful_cancel", "reattach", "events_file", "gpu_metrics", "admission"})
    Options: ClassVar[type[BaseModel]] = LocalOptions

    def check(self) -> Health:
        from gpu_catalog.detect import detect

        found = detect()
        if found.gpus:
            names = ", ".join(f"{g.name} ({g.free_bytes / (1 << 30):.1f} GiB free)" for g in found.gpus)
            return Health(True, f"this machine: {len(found.gpus)} GPU(s): {names}")
        return Health(True, f"this machine, CPU only ({found.reason}); runs need --device cpu")

    def render(self, spec: LaunchSpec, run_dir: Path, options: BaseModel) -> Rendered:
        files = run_files(spec)
        entry = (sys.executable, "-m", "launcher.entry", str(run_dir))
        accel = accelerate_config(spec)
        if accel is not None:
            files["accelerate.yaml"] = _yaml(accel)
            # torchrun's rendezvous port: a free one, so two runs on one machine never collide
            trainer = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(run_dir / "accelerate.yaml"),
                       "--main_process_port", str(_free_port()), "-m", "launcher.entry", str(run_dir))
        else:
            trainer = entry
        argv = (sys.executable, "-m", "launcher.shim", str(run_dir), "--", *trainer)
        env = run_environment(spec)
        shown = shown_environment(env)
        processes = spec.resources.num_processes
        where = "CPU" if spec.resources.device == "cpu" else (", ".join(spec.resources.gpus) or "the visible GPU")
        summary = f"{spec.method} {spec.stage} of {spec.model.location} in {processes} process(es) on {where}; output in {spec.output_dir}"
        return Rendered(files=files, argv=argv, env=shown, summary=summary)

    def submit(self, rendered: Rendered, run_dir: Path) -> Handle:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.files.items():
            path = run_dir / name
            path.write_text(text)
            os.chmod(path, 0o600)
        spec = LaunchSpec.model_validate_json(rendered.files["spec.json"])
        env = run_environment(spec)  # the real values: Rendered.env hides secrets
        log = open(run_dir / LOG_FILE, "ab")
        try:
            proc = subprocess.Popen(rendered.argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise LaunchError(f"could not start {rendered.argv[0]}: {exc.strerror or exc}") from exc
        finally:
            log.close()
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = time.time()
        return Handle(self.name, {"pid": proc.pid, "pgid": proc.pid, "create_time": create_time, "marker": spec.run_id})

    def poll(self, handle: Handle, run_dir: Path) -> Observation:
        exit_path = run_dir / EXIT_FILE
        if exit_path.exists():
            record = json.loads(exit_path.read_text())
            code = record.get("exit_code")
            if code == 0:
                return Observation(RunState.SUCCEEDED, exit_code=0)
            if code == EXIT_OOM:
                return Observation(RunState.FAILED, Reason.OOM, code, "CUDA out of memory")
            if record.get("signal"):
                return Observation(RunState.FAILED, Reason.KILLED_AFTER_GRACE if record["signal"] == signal.SIGKILL else Reason.EXIT_NONZERO, None,
                                   f"the trainer was ended by signal {record['signal']}")
            return Observation(RunState.FAILED, Reason.EXIT_NONZERO, code, f"the trainer exited with code {code}")
        if _alive(handle):
            return Observation(RunState.RUNNING)
        return Observation(RunState.LOST, Reason.SERVER_RESTART, None, "no process and no exit record")

    def cancel(self, handle: Handle, run_dir: Path) -> None:
        # every rank checks the stop file after each step and all ranks agree before stopping
        (run_dir / "STOP").write_text(str(time.time()))

    def kill(self, handle: Handle, run_dir: Path) -> None:
        procs = run_processes(str(handle.data.get("marker")))
        trainers = [p for p in procs if _is_entry(p)]
        for proc in trainers:  # the entry dumps its stacks to the log on SIGUSR1: where it hung
            try:
                proc.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
        if trainers:
            time.sleep(0.5)
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        try:
            os.killpg(int(handle.data["pgid"]), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, KeyError, ValueError):
            pass

    def read_logs(self, handle: Handle | None, run_dir: Path, offset: int, limit: int) -> LogChunk:
        return read_log_file(run_dir, offset, limit)


def _is_entry(proc: psutil.Process) -> bool:
    try:
        return "launcher.entry" in proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
