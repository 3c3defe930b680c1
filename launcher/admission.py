"""Admission of runs on this host (issue 25, item 4): what a local run may take before it starts.

Twelve quick CPU launches once started twelve trainers (4.2 GiB, load 11.7), and a 1 GB one-line
JSONL was accepted and its trainer grew past 6 GiB. Before a local run starts, the supervisor now
checks (launcher/supervisor.py `_place`, for runs the server launches: the CLI's are the user's own):

- the number of local runs live at once (starting, running, cancelling):
  VRAMPLAN_MAX_LOCAL_RUNS, default half the CPUs this process may use, at least 2;
- the host's available memory: VRAMPLAN_MIN_FREE_RAM_GIB (default 2) must stay free;
- the CPU: the 1-minute load average per usable CPU must be under VRAMPLAN_MAX_LOAD_PER_CPU
  (default 3; 0 turns the check off).

A run past any of them is queued when the launch asked to queue (the supervisor admits it when a
slot frees, first in first out), else refused: HostBusy, which the API answers 429 with the limit
named. The server has one token, so one user: the per-user cap is the total.

Before a served launch reads its dataset (the preflight parses it whole), the file is held to
VRAMPLAN_MAX_DATASET_BYTES (default 2 GiB) and, for JSONL and CSV, each line to
VRAMPLAN_MAX_DATASET_LINE_BYTES (default 4 MiB; about a million tokens, far past any seq_len):
a 422 on `dataset` naming the limit otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from planner.errors import PlanInputError

GIB = 1 << 30
MIB = 1 << 20
LINE_LIMITED = (".jsonl", ".csv")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must not be negative")
    return value


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class HostLimits:
    max_local_runs: int
    min_free_ram_bytes: int
    max_load_per_cpu: float
    max_dataset_bytes: int
    max_dataset_line_bytes: int

    @classmethod
    def from_env(cls) -> HostLimits:
        return cls(
            max_local_runs=max(1, int(_env_number("VRAMPLAN_MAX_LOCAL_RUNS", max(2, usable_cpus() // 2)))),
            min_free_ram_bytes=int(_env_number("VRAMPLAN_MIN_FREE_RAM_GIB", 2) * GIB),
            max_load_per_cpu=_env_number("VRAMPLAN_MAX_LOAD_PER_CPU", 3.0),
            max_dataset_bytes=int(_env_number("VRAMPLAN_MAX_DATASET_BYTES", 2 * GIB)),
            max_dataset_line_bytes=int(_env_number("VRAMPLAN_MAX_DATASET_LINE_BYTES", 4 * MIB)),
        )


class HostBusy(Exception):
    """The host has no room for another local run now (HTTP 429); the message names the limit."""


def host_room(live_local_runs: int, limits: HostLimits | None = None, *, available: int | None = None,
              load: float | None = None) -> str | None:
    """None when one more local run may start now, else why not (naming the limit and its variable).
    `available`, `load`: the host's available memory and 1-minute load (default: measured)."""
    limits = limits or HostLimits.from_env()
    if live_local_runs >= limits.max_local_runs:
        return (f"{live_local_runs} local run(s) are live, the most this host takes at once (VRAMPLAN_MAX_LOCAL_RUNS={limits.max_local_runs}); "
                "queue it (queue: true) or wait for one to end")
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    if available < limits.min_free_ram_bytes:
        return (f"the host has {available / GIB:.2f} GiB of memory available; a run may start only while "
                f"{limits.min_free_ram_bytes / GIB:.2f} GiB stay free (VRAMPLAN_MIN_FREE_RAM_GIB)")
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    cpus = usable_cpus()
    if limits.max_load_per_cpu and load / cpus >= limits.max_load_per_cpu:
        return (f"the host's load is {load:.1f} on {cpus} CPU(s), at or over {limits.max_load_per_cpu:g} per CPU "
                "(VRAMPLAN_MAX_LOAD_PER_CPU); queue it or try again when the load falls")
    return None


def check_dataset_size(path: str | Path, limits: HostLimits | None = None) -> None:
    """PlanInputError on `dataset` for a dataset file (or directory) over the size limit, or a JSONL/CSV
    file with a line over the line limit; read in 1 MiB blocks, never a whole line at once."""
    limits = limits or HostLimits.from_env()
    path = Path(path)
    if not path.exists():
        return
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    total = sum(p.stat().st_size for p in files)
    if total > limits.max_dataset_bytes:
        raise PlanInputError("dataset", f"{path.name} is {total / MIB:,.1f} MiB; a served run's dataset may be at most "
                                        f"{limits.max_dataset_bytes / MIB:,.1f} MiB (VRAMPLAN_MAX_DATASET_BYTES)")
    for file in files:
        if file.suffix.lower() in LINE_LIMITED:
            _check_lines(file, path if path.is_dir() else file.parent, limits.max_dataset_line_bytes)


def _check_lines(file: Path, base: Path, limit: int) -> None:
    line, length = 1, 0
    with open(file, "rb") as fh:
        while block := fh.read(MIB):
            start = 0
            while True:
                end = block.find(b"\n", start)
                length += (len(block) if end < 0 else end) - start
                if length > limit:
                    raise PlanInputError("dataset", f"{file.relative_to(base)} line {line} is longer than {limit / MIB:,.1f} MiB, the most a line may "
                                                    f"hold (VRAMPLAN_MAX_DATASET_LINE_BYTES); one row per line, each under the limit")
                if end < 0:
                    break
                line, length, start = line + 1, 0, end + 1
