"""`ray`: the run as a Ray Job on a Ray cluster (`ray.job_submission`), for teams that run Ray.

Needs the `ray` extra (`pip install 'vramplan[ray]'`); without it the backend says so and is
unavailable. The run's files (spec.json, trl.yaml, accelerate.yaml) travel as the job's working
directory, so no shared filesystem is needed: the entry prints its events into the job's log as
`VRAMPLAN_EVENT {json}` lines, and polling copies them into the run directory. The cluster's Python
must have vramplan with its `launch` extra installed, and the dataset and output paths must exist
there. One run is one job on one node (its GPUs through `accelerate launch`).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from launcher.allowlists import cluster_address, python_interpreter
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
    EVENT_LOG_PREFIX,
    EVENTS_FILE,
    EVENTS_TO_LOG_ENV,
    EXIT_OOM,
    LOG_FILE,
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
from launcher.spec import LaunchSpec

INSTALL = "pip install 'vramplan[ray]'"
STATES = {
    "PENDING": (RunState.STARTING, None),
    "RUNNING": (RunState.RUNNING, None),
    "STOPPED": (RunState.CANCELLED, Reason.CANCELLED_BY_USER),
    "SUCCEEDED": (RunState.SUCCEEDED, None),
    "FAILED": (RunState.FAILED, Reason.EXIT_NONZERO),
}


class RayOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str = Field(default="http://127.0.0.1:8265", pattern=r"^https?://[A-Za-z0-9.\-\[\]:]{1,253}(:\d{1,5})?/?$",
                         description="the Ray dashboard's address (the Jobs API)")
    python: str = Field(default="python", pattern=r"^[A-Za-z0-9_./\-]{1,512}$", description="the Python on the cluster that has vramplan installed")
    grace_period_s: float = Field(default=120.0, ge=1, le=3600, description="Ray's stop wait: seconds between SIGTERM and SIGKILL")

    @field_validator("python")
    @classmethod
    def _a_python(cls, value: str) -> str:
        return python_interpreter(value)  # the job's entrypoint execs it

    @field_validator("address")
    @classmethod
    def _a_cluster(cls, value: str) -> str:
        return cluster_address(value)  # the server sends it requests: never a metadata service


def _client(address: str):
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise LaunchError(f"the ray backend needs Ray: {INSTALL}") from exc
    return JobSubmissionClient(address)


class RayBackend:
    name: ClassVar[str] = "ray"
    api_version: ClassVar[int] = API_VERSION
    capabilities: ClassVar[frozenset[str]] = frozenset({"multi_gpu", "graceful_cancel", "reattach", "gpu_metrics", "queue"})
    Options: ClassVar[type[BaseModel]] = RayOptions

    def check(self, options: RayOptions | None = None) -> Health:
        try:
            import ray  # noqa: F401
        except ImportError:
            return Health(False, f"Ray is not installed: {INSTALL}")
        address = (options or RayOptions()).address.rstrip("/")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=3) as response:
                version = json.loads(response.read()).get("ray_version", "?")
        except Exception as exc:  # no head at the address: the backend is there, the cluster is not
            return Health(False, f"no Ray cluster answers at {address} ({type(exc).__name__}); start one with `ray start --head` or pass address=")
        return Health(True, f"Ray {version} at {address}")

    def render(self, spec: LaunchSpec, run_dir: Path, options: BaseModel) -> Rendered:
        assert isinstance(options, RayOptions)
        files = run_files(spec)
        accel = accelerate_config(spec)
        # the job's working directory is the run's files: paths relative to it (Options.python has no spaces)
        trainer = entry_argv(options.python, ".")
        if accel is not None:
            files["accelerate.yaml"] = yaml_text(accel)
            trainer = accelerate_argv(options.python, "accelerate.yaml", ".")
        entrypoint = " ".join(shim_argv(options.python, ".", trainer))
        shown = shown_environment(_job_env(spec, int(options.grace_period_s)))
        summary = (f"{spec.method} {spec.stage} of {spec.model.location} as a Ray Job at {options.address} "
                   f"({spec.resources.num_processes} {'GPU' if spec.resources.device == 'cuda' else 'CPU process'}(es)); output in {spec.output_dir}")
        files["ray-job.json"] = json.dumps({"address": options.address, "entrypoint": entrypoint,
                                            "num_gpus": spec.resources.num_processes if spec.resources.device == "cuda" else 0}, indent=2)
        return Rendered(files=files, argv=("ray", "job", "submit", "--address", options.address, "--working-dir", str(run_dir), "--", *entrypoint.split()),
                        env=shown, summary=summary)

    def submit(self, rendered: Rendered, run_dir: Path) -> Handle:
        write_files(run_dir, rendered.files)
        spec = rendered_spec(rendered)
        job = json.loads(rendered.files["ray-job.json"])
        env = _job_env(spec, int(rendered.env["RAY_JOB_STOP_WAIT_TIME_S"]))  # the real values: Rendered.env hides secrets
        client = _client(job["address"])
        working = run_dir / "ray-working-dir"
        working.mkdir(exist_ok=True)
        for name in ("spec.json", "trl.yaml", "accelerate.yaml"):
            if name in rendered.files:
                (working / name).write_text(rendered.files[name])
        try:
            submission_id = client.submit_job(
                entrypoint=job["entrypoint"],
                submission_id=f"vramplan-{spec.run_id}",
                runtime_env={"working_dir": str(working), "env_vars": env},
                entrypoint_num_gpus=job["num_gpus"] or None,
                metadata={"vramplan_run_id": spec.run_id},
            )
        except Exception as exc:  # the Jobs API's errors are RuntimeErrors with the server's text
            raise LaunchError(f"Ray refused the job: {exc}") from exc
        return Handle(self.name, {"submission_id": submission_id, "address": job["address"], "marker": spec.run_id, "submitted_at": time.time()})

    def poll(self, handle: Handle, run_dir: Path) -> Observation:
        try:
            client = _client(str(handle.data["address"]))
            status = str(client.get_job_status(str(handle.data["submission_id"])))
            logs = client.get_job_logs(str(handle.data["submission_id"]))
        except LaunchError:
            raise
        except Exception as exc:
            return Observation(None, Reason.BACKEND_UNREACHABLE, message=f"Ray did not answer: {type(exc).__name__}")
        _mirror_events(logs, run_dir)
        (run_dir / LOG_FILE).write_text("\n".join(line for line in logs.splitlines() if not line.startswith(EVENT_LOG_PREFIX)) + "\n")
        state, reason = STATES.get(status, (RunState.RUNNING, None))
        if state == RunState.FAILED and _had_oom(run_dir):
            return Observation(RunState.FAILED, Reason.OOM, EXIT_OOM, "CUDA out of memory")
        if state in (RunState.FAILED, RunState.CANCELLED):
            return Observation(state, reason, None, f"Ray job {handle.data['submission_id']}: {status}")
        return Observation(state)

    def cancel(self, handle: Handle, run_dir: Path) -> None:
        # Ray sends SIGTERM (the trainer checkpoints and stops), then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S
        try:
            _client(str(handle.data["address"])).stop_job(str(handle.data["submission_id"]))
        except Exception:
            pass

    kill = cancel  # Ray's own stop escalates to SIGKILL after the grace period

    def read_logs(self, handle: Handle | None, run_dir: Path, offset: int, limit: int) -> LogChunk:
        return read_log_file(run_dir, offset, limit)  # poll() keeps the run directory's train.log current


def _job_env(spec: LaunchSpec, grace_s: int) -> dict[str, str]:
    """The job's variables: the run's, less this machine's paths (the cluster has its own), with the
    events sent through the log and Ray's stop wait raised to the grace period."""
    env = {k: v for k, v in run_environment(spec).items() if k not in ("PATH", "HOME", "USER", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")}
    env.update({EVENTS_TO_LOG_ENV: "1", "RAY_JOB_STOP_WAIT_TIME_S": str(grace_s)})
    return env


def _mirror_events(logs: str, run_dir: Path) -> None:
    """Append the events not yet copied: the job's log is the whole log each time, in order."""
    events = [line[len(EVENT_LOG_PREFIX):] for line in logs.splitlines() if line.startswith(EVENT_LOG_PREFIX)]
    path = run_dir / EVENTS_FILE
    have = sum(1 for _ in open(path, "rb")) if path.exists() else 0
    if len(events) > have:
        with open(path, "a") as fh:
            fh.write("".join(line + "\n" for line in events[have:]))


def _had_oom(run_dir: Path) -> bool:
    path = run_dir / EVENTS_FILE
    return path.exists() and '"kind": "oom"' in path.read_text()
