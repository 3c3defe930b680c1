"""Launched runs, for the web: the request, its paths, the supervisor the app holds, the live feed.

The launcher decides everything about a run; this module only translates. A launch request is
the plan options, the run's settings (launcher.spec.RunSettings), a registered backend's name and
bounded options: never a command. Every path a request names (model directory, dataset, output,
reward model) must resolve, symlinks followed, inside the configured roots (VRAMPLAN_ROOTS:
directories separated by ':', default the server's working directory; and the data directory);
the run directory, its logs and its checkpoints live under the data directory.

One Supervisor per app and data directory. Everything that changes runs (launch, cancel, resume,
and the loop that follows live runs and admits queued ones) goes through one lock; reads use a
connection of their own. With several worker processes only the one holding the data directory's
supervisor.lock runs the loop, so a queued run is started once.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from pydantic import ValidationError as PydanticValidationError

from launcher.spec import DATASET_SUFFIXES, HUB_ID, RunSettings
from planner.errors import PlanInputError
from planner.options import TrainingOptions

log = logging.getLogger("vramplan")
GIB = 1 << 30
MAX_CONFIG_BYTES = 40 * 1024  # as a pasted config.json
LIVE_STATES = ("queued", "starting", "running", "cancelling")
BackendOptionValue = StrictBool | int | float | Annotated[str, Field(max_length=1000)]


class LaunchRequest(TrainingOptions, RunSettings):
    """POST /api/v1/runs and /api/v1/runs/dry-run: the plan options, the run's settings, where it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, json_schema_extra={"examples": [
        {"model": "Qwen/Qwen2.5-0.5B", "method": "lora", "dataset": "data/train.jsonl", "max_steps": 100, "device": "cpu"},
        {"model": "Qwen/Qwen2.5-0.5B", "method": "qlora", "dataset": "data/train.jsonl", "epochs": 1, "device": "cuda", "queue": True},
    ]})

    model: str = Field(min_length=1, max_length=4096, description="a catalog id (GET /api/v1/models) or a model directory with weights inside the server's roots")
    backend: str = Field(default="local", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="a backend from GET /api/v1/backends")
    backend_options: dict[Annotated[str, Field(max_length=64)], BackendOptionValue] = Field(
        default_factory=dict, max_length=32, description="the backend's own options (local: grace_period_s)")
    gpus: list[Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+$")]] = Field(
        default_factory=list, max_length=64, description="NVML UUIDs or indexes of the GPUs to use (default: those with most free memory)")
    force: StrictBool = Field(default=False, description="start even when the GPUs' free memory is short of the plan")
    queue: StrictBool = Field(default=False, description="when memory is short, wait in the queue instead of a 409")

    def options(self, device: str) -> TrainingOptions:
        """The plan options as given, with the launch defaults the CLI uses: expandable segments
        (what a launched run sets) and, on a GPU run with no GPU named, the detected GPU."""
        given = self.model_dump(include=self.model_fields_set & set(TrainingOptions.model_fields))
        given.setdefault("allocator", "expandable_segments")
        if device == "cuda" and "gpu" not in given and "gpu_memory_gib" not in given:
            given["gpu"] = "auto"
        return TrainingOptions.model_validate(given)

    def settings(self, **changes: Any) -> RunSettings:
        given = self.model_dump(include=self.model_fields_set & set(RunSettings.model_fields))
        return RunSettings.model_validate({"dataset": self.dataset, **given, **changes})


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: StrictBool = Field(default=False, description="start even when the GPUs' free memory is short of the plan")


# -- paths -----------------------------------------------------------------------------------------


def roots(data_dir: Path) -> list[Path]:
    """VRAMPLAN_ROOTS (default: the working directory), then the data directory, where runs keep
    their directories and default outputs. Relative paths are taken from the first."""
    raw = os.environ.get("VRAMPLAN_ROOTS")
    found = [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()] if raw else [Path.cwd().resolve()]
    return [*found, data_dir] if data_dir not in found else found


def _inside(path: Path, allowed: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in allowed)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text


