"""Models from pasted config.json text, built away from the server process.

A pasted config is data from anyone who can reach the page. Building it imports torch and
transformers and creates one Python object per module, so a config that slips past the size
checks could hold a process for minutes and take gigabytes. The build therefore runs in a worker
process with a memory limit (RLIMIT_AS) and a deadline: past the deadline the worker is killed
and replaced, and the request gets a 422 naming the limit. Results, failures included, are
cached by the bytes they hold, so a repeated request costs nothing and no request can pin
unbounded memory in the cache.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import threading
from collections import OrderedDict
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from planner.errors import PlanInputError
from planner.model_config import parse_config_text
from planner.request import pasted_name
from planner.spec import ModelSpec

GIB = 1 << 30


@dataclass(frozen=True)
class BuildLimits:
    timeout_s: float = 30.0  # a 405B config builds in about 2 s on one core
    memory_bytes: int = 4 * GIB  # address space of the worker: torch itself maps about 0.7 GiB
    cache_bytes: int = 64 << 20
    max_waiting: int = 4  # builds queued behind the running one before new ones are turned away


class BuildBusy(Exception):
    """Too many builds waiting: the caller answers 503, try again shortly."""


def _limit_worker(memory_bytes: int) -> None:
    import os
    import resource

    from app.lifetime import exit_with_parent

    exit_with_parent()  # a server killed with SIGKILL takes its build worker with it (app/lifetime.py)

    # A meta-device build runs no kernels. OpenBLAS would reserve a buffer per core it sees (the
    # host's, not the container's), address space the limit below is meant for.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    from planner.introspect import _load_transformers

    _load_transformers()  # import once per worker, not per build


def _build_in_worker(config: dict, name: str) -> tuple[str, str]:
    """("ok", spec JSON) or ("error", reason); runs in the worker process."""
    from planner.introspect import spec_from_config

    try:
        return "ok", spec_from_config(config, name=name).to_json()
    except PlanInputError as exc:
        return "error", exc.reason
    except MemoryError:
        return "memory", ""
    except RecursionError:
        return "error", "this config nests too deeply to build"


def _trace_in_worker(config: dict, options_json: str) -> tuple[str, object]:
    """("ok", SimulatedStep) or ("unsupported", reason): the allocator's trace of a pasted config,
    in the worker process, under the build's limits."""
    from planner.options import TrainingOptions
    from planner.step_trace import SimulationUnsupported, simulate_step

    try:
        return "ok", simulate_step(config, TrainingOptions.model_validate_json(options_json))
    except SimulationUnsupported as exc:
        return "unsupported", str(exc)
    except MemoryError:
        return "memory", ""
    except RecursionError:
        return "unsupported", "this config nests too deeply to trace"


class SpecBuilder:
    """Builds ModelSpecs from config text in one worker process. `build` blocks: call it from a
    thread, never on the event loop."""

    def __init__(self, limits: BuildLimits = BuildLimits()):
        self.limits = limits
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._waiting = threading.BoundedSemaphore(limits.max_waiting + 1)
        # one build at a time, so a deadline measures that build alone, never time in a queue
        self._running = threading.Lock()
        self._cache: OrderedDict[str, tuple[ModelSpec | str, int]] = OrderedDict()
        self._cache_bytes = 0

    # -- cache, by bytes ------------------------------------------------------------------
    def _cached(self, key: str) -> ModelSpec | str | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            self._cache.move_to_end(key)
            return hit[0]

    def _remember(self, key: str, value: ModelSpec | str, size: int) -> None:
        if size > self.limits.cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = (value, size)
            self._cache_bytes += size
            while self._cache_bytes > self.limits.cache_bytes:
                _, (_, dropped) = self._cache.popitem(last=False)
                self._cache_bytes -= dropped

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    # -- the worker -----------------------------------------------------------------------
    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded server
                    initializer=_limit_worker,
                    initargs=(self.limits.memory_bytes,),
                )
            return self._pool

    def _discard_worker(self) -> None:
        """Kill the worker (a build past its deadline cannot be interrupted any other way)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        """Stop the worker: politely when it is idle (so multiprocessing cleans up after it),
        by killing it when a build is still running."""
        if self._running.locked():
            self._discard_worker()
            return
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def build(self, text: str, source: str = "the pasted config.json", name: str | None = None) -> ModelSpec:
        """planner.request.ConfigBuilder's build, in the worker. `name`: the spec's (a model
        directory's path); by default the config's own name."""
        key = hashlib.sha256(f"{name}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
        hit = self._cached(key)
        if isinstance(hit, ModelSpec):
            return hit
        if isinstance(hit, str):
            raise PlanInputError("config_json", hit)
        # the pure checks (size, JSON, remote code, sizes as written) cost nothing: refuse here
        try:
            config = parse_config_text(text, source)
        except PlanInputError as exc:
            raise PlanInputError("config_json", exc.reason) from None
        pasted = name is None
        name = name or pasted_name(config)
        # what waits is said as it is: a pasted config, or the config.json of a model directory
        waiting = "model configs (pasted, or from a model directory)"
        what = "this pasted config" if pasted else source
        busy = BuildBusy(f"{self.limits.max_waiting + 1} {waiting} are being built; {what} waits its turn: try again in a few seconds")
        kind, payload = self._in_line(busy, _build_in_worker, config, name)
        if kind == "ok":
            spec = ModelSpec.from_dict(json.loads(payload))
            self._remember(key, spec, len(payload) + len(text))
            return spec
        reason = self._reason(kind, payload, "building", "the build process")
        self._remember(key, reason, len(reason) + 64)
        raise PlanInputError("config_json", reason)

    def trace(self, config: dict, options):
        """The allocator's simulation of a pasted config's step (planner.step_trace.simulated_for's
        tracer), in the worker under the build's limits: a trace past them is refused with the
        reason, never left running in the server."""
        from planner.step_trace import SimulationUnsupported, TracesBusy

        busy = TracesBusy(f"{self.limits.max_waiting + 1} pasted configs are being built or traced: the formula's reserve for now; ask again in a few seconds")
        kind, payload = self._in_line(busy, _trace_in_worker, config, options.model_dump_json())
        if kind == "ok":
            return payload
        raise SimulationUnsupported(self._reason(kind, payload, "tracing", "the trace's process"))

    def _in_line(self, busy: Exception, work, *args) -> tuple[str, object]:
        """`work(*args)` in the worker, one at a time; `busy` is raised when too many wait."""
        if not self._waiting.acquire(blocking=False):
            raise busy
        try:
            with self._running:
                return self._run(work, *args)
        finally:
            self._waiting.release()

    def _reason(self, kind: str, payload, doing: str, process: str) -> str:
        """Why the worker gave no answer, in the limits' words; the worker's own reason otherwise."""
        return {
            "memory": f"{doing} this model needs more than the {self.limits.memory_bytes / GIB:.1f} GiB a build may use",
            "timeout": f"{doing} this model took longer than the {self.limits.timeout_s:g} s a build may take",
            "crashed": f"{process} stopped, most likely over the {self.limits.memory_bytes / GIB:.1f} GiB a build may use",
        }.get(kind, payload)

    def _run(self, work, *args) -> tuple[str, object]:
        try:
            future = self._executor().submit(work, *args)
        except (BrokenProcessPool, RuntimeError):
            self._discard_worker()
            future = self._executor().submit(work, *args)
        try:
            return future.result(timeout=self.limits.timeout_s)
        except concurrent.futures.TimeoutError:
            self._discard_worker()
            return "timeout", ""
        except BrokenProcessPool:
            self._discard_worker()
            return "crashed", ""
