"""The run store: SQLite in WAL mode, the source of truth for every run.

Every transition is written (and committed, synchronous=FULL) before its side effect, so a crash
between the two leaves a row that says what was about to happen, never a process nobody knows of.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from launcher.backend import TERMINAL, TRANSITIONS, RunState

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY,
  idempotency_key TEXT UNIQUE,
  attempt INTEGER NOT NULL DEFAULT 1,
  resumed_from_run_id TEXT REFERENCES runs(id),
  resume_checkpoint TEXT,
  backend TEXT NOT NULL,
  backend_options_json TEXT NOT NULL,
  handle_json TEXT,
  state TEXT NOT NULL CHECK (state IN ('queued','starting','running','cancelling','succeeded','failed','cancelled','lost')),
  reason TEXT, message TEXT, exit_code INTEGER,
  model TEXT NOT NULL, stage TEXT NOT NULL, method TEXT NOT NULL,
  spec_json TEXT NOT NULL, plan_hash TEXT NOT NULL,
  predicted_peak_bytes INTEGER NOT NULL, predicted_high_bytes INTEGER NOT NULL,
  num_gpus INTEGER NOT NULL, gpu_uuids TEXT,
  run_dir TEXT NOT NULL, output_dir TEXT NOT NULL,
  created_at REAL NOT NULL, started_at REAL, finished_at REAL, cancel_requested_at REAL,
  events_offset INTEGER NOT NULL DEFAULT 0, stopped_at_step INTEGER,
  last_step INTEGER, total_steps INTEGER, final_loss REAL,
  measured_peak_bytes INTEGER, measured_allocated_bytes INTEGER, measured_load_peak_bytes INTEGER,
  measured_cuda_context_bytes INTEGER, alloc_retries INTEGER, error_pct REAL,
  gpu_name TEXT, driver TEXT, versions_json TEXT, hint TEXT
);
CREATE TABLE IF NOT EXISTS run_metrics (
  run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  step INTEGER NOT NULL, rank INTEGER NOT NULL, t REAL,
  loss REAL, learning_rate REAL, grad_norm REAL, num_tokens REAL,
  max_reserved INTEGER, max_allocated INTEGER, nvml_process_used INTEGER, extra_json TEXT,
  PRIMARY KEY (run_id, step, rank)
);
CREATE TABLE IF NOT EXISTS run_transitions (
  run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  at REAL NOT NULL, from_state TEXT, to_state TEXT NOT NULL, reason TEXT, message TEXT
);
"""


