"""What /healthz reports: the process answers, the run store opens and reads, and the data
directory's disk takes writes. 200 when all hold; 503 when the store is broken (unreadable,
damaged, deleted or replaced under the server) or the data directory cannot be written (read-only,
full), each part saying what failed and what to do.

The answer is cached for MAX_AGE_S, so a flood of probes costs one check a second, and it is
computed on the event loop (a stat, a statvfs and one read of a small SQLite file): a health
check never waits for a thread behind the plans.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from app.http_policy import SECURITY_HEADERS, host_allowed

MAX_AGE_S = 1.0
# under this a write to the store may fail (SQLite's journal, a run's first log lines): failing
MIN_FREE_BYTES = 16 << 20
# under this the next launch's checkpoints will not fit: said, still healthy
LOW_FREE_BYTES = 1 << 30

_cache: dict[Path, tuple[float, int, bytes]] = {}
_lock = threading.Lock()


def _store(data_dir: Path, open_problem: str | None) -> dict:
    from launcher.store import ORPHANS_SHOWN, orphaned_run_dirs, orphans_todo, storage_todo

    path = data_dir / "runs.sqlite"
    out: dict = {"path": str(path)}
    if open_problem:
        return {**out, "ok": False, "error": open_problem,
                "what_to_do": "restart the server: it opens the store found then (restore the file from a backup first if it was deleted by mistake)"}
    ids: list[str] = []
    if path.exists():
        try:
            db = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=1.0)
            try:
                ids = [row[0] for row in db.execute("SELECT id FROM runs")]
            finally:
                db.close()
        except sqlite3.Error as exc:
            return {**out, "ok": False, "error": f"{type(exc).__name__}: {exc}", "what_to_do": storage_todo(exc)}
    # runs' directories the store does not list: a store deleted or replaced, then a restart
    orphans = orphaned_run_dirs(data_dir, ids)
    if orphans:
        return {**out, "ok": False, "runs": len(ids), "orphaned_run_dirs": orphans[:ORPHANS_SHOWN],
                "error": f"{len(orphans)} run director{'y' if len(orphans) == 1 else 'ies'} under {data_dir / 'runs'} "
                         f"{'is' if len(orphans) == 1 else 'are'} not in the run store (deleted or replaced)",
                "what_to_do": orphans_todo(data_dir)}
    if not ids and not path.exists():
        return {**out, "ok": True, "runs": 0, "note": "no run stored yet"}
    return {**out, "ok": True, "runs": len(ids)}


def _disk(data_dir: Path) -> dict:
    where = data_dir
    while not where.exists() and where.parent != where:
        where = where.parent
    out: dict = {"path": str(data_dir)}
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        return {**out, "ok": False, "error": exc.strerror or str(exc), "what_to_do": "check that the data directory exists and is readable"}
    out["free_bytes"] = usage.free
    if not os.access(where, os.W_OK):
        return {**out, "ok": False, "error": f"{where} is not writable (read-only file system or permissions)",
                "what_to_do": "make the data directory writable by the server's user, or point VRAMPLAN_DATA_DIR elsewhere and restart"}
    if usage.free < MIN_FREE_BYTES:
        return {**out, "ok": False, "error": f"the disk is full ({usage.free:,} bytes free)",
                "what_to_do": "free some space on the data directory's disk (old runs' checkpoints)"}
    if usage.free < LOW_FREE_BYTES:
        out["warning"] = f"under 1 GiB free ({usage.free / (1 << 30):.2f} GiB): a run's checkpoints may not fit"
    return {**out, "ok": True}


def check(data_dir: Path, open_problem: str | None = None) -> tuple[int, dict]:
    """(status, body), checked now. `open_problem`: what the server's own open store says
    (RunsRuntime.store_problem: deleted or replaced under it)."""
    store, disk = _store(data_dir, open_problem), _disk(data_dir)
    ok = store["ok"] and disk["ok"]
    return (200 if ok else 503), {"status": "ok" if ok else "failing", "store": store, "disk": disk}


def current(data_dir: Path, open_problem: str | None = None, max_age: float = MAX_AGE_S) -> tuple[int, bytes]:
    """(status, JSON body), from the cache when it is under `max_age` seconds old."""
    now = time.monotonic()
    with _lock:
        hit = _cache.get(data_dir)
    if hit is not None and now - hit[0] < max_age and open_problem is None:
        return hit[1], hit[2]
    status, body = check(data_dir, open_problem)
    encoded = json.dumps(body, separators=(",", ":")).encode()
    with _lock:
        if len(_cache) > 16:
            _cache.clear()
        _cache[data_dir] = (now, status, encoded)
    return status, encoded


# -- answered at accept ------------------------------------------------------------------------------
# A fresh connection waits a turn of the event loop to be accepted, one to get its transport and
# one for its request's task; a turn runs every plan that is ready (32 clients planning: ~48 ms a
# turn), so a probe took ~190 ms while a plan on a kept-alive connection took ~48. The server's
# accept (app/server.py) asks answer_at_accept() about the bytes already waiting on a connection
# it has just accepted: a whole `GET /healthz` is answered there, in the same turn, and closed.

_provider = None
HEALTH_REQUEST = re.compile(rb"(GET|HEAD) /healthz HTTP/1\.[01]\r\n((?:[!-9;-~]+:[ \t]*[^\r\n]*\r\n){0,32})\r\n")


def register(provider) -> None:
    """`provider()` -> (status, JSON body) for the server's own app (app/main.py registers it)."""
    global _provider
    _provider = provider


def answer_at_accept(head: bytes) -> bytes | None:
    """The whole response to `head` when it is exactly one complete GET or HEAD of /healthz with
    one Host this server answers to and no body; None otherwise (the app answers it as usual)."""
    if _provider is None or not head.startswith((b"GET /healthz ", b"HEAD /healthz ")):
        return None
    match = HEALTH_REQUEST.match(head)
    if match is None or match.end() != len(head):  # pipelined, partial or odd: not here
        return None
    lines = match.group(2).split(b"\r\n")
    hosts = [line.split(b":", 1)[1].strip() for line in lines if line[:5].lower() == b"host:"]
    if any(line[:15].lower() in (b"content-length:", b"transfer-encod") for line in lines):
        return None
    if len(hosts) != 1 or not host_allowed(hosts[0].decode("latin-1")):
        return None
    status, body = _provider()
    reason = b"OK" if status == 200 else b"Service Unavailable"
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"cache-control", b"no-store"),
               (b"connection", b"close"), *SECURITY_HEADERS]
    head_out = b"HTTP/1.1 %d %s\r\n" % (status, reason) + b"".join(b"%s: %s\r\n" % h for h in headers) + b"\r\n"
    return head_out + (body if match.group(1) == b"GET" else b"")
