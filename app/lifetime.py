"""Processes that die with their server.

A server killed with SIGKILL runs no cleanup: its children are reparented to init and live on
(issue 25, item 6: the pasted-config build worker, 0.4-0.6 GB each, and multiprocessing's resource
tracker, after every kill -9; `vramplan serve --workers N`'s uvicorn workers likewise).

Each such child calls `exit_with_parent()` as it starts: a daemon thread that checks, four times
a second, that its parent is still the process that started it, and ends the child at once
(os._exit) when it is not. The resource tracker needs nothing of its own: it exits when the last
holder of its pipe (the server and its workers) is gone.

Why not PR_SET_PDEATHSIG (prctl), which the kernel fires on the parent's death: it fires when the
*thread* that forked the child exits, not the process. The build worker is started by
concurrent.futures from whichever request thread submits the first build, and those threads
(anyio's pool) end after ten idle seconds, which would kill a healthy worker. The watch costs one
sleeping thread and works wherever os.getppid() does. (The run shim, single-threaded, does use
PR_SET_PDEATHSIG for its trainer: launcher/shim.py.)
"""

from __future__ import annotations

import os
import threading
import time

_started = False


def exit_with_parent(parent: int | None = None, interval: float = 0.25) -> None:
    """End this process when `parent` (default: multiprocessing's parent, else the current
    parent) is no longer its parent. Idempotent; a no-op for a process whose parent is init."""
    global _started
    if _started:
        return
    if parent is None:
        import multiprocessing

        known = multiprocessing.parent_process()
        parent = known.pid if known is not None and known.pid else os.getppid()
    if parent <= 1:
        return
    if os.getppid() != parent:  # the parent died before the watch began
        os._exit(0)
    _started = True

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