def confine(field: str, text: str, allowed: list[Path], must_exist: bool = True) -> Path:
    """`text` as a path inside the roots (relative paths are taken from the first root), symlinks
    resolved; PlanInputError naming the field otherwise."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = allowed[0] / path
    try:
        resolved = path.resolve(strict=must_exist)
    except FileNotFoundError:
        raise PlanInputError(field, f"{text}: no such file or directory") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise PlanInputError(field, f"{text}: {exc}") from None
    if not _inside(resolved, allowed):
        raise PlanInputError(field, f"{text} is outside the directories this server may use ({', '.join(map(str, allowed))}); "
                                    "set VRAMPLAN_ROOTS to add one")
    return resolved


def _path_or_hub(field: str, text: str, allowed: list[Path]) -> str:
    """A dataset or reward model: a path inside the roots (made absolute), or a hub id."""
    text = text.strip()
    relative = allowed[0] / text
    if _looks_like_path(text) or Path(text).suffix.lower() in DATASET_SUFFIXES or relative.exists() or Path(text).exists():
        return str(confine(field, text, allowed))
    if not HUB_ID.fullmatch(text):
        raise PlanInputError(field, f"{text!r} is neither a path inside the server's roots nor a hub id (owner/name)")
    return text


def resolve_launch_model(model: str, allowed: list[Path]):
    """(what the launcher is given as the model, its ModelSpec): a catalog id, or a directory inside
    the roots whose config.json is built like a pasted one (a worker process with limits)."""
    from app.service import BUILDER
    from planner.catalog import find_catalog_model

    model = model.strip()
    match = find_catalog_model(model) if not _looks_like_path(model) else None
    if match is not None:
        if Path(model).exists():  # the launcher would take it as a directory: hold it to the roots too
            confine("model", model, allowed)
        return model, match.spec
    if not _looks_like_path(model) and not (allowed[0] / model).exists():
        from planner.catalog import closest_ids

        hint = closest_ids(model)
        suggestion = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise PlanInputError("model", f"unknown model {model!r}: give a catalog id or a model directory inside the server's roots{suggestion}")
    directory = confine("model", model, allowed)
    config = directory / "config.json"
    if not directory.is_dir() or not config.is_file():
        raise PlanInputError("model", f"{model}: a run needs a model directory holding config.json and the weights")
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise PlanInputError("model", f"{config} is over {MAX_CONFIG_BYTES // 1024} KiB: not a model config")
    try:
        spec = BUILDER.build(config.read_text(errors="replace"), source=str(config))
    except PlanInputError as exc:
        raise PlanInputError("model", exc.reason) from None
    return str(directory), spec


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    from gpu_catalog.detect import detect

    found = detect()
    if found.gpus:
        return "cuda"
    raise PlanInputError("device", f"{found.reason or 'no GPU detected'}; set device to cpu to run on the CPU (slow; for small models and tests)")


# -- the app's supervisor ------------------------------------------------------------------------


class LaunchProblem(Exception):
    """A request the launcher refused: status, loc and message for the error shape, plus extras."""

    def __init__(self, status: int, loc: list, msg: str, kind: str, **extra: Any):
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind, self.extra = status, loc, msg, kind, extra

    def body(self) -> dict:
        return {"detail": [{"loc": self.loc, "msg": self.msg, "type": self.kind}], **self.extra}


class RunsRuntime:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.lock = threading.RLock()  # the supervisor: launch, cancel, resume, refresh
        self._read_lock = threading.Lock()
        self._supervisor = None
        self._reader = None
        self._leader_fd: int | None = None
        self.poked = False  # something changed (a launch, a cancel): follow now, not after the pause

    @property
    def db_path(self) -> Path:
        return self.data_dir / "runs.sqlite"

    def supervisor(self):
        with self.lock:
            if self._supervisor is None:
                from launcher.supervisor import Supervisor

                self._supervisor = Supervisor(self.data_dir)
            return self._supervisor

    def read(self, func, *args):
        """func(store, *args) on the reading connection; None when no run was ever stored."""
        with self._read_lock:
            if self._reader is None:
                if not self.db_path.exists():
                    return None
                from launcher.store import RunStore

                self._reader = RunStore(self.db_path)
            return func(self._reader, *args)

    def roots(self) -> list[Path]:
        return roots(self.data_dir)

    def close(self) -> None:
        with self.lock, self._read_lock:
            for store in (self._reader, self._supervisor.store if self._supervisor else None):
                if store is not None:
                    store.close()
            self._reader = self._supervisor = None
            if self._leader_fd is not None:
                os.close(self._leader_fd)
                self._leader_fd = None

    # -- following -------------------------------------------------------------------------
    def _lead(self) -> bool:
        """This process follows the runs (one per data directory, across worker processes)."""
        if self._leader_fd is not None:
            return True
        fd = os.open(self.data_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._leader_fd = fd
        return True

    def follow(self) -> bool:
        """Refresh every unfinished run (re-attach the live, close the dead, admit the queued);
        True while some run is still live. A run whose backend fails is logged and left as it is."""
        self.poked = False
        if not self.db_path.exists() or not self._lead():
            return False
        live = False
        with self.lock:
            supervisor = self.supervisor()
            for record in supervisor.store.list(states=LIVE_STATES):
                try:
                    record = supervisor.refresh(record.id)
                except Exception:
                    log.exception("refreshing run %s failed", record.id[:8])
                live = live or record.state in LIVE_STATES
        return live

    # -- acting ----------------------------------------------------------------------------
    def prepare(self, request: LaunchRequest):
        """(plan, Prepared): the dry run. Blocks (builds a model, loads a backend): call from a thread."""
        from launcher.registry import UnknownBackend
        from planner.plan import build_plan
        from planner.step_trace import single_plan_options

        allowed = self.roots()
        model_arg, spec = resolve_launch_model(request.model, allowed)
        device = resolve_device(request.device)
        changes: dict[str, Any] = {"device": device, "dataset": _path_or_hub("dataset", request.dataset, allowed)}
        if request.output_dir is not None:
            changes["output_dir"] = str(confine("output_dir", request.output_dir, allowed, must_exist=False))
        if request.reward_model is not None:
            changes["reward_model"] = _path_or_hub("reward_model", request.reward_model, allowed)
        settings = request.settings(**changes)
        plan = build_plan(spec, single_plan_options(spec, request.options(device)))
        try:
            prepared = self.supervisor().prepare(plan, model_arg, settings, backend=request.backend, backend_options=request.backend_options,
                                                 device=device, gpus=tuple(request.gpus))
        except UnknownBackend as exc:
            raise PlanInputError("backend", str(exc)) from None
        except PydanticValidationError as exc:  # the backend's Options refused them
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise PlanInputError("backend_options", f"{where}: {err['msg']}" if where else err["msg"]) from None
        except PlanInputError:
            raise
        except ValueError as exc:  # a backend that failed to import or start
            raise PlanInputError("backend", str(exc)) from None
        return plan, prepared

    def launch(self, request: LaunchRequest, idempotency_key: str | None, force: bool | None = None, queue: bool | None = None):
        """(record, replayed): starts the run, or returns the run this key already started."""
        from launcher.supervisor import LaunchRefused

        plan, prepared = self.prepare(request)
        with self.lock:
            supervisor = self.supervisor()
            if idempotency_key:
                existing = supervisor.store.by_idempotency_key(idempotency_key)
                if existing is not None:
                    if not _same_request(existing, prepared):
                        raise LaunchProblem(422, ["header", "Idempotency-Key"], "this Idempotency-Key started a different run "
                                            f"({existing.id}); use a new key for a new request", "idempotency_key_reused", run_id=existing.id)
                    return existing, True
            try:
                record = supervisor.launch(prepared, force=request.force if force is None else force,
                                           queue=request.queue if queue is None else queue, idempotency_key=idempotency_key)
                self.poked = True
            except LaunchRefused as exc:
                raise LaunchProblem(409, ["body", "force"], str(exc).replace("--force", "force").replace("--queue", "queue"), "does_not_fit",
                                    admission=exc.numbers, predicted_peak_bytes=plan.peak_bytes, predicted_high_bytes=plan.peak_high_bytes,
                                    verdict=plan.verdict) from None
        return record, False

    def cancel(self, run_id: str):
        with self.lock:
            supervisor = self.supervisor()
            record = supervisor.get(run_id)
            self.poked = True
            return supervisor.cancel(record.id)

    def resume(self, run_id: str, force: bool = False):
        from launcher.backend import LaunchError
        from launcher.supervisor import LaunchRefused, last_complete_checkpoint

        with self.lock:
            supervisor = self.supervisor()
            record = supervisor.get(run_id)
            checkpoint = last_complete_checkpoint(Path(record.output_dir))
            if checkpoint is not None:  # the checkpoint resumed from must be inside the roots like the output
                confine("output_dir", str(checkpoint), self.roots())
            self.poked = True
            try:
                return supervisor.resume(record.id, force=force)
            except LaunchRefused as exc:
                raise LaunchProblem(409, ["body", "force"], str(exc).replace("--force", "force").replace("--queue", "queue"), "does_not_fit",
                                    admission=exc.numbers) from None
            except LaunchError as exc:
                raise LaunchProblem(409, ["path", "run_id"], str(exc), "conflict") from None

    # -- reading ---------------------------------------------------------------------------
    def get(self, run_id: str):
        from launcher.supervisor import RunNotFound

        def find(store):
            return store.get(run_id) or (store.find(run_id) if len(run_id) >= 4 else None)

        record = self.read(find)
        if record is None:
            raise RunNotFound(f"no run {run_id!r}")
        return record

    def list(self) -> list:
        return self.read(lambda store: store.list()) or []

    def queue_positions(self) -> dict[str, int]:
        queued = self.read(lambda store: store.list(states=("queued",))) or []
        return {r.id: i + 1 for i, r in enumerate(queued)}

    def metrics(self, run_id: str, after_step: int = -1) -> list[dict]:
        return self.read(lambda store: store.metrics(run_id, after_step)) or []

    def transitions(self, run_id: str) -> list[dict]:
        return self.read(lambda store: store.transitions(run_id)) or []

    def logs(self, record, offset: int, limit: int):
        """A chunk of the run's log, read through its backend (the run directory must be ours)."""
        from launcher.backend import LogChunk
        from launcher.registry import load_backend
        from launcher.supervisor import _handle

        run_dir = Path(record.run_dir).resolve()
        if not run_dir.is_relative_to(self.data_dir):
            raise PlanInputError("run_id", "this run's directory is outside the data directory")
        try:
            backend = load_backend(record.backend)
        except (LookupError, ValueError) as exc:
            return LogChunk(f"[the log cannot be read: {exc}]\n", offset, True)
        return backend.read_logs(_handle(record), run_dir, offset, limit)


