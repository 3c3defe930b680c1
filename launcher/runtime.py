"""A long-lived process's hold on the runs of one data directory: the server's.

One Supervisor per process and data directory. Everything that changes runs (launch, cancel,
resume, and the loop that follows live runs and admits queued ones) goes through one lock; reads
use a connection of their own. With several worker processes only the one holding the data
directory's supervisor.lock follows the runs, so a queued run is started once.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from launcher.paths import server_roots
from planner.errors import PlanInputError
from planner.request import confine

log = logging.getLogger("vramplan")


class IdempotencyConflict(Exception):
    """An idempotency key that already started a different run."""

    def __init__(self, run_id: str):
        super().__init__(f"this Idempotency-Key started a different run ({run_id}); use a new key for a new request")
        self.run_id = run_id


class RunsRuntime:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.lock = threading.RLock()  # the supervisor: launch, cancel, resume, refresh
        self._read_lock = threading.Lock()
        self._supervisor = None
        self._reader = None
        self._leader_fd: int | None = None
        self.poked = False  # something changed (a launch, a cancel): follow now, not after the pause
        self._store_seen = False  # a store was opened here: its disappearance is a fault, not "no runs yet"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "runs.sqlite"

    def supervisor(self):
        with self.lock:
            if self._supervisor is not None and self._fresh(self._supervisor.store):
                self._supervisor.close()
                self._supervisor = None
            if self._supervisor is None:
                from launcher.supervisor import Supervisor

                self._missing_store()
                self._supervisor = Supervisor(self.data_dir)
                self._store_seen = True
            return self._supervisor

    def read(self, func, *args):
        """func(store, *args) on the reading connection; None when no run was ever stored."""
        with self._read_lock:
            if self._reader is not None and self._fresh(self._reader):
                self._reader.close()
                self._reader = None
            if self._reader is None:
                if not self.db_path.exists():
                    self._missing_store()
                    return None
                from launcher.store import RunStore

                self._reader = RunStore(self.db_path)
                self._store_seen = True
            return func(self._reader, *args)

    def _fresh(self, store) -> bool:
        """True when `store`'s file was replaced by another (reopen it: a restored backup); raises
        StoreUnavailable when it was deleted."""
        problem = store.file_problem()
        if problem is None:
            return False
        if self.db_path.exists():
            log.warning("the run store %s %s: opening the file now there", self.db_path, problem)
            return True
        store.check()  # raises, saying what happened and what to do
        return False

    def _missing_store(self) -> None:
        """A store this process used is gone: refuse, rather than start an empty one unseen."""
        if self._store_seen and not self.db_path.exists():
            from launcher.store import StoreUnavailable

            raise StoreUnavailable(self.db_path, "was deleted while the server was using it",
                                   "restore it from a backup, or restart the server to begin an empty store "
                                   "(the runs' directories stay under the data directory)")

    def store_problem(self) -> str | None:
        """The store this process used was deleted under it, or None (a replaced one is reopened at
        its next use). No locks: for /healthz."""
        if self._store_seen and not self.db_path.exists():
            return f"the run store {self.db_path} was deleted while the server was using it"
        return None

    def roots(self) -> list[Path]:
        return server_roots(self.data_dir)

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
        """Supervisor.follow_live, where this process leads; True while some run is still live."""
        self.poked = False
        if not self.db_path.exists() or not self._lead():
            return False
        with self.lock:
            return self.supervisor().follow_live()

    # -- acting ----------------------------------------------------------------------------
    def launch(self, prepared, *, force: bool, queue: bool, idempotency_key: str | None = None, request_hash: str | None = None):
        """(record, replayed): starts the prepared run, or returns the run this key already started
        (IdempotencyConflict when the key started a different one). LaunchRefused when it does
        not fit and neither force nor queue was asked. `request_hash` (the request's fingerprint) is
        stored with the run so that a retry can be answered before anything is built (replayed)."""
        with self.lock:
            supervisor = self.supervisor()
            if idempotency_key:
                existing = supervisor.store.by_idempotency_key(idempotency_key)
                if existing is not None:
                    if existing.request_hash and request_hash:
                        if existing.request_hash != request_hash:
                            raise IdempotencyConflict(existing.id)
                    elif not same_request(existing, prepared):
                        raise IdempotencyConflict(existing.id)
                    return existing, True
            self._check_output_dir(supervisor, prepared)
            record = supervisor.launch(prepared, force=force, queue=queue, idempotency_key=idempotency_key)
            if request_hash:
                supervisor.store.update(record.id, request_hash=request_hash)
                record = supervisor.store.get(record.id) or record
            self.poked = True
        return record, False

    def replayed(self, idempotency_key: str | None, request_hash: str | None):
        """The run this key already started for this same request (an idempotent retry), read
        before the request is planned or any model built; IdempotencyConflict when the key started
        a run for another request; None when the key is new, or its run was stored without a
        fingerprint (then the prepared run is compared, as launch does)."""
        if not idempotency_key or not request_hash:
            return None
        existing = self.read(lambda store: store.by_idempotency_key(idempotency_key))
        if existing is None or not existing.request_hash:
            return None
        if existing.request_hash != request_hash:
            raise IdempotencyConflict(existing.id)
        return existing

    def _check_output_dir(self, supervisor, prepared) -> None:
        """A served run's output_dir named by the request (not the run's own output/) may not be the
        data directory, the model's directory or another run's output (launcher.paths.check_output_dir)."""
        from launcher.paths import check_output_dir

        spec = prepared.spec
        own = Path(prepared.run_dir).resolve()
        output = Path(spec.output_dir).resolve()
        if output == own or output.is_relative_to(own):
            return
        model = spec.model.location if spec.model.kind == "directory" else None
        taken = [(r.id, r.output_dir) for r in supervisor.store.list() if r.id != spec.run_id
                 and not Path(r.output_dir).resolve().is_relative_to(Path(r.run_dir).resolve())]
        check_output_dir(output, self.data_dir, model, taken)

    def cancel(self, run_id: str):
        with self.lock:
            supervisor = self.supervisor()
            record = supervisor.get(run_id)
            self.poked = True
            return supervisor.cancel(record.id)

    def resume(self, run_id: str, force: bool = False):
        """Supervisor.resume, with the checkpoint it resumes from held to the roots like the output."""
        from launcher.supervisor import last_complete_checkpoint

        with self.lock:
            supervisor = self.supervisor()
            record = supervisor.get(run_id)
            checkpoint = last_complete_checkpoint(Path(record.output_dir))
            if checkpoint is not None:
                confine("output_dir", str(checkpoint), self.roots())
            self.poked = True
            return supervisor.resume(record.id, force=force)

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

    def orphaned_run_dirs(self) -> list[str]:
        """Runs' directories under the data directory that the store does not list (a store deleted
        or replaced, then a restart): said by the runs list and /healthz, never an empty list unexplained."""
        from launcher.store import orphaned_run_dirs

        return orphaned_run_dirs(self.data_dir, self.read(lambda store: store.ids()) or [])

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
        from launcher.supervisor import handle_of

        run_dir = Path(record.run_dir).resolve()
        if not run_dir.is_relative_to(self.data_dir):
            raise PlanInputError("run_id", "this run's directory is outside the data directory")
        try:
            backend = load_backend(record.backend)
        except (LookupError, ValueError) as exc:
            return LogChunk(f"[the log cannot be read: {exc}]\n", offset, True)
        return backend.read_logs(handle_of(record), run_dir, offset, limit)


def same_request(existing, prepared) -> bool:
    """A stored run and a prepared one are the same launch (an idempotent retry)."""
    spec = existing.spec
    return (spec["plan_hash"] == prepared.spec.plan_hash and spec["model"] == prepared.spec.model.model_dump(mode="json")
            and spec["settings"] == prepared.spec.settings.model_dump(mode="json") and existing.backend == prepared.backend
            and json.loads(existing.backend_options_json) == prepared.backend_options)


async def follow_forever(current: Callable[[], RunsRuntime], busy_interval: float = 0.5, idle_interval: float = 2.0,
                         tick: float = 0.05) -> None:
    """A server's loop: refreshes live runs (first at start: re-attach) and admits queued ones; at
    once after a launch, cancel or resume, else every busy_interval while a run is live.
    `current()` gives the runtime of the data directory named now."""
    while True:
        try:
            live = await asyncio.to_thread(current().follow)
        except Exception:
            log.exception("following runs failed")
            live = False
        waited, pause = 0.0, busy_interval if live else idle_interval
        while waited < pause and not current().poked:
            await asyncio.sleep(tick)
            waited += tick
