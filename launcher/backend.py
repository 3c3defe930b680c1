"""The backend contract: how a run is started, followed and stopped, whatever engine runs it.

Synchronous on purpose (subprocess calls with timeouts, easy to test); callers that must not block
run these methods in a thread. A backend never raises from check(); submit() raises LaunchError.

The contract, method by method, is the docstrings of `Backend` below; docs/backends.md summarises
it, and tests/test_backend_contract.py fails when a member of the protocol is undocumented in
either. What backends share (the run's files, their YAML, environment, argv and log) is the public
module launcher.run_files.
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
    KILLED_AFTER_GRACE = "killed_after_grace"  # a cancel's grace period ran out and the supervisor killed the run
    KILLED = "killed"  # a signal ended the trainer and no cancel asked for it (kill -9, the kernel's OOM killer)
    SHIM_KILLED = "shim_killed"  # the run's shim ended without recording the trainer's exit (killed); the trainer went with it
    PATH_OUTSIDE_ROOTS = "path_outside_roots"  # a served run's path led outside the roots when the trainer opened it
    DISK_FULL = "disk_full"  # the disk under the run's directory or output filled (ENOSPC/EDQUOT)
    CANCELLED_BY_USER = "cancelled_by_user"
    SERVER_RESTART = "server_restart"  # the machine restarted under a live run (its shim started before this boot)
    BACKEND_UNREACHABLE = "backend_unreachable"
    DOES_NOT_FIT = "does_not_fit"
    DATA_ERROR = "data_error"  # the dataset, named by the entry with its file and line
    MISSING_PACKAGE = "missing_package"  # an ImportError, with the pip line in the hint
    NAN_LOSS = "nan_loss"  # the loss became NaN or infinite


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
    """What poll() saw: the run's state as the engine (or the run's exit record) tells it."""

    state: RunState | None  # None: the backend could not tell (unreachable); keep the state
    reason: Reason | None = None
    exit_code: int | None = None
    message: str = ""


@dataclass(frozen=True)
class Health:
    """check()'s answer: whether the backend can run here, and a line that says why (or what to install)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class LogChunk:
    """Part of a run's log: ``text`` from a byte offset; read on from ``next_offset``; ``eof``: nothing more now."""

    text: str
    next_offset: int
    eof: bool = field(default=False)


