"""`python -m launcher.shim RUN_DIR -- ARGV...`: runs the trainer as its child and records how it ended.

The shim ignores SIGTERM and SIGINT itself (a signal to the run's process group is for the trainer,
which checkpoints and exits) and writes exit.json atomically when the child ends, so a supervisor
that comes back after a restart still learns the exit status of a run it did not start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FILE = "exit.json"


def _restore_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ignored dispositions survive exec: undo ours
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def exit_file_name() -> str:
    """exit.json for the run; under Slurm every node has a shim, and the first node's record is the run's."""
    node = os.environ.get("SLURM_NODEID")
    return EXIT_FILE if node in (None, "", "0") else f"exit-node{int(node)}.json"


def write_exit(run_dir: Path, record: dict) -> None:
    name = exit_file_name()
    tmp = run_dir / (name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0])
    child_argv = argv[argv.index("--") + 1:]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.time()
    try:
        child = subprocess.Popen(child_argv, preexec_fn=_restore_signals)
    except OSError as exc:
        write_exit(run_dir, {"exit_code": 127, "signal": None, "error": str(exc), "started_at": started, "finished_at": time.time()})
        return 127
    code = child.wait()
    write_exit(run_dir, {
        "exit_code": code if code >= 0 else None,
        "signal": -code if code < 0 else None,
        "child_pid": child.pid,
        "started_at": started,
        "finished_at": time.time(),
    })
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