def _same_request(existing, prepared) -> bool:
    spec = existing.spec
    return (spec["plan_hash"] == prepared.spec.plan_hash and spec["model"] == prepared.spec.model.model_dump(mode="json")
            and spec["settings"] == prepared.spec.settings.model_dump(mode="json") and existing.backend == prepared.backend
            and json.loads(existing.backend_options_json) == prepared.backend_options)


_RUNTIMES_LOCK = threading.Lock()


def runtime(app) -> RunsRuntime:
    """The app's runtime for the data directory named now (tests point VRAMPLAN_DATA_DIR elsewhere)."""
    from app.auth import data_dir

    wanted = data_dir()
    with _RUNTIMES_LOCK:
        current = getattr(app.state, "runs_runtime", None)
        if current is None or current.data_dir != wanted:
            if current is not None:
                current.close()
            current = app.state.runs_runtime = RunsRuntime(wanted)
        return current


async def follow_forever(app, busy_interval: float = 0.5, idle_interval: float = 2.0, tick: float = 0.05) -> None:
    """The lifespan's loop: refreshes live runs (first at start: re-attach) and admits queued ones;
    at once after a launch, cancel or resume, else every busy_interval while a run is live."""
    while True:
        try:
            live = await run_in_threadpool(runtime(app).follow)
        except Exception:
            log.exception("following runs failed")
            live = False
        waited, pause = 0.0, busy_interval if live else idle_interval
        while waited < pause and not runtime(app).poked:
            await asyncio.sleep(tick)
            waited += tick