@dataclass(frozen=True)
class RunRecord:
    id: str
    idempotency_key: str | None
    attempt: int
    resumed_from_run_id: str | None
    resume_checkpoint: str | None
    backend: str
    backend_options_json: str
    handle_json: str | None
    state: str
    reason: str | None
    message: str | None
    exit_code: int | None
    model: str
    stage: str
    method: str
    spec_json: str
    plan_hash: str
    predicted_peak_bytes: int
    predicted_high_bytes: int
    num_gpus: int
    gpu_uuids: str | None
    run_dir: str
    output_dir: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested_at: float | None
    events_offset: int
    stopped_at_step: int | None
    last_step: int | None
    total_steps: int | None
    final_loss: float | None
    measured_peak_bytes: int | None
    measured_allocated_bytes: int | None
    measured_load_peak_bytes: int | None
    measured_cuda_context_bytes: int | None
    alloc_retries: int | None
    error_pct: float | None
    gpu_name: str | None
    driver: str | None
    versions_json: str | None
    hint: str | None = None  # what to do about a failure, from the trainer's error event
    request_hash: str | None = None  # the launch request's fingerprint: an Idempotency-Key retry is matched by it before any build

    @property
    def terminal(self) -> bool:
        return RunState(self.state) in TERMINAL

    @property
    def spec(self) -> dict:
        return json.loads(self.spec_json)

    def to_dict(self) -> dict:
        """The run as the CLI's --json and the API show it: no spec text, decoded JSON columns."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("spec_json", "backend_options_json", "handle_json", "versions_json", "gpu_uuids", "events_offset", "request_hash")}
        out["backend_options"] = json.loads(self.backend_options_json)
        out["gpu_uuids"] = json.loads(self.gpu_uuids) if self.gpu_uuids else []
        out["versions"] = json.loads(self.versions_json) if self.versions_json else None
        out["duration_s"] = (self.finished_at or time.time()) - self.started_at if self.started_at else None
        return out


COLUMNS = tuple(f.name for f in fields(RunRecord))
ADDED_COLUMNS = (("hint", "TEXT"), ("request_hash", "TEXT"))  # columns added after the first release of the schema
METRIC_COLUMNS = ("t", "loss", "learning_rate", "grad_norm", "num_tokens", "max_reserved", "max_allocated", "nvml_process_used", "extra_json")


class TransitionError(ValueError):
    pass


class StoreUnavailable(Exception):
    """The run store cannot be used: what failed (`what`) and what to do (`todo`). A server
    answers it 503: it is the server's storage, never the request's fault."""

    def __init__(self, path: Path, what: str, todo: str):
        super().__init__(f"the run store {path} {what}; {todo}")
        self.path, self.what, self.todo = path, what, todo


def storage_todo(exc: BaseException) -> str:
    """What to do about a SQLite or OS error on the store or the data directory."""
    text = str(exc).lower()
    if "full" in text or getattr(exc, "errno", None) in (28, 122):  # ENOSPC, EDQUOT
        return "the disk of the data directory is full: free some space (old runs' checkpoints), then retry"
    if "readonly" in text or "read-only" in text or getattr(exc, "errno", None) == 30:  # EROFS
        return "the data directory is read-only: make it writable by the server's user (or point VRAMPLAN_DATA_DIR elsewhere), then restart the server"
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return "the file is damaged: stop the server, move the file aside (restore a backup if there is one) and start the server again"
    if "locked" in text or "busy" in text:
        return "another process holds it locked: retry in a few seconds"
    if "unable to open" in text or "permission" in text or getattr(exc, "errno", None) in (1, 13):
        return "the server cannot open it: check that the data directory and the file exist and belong to the server's user"
    return "see the server's log; retry, and if it persists move the file aside and restart the server"


RUN_ID_DIR = re.compile(r"[0-9a-f]{32}")
ORPHANS_SHOWN = 20


def orphaned_run_dirs(data_dir: Path, known_ids, limit: int = 10_000) -> list[str]:
    """The runs' directories under `<data dir>/runs/` that no run in the store names: left by a
    store that was deleted or replaced (their logs and checkpoints are still there, their records
    are not). Sorted; at most `limit` entries are looked at."""
    runs_root = Path(data_dir) / "runs"
    known = set(known_ids)
    out = []
    try:
        with os.scandir(runs_root) as entries:
            for i, entry in enumerate(entries):
                if i >= limit:
                    break
                if RUN_ID_DIR.fullmatch(entry.name) and entry.name not in known and entry.is_dir(follow_symlinks=False):
                    out.append(entry.path)
    except OSError:
        return []
    return sorted(out)


def orphans_todo(data_dir: Path) -> str:
    return (f"the run store {Path(data_dir) / 'runs.sqlite'} does not list these runs' directories (it was deleted or replaced): "
            "stop the server, restore runs.sqlite from a backup and start it again; or, to keep the new store, move the "
            f"directories out of {Path(data_dir) / 'runs'} (their logs and checkpoints stay readable there)")


class RunStore:
    """One connection to the store. The file it opened is remembered (device and inode): a store
    deleted or replaced while it is open is refused (StoreUnavailable) on the next use, never
    written on unseen (SQLite would go on writing the unlinked file)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # one writer per process; SQLite's lock orders processes
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise
        stat = os.stat(path)
        self.identity = (stat.st_dev, stat.st_ino)

    def file_problem(self) -> str | None:
        """Why the file at `path` is no longer the one this connection has open, or None."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return "was deleted while the server was using it"
        except OSError as exc:
            return f"cannot be looked at ({exc.strerror or exc})"
        if (stat.st_dev, stat.st_ino) != self.identity:
            return "was replaced by another file while the server was using it"
        return None

    def check(self) -> None:
        """StoreUnavailable when the file was deleted or replaced under this connection."""
        problem = self.file_problem()
        if problem is not None:
            raise StoreUnavailable(self.path, problem, "restart the server: it opens the store found then (restore the file from a backup "
                                                       "first if it was deleted by mistake; the runs' directories are kept under the data directory)")

    def _open(self) -> None:
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(runs)")}
        for name, kind in ADDED_COLUMNS:
            if name not in columns:  # a store written before the column existed
                try:
                    self._db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        self._db.close()

    # -- reading ---------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord | None:
        self.check()
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return RunRecord(**dict(row)) if row else None

    def find(self, prefix: str) -> RunRecord | None:
        """A run by its id or an unambiguous prefix of it (as `git` takes commits)."""
        self.check()
        rows = self._db.execute("SELECT * FROM runs WHERE id LIKE ? LIMIT 2", (prefix.replace("%", "").replace("_", "") + "%",)).fetchall()
        return RunRecord(**dict(rows[0])) if len(rows) == 1 else None

    def ids(self) -> list[str]:
        self.check()
        return [row["id"] for row in self._db.execute("SELECT id FROM runs")]

    def by_idempotency_key(self, key: str) -> RunRecord | None:
        self.check()
        row = self._db.execute("SELECT * FROM runs WHERE idempotency_key = ?", (key,)).fetchone()
        return RunRecord(**dict(row)) if row else None

    def list(self, states: tuple[str, ...] | None = None) -> list[RunRecord]:
        self.check()
        if states:
            rows = self._db.execute(f"SELECT * FROM runs WHERE state IN ({','.join('?' * len(states))}) ORDER BY created_at", states).fetchall()
        else:
            rows = self._db.execute("SELECT * FROM runs ORDER BY created_at DESC").fetchall()
        return [RunRecord(**dict(r)) for r in rows]

    def metrics(self, run_id: str, after_step: int = -1) -> list[dict]:
        self.check()
        rows = self._db.execute("SELECT * FROM run_metrics WHERE run_id = ? AND step > ? ORDER BY step, rank", (run_id, after_step)).fetchall()
        return [dict(r) for r in rows]

    def transitions(self, run_id: str) -> list[dict]:
        self.check()
        rows = self._db.execute("SELECT at, from_state, to_state, reason, message FROM run_transitions WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    # -- writing ---------------------------------------------------------------------------
    def create(self, values: dict[str, Any]) -> RunRecord:
        self.check()
        values = {"created_at": time.time(), **values}
        unknown = set(values) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown run columns: {sorted(unknown)}")
        names = ", ".join(values)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(f"INSERT INTO runs ({names}) VALUES ({', '.join('?' * len(values))})", tuple(values.values()))
                self._db.execute("INSERT INTO run_transitions VALUES (?, ?, NULL, ?, NULL, NULL)", (values["id"], values["created_at"], values["state"]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(values["id"])

    def update(self, run_id: str, **values: Any) -> None:
        self.check()
        if not values:
            return
        if "state" in values:
            raise ValueError("state changes go through transition()")
        with self._lock:
            self._db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?", (*values.values(), run_id))

    def transition(self, run_id: str, to_state: RunState, reason: str | None = None, message: str | None = None, **values: Any) -> RunRecord:
        """Move a run to `to_state`, with the reason, in one transaction; refuses a move the state machine forbids."""
        self.check()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None:
                    raise TransitionError(f"no run {run_id}")
                current = RunState(row["state"])
                if to_state != current and to_state not in TRANSITIONS.get(current, frozenset()):
                    raise TransitionError(f"run {run_id[:8]} is {current}; it cannot become {to_state}")
                now = time.time()
                sets = {"state": str(to_state), "reason": reason, "message": message, **values}
                if to_state in TERMINAL:
                    sets.setdefault("finished_at", now)
                self._db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?", (*sets.values(), run_id))
                if to_state != current:
                    self._db.execute("INSERT INTO run_transitions VALUES (?, ?, ?, ?, ?, ?)", (run_id, now, str(current), str(to_state), reason, message))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(run_id)

    def add_metrics(self, run_id: str, rows: list[dict]) -> None:
        self.check()
        if not rows:
            return
        with self._lock:
            self._db.executemany(
                # a step can log twice (its loss, then the trainer's summary): merge, keeping what each knew
                "INSERT INTO run_metrics VALUES (:run_id, :step, :rank, :t, :loss, :learning_rate, :grad_norm, :num_tokens, :max_reserved, :max_allocated, :nvml_process_used, :extra_json) "
                "ON CONFLICT(run_id, step, rank) DO UPDATE SET " + ", ".join(f"{c} = COALESCE(excluded.{c}, {c})" for c in METRIC_COLUMNS),
                [{"run_id": run_id, **r} for r in rows],
            )
