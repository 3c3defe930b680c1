"""Traced steps kept on disk, so a plan asked again (a CI capacity check, the CLI run twice) does
not trace again: a 13B model's trace takes about 5 s, a 70B model's 12 s.

A trace depends only on the model config, the options that shape the step, the installed torch,
transformers, PEFT, TRL and bitsandbytes, and vramplan's planner code, and the key hashes all of
them, so an upgrade or an edit never reads an old entry. Entries are JSON this module writes (no
pickle: nothing read from the cache runs); an unreadable or foreign entry is ignored and traced
again. `VRAMPLAN_TRACE_CACHE=off` turns the cache off; `VRAMPLAN_CACHE_DIR` moves it (default
`$XDG_CACHE_HOME/vramplan`, else `~/.cache/vramplan`); it keeps the newest MAX_ENTRIES traces.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

FORMAT = 1
# a server planning many variants keeps at most this many (about 500 bytes each); past it, the
# oldest go. Storing follows a trace of seconds, so listing the folder then costs nothing noticeable
MAX_ENTRIES = 5000
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes")
PLANNER_DIR = Path(__file__).resolve().parent


def cache_dir() -> Path | None:
    """Where traces are kept, or None when the cache is off."""
    if os.environ.get("VRAMPLAN_TRACE_CACHE", "").strip().lower() in ("off", "0", "false", "no"):
        return None
    root = os.environ.get("VRAMPLAN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vramplan")
    return Path(root) / "traces"


@lru_cache(maxsize=1)
def _fingerprint() -> str:
    """The installed libraries and the planner's own code: what a trace's result depends on besides its inputs."""
    digest = hashlib.sha256()
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={version(name)};".encode())
        except PackageNotFoundError:
            digest.update(f"{name}=none;".encode())
    for path in sorted(PLANNER_DIR.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def trace_key(config: dict, options_key: str) -> str:
    text = json.dumps({"format": FORMAT, "code": _fingerprint(), "config": config, "options": options_key}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load(key: str) -> dict | None:
    """The stored trace for this key, or None (no cache, no entry, or an entry that is not ours)."""
    directory = cache_dir()
    if directory is None:
        return None
    try:
        entry = json.loads((directory / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return entry.get("step") if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("step"), dict) else None


def store(key: str, step: dict) -> None:
    """Keep a trace; a cache that cannot be written (read-only home, full disk) is skipped."""
    directory = cache_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # written whole, then renamed: a reader in another process never sees half an entry
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as out:
            json.dump({"key": key, "step": step}, out)
        os.replace(out.name, directory / f"{key}.json")
        _prune(directory)
    except OSError:
        return


def _prune(directory: Path) -> None:
    entries = list(directory.glob("*.json"))
    if len(entries) <= MAX_ENTRIES:
        return
    by_age = sorted(entries, key=lambda path: path.stat().st_mtime)
    for path in by_age[: len(entries) - MAX_ENTRIES]:
        path.unlink(missing_ok=True)
