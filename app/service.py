"""What the API and the pages share: request models and the calls into the planner.

The web layer never computes a number: it turns a request into TrainingOptions (and a Task),
asks the planner, and returns the planner's objects as dicts. Models come from the catalog or
from a pasted/uploaded config.json; never from a filesystem path a web user names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from pydantic import ConfigDict, Field, model_validator

from app.model_builder import BuildLimits, SpecBuilder
from planner.advisor import Task
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.plan import plan_is_quick
from planner.request import (
    NO_PATHS,
    LaunchTarget,
    ModelSource,
    plan_source,
    resolve_source,
    single_plan_options,
)

MAX_CONFIG_TEXT = 40 * 1024  # published config.json files are 1-6 KiB
# A plan request is a few hundred bytes. The body may hold the longest config text even with
# every character escaped as \uXXXX (6 bytes), so a config over its limit gets the 422 that
# names the field rather than a 413.
MAX_BODY_BYTES = 512 * 1024
# a pasted config's build has its own deadline (app/model_builder.py); this bounds the rest
REQUEST_DEADLINE_S = 60.0


class PlanRequest(TrainingOptions):
    """The plan options plus the model: a catalog id, or a config.json's text."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["model"]}, {"required": ["config_json"]}]})

    model: str | None = Field(default=None, max_length=300, description="a catalog id (GET /api/v1/models); required unless config_json is given")
    config_json: str | None = Field(default=None, max_length=MAX_CONFIG_TEXT, description="a config.json's text, planned instead of a catalog model")

    @model_validator(mode="after")
    def _a_model_is_named(self):
        # an empty body must not quietly plan some default model
        if not (self.model and self.model.strip()) and not (self.config_json and self.config_json.strip()):
            raise PlanInputError("model", "give a catalog id in model (GET /api/v1/models lists them), or a config.json's text in config_json")
        return self

    def options(self) -> TrainingOptions:
        """The given fields that are plan options, so TrainingOptions knows what was not given."""
        given = self.model_dump(include=self.model_fields_set & set(TrainingOptions.model_fields))
        return TrainingOptions.model_validate(given)


class AdviseRequest(PlanRequest, Task):
    """Plan options, model and the task questions in one body."""

    def task(self) -> Task:
        return Task.model_validate(self.model_dump(include=self.model_fields_set & set(Task.model_fields)))


def web_source(model: str | None, config_json: str | None = None, roots: list | None = None) -> ModelSource:
    """The model a web request names: a catalog id, or a config.json given as text; a model
    directory only inside `roots`, which a signed-in user has (app/runs.py signed_in_roots): the
    server's files are not an anonymous user's to name. Configs build in the worker, under its
    limits. Blocks while a config builds: call it from a thread."""
    from launcher.paths import check_path_text
    from planner.request import looks_like_path

    if roots and isinstance(model, str) and not (config_json and config_json.strip()) and (looks_like_path(model.strip()) or "\0" in model):
        check_path_text("model", model.strip())  # a NUL, a name too long, ~nosuchuser: the field's error, not an OSError
    try:
        return resolve_source(model, config_json, roots=roots or NO_PATHS, builder=BUILDER)
    except RecursionError:
        if config_json and config_json.strip():
            raise PlanInputError("config_json", "the config.json nests too deeply to read (a config is a few levels deep)") from None
        raise


def web_plan(source: ModelSource, options: TrainingOptions, launch: LaunchTarget | None = None):
    """The single plan the page, the API and the runs API give: planner/request.py's recipe, with
    configs traced in the build worker."""
    return plan_source(source, options, launch=launch, builder=BUILDER)


def trace_would_run(source: ModelSource, options: TrainingOptions) -> bool:
    """web_plan would trace a step now, for seconds: the simulation is on and neither memoized,
    refused at once, nor kept in the disk cache (planner/trace_cache.py)."""
    from planner.step_trace import trace_pending

    return not plan_is_quick(source.spec, options, source.config) and trace_pending(source.spec, options, source.config)


# A plan is pure Python holding the GIL: more threads than cores only make them take turns.
PLANNING_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="plan")
# Threads that wait on the build worker, apart from planning's: builds queued behind a slow one
# must not leave catalog plans without a thread.
BUILD_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=BuildLimits.max_waiting + 1, thread_name_prefix="build")


