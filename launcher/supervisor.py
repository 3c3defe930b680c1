"""The supervisor: admits, starts, follows, cancels and resumes runs, and keeps the store true.

Any process may supervise (the CLI, the web app): the store is the truth and the run's files are its
evidence. `refresh()` reads a run's new events and asks its backend how it is; after a crash of
whoever started it, the next refresh re-attaches a live run (pid and start time) and marks a dead
one without an exit record `lost`. Nothing is ever re-run silently.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launcher.backend import (
    TERMINAL,
    Handle,
    LaunchError,
    Observation,
    Reason,
    Rendered,
    RunState,
)
from launcher.registry import load_backend
from launcher.spec import LaunchSpec, RunSettings, launch_spec, merge_launch_spec
from launcher.store import RunRecord, RunStore

MAX_EVENT_LINE = 65_536
GIB = 1 << 30
LIVE_STATES = ("queued", "starting", "running", "cancelling")
log = logging.getLogger("vramplan")


def default_data_dir() -> Path:
    if os.environ.get("VRAMPLAN_DATA_DIR"):
        return Path(os.environ["VRAMPLAN_DATA_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "vramplan"


class LaunchRefused(Exception):
    """The run was not started because it would not fit (exit 1, HTTP 409): the message has the numbers."""

    def __init__(self, message: str, numbers: dict[str, Any] | None = None):
        super().__init__(message)
        self.numbers = numbers or {}


class RunNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Admission:
    ok: bool
    message: str
    device: str  # "cuda" or "cpu"
    gpus: tuple[str, ...] = ()
    free_bytes: tuple[int, ...] = ()
    needed_bytes: int = 0
    host_busy: bool = False  # refused for the host's room (runs, memory, load), not the GPUs'

    def to_dict(self) -> dict:
        return {"ok": self.ok, "message": self.message, "device": self.device, "gpus": list(self.gpus),
                "free_bytes": list(self.free_bytes), "needed_bytes": self.needed_bytes, "host_busy": self.host_busy}


@dataclass(frozen=True)
class Prepared:
    spec: LaunchSpec
    rendered: Rendered
    admission: Admission
    run_dir: Path
    backend: str
    backend_options: dict = field(default_factory=dict)
    dataset_check: dict | None = None  # launcher.preflight's DatasetCheck, as the door that read the dataset saw it

    def dry_run_dict(self) -> dict:
        return {
            "run_id": self.spec.run_id,
            "run_dir": str(self.run_dir),
            "backend": self.backend,
            "summary": self.rendered.summary,
            "argv": list(self.rendered.argv),
            "env": dict(self.rendered.env),
            "files": dict(self.rendered.files),
            "admission": self.admission.to_dict(),
            "predicted_peak_bytes": self.spec.predicted_peak_bytes,
            "predicted_high_bytes": self.spec.predicted_high_bytes,
            "plan": self.spec.plan,
            "dataset_check": self.dataset_check,
        }


def admit(spec_high_bytes: int, num_gpus: int, device: str, wanted: tuple[str, ...] = (), detection=None) -> Admission:
    """Which GPUs a local run gets, and whether their free memory now holds the plan's high estimate."""
    if device == "cpu":
        return Admission(True, "runs on the CPU: GPU memory is not checked", "cpu")
    from gpu_catalog.detect import detect

    found = detection if detection is not None else detect()
    if not found.gpus:
        return Admission(False, f"{found.reason or 'no NVIDIA GPU detected'}; pass --device cpu to run on the CPU", "cuda")
    by_key = {}
    for gpu in found.gpus:
        by_key[str(gpu.index)] = gpu
        if gpu.uuid:
            by_key[gpu.uuid] = gpu
    if wanted:
        missing = [w for w in wanted if w not in by_key]
        if missing:
            return Admission(False, f"no GPU {', '.join(missing)} on this machine (have: {', '.join(g.uuid or str(g.index) for g in found.gpus)})", "cuda")
        chosen = [by_key[w] for w in wanted]
    else:
        chosen = sorted(found.gpus, key=lambda g: -g.free_bytes)[:num_gpus]
    if len(chosen) < num_gpus:
        return Admission(False, f"the plan needs {num_gpus} GPUs; this machine has {len(found.gpus)}", "cuda",
                         tuple(g.uuid or str(g.index) for g in chosen), tuple(g.free_bytes for g in chosen), spec_high_bytes)
    short = [g for g in chosen if g.free_bytes < spec_high_bytes]
    ids = tuple(g.uuid or str(g.index) for g in chosen)
    free = tuple(g.free_bytes for g in chosen)
    if short:
        worst = min(short, key=lambda g: g.free_bytes)
        return Admission(False, f"{worst.name} (GPU {worst.index}) has {worst.free_bytes / GIB:.2f} GiB free; the plan needs up to "
                                f"{spec_high_bytes / GIB:.2f} GiB per GPU", "cuda", ids, free, spec_high_bytes)
    return Admission(True, f"{len(chosen)} GPU(s) with at least {min(free) / GIB:.2f} GiB free hold the plan's {spec_high_bytes / GIB:.2f} GiB",
                     "cuda", ids, free, spec_high_bytes)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint-N whose state, weights, optimizer and scheduler were all written."""
    candidates = []
    for path in output_dir.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        weights = [p for pattern in ("adapter_model.safetensors", "model.safetensors", "model-*.safetensors", "pytorch_model.bin") for p in path.glob(pattern)]
        needed = [path / "trainer_state.json", path / "optimizer.pt", path / "scheduler.pt"]
        if weights and all(p.exists() and p.stat().st_size > 0 for p in needed + weights):
            candidates.append((step, path))
    return max(candidates)[1] if candidates else None


class Supervisor:
    def __init__(self, data_dir: Path | None = None):
        self.data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self.runs_root = self.data_dir / "runs"
        self.runs_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.store = RunStore(self.data_dir / "runs.sqlite")

    def close(self) -> None:
        self.store.close()

    # -- starting ----------------------------------------------------------------------------
    def prepare(self, plan, model: str, settings: RunSettings, *, backend: str = "local", backend_options: dict | None = None,
                device: str = "auto", gpus: tuple[str, ...] = (), resume_from: str | None = None, attempt: int = 1,
                run_id: str | None = None, dataset_check=None, confine_to: tuple[str, ...] = ()) -> Prepared:
        """Everything up to, not including, starting the run: the spec, the files, the argv, the admission.
        `dataset_check`: the preflight's DatasetCheck (launcher/preflight.py), which the doors run before planning.
        `confine_to`: the server's roots, which the trainer holds its paths to when it opens them (empty: the CLI's own runs)."""
        impl = load_backend(backend)
        options_model = impl.Options.model_validate(backend_options or {})
        if device == "auto":
            device = settings.device if settings.device != "auto" else "cuda"
        spec = launch_spec(plan, model, settings, run_id=run_id, runs_root=self.runs_root, device=device, resume_from=resume_from, attempt=attempt)
        if confine_to:
            spec = spec.model_copy(update={"confine_to": tuple(str(root) for root in confine_to)})
        prepared = self._place(backend, impl, spec, options_model, gpus)
        return replace(prepared, dataset_check=dataset_check.to_dict()) if dataset_check is not None else prepared

    def prepare_merge(self, plan, base: str, adapter: str | None, output_dir: str, *, backend: str = "local", backend_options: dict | None = None,
                      mergekit_config: dict | None = None, confine_to: tuple[str, ...] = ()) -> Prepared:
        """A merge run (launcher/merge_job.py) up to its start: `plan` a planner.merge.MergePlan made
        for this adapter, or for mergekit's config over the base and the models it names, with every
        input and the output checked (app/merge_run.py plan_run, plan_mergekit_run)."""
        impl = load_backend(backend)
        options_model = impl.Options.model_validate(backend_options or {})
        spec = merge_launch_spec(plan, base, adapter, output_dir, mergekit_config=mergekit_config)
        if confine_to:  # a served merge: the merge job confines every path again when it opens them
            spec = spec.model_copy(update={"confine_to": tuple(confine_to)})
        return self._place(backend, impl, spec, options_model)

    def _place(self, backend: str, impl, spec: LaunchSpec, options_model, wanted: tuple[str, ...] = ()) -> Prepared:
        """Admission (where the backend admits), the GPUs it chose written into the spec, and the render."""
        device = spec.resources.device
        if "admission" in impl.capabilities:
            admission = admit(spec.predicted_high_bytes, spec.resources.num_processes, device, wanted)
            if admission.ok and spec.confine_to:  # a served run: the host's room too (launcher/admission.py); the CLI's are the user's own
                from launcher.admission import host_room

                live = [r for r in self.store.list(states=("starting", "running", "cancelling")) if r.backend == backend and r.id != spec.run_id]
                busy = host_room(len(live))
                if busy is not None:
                    admission = Admission(False, busy, device, host_busy=True)
        else:
            admission = Admission(True, f"the {backend} backend places the run; free memory is checked there", device)
        if admission.gpus and device == "cuda":
            spec = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus": admission.gpus})})
        run_dir = self.runs_root / spec.run_id
        return Prepared(spec, impl.render(spec, run_dir, options_model), admission, run_dir, backend, options_model.model_dump(mode="json"))

    def launch(self, prepared: Prepared, *, force: bool = False, queue: bool = False, idempotency_key: str | None = None,
               resumed_from: RunRecord | None = None) -> RunRecord:
        if idempotency_key:
            existing = self.store.by_idempotency_key(idempotency_key)
            if existing is not None:
                return existing
        admission = prepared.admission
        if not admission.ok and admission.host_busy and not queue:  # force overrides the plan's fit, never the host's room
            from launcher.admission import HostBusy

            raise HostBusy(f"refused: {admission.message}")
        if not admission.ok and not force and not queue:
            raise LaunchRefused(f"refused: {admission.message} (--force starts it anyway, --queue waits for free memory)", admission.to_dict())
        spec = prepared.spec
        record = self.store.create({
            "id": spec.run_id,
            "idempotency_key": idempotency_key,
            "attempt": spec.attempt,
            "resumed_from_run_id": resumed_from.id if resumed_from else None,
            "resume_checkpoint": spec.resume_from,
            "backend": prepared.backend,
            "backend_options_json": json.dumps(prepared.backend_options),
            "state": str(RunState.QUEUED),
            "model": spec.plan["model"]["name"],
            "stage": spec.stage,
            "method": spec.method,
            "spec_json": spec.model_dump_json(),
            "plan_hash": spec.plan_hash,
            "predicted_peak_bytes": spec.predicted_peak_bytes,
            "predicted_high_bytes": spec.predicted_high_bytes,
            "num_gpus": spec.resources.num_processes,
            "gpu_uuids": json.dumps(list(spec.resources.gpus)),
            "run_dir": str(prepared.run_dir),
            "output_dir": spec.output_dir,
        })
        if not admission.ok and (not force or admission.host_busy):
            self.store.update(record.id, message=f"queued: {admission.message}")
            return self.store.get(record.id)
        return self._start(record, prepared.rendered)

    def _start(self, record: RunRecord, rendered: Rendered) -> RunRecord:
        # the transition is written before the process exists: a crash in between leaves a run that says so
        self.store.transition(record.id, RunState.STARTING)
        impl = load_backend(record.backend)
        try:
            handle = impl.submit(rendered, Path(record.run_dir))
        except LaunchError as exc:
            return self.store.transition(record.id, RunState.FAILED, str(Reason.LAUNCH_FAILED), str(exc))
        self.store.update(record.id, handle_json=json.dumps({"backend": handle.backend, "data": dict(handle.data)}))
        return self.store.get(record.id)

    # -- following ---------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord:
        record = self.store.get(run_id) or self.store.find(run_id)
        if record is None:
            raise RunNotFound(f"no run {run_id!r} (vramplan runs lists them)")
        return record

    def refresh(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record.terminal:
            return record
        if record.state == RunState.QUEUED:
            return self._try_admit(record)
        self._ingest(record)
        record = self.store.get(record.id)
        handle = handle_of(record)
        if handle is None:  # written STARTING, died before the process was recorded
            if time.time() - record.created_at > 60:
                return self.store.transition(record.id, RunState.LOST, str(Reason.LAUNCH_FAILED), "the launcher stopped before the run's process was recorded")
            return record
        impl = load_backend(record.backend)
        observation = impl.poll(handle, Path(record.run_dir))
        return self._apply(record, observation, impl, handle)

    def _apply(self, record: RunRecord, obs: Observation, impl, handle: Handle) -> RunRecord:
        state = RunState(record.state)
        if obs.state is None:
            return record
        if obs.state == RunState.RUNNING:
            if state == RunState.CANCELLING and record.cancel_requested_at is not None:
                grace = json.loads(record.backend_options_json).get("grace_period_s", 120.0)
                if time.time() - record.cancel_requested_at > grace:
                    impl.kill(handle, Path(record.run_dir))
                    return self.store.transition(record.id, RunState.CANCELLED, str(Reason.KILLED_AFTER_GRACE),
                                                 f"no clean stop within {grace:g} s: every process of the run was killed")
            return record
        if obs.state in TERMINAL:
            self._ingest(record)  # the last lines land before the exit record
            record = self.store.get(record.id)
            if record.stopped_at_step is not None and obs.state in (RunState.SUCCEEDED, RunState.FAILED) and obs.reason != Reason.OOM:
                # torchrun exits 1 after a clean stop on SIGTERM, so the stop event decides, not the code
                return self._finish(record, RunState.CANCELLED, str(Reason.CANCELLED_BY_USER),
                                    f"stopped at step {record.stopped_at_step} with a checkpoint", obs.exit_code)
            if obs.state == RunState.FAILED and record.hint is not None and obs.reason in (Reason.EXIT_NONZERO, Reason.OOM, Reason.DISK_FULL, None):
                # the trainer said what ended it: its words, not "the trainer exited with code 1"
                return self._finish(record, RunState.FAILED, record.reason or (str(obs.reason) if obs.reason else None), record.message, obs.exit_code)
            if obs.state == RunState.FAILED and (record.reason == str(Reason.OOM) or obs.reason == Reason.OOM):
                # the entry's error event says more than the exit code: what it tried to allocate
                return self._finish(record, RunState.FAILED, str(Reason.OOM), record.message or "CUDA out of memory", obs.exit_code)
            if obs.state == RunState.LOST:
                _append_log(Path(record.run_dir), f"vramplan: run marked lost: {obs.message}")
            return self._finish(record, obs.state, str(obs.reason) if obs.reason else None, obs.message or None, obs.exit_code)
        return record

    def _finish(self, record: RunRecord, state: RunState, reason: str | None, message: str | None, exit_code: int | None) -> RunRecord:
        if state == RunState.SUCCEEDED and record.state == RunState.STARTING:
            self.store.transition(record.id, RunState.RUNNING)  # the timeline shows it ran, however briefly
        return self.store.transition(record.id, state, reason, message, exit_code=exit_code)

    def _try_admit(self, record: RunRecord) -> RunRecord:
        oldest = self.store.list(states=(str(RunState.QUEUED),))
        if oldest and oldest[0].id != record.id:
            return record  # first in, first out
        spec = LaunchSpec.model_validate_json(record.spec_json)
        impl = load_backend(record.backend)
        prepared = self._place(record.backend, impl, spec, impl.Options.model_validate(json.loads(record.backend_options_json)), spec.resources.gpus)
        if not prepared.admission.ok:
            self.store.update(record.id, message=f"queued: {prepared.admission.message}")
            return self.store.get(record.id)
        return self._start(record, prepared.rendered)

    def _ingest(self, record: RunRecord) -> None:
        path = Path(record.run_dir) / "events.jsonl"
        if not path.exists():
            return
        with open(path, "rb") as fh:
            fh.seek(record.events_offset)
            data = fh.read()
        end = data.rfind(b"\n")
        if end < 0:
            return  # no complete line yet
        updates: dict[str, Any] = {}
        metrics: list[dict] = []
        transition: tuple | None = None
        contexts: dict[int, int] = {}
        for raw in data[: end + 1].splitlines():
            if not raw.strip() or len(raw) > MAX_EVENT_LINE:
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(event, dict) or event.get("run_id") != record.id:
                continue
            kind = event.get("event")
            rank = int(event.get("rank") or 0)
            if kind == "start" and isinstance(event.get("versions"), dict):
                updates["versions_json"] = json.dumps(event["versions"])
            elif kind == "train_begin":
                updates.setdefault("started_at", event.get("t"))
                updates["total_steps"] = event.get("max_steps")
                for key, column in (("gpu_name", "gpu_name"), ("driver", "driver")):
                    if event.get(key):
                        updates[column] = event[key]
                if event.get("cuda_context") is not None:
                    contexts[rank] = int(event["cuda_context"])
                    updates["measured_cuda_context_bytes"] = max(contexts.values())
                if event.get("load_peak_reserved") is not None:
                    updates["measured_load_peak_bytes"] = max(int(event["load_peak_reserved"]), record.measured_load_peak_bytes or 0)
                if record.state == RunState.STARTING and transition is None:
                    transition = (RunState.RUNNING,)
            elif kind == "log":
                step = int(event.get("step") or 0)
                metrics.append({
                    "step": step, "rank": rank, "t": event.get("t"), "loss": event.get("loss"), "learning_rate": event.get("learning_rate"),
                    "grad_norm": event.get("grad_norm"), "num_tokens": event.get("num_tokens"), "max_reserved": event.get("max_memory_reserved"),
                    "max_allocated": event.get("max_memory_allocated"), "nvml_process_used": event.get("nvml_process_used"),
                    "extra_json": json.dumps(event.get("extra") or {}),
                })
                updates["last_step"] = max(step, updates.get("last_step") or record.last_step or 0)
                loss = event.get("loss", event.get("train_loss"))
                if loss is not None and rank == 0:
                    updates["final_loss"] = loss
                self._measure(record, event, updates)
            elif kind == "merge_end":
                updates["last_step"] = 1
                self._measure_merge(record, event, updates)
            elif kind == "stopping":
                updates["stopped_at_step"] = event.get("step")
            elif kind in ("train_end", "end"):
                if event.get("step") is not None:
                    updates["last_step"] = max(int(event["step"]), updates.get("last_step") or record.last_step or 0)
                self._measure(record, event, updates)
            elif kind == "error":
                self._measure(record, event, updates)
                said = _said(event)
                known = updates.get("hint", record.hint) is not None
                # the first rank's words stand, unless a later one names the cause (an OOM on rank 1 ends rank 0 with a broken pipe)
                if said is not None and (not known or (said[0] in ENTRY_REASONS and updates.get("reason", record.reason) not in ENTRY_REASONS)):
                    updates["reason"], updates["message"], updates["hint"] = said
                    if said[0] == str(Reason.OOM):
                        updates["message"] = _oom_words(record, said[1], updates)
                elif said is None and event.get("kind") == "oom":
                    updates["reason"] = str(Reason.OOM)
                    updates["message"] = f"CUDA out of memory: {str(event.get('message'))[:300]}"
                elif said is None and not known:
                    # the trainer's own words, kept over the exit code's (a hint marks them as said)
                    updates["message"] = f"{event.get('type')}: {str(event.get('message'))[:500]}"
                    updates["hint"] = "the run's log has the traceback (vramplan runs logs ID)"
        updates["events_offset"] = record.events_offset + end + 1
        if transition is not None:  # first: a transition sets its own reason and message, the events' come after
            self.store.transition(record.id, *transition)
        self.store.add_metrics(record.id, metrics)
        self.store.update(record.id, **updates)

    @staticmethod
    def _measure(record: RunRecord, event: dict, updates: dict) -> None:
        """Measured peak per GPU: the worst rank's reserved plus its CUDA context (NVML's, else the plan's)."""
        reserved = event.get("max_memory_reserved")
        if reserved is None:
            return
        context = updates.get("measured_cuda_context_bytes", record.measured_cuda_context_bytes)
        if context is None:
            context = _plan_context(record)
        peak = int(reserved) + int(context)
        best = max(peak, updates.get("measured_peak_bytes") or record.measured_peak_bytes or 0)
        updates["measured_peak_bytes"] = best
        allocated = event.get("max_memory_allocated")
        if allocated is not None:
            updates["measured_allocated_bytes"] = max(int(allocated), updates.get("measured_allocated_bytes") or record.measured_allocated_bytes or 0)
        updates["alloc_retries"] = max(int(event.get("alloc_retries") or 0), updates.get("alloc_retries") or record.alloc_retries or 0)
        updates["error_pct"] = round(100 * (record.predicted_peak_bytes - best) / best, 2)

    @staticmethod
    def _measure_merge(record: RunRecord, event: dict, updates: dict) -> None:
        """A merge run's measured peak, in the terms of its prediction (launcher.spec.merge_launch_spec):
        on the CPU the host peak above the imported runtime; with CUDA the GPU's peak allocated (the
        merge plan's GPU terms are its tensors: the model, the adapter, the largest delta)."""
        if event.get("device") == "cuda" and event.get("gpu_peak_bytes") is not None:
            measured = updates["measured_allocated_bytes"] = int(event["gpu_peak_bytes"])
        elif event.get("host_peak_bytes") is not None:
            measured = int(event["host_peak_bytes"])
        else:
            return
        updates["measured_peak_bytes"] = measured
        if measured:
            updates["error_pct"] = round(100 * (record.predicted_peak_bytes - measured) / measured, 2)

    def follow_live(self) -> bool:
        """Reconcile every unfinished run: re-attach the live, close the dead, admit the queued;
        True while some run is still live. A run whose backend fails is logged and left as it is,
        so one broken backend does not stop the others being followed."""
        live = False
        for record in self.store.list(states=LIVE_STATES):
            try:
                record = self.refresh(record.id)
            except Exception:
                log.exception("refreshing run %s failed", record.id[:8])
            live = live or record.state in LIVE_STATES
        return live

    def wait(self, run_id: str, interval: float = 0.5, timeout: float | None = None, on_update=None) -> RunRecord:
        deadline = None if timeout is None else time.monotonic() + timeout
        record = self.refresh(run_id)
        seen = None
        while not record.terminal:
            if on_update and (record.state, record.last_step) != seen:
                seen = (record.state, record.last_step)
                on_update(record)
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
            record = self.refresh(run_id)
        return record

    # -- stopping and resuming -----------------------------------------------------------------
    def cancel(self, run_id: str) -> RunRecord:
        record = self.refresh(run_id)
        if record.terminal:
            return record
        if record.state == RunState.QUEUED:
            return self.store.transition(record.id, RunState.CANCELLED, str(Reason.CANCELLED_BY_USER), "cancelled before it started")
        if record.state != RunState.CANCELLING:
            record = self.store.transition(record.id, RunState.CANCELLING, str(Reason.CANCELLED_BY_USER), "stop asked: the run saves a checkpoint and exits",
                                           cancel_requested_at=time.time())
        handle = handle_of(record)
        if handle is not None:
            load_backend(record.backend).cancel(handle, Path(record.run_dir))
        return record

    def resume(self, run_id: str, *, force: bool = False) -> RunRecord:
        """A new attempt from the run's last complete checkpoint, in the same output directory."""
        record = self.refresh(run_id)
        if not record.terminal:
            raise LaunchError(f"run {record.id[:8]} is still {record.state}; cancel it first")
        if record.state == RunState.SUCCEEDED:
            raise LaunchError(f"run {record.id[:8]} succeeded; there is nothing to resume")
        if record.stage == "merge":
            raise LaunchError(f"run {record.id[:8]} is a merge, which keeps no checkpoint: launch it again (vramplan merge BASE --launch ...)")
        checkpoint = last_complete_checkpoint(Path(record.output_dir))
        if checkpoint is None:
            raise LaunchError(f"run {record.id[:8]} left no complete checkpoint in {record.output_dir}")
        spec = LaunchSpec.model_validate_json(record.spec_json)
        from launcher.spec import new_run_id

        new_id = new_run_id()
        spec = spec.model_copy(update={"run_id": new_id, "resume_from": str(checkpoint), "attempt": record.attempt + 1,
                                       "resources": spec.resources.model_copy(update={"gpus": ()})})
        impl = load_backend(record.backend)
        prepared = self._place(record.backend, impl, spec, impl.Options.model_validate(json.loads(record.backend_options_json)))
        return self.launch(prepared, force=force, resumed_from=record)

    def logs(self, run_id: str, offset: int = 0, limit: int = 65_536):
        record = self.get(run_id)
        return load_backend(record.backend).read_logs(handle_of(record), Path(record.run_dir), offset, limit)

    def calibration_rows(self) -> list[dict]:
        """Finished runs with a measured peak, in the form of bench/results/calibration-runs.jsonl, so
        `python bench/calibrate.py` can refit the memory model from a team's own runs."""
        rows = []
        for record in reversed(self.store.list()):
            if record.measured_peak_bytes is None or record.state not in ("succeeded", "cancelled", "failed") or record.stage == "merge":
                continue  # a merge's measured peak is the host's (launcher/merge_job.py), not a training step's
            spec = record.spec
            context = record.measured_cuda_context_bytes
            rows.append({
                "name": f"launch-{record.id[:8]}-{record.method}-{record.stage}",
                "model": spec["model"]["location"],
                "options": spec["options"],
                "gpu": record.gpu_name,
                "measured": {
                    "peak_allocated": record.measured_allocated_bytes,
                    "peak_reserved": record.measured_peak_bytes - (context if context is not None else _plan_context(record)),
                    "outside_allocator": context,
                },
                "metric": "worst rank's max_memory_reserved/allocated after reset at train begin, over the whole run; "
                          "outside_allocator = NVML process used - reserved at train begin (null: NVML could not tell)",
                "versions": json.loads(record.versions_json) if record.versions_json else None,
                "source": f"vramplan launch, run {record.id} ({record.state}{', ' + record.reason if record.reason else ''}), driver {record.driver}",
                "predicted": {"peak_bytes": record.predicted_peak_bytes, "high_bytes": record.predicted_high_bytes,
                              "calibration": spec["plan"].get("calibration"), "error_pct": record.error_pct},
                "alloc_retries": record.alloc_retries,
                # a run that ran out of memory: its measured peak is what it held when an allocation failed, a lower bound
                # of what the step needs; the plan's prediction beside it was too low (refits should treat it as such)
                "oom": record.reason == str(Reason.OOM),
                "failure": {"reason": record.reason, "message": record.message} if record.state == "failed" else None,
            })
        return rows


