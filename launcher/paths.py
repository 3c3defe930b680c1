"""The paths a served launch may name: the server's roots, and a dataset or reward model in them.

A launch from the server names paths for someone else's machine, so every one must resolve,
symlinks followed, inside the roots (VRAMPLAN_ROOTS: directories separated by ':', default the
server's working directory; and the data directory). The model itself is resolved by
planner/request.py, with the same roots; the CLI's launches are the user's own and are not
confined.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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


NAME_MAX = 255  # bytes in one name of a path (Linux, macOS)
PATH_MAX = 4096


def check_path_text(field: str, text: str) -> None:
    """PlanInputError naming `field` for a path no file system can hold or no user has: a NUL
    byte, a name over NAME_MAX bytes, a path over PATH_MAX, `~user` for a user this server does
    not have. Checked before the path is used, so none of them surfaces as an OSError."""
    if "\0" in text:
        raise PlanInputError(field, "a path cannot hold a NUL byte (\\0)")
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError:
        raise PlanInputError(field, "the path holds a character no file name can (a lone UTF-16 surrogate)") from None
    if len(encoded) > PATH_MAX:
        raise PlanInputError(field, f"the path is {len(encoded):,} bytes; a path may have at most {PATH_MAX:,}")
    longest = max(len(part) for part in encoded.split(b"/"))
    if longest > NAME_MAX:
        raise PlanInputError(field, f"a name in the path is {longest:,} bytes; a file or directory name may have at most {NAME_MAX}")
    if text.startswith("~"):
        user = text[1:].split("/", 1)[0]
        try:
            expanded = os.path.expanduser(text)
        except (KeyError, RuntimeError):
            expanded = text
        if expanded.startswith("~"):
            who = f"user {user!r}" if user else "home directory for its own user"
            raise PlanInputError(field, f"{text[:100]}: this server has no {who}, so ~{user} names no directory; give the path itself")


def path_or_hub(field: str, text: str, allowed: list[Path]) -> str:
    """A dataset or reward model: a path inside the roots (made absolute), or a hub id."""
    text = text.strip()
    check_path_text(field, text)
    relative = allowed[0] / text
    if looks_like_path(text) or Path(text).suffix.lower() in DATASET_SUFFIXES or relative.exists() or Path(text).exists():
        return str(confine(field, text, allowed))
    if not HUB_ID.fullmatch(text):
        raise PlanInputError(field, f"{text!r} is neither a path inside the server's roots nor a hub id (owner/name)")
    return text


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output_dir(output_dir: str | Path, data_dir: Path, model: str | Path | None = None,
                     taken: Iterable[tuple[str, str]] = ()) -> Path:
    """PlanInputError on `output_dir` when a run's checkpoints there would land on what the
    server or another run needs: the data directory (the run store, the token, every run's own
    directory), the model directory, or another run's output directory (`taken`: (run id, its
    output_dir)); in them, or holding them. `model`: the model's location as the launch names it
    (only an existing directory or file counts). The resolved path otherwise. For a served
    launch's explicit output_dir, after it is confined to the roots."""
    out = Path(output_dir).expanduser().resolve()
    data = Path(data_dir).expanduser().resolve()
    if _overlap(out, data):
        where = "is" if out == data else "is inside" if out.is_relative_to(data) else "holds"
        raise PlanInputError("output_dir", f"{output_dir} {where} the server's data directory ({data}), where the run store and every run's "
                                           "files are kept; leave output_dir out (the run's own directory is used) or name a directory outside it")
    if model is not None and looks_like_path(str(model)):
        try:
            model_path = Path(model).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            model_path = None
        if model_path is not None and model_path.exists():
            model_dir = model_path if model_path.is_dir() else model_path.parent
            if _overlap(out, model_dir):
                where = "is" if out == model_dir else "is inside" if out.is_relative_to(model_dir) else "holds"
                raise PlanInputError("output_dir", f"{output_dir} {where} the model's directory ({model_dir}): checkpoints would be "
                                                   "written over or beside the weights being trained; name a directory of its own")
    for run_id, other in taken:
        other_path = Path(other).expanduser().resolve()
        if _overlap(out, other_path):
            raise PlanInputError("output_dir", f"{output_dir} overlaps the output directory of run {run_id[:8]} ({other_path}): two runs' "
                                               "checkpoints would mix (resume that run instead, or name a directory of its own)")
    return out
