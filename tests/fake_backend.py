"""A backend for the web tests, registered only in tests (`register(monkeypatch)`).

It starts no process: a thread writes what the trainer entry would (events.jsonl with start,
train_begin, a log line per step with a loss and GPU memory near the plan's peak, checkpoints,
end; train.log; exit.json), one step every `settings.step_sleep_s` seconds (default $VRAMPLAN_FAKE_STEP_S or 0.02), for
`settings.max_steps` steps (default 5). A STOP file stops it after the current step with a
checkpoint, as the real entry does, so cancel and resume work as with `local`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import ClassVar

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
from launcher.spec import LaunchSpec

_THREADS: dict[str, threading.Thread] = {}
_KILLED: set[str] = set()


class FakeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grace_period_s: float = Field(default=30.0, ge=0.1, le=3600)
    fail_at_step: int | None = Field(default=None, ge=1, le=1_000_000, description="exit 1 after this step")
    memory_factor: float = Field(default=0.97, gt=0, le=10, description="measured peak / predicted peak")


def register(monkeypatch, also_as_local: bool = False) -> None:
    """Make `fake` a registered backend (and `local` too, where no test may start a real process)."""
    from launcher import registry

    real = registry._entry_points()
    fake = metadata.EntryPoint(name="fake", value="tests.fake_backend:FakeBackend", group=registry.GROUP)
    extra = {"fake": fake, **({"local": metadata.EntryPoint(name="local", value="tests.fake_backend:FakeBackend", group=registry.GROUP)} if also_as_local else {})}
    monkeypatch.setattr(registry, "_entry_points", lambda: {**real, **extra})


def _write(path: Path, line: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _train(run_dir: Path, spec: LaunchSpec, options: FakeOptions, marker: str) -> None:
    events, log = run_dir / "events.jsonl", run_dir / "train.log"
    steps = spec.settings.max_steps or 5
    pause = spec.settings.step_sleep_s or float(os.environ.get("VRAMPLAN_FAKE_STEP_S", "0.02"))
    context = next((c["bytes"] for c in spec.plan["components"] if c["name"] == "runtime.cuda_context"), 0)
    target = int(spec.predicted_peak_bytes * options.memory_factor) - context
    first = 1
    if spec.resume_from:
        first = int(Path(spec.resume_from).name.split("-")[1]) + 1
    base = {"run_id": spec.run_id, "rank": 0}
    _write(events, {**base, "event": "start", "t": time.time(), "versions": {"fake": "1"}})
    _write(events, {**base, "event": "train_begin", "t": time.time(), "max_steps": steps, "gpu_name": "Fake GPU 80GB",
                    "resumed_from_step": first - 1 if spec.resume_from else None})
    output = Path(spec.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    code, step = 0, first - 1
    for step in range(first, steps + 1):
        if marker in _KILLED:
            return
        time.sleep(pause)
        reserved = int(target * min(1.0, 0.8 + 0.2 * step / steps))
        _write(events, {**base, "event": "log", "t": time.time(), "step": step, "loss": round(2.0 / (1 + 0.3 * step), 4), "learning_rate": 1e-4,
                        "max_memory_reserved": reserved, "max_memory_allocated": int(reserved * 0.9)})
        with open(log, "a") as fh:
            fh.write(f"step {step}/{steps}: loss {2.0 / (1 + 0.3 * step):.4f}\n")
        if options.fail_at_step == step:
            code = 1
            break
        if (run_dir / "STOP").exists():
            _checkpoint(output, step)
            _write(events, {**base, "event": "stopping", "t": time.time(), "step": step})
            break
    else:
        _checkpoint(output, step)
    _write(events, {**base, "event": "end", "t": time.time(), "step": step})
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": code}))


def _checkpoint(output: Path, step: int) -> None:
    path = output / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors"):
        (path / name).write_text("fake")


class FakeBackend:
    name: ClassVar[str] = "fake"
    api_version: ClassVar[int] = API_VERSION
    capabilities: ClassVar[frozenset[str]] = frozenset({"graceful_cancel", "events_file", "gpu_metrics", "admission"})
    Options: ClassVar[type[BaseModel]] = FakeOptions

    def check(self) -> Health:
        return Health(True, "a fake trainer in a thread (tests)")

    def render(self, spec: LaunchSpec, run_dir: Path, options: BaseModel) -> Rendered:
        files = {"spec.json": spec.model_dump_json(indent=2), "fake.json": options.model_dump_json()}
        return Rendered(files=files, argv=("fake-trainer", str(run_dir)), env={"VRAMPLAN_RUN_ID": spec.run_id},
                        summary=f"{spec.method} {spec.stage} of {spec.model.location} in a fake trainer")

    def submit(self, rendered: Rendered, run_dir: Path) -> Handle:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.files.items():
            (run_dir / name).write_text(text)
        spec = LaunchSpec.model_validate_json(rendered.files["spec.json"])
        options = FakeOptions.model_validate_json(rendered.files["fake.json"])
        if spec.dataset.location.endswith("refuse-me.jsonl"):
            raise LaunchError("the fake backend refuses this dataset")
        marker = f"{spec.run_id}-{time.monotonic_ns()}"
        thread = threading.Thread(target=_train, args=(run_dir, spec, options, marker), daemon=True, name=f"fake-{spec.run_id[:8]}")
        _THREADS[marker] = thread
        thread.start()
        return Handle(self.name, {"marker": marker})

    def poll(self, handle: Handle, run_dir: Path) -> Observation:
        exit_path = run_dir / "exit.json"
        if exit_path.exists():
            code = json.loads(exit_path.read_text())["exit_code"]
            if code == 0:
                return Observation(RunState.SUCCEEDED, exit_code=0)
            return Observation(RunState.FAILED, Reason.EXIT_NONZERO, code, f"the fake trainer exited with code {code}")
        thread = _THREADS.get(str(handle.data.get("marker")))
        if thread is not None and thread.is_alive():
            return Observation(RunState.RUNNING)
        return Observation(RunState.LOST, Reason.SERVER_RESTART, None, "no fake trainer and no exit record")

    def cancel(self, handle: Handle, run_dir: Path) -> None:
        (run_dir / "STOP").write_text(str(time.time()))

    def kill(self, handle: Handle, run_dir: Path) -> None:
        _KILLED.add(str(handle.data.get("marker")))

    def read_logs(self, handle: Handle | None, run_dir: Path, offset: int, limit: int) -> LogChunk:
        from launcher.run_files import read_log_file

        return read_log_file(run_dir, offset, limit)
