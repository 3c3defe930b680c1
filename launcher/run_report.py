"""What a run's process reports without torch or the trainer: its exit codes, plain event lines,
the library versions, and whether an exception was CUDA running out of memory. Shared by the
training entry (launcher/entry.py) and the merge job (launcher/merge_job.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

EXIT_OOM = 3
EXIT_DISK_FULL = 4


def is_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # torch itself is what is missing
        return False
    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def emit_plain(run_dir: Path, run_id: str, event: str, **fields) -> None:
    """One event line without launcher/events.py (which needs torch): for a run that could not import it."""
    import time

    line = json.dumps({"t": time.time(), "run_id": run_id, "rank": int(os.environ.get("RANK", "0")), "event": event, **fields}, default=str)
    fd = os.open(run_dir / "events.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
    if os.environ.get("VRAMPLAN_EVENTS_TO_LOG") == "1":
        print(f"VRAMPLAN_EVENT {line}", flush=True)


def library_versions() -> dict:
    from importlib import metadata

    out = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out
