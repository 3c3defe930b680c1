"""The paths a served launch may name: the server's roots, and a dataset or reward model in them.

A launch from the server names paths for someone else's machine, so every one must resolve,
symlinks followed, inside the roots (VRAMPLAN_ROOTS: directories separated by ':', default the
server's working directory; and the data directory). The model itself is resolved by
planner/request.py, with the same roots; the CLI's launches are the user's own and are not
confined.
"""

from __future__ import annotations

import os
from pathlib import Path

from launcher.spec import DATASET_SUFFIXES, HUB_ID
from planner.errors import PlanInputError
from planner.request import confine, looks_like_path


def server_roots(data_dir: Path) -> list[Path]:
    """VRAMPLAN_ROOTS (default: the working directory), then the data directory, where runs keep
    their directories and default outputs. Relative paths are taken from the first."""
    raw = os.environ.get("VRAMPLAN_ROOTS")
    found = [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()] if raw else [Path.cwd().resolve()]
    return [*found, data_dir] if data_dir not in found else found


def path_or_hub(field: str, text: str, allowed: list[Path]) -> str:
    """A dataset or reward model: a path inside the roots (made absolute), or a hub id."""
    text = text.strip()
    relative = allowed[0] / text
    if looks_like_path(text) or Path(text).suffix.lower() in DATASET_SUFFIXES or relative.exists() or Path(text).exists():
        return str(confine(field, text, allowed))
    if not HUB_ID.fullmatch(text):
        raise PlanInputError(field, f"{text!r} is neither a path inside the server's roots nor a hub id (owner/name)")
    return text
