"""`python -m launcher.shim RUN_DIR -- ARGV...`: runs the trainer as its child and records how it ended.

The shim ignores SIGTERM and SIGINT itself (a signal to the run's process group is for the trainer,
which checkpoints and exits) and writes exit.json atomically when the child ends, so a supervisor
that comes back after a restart still learns the exit status of a run it did not start.

Two things keep that record true when the machine misbehaves:

- a full disk: the shim reserves a few KiB in the run directory before the trainer starts
  (exit.json.reserve); when exit.json cannot be written (ENOSPC/EDQUOT), the reserve is removed and
  the write tried again, so the record of a run that filled its disk still lands, with
  ``disk_full`` and the free bytes the shim saw;
- a killed shim: the trainer is started with PR_SET_PDEATHSIG (Linux), so a kill -9 of the shim
  ends the trainer too instead of leaving it training with nobody to record its end; the
  supervisor then finds neither the shim nor an exit record and says the shim was killed
  (launcher/backends/local.py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FILE = "exit.json"
RESERVE_SUFFIX = ".reserve"
RESERVE_BYTES = 16_384
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)
LOW_DISK_BYTES = 1 << 20  # below this, a failed trainer is said to have filled its disk


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """PR_SET_PDEATHSIG: the kernel sends `sig` to this process when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_setup() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ignored dispositions survive exec: undo ours
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with_parent()


def exit_file_name() -> str:
    """exit.json for the run; under Slurm every node has a shim, and the first node's record is the run's."""
    node = os.environ.get("SLURM_NODEID")
    return EXIT_FILE if node in (None, "", "0") else f"exit-node{int(node)}.json"


def reserve(run_dir: Path) -> None:
    """Hold RESERVE_BYTES of the run directory's disk for the exit record (best effort)."""
    path = run_dir / (exit_file_name() + RESERVE_SUFFIX)
    try:
        with open(path, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        pass


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_exit(run_dir: Path, record: dict) -> None:
    name = exit_file_name()
    reserve_path = run_dir / (name + RESERVE_SUFFIX)
    for attempt in (1, 2):
        tmp = run_dir / (name + ".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, run_dir / name)
            break
        except OSError as exc:
            if attempt == 2 or exc.errno not in DISK_ERRORS or not reserve_path.exists():
                raise
            record = {**record, "disk_full": True}
            reserve_path.unlink()  # the reserve's blocks are what the record is written into
    try:
        reserve_path.unlink()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0])
    child_argv = argv[argv.index("--") + 1:]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reserve(run_dir)
    started = time.time()
    try:
        child = subprocess.Popen(child_argv, preexec_fn=_child_setup)
    except OSError as exc:
        write_exit(run_dir, {"exit_code": 127, "signal": None, "error": str(exc), "started_at": started, "finished_at": time.time()})
        return 127
    code = child.wait()
    record = {
        "exit_code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "child_pid": child.pid,
        "started_at": started,
        "finished_at": time.time(),
    }
    if code != 0:
        free = free_bytes(run_dir)
        record["free_bytes"] = free
        if free is not None and free < LOW_DISK_BYTES:
            record["disk_full"] = True
    write_exit(run_dir, record)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