async def off_loop(func, *args, executor=PLANNING_THREADS):
    """Run planning in a worker thread, never on the event loop, so /healthz and every other
    request keep being answered while one plan builds a model or searches; past the deadline
    the caller gets a 422 naming the limit."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.run_in_executor(executor, func, *args), REQUEST_DEADLINE_S)
    except asyncio.TimeoutError:
        raise PlanInputError("body", f"planning this request took longer than {REQUEST_DEADLINE_S:g} s, the limit per request") from None


class QuickShapes:
    """Plan shapes (catalog model, method, stage, targets, quantization, parallelism) whose plan
    was measured, on a thread, to take under INLINE_MAX_S. A plan's cost is the spec's tensor
    walks for those choices, memoized after the first; the sizes (batch, sequence, GPUs) are
    arithmetic. Such a plan is cheaper than the hop to a thread, and a hop makes the event loop
    wait for the GIL behind the planning threads (p99 56 ms at 32 connections against 22 ms with
    the plan on the loop, bench/load.py), so it runs on the loop. Anything not yet measured,
    slow, a pasted config, or a search or advice runs on a thread."""

    INLINE_MAX_S = 0.002
    MAX_SHAPES = 4096

    def __init__(self):
        self._quick: dict[tuple, None] = {}

    @staticmethod
    def shape(request: PlanRequest) -> tuple:
        targets = request.lora_targets if isinstance(request.lora_targets, str) else tuple(request.lora_targets)
        return ((request.model or "").strip().lower(), request.method, request.stage, targets, request.quantization, request.parallelism, request.trainer)

    def is_quick(self, shape: tuple) -> bool:
        return shape in self._quick

    def measured(self, shape: tuple, seconds: float) -> None:
        if seconds < self.INLINE_MAX_S:
            if len(self._quick) >= self.MAX_SHAPES:
                self._quick.clear()
            self._quick[shape] = None


QUICK_SHAPES = QuickShapes()


async def with_source(request: PlanRequest, func, *args, roots: list | None = None, inline_if_quick: bool = False):
    """`func(source, *args)` for the request's model, off the loop: a catalog model is looked up
    in the planning thread itself; a pasted config or a model directory is built by the worker
    first, waited for on a thread of its own. With `inline_if_quick` (plan and check:
    `func(source, options)`), a catalog plan of a shape measured quick runs on the loop
    (QuickShapes), unless it would trace a step: a simulation's batch and sequence change the
    trace, so only one already memoized is quick."""
    if (request.config_json and request.config_json.strip()) or roots:
        source = await off_loop(web_source, request.model, request.config_json, roots, executor=BUILD_THREADS)
        return await off_loop(func, source, *args)
    if not inline_if_quick:
        return await off_loop(lambda: func(web_source(request.model), *args))
    shape = QUICK_SHAPES.shape(request)
    if QUICK_SHAPES.is_quick(shape):
        source = web_source(request.model)
        if plan_is_quick(source.spec, single_plan_options(source.spec, args[0])):
            return func(source, *args)

    def timed():
        source = web_source(request.model)
        started = time.perf_counter()
        result = func(source, *args)
        QUICK_SHAPES.measured(shape, time.perf_counter() - started)
        return result

    return await off_loop(timed)


def spec_of(func):
    """`func(spec, ...)` as with_source's `func(source, ...)`: advice and searches plan the spec."""
    return lambda source, *args: func(source.spec, *args)


# one per server process; its worker starts with the first pasted config
BUILDER = SpecBuilder()


class TraceAhead:
    """Traces started for a page that answered at once with the formula's plan (its first visit, a
    shared or fit-search link, an upload), so that the page's next ask (htmx's refine request, the
    reload without JavaScript) finds the simulated plan done or waits only for the remainder.

    One thread: traces take turns on step_trace's lock anyway, and a page's trace never holds a
    planning thread. At most `max_pending` wait or run (past that the page's next ask traces for
    itself, under MAX_TRACES_IN_LINE as any plan does); the same plan is traced once however many
    pages ask. A trace starts once its page has been sent (`sent()`) or after `start_after_s`, so
    the page's first byte never shares the GIL with it."""

    def __init__(self, max_pending: int | None = None, start_after_s: float = 2.0):
        from planner.step_trace import MAX_TRACES_IN_LINE

        self.max_pending = MAX_TRACES_IN_LINE if max_pending is None else max_pending
        self.start_after_s = start_after_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-ahead")
        self._pending: dict[tuple, concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(source: ModelSource, options: TrainingOptions) -> tuple:
        # the spec object itself: catalog specs and built configs are each kept as one object
        return (id(source.spec), options.model_dump_json())

    def start(self, source: ModelSource, options: TrainingOptions) -> threading.Event | None:
        """Trace this plan in the background; returns the event that says its page was sent (set
        it then), or None when it is already under way or too many are."""
        key = self.key(source, options)
        sent = threading.Event()
        with self._lock:
            if key in self._pending or len(self._pending) >= self.max_pending:
                return None
            future = self._pool.submit(self._trace, source, options, sent)
            self._pending[key] = future
        future.add_done_callback(lambda _: self._forget(key))
        return sent

    def _trace(self, source: ModelSource, options: TrainingOptions, sent: threading.Event) -> None:
        sent.wait(self.start_after_s)
        try:
            web_plan(source, options)  # memoized on the spec: the page's next plan reads it
        except Exception:  # noqa: BLE001 - the page's own plan says what is wrong, when it is asked
            pass

    def _forget(self, key: tuple) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def wait(self, source: ModelSource, options: TrainingOptions, timeout: float | None = None) -> bool:
        """Wait for this plan's trace when one is under way (rather than trace it twice); True when
        there was one."""
        with self._lock:
            future = self._pending.get(self.key(source, options))
        if future is None:
            return False
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            pass
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)


TRACE_AHEAD = TraceAhead()