# -- views ---------------------------------------------------------------------------------------


def finite(value):
    """JSON has no NaN or Infinity (a diverged loss is NaN): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def run_dict(record, queue_position: int | None = None) -> dict:
    data = record.to_dict()
    spec = record.spec
    data["device"] = spec["resources"]["device"]
    data["planned_gpu"] = spec["plan"]["gpu"]["name"]
    data["predicted_low_bytes"] = spec["plan"].get("peak_low_bytes")
    data["queue_position"] = queue_position
    data["terminal"] = record.terminal
    return finite(data)


def metric_dict(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in ("run_id", "extra_json")}
    try:
        out["extra"] = json.loads(row.get("extra_json") or "{}")
    except ValueError:
        out["extra"] = {}
    return finite(out)


def measured_per_step(record, rows: list[dict]) -> list[tuple[int, int]]:
    """(step, bytes) for the steps that logged memory: the worst rank's reserved memory plus its
    CUDA context, the measure the supervisor's measured peak uses."""
    context = record.measured_cuda_context_bytes
    if context is None:
        context = next((c["bytes"] for c in record.spec["plan"]["components"] if c["name"] == "runtime.cuda_context"), 0)
    by_step: dict[int, int] = {}
    for row in rows:
        if row.get("max_reserved") is not None:
            by_step[row["step"]] = max(by_step.get(row["step"], 0), int(row["max_reserved"]) + int(context))
    return sorted(by_step.items())