@runtime_checkable
class Backend(Protocol):
    """A trainer backend: starts a run somewhere, follows it, stops it. Structural: a class need not
    subclass this, it needs these attributes and these seven methods.

    Loading. A backend is a class named in the entry-point group ``vramplan.backends`` (vramplan's own
    local, slurm and ray included). launcher.registry.load_backend() imports it when its name is
    used, refuses it (ValueError, with the reason; listed as unavailable) when ``api_version`` is not
    launcher.backend.API_VERSION or ``Options`` is not a pydantic model, and then calls ``cls()``
    with no arguments. It does so on every call the supervisor makes (twice a second while runs are
    followed), so the constructor must be cheap and nothing may live only in the instance.

    State. Any process may supervise (the CLI, the web app, after a restart of either), so every
    method may run in another process than the one that submitted the run. What is needed to find
    the run again goes in the Handle that submit() returns (stored as JSON with the run) and in the
    run directory; the methods are given both.

    The run. Wherever the backend puts it, the run executes
    ``python -m launcher.shim RUN_DIR -- python -m launcher.entry RUN_DIR`` (the entry possibly under
    ``accelerate launch``; launcher.run_files builds these argvs). The entry reads RUN_DIR/spec.json
    and RUN_DIR/trl.yaml, writes events.jsonl there (or
    ``VRAMPLAN_EVENT {json}`` lines in its log when VRAMPLAN_EVENTS_TO_LOG=1, for a backend to copy
    into RUN_DIR), checks RUN_DIR/STOP after every step, and exits 0 (done, or stopped on request
    with a checkpoint), 3 (CUDA out of memory) or 1; the shim writes exit.json when it ends. The
    supervisor reads events.jsonl itself: a backend only has to put it in the run directory.

    Order of calls (launcher.supervisor.Supervisor): render() for a launch or a dry run (again when a
    queued run is admitted, and for a resume); submit() once per run; poll() on every refresh while
    the run is starting, running or cancelling; cancel() when the user stops it; kill() when it
    has not stopped within the grace period; read_logs() whenever its log is shown, in any state.
    check() only when backends are listed (``vramplan backends``, the API, the launch form).

    Methods are synchronous and may block for as long as their engine's commands take (use timeouts);
    callers that must not block run them in a thread.
    """

    name: ClassVar[str]
    """The backend's name, as its entry point names it (``local``, ``slurm``, ``ray``); submit()
    puts it in Handle.backend."""

    api_version: ClassVar[int]
    """The contract version the class speaks: launcher.backend.API_VERSION (1). Any other value and
    the backend is listed as unavailable with the reason, never loaded."""

    capabilities: ClassVar[frozenset[str]]
    """What the backend can do, shown by ``vramplan backends`` and the API. Known: ``multi_gpu``,
    ``multi_node``, ``graceful_cancel`` (cancel() lets the run checkpoint), ``reattach`` (a run is
    found again from its Handle after a restart), ``events_file`` (the run writes events.jsonl into
    the run directory itself), ``gpu_metrics``, ``queue`` (the engine queues the job itself) and
    ``admission``. Only ``admission`` changes what the supervisor does: with it, a launch is checked
    against this machine's free GPU memory (refused, forced or queued) and the chosen GPUs' UUIDs are
    written into spec.resources.gpus before render(); without it the backend places the run."""

    Options: ClassVar[type[BaseModel]]
    """The backend's options, a pydantic model with bounded fields only (a request may name a
    partition, never a command line; ``extra="forbid"``). Validated from ``--backend-option
    KEY=VALUE`` or the API's ``backend_options`` (a ValidationError is the user's error), stored with
    the run and validated again when a queued run is admitted or a run is resumed. A field
    ``grace_period_s`` is the seconds the supervisor waits after cancel() before kill() (120 without
    one). ``vramplan backends`` lists each field's name, type, default and description."""

    def check(self) -> Health:
        """Whether this backend can run here now, in one line: ``Health(ok, detail)``.

        Receives nothing. Never raises: a missing command, module or cluster is ``Health(False,
        detail)`` with what to install or start (launcher.registry also treats a raise as
        unavailable, with its message). Starts nothing and changes nothing; quick (any call to the
        engine has a timeout of seconds). Called when backends are listed (``vramplan backends``,
        ``GET /api/v1/backends``, the web app's launch form), not before each launch. Idempotent.
        """
        ...

    def render(self, spec: LaunchSpec, run_dir: Path, options: BaseModel) -> Rendered:
        """The dry run: every file of the run and the argv that would start it. Starts nothing.

        Receives the LaunchSpec (with the GPUs admission chose when the backend has ``admission``),
        the run directory it will have (``<data dir>/runs/<run id>``; it may not exist yet) and an
        instance of ``Options``, already validated.

        Returns ``Rendered``: ``files`` (path relative to the run directory -> content; by
        convention launcher.run_files.run_files(spec), i.e. spec.json and trl.yaml, plus the
        backend's own, e.g. accelerate.yaml or job.sbatch), ``argv`` (a tuple, never a shell
        string), ``env`` (what the run gets, secrets shown as ``"***"``:
        launcher.run_files.shown_environment) and a one-line ``summary``.

        Must not start, submit or contact anything, nor write the run directory: the CLI writes the
        files of a dry run itself, and submit() writes them for a real one. Called for every launch
        and dry run, again when a queued run is admitted (that render's Rendered is the one
        submitted) and for a resume, so it must give the same result for the same input. May raise
        LaunchError when this backend cannot run the spec (e.g. GPUs that do not split into nodes).
        """
        ...

    def submit(self, rendered: Rendered, run_dir: Path) -> Handle:
        """Start the run and return at once with a Handle to find it again; do not wait for it.

        Receives the Rendered from render() and the run directory. Writes ``rendered.files`` into
        the run directory (creating it; launcher.run_files.write_files) and starts ``rendered.argv``
        or its equivalent. ``rendered.env`` has its secrets masked: build the real environment
        again (launcher.run_files.run_environment(launcher.run_files.rendered_spec(rendered))).

        Returns ``Handle(self.name, data)``: ``data`` is JSON-able (str, int, float), stored with the
        run, and enough for poll(), cancel(), kill() and read_logs() to find the run from another
        process after a restart (a pid and its start time, a job id, a submission id; by
        convention ``marker``: the run id).

        Raises LaunchError, with the reason in the user's terms, when the run could not be started;
        the supervisor then marks the run failed (``launch_failed``) with that message. Any other
        exception is not caught. Called exactly once per run, after the run is recorded as
        ``starting``; a run whose handle was never recorded is marked lost after 60 s. Not
        idempotent: nothing is ever re-run silently.
        """
        ...

    def poll(self, handle: Handle, run_dir: Path) -> Observation:
        """How the run is now, as an Observation(state, reason, exit_code, message).

        Receives the Handle from submit() and the run directory. Returns ``RunState.STARTING``
        while the engine holds the job (e.g. pending), ``RunState.RUNNING`` while it runs, a
        terminal state once it ended (from the engine, or the shim's exit.json:
        launcher.run_files.read_exit): SUCCEEDED; FAILED with ``Reason.OOM`` and exit code 3 (CUDA
        out of memory), or another reason (``exit_nonzero``, ``timeout``, ``preempted``,
        ``node_fail``, ``host_oom``, ...); CANCELLED; LOST (``server_restart``) when neither the
        engine nor an exit record knows the run. ``state=None`` with
        ``Reason.BACKEND_UNREACHABLE``: the engine did not answer; the supervisor keeps the state.

        Should not raise for an engine that does not answer (that is ``state=None``); it may copy
        what the run reports into the run directory (its log, its events) but must not change the
        run. The supervisor calls it on every refresh (the CLI's ``--wait`` twice a second, the web
        app, ``vramplan runs``) of a run that is starting, running or cancelling and has a handle,
        from any process: idempotent, and the same answer for a run that has ended. It reads the
        run's events itself: a run that stopped on request is recorded cancelled whatever exit
        state poll() gives, an OOM event makes it ``oom``, and the move from starting to running
        comes from the run's first training event, not from poll().
        """
        ...

    def cancel(self, handle: Handle, run_dir: Path) -> None:
        """Ask the run to stop gracefully: checkpoint and exit. Returns at once.

        Receives the Handle and the run directory. Writes the stop file (``RUN_DIR/STOP``,
        launcher.run_files.STOP_FILE; every rank checks it after each step) and/or sends SIGTERM to
        the trainer (the shim ignores SIGTERM; the trainer checkpoints and exits). Does not wait for
        the run to end and does not kill it: the supervisor follows the stop with poll(), and calls
        kill() when the run is still running ``grace_period_s`` after the stop was asked.

        Must not raise when the run has already ended or the engine does not answer. Called when
        the user cancels a run that has a handle (the run is then ``cancelling``), and again on
        each further cancel of it: idempotent. A queued run never reaches the backend.
        """
        ...

    def kill(self, handle: Handle, run_dir: Path) -> None:
        """End every process of the run now, on every node; no checkpoint.

        Receives the Handle and the run directory. Must reach every process, not only the one it
        started (torchrun starts each worker in a session of its own: the local backend finds them
        by the VRAMPLAN_RUN_ID marker in their environment; Slurm's ``scancel`` and Ray's stop
        reach theirs). May wait briefly for them to go.

        Must not raise for processes already gone or an engine that does not answer; idempotent.
        Called by the supervisor on a refresh of a ``cancelling`` run that poll() still sees
        running more than ``grace_period_s`` after the stop was asked; the run is then recorded
        cancelled (``killed_after_grace``) without another poll().
        """
        ...

    def read_logs(self, handle: Handle | None, run_dir: Path, offset: int, limit: int) -> LogChunk:
        """A chunk of the run's log (its stdout and stderr): at most ``limit`` bytes from byte
        ``offset``.

        Receives the Handle, or None when the run has none (queued, or it failed before a process
        was recorded), the run directory, and the offset and limit in bytes. Returns
        ``LogChunk(text, next_offset, eof)``: the bytes decoded as UTF-8 (invalid bytes replaced),
        ``next_offset = offset + bytes read``, ``eof`` when fewer than ``limit`` bytes came back;
        ``LogChunk("", offset, True)`` while there is no log. launcher.run_files.read_log_file does
        this for a log at ``RUN_DIR/train.log``.

        Read-only; must not raise for a missing log. Called whenever the log is shown (``vramplan runs
        logs``, the run page, the API), for a run in any state, terminal ones included.
        """
        ...
