"""The backend contract: how a run is started, followed and stopped, whatever engine runs it.

Synchronous on purpose (subprocess calls with timeouts, easy to test); callers that must not block
run these methods in a thread. A backend never raises from check(); submit() raises LaunchError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

from launcher.spec import LaunchSpec

API_VERSION = 1


class RunState(StrEnum):
    QUEUED = "queued"  # stored; waiting for admission (its GPUs free and the plan fitting them)
    STARTING = "starting"  # handed to the backend; no training step yet
    RUNNING = "running"
    CANCELLING = "cancelling"  # cancel asked; waiting for the checkpoint and exit within the grace period
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # no exit record, and no backend knows the run


TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.LOST})
# Allowed moves; terminal states never change.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.STARTING, RunState.CANCELLED, RunState.FAILED, RunState.LOST}),
    RunState.STARTING: frozenset({RunState.RUNNING, RunState.CANCELLING, RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.LOST}),
    RunState.RUNNING: frozenset({RunState.CANCELLING, RunState.SUCCEEDED, RunState.FAILED, RunState.LOST}),
    RunState.CANCELLING: frozenset({RunState.CANCELLED, RunState.SUCCEEDED, RunState.FAILED, RunState.LOST}),
}


class Reason(StrEnum):
    OOM = "oom"  # CUDA out of memory, named by the entry
    HOST_OOM = "host_oom"
    TIMEOUT = "timeout"
    PREEMPTED = "preempted"
    NODE_FAIL = "node_fail"
    LAUNCH_FAILED = "launch_failed"
    EXIT_NONZERO = "exit_nonzero"
    KILLED_AFTER_GRACE = "killed_after_grace"
    CANCELLED_BY_USER = "cancelled_by_user"
    SERVER_RESTART = "server_restart"
    BACKEND_UNREACHABLE = "backend_unreachable"
    DOES_NOT_FIT = "does_not_fit"


class LaunchError(Exception):
    """The backend could not start the run; the message says why in the user's terms."""


@dataclass(frozen=True)
class Handle:
    """Enough to find a run again after a restart; stored as JSON in the run's row."""

    backend: str
    data: Mapping[str, str | int | float]


@dataclass(frozen=True)
class Rendered:
    """The dry run: every file and the argv, nothing started."""

    files: Mapping[str, str]  # path relative to the run directory -> content
    argv: tuple[str, ...]  # never a shell string
    env: Mapping[str, str]  # what the run gets; secrets shown as "***"
    summary: str


@dataclass(frozen=True)
class Observation:
    state: RunState | None  # None: the backend could not tell (unreachable); keep the state
    reason: Reason | None = None
    exit_code: int | None = None
    message: str = ""


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


@dataclass(frozen=True)
class LogChunk:
    text: str
    next_offset: int
    eof: bool = field(default=False)


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]
    api_version: ClassVar[int]
    # "multi_gpu", "multi_node", "graceful_cancel", "reattach", "events_file", "gpu_metrics", "admission"
    capabilities: ClassVar[frozenset[str]]
    Options: ClassVar[type[BaseModel]]

    def check(self) -> Health: ...
    def render(self, spec: LaunchSpec, run_dir: Path, options: BaseModel) -> Rendered: ...
    def submit(self, rendered: Rendered, run_dir: Path) -> Handle: ...
    def poll(self, handle: Handle, run_dir: Path) -> Observation: ...
    def cancel(self, handle: Handle, run_dir: Path) -> None: ...
    def kill(self, handle: Handle, run_dir: Path) -> None: ...
    def read_logs(self, handle: Handle, run_dir: Path, offset: int, limit: int) -> LogChunk: ...