def loss_per_step(rows: list[dict]) -> list[tuple[int, float]]:
    out = {}
    for row in rows:
        loss = row.get("loss")
        if loss is not None and math.isfinite(loss) and (row["step"] not in out or row["rank"] == 0):
            out[row["step"]] = float(loss)
    return sorted(out.items())


# -- the live feed (server-sent events) ----------------------------------------------------------


class Cursor:
    """Where a client is in a run's feed: the last metric step, transitions and log bytes it has.
    Sent as every event's id, so a reconnect with Last-Event-ID continues exactly there."""

    def __init__(self, step: int = -1, transitions: int = 0, log_offset: int = 0):
        self.step, self.transitions, self.log_offset = step, transitions, log_offset

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        if not text:
            return cls()
        parts = text.strip().split(".")
        try:
            step, transitions, offset = (int(p) for p in parts)
        except ValueError:
            raise PlanInputError("Last-Event-ID", "an event id is STEP.TRANSITIONS.LOG_OFFSET, as this server sent it") from None
        if step < -1 or transitions < 0 or offset < 0:
            raise PlanInputError("Last-Event-ID", "an event id's parts are not negative")
        return cls(step, transitions, offset)

    def __str__(self) -> str:
        return f"{self.step}.{self.transitions}.{self.log_offset}"


LOG_CHUNK = 64 * 1024
SSE_RETRY_MS = 3000
SSE_MAX_SECONDS = 600  # then the client reconnects with Last-Event-ID (no connection is held for good)
SSE_HEARTBEAT_S = 15


def _event(kind: str, data: Any, cursor: Cursor | None) -> str:
    head = f"id: {cursor}\n" if cursor is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(finite(data), separators=(',', ':'), allow_nan=False)}\n\n"


def summary(record) -> dict:
    return {"id": record.id, "state": record.state, "reason": record.reason, "message": record.message, "last_step": record.last_step,
            "total_steps": record.total_steps, "final_loss": record.final_loss, "measured_peak_bytes": record.measured_peak_bytes,
            "predicted_peak_bytes": record.predicted_peak_bytes, "error_pct": record.error_pct, "terminal": record.terminal}


def feed_batch(rt: RunsRuntime, run_id: str, cursor: Cursor) -> tuple[list[str], bool]:
    """The events past `cursor` (advancing it) and whether the feed is complete (the run ended and
    everything it wrote was sent). Blocking: call from a thread."""
    record = rt.get(run_id)
    done = record.terminal  # read first: what it wrote before ending is all read below
    out: list[str] = []
    for t in rt.transitions(record.id)[cursor.transitions:]:
        cursor.transitions += 1
        out.append(_event("state", {**t, "state": t["to_state"]}, cursor))
    rows = rt.metrics(record.id, cursor.step)
    if rows:
        last = rows[-1]["step"]
        for row in rows:
            if row["step"] == last and record.num_gpus > 1 and not done:
                break  # the newest step may still get its other ranks' rows: sent with the next
            cursor.step = row["step"]
            out.append(_event("metric", metric_dict(row), cursor))
    for _ in range(4):  # up to 256 KiB of log per batch
        chunk = rt.logs(record, cursor.log_offset, LOG_CHUNK)
        if chunk.text:
            cursor.log_offset = chunk.next_offset
            out.append(_event("log", {"text": chunk.text, "next_offset": chunk.next_offset}, cursor))
        if chunk.eof:
            break
    else:
        done = False  # more log to send: not complete yet
    record = rt.get(record.id)
    if out:
        out.append(_event("update", summary(record), cursor))
    if done:
        out.append(_event("end", summary(record), cursor))
    return out, done


async def event_stream(rt: RunsRuntime, run_id: str, cursor: Cursor, interval: float = 0.5):
    yield f"retry: {SSE_RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    while True:
        events, done = await run_in_threadpool(feed_batch, rt, run_id, cursor)
        for event in events:
            yield event
        now = time.monotonic()
        if events:
            last_sent = now
        if done or now - started > SSE_MAX_SECONDS:
            return
        if now - last_sent > SSE_HEARTBEAT_S:
            last_sent = now
            yield ": still here\n\n"
        await asyncio.sleep(interval)
