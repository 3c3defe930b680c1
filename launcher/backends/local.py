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
import threading
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
from launcher.exports import accelerate_config
from launcher.run_files import (
    EXIT_FILE,
    EXIT_OOM,
    LOG_FILE,
    MARKER,
    STOP_FILE,
    accelerate_argv,
    entry_argv,
    read_log_file,
    rendered_spec,
    run_environment,
    run_files,
    shim_argv,
    shown_environment,
    write_files,
    yaml_text,
)
from launcher.entry import EXIT_DISK_FULL
from launcher.shim import LOW_DISK_BYTES, free_bytes
from launcher.spec import LaunchSpec


class LocalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grace_period_s: float = Field(default=120.0, ge=1, le=3600, description="seconds a cancelled run has to checkpoint and exit before it is killed")


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
        accel = accelerate_config(spec)
        if accel is not None:
            files["accelerate.yaml"] = yaml_text(accel)
            # torchrun's rendezvous port: a free one, so two runs on one machine never collide
            trainer = accelerate_argv(sys.executable, run_dir / "accelerate.yaml", run_dir, "--main_process_port", str(_free_port()))
        else:
            trainer = entry_argv(sys.executable, run_dir)
        argv = shim_argv(sys.executable, run_dir, trainer)
        env = run_environment(spec)
        shown = shown_environment(env)
        processes = spec.resources.num_processes
        where = "CPU" if spec.resources.device == "cpu" else (", ".join(spec.resources.gpus) or "the visible GPU")
        summary = f"{spec.method} {spec.stage} of {spec.model.location} in {processes} process(es) on {where}; output in {spec.output_dir}"
        return Rendered(files=files, argv=argv, env=shown, summary=summary)

    def submit(self, rendered: Rendered, run_dir: Path) -> Handle:
        write_files(run_dir, rendered.files, 0o600)
        spec = rendered_spec(rendered)
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
        # reap the shim when it ends: a finished run is no zombie until the next launch's Popen collects it
        threading.Thread(target=proc.wait, name=f"reap-{spec.run_id[:8]}", daemon=True).start()
        return Handle(self.name, {"pid": proc.pid, "pgid": proc.pid, "create_time": create_time, "marker": spec.run_id})

    def poll(self, handle: Handle, run_dir: Path) -> Observation:
        exit_path = run_dir / EXIT_FILE
        if exit_path.exists():
            return _ended(json.loads(exit_path.read_text()), run_dir)
        if _alive(handle):
            return Observation(RunState.RUNNING)
        if exit_path.exists():  # the shim wrote its record between the two looks
            return _ended(json.loads(exit_path.read_text()), run_dir)
        return self._lost(handle, run_dir)

    def _lost(self, handle: Handle, run_dir: Path) -> Observation:
        """No shim and no exit record: the machine restarted under the run, or the shim was killed."""
        try:
            started = float(handle.data["create_time"])
        except (KeyError, ValueError):
            started = None
        if started is not None and started < psutil.boot_time():
            return Observation(RunState.LOST, Reason.SERVER_RESTART, None,
                               "the machine restarted while the run was live: no process and no exit record")
        # the shim's trainer dies with it (PR_SET_PDEATHSIG); what a launcher started in sessions of its own may not
        left = run_processes(str(handle.data.get("marker")))
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)
        stopped = f"; {len(left)} process(es) of the run left behind were killed" if left else ""
        free = free_bytes(run_dir)
        if free is not None and free < LOW_DISK_BYTES:
            return Observation(RunState.LOST, Reason.DISK_FULL, None,
                               f"the run's shim (pid {handle.data.get('pid')}) ended without an exit record and the disk under {run_dir} "
                               f"is full ({free} bytes free){stopped}")
        return Observation(RunState.LOST, Reason.SHIM_KILLED, None,
                           f"the run's shim (pid {handle.data.get('pid')}) was killed before it could record the trainer's exit "
                           f"(no exit record; the trainer ends with its shim){stopped}; resume from the last checkpoint")

    def cancel(self, handle: Handle, run_dir: Path) -> None:
        # every rank checks the stop file after each step and all ranks agree before stopping
        (run_dir / STOP_FILE).write_text(str(time.time()))

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


def _ended(record: dict, run_dir: Path) -> Observation:
    """The Observation of a run whose shim wrote its exit record."""
    code = record.get("exit_code")
    if code == 0:
        return Observation(RunState.SUCCEEDED, exit_code=0)
    if code == EXIT_OOM:
        return Observation(RunState.FAILED, Reason.OOM, code, "CUDA out of memory")
    if code == EXIT_DISK_FULL or record.get("disk_full"):
        free = record.get("free_bytes")
        left = f" ({free} bytes left)" if isinstance(free, int) else ""
        return Observation(RunState.FAILED, Reason.DISK_FULL, code,
                           f"the disk under the run's directory or output filled{left}: No space left on device")
    number = record.get("signal")
    if number:
        try:
            name = signal.Signals(int(number)).name
        except ValueError:
            name = f"signal {number}"
        why = " (the kernel's OOM killer sends it when the host runs out of memory)" if int(number) == signal.SIGKILL else ""
        # killed_after_grace is the supervisor's own kill after a cancel; a signal nobody here sent is `killed`
        return Observation(RunState.FAILED, Reason.KILLED, None,
                           f"the trainer was killed by {name} (signal {number}) without a cancel{why}")
    if record.get("error"):
        return Observation(RunState.FAILED, Reason.LAUNCH_FAILED, code, f"the trainer could not be started: {record['error']}")
    return Observation(RunState.FAILED, Reason.EXIT_NONZERO, code, f"the trainer exited with code {code}")


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