# the reasons the trainer entry names (launcher/entry.py explain), kept over an exit code's
ENTRY_REASONS = (str(Reason.OOM), str(Reason.HOST_OOM), str(Reason.DATA_ERROR), str(Reason.MISSING_PACKAGE), str(Reason.NAN_LOSS),
                 str(Reason.DISK_FULL), str(Reason.PATH_OUTSIDE_ROOTS))


def _said(event: dict) -> tuple[str | None, str, str] | None:
    """(reason, one-line message, hint) from an error event of the entry that explains (launcher/entry.py), else None."""
    summary, hint = event.get("summary"), event.get("hint")
    if not isinstance(summary, str) or not isinstance(hint, str):
        return None
    reason = event.get("reason")
    reason = reason if isinstance(reason, str) and reason in ENTRY_REASONS else None
    return reason, " ".join(summary.split())[:500], " ".join(hint.split())[:500]


def _oom_words(record: RunRecord, summary: str, updates: dict) -> str:
    """An OOM's message with the measured peak (reserved plus the CUDA context, as every measured peak) against the plan's."""
    measured = updates.get("measured_peak_bytes", record.measured_peak_bytes)
    head = summary.split(": ", 1)[0]
    if measured is None:
        return f"{head}: the plan predicted {record.predicted_peak_bytes / GIB:.2f} GiB per GPU"
    return (f"{head}: measured peak {measured / GIB:.2f} GiB per GPU when it failed, against the plan's {record.predicted_peak_bytes / GIB:.2f} GiB "
            f"(up to {record.predicted_high_bytes / GIB:.2f})")


def handle_of(record: RunRecord) -> Handle | None:
    if not record.handle_json:
        return None
    data = json.loads(record.handle_json)
    return Handle(data["backend"], data["data"])


def _plan_context(record: RunRecord) -> int:
    plan = json.loads(record.spec_json)["plan"]
    return next((c["bytes"] for c in plan.get("components", ()) if c["name"] == "runtime.cuda_context"), 0)  # a merge plan has none


def _append_log(run_dir: Path, line: str) -> None:
    try:
        with open(run_dir / "train.log", "a") as fh:
            fh.write(line + "\n")
    except OSError:
        pass
