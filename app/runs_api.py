"""The runs API, /api/v1/runs and /api/v1/backends: launch, follow, cancel and resume runs.

Every route here needs the token (`Authorization: Bearer TOKEN`, or the browser's sign-in cookie
with a same-origin request); app/main.py's guard checks that before any handler runs. Errors have
the shape of the rest of the API: `{"detail": [{"loc", "msg", "type"}]}`, a 409 adding the numbers.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer

from app.run_feed import LOG_CHUNK, Cursor, event_stream
from app.runs import LaunchRequest, MergeLaunchRequest, ResumeRequest, metric_dict, run_dict, runtime
from app.schemas import (
    RUN_ERRORS,
    BackendsOut,
    DryRunOut,
    ErrorResponse,
    LogsOut,
    MetricsOut,
    RefusedResponse,
    RunListOut,
    RunOut,
)
from planner.errors import PlanInputError

# documents the scheme in /openapi.json (and gives /docs its Authorize button); the guard checks it
bearer = HTTPBearer(auto_error=False, description="the token `vramplan serve` printed (also in <data dir>/token)")
router = APIRouter(prefix="/api/v1", tags=["runs"], dependencies=[Depends(bearer)])
RunId = Annotated[str, Path(pattern=r"^[0-9a-f]{4,32}$", description="a run id, or an unambiguous prefix of 4 or more of its hex digits")]
EVENT_ID = r"^((-1|[0-9]{1,15})\.[0-9]{1,15}\.[0-9]{1,15})?$"  # run_feed.Cursor: STEP.TRANSITIONS.LOG_OFFSET
REFUSED = {409: {"model": RefusedResponse, "description": "the plan does not fit the GPUs' free memory now (send force or queue), "
                                                           "or the run cannot be resumed; the numbers are in the body"},
           429: {"model": ErrorResponse, "description": "host_busy: the host has no room for another served run now (live local runs, "
                                                        "free memory or load past the server's limits); send queue: true to wait, or retry later"}}


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def _run_response(request: Request, record, status: int = 200) -> JSONResponse:
    positions = runtime(request.app).queue_positions()
    return JSONResponse(run_dict(record, positions.get(record.id)), status_code=status)


@router.post("/runs", status_code=201, summary="Launch a run: the plan options, the run's settings and a backend",
             response_model=RunOut, responses={**RUN_ERRORS, **REFUSED})
async def create_run(request: Request, body: LaunchRequest,
                     idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[!-~]+$",
                                                                   description="a repeat with the same key returns the same run")] = None) -> JSONResponse:
    record, replayed = await run_in_threadpool(runtime(request.app).launch, body, idempotency_key)
    response = _run_response(request, record, 201)
    response.headers["Location"] = f"/api/v1/runs/{record.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@router.post("/merges", status_code=201, summary="Launch a merge as a run: a PEFT adapter into its base, or mergekit's method over models",
             response_model=RunOut, responses={**RUN_ERRORS, 409: REFUSED[409]})
async def create_merge(request: Request, body: MergeLaunchRequest,
                       idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[!-~]+$",
                                                                     description="a repeat with the same key returns the same run")] = None) -> JSONResponse:
    """Every path inside the server's roots; the run's measured host (or GPU) peak is kept beside
    the plan's, as for `vramplan merge --launch`. Follow it at /api/v1/runs/{id}."""
    record, replayed = await run_in_threadpool(runtime(request.app).launch_merge, body, idempotency_key)
    response = _run_response(request, record, 201)
    response.headers["Location"] = f"/api/v1/runs/{record.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@router.post("/runs/dry-run", summary="What a launch would do: files, command, admission against free memory now; starts nothing",
             response_model=DryRunOut, responses=RUN_ERRORS)
async def dry_run(request: Request, body: LaunchRequest) -> JSONResponse:
    _, prepared = await run_in_threadpool(runtime(request.app).prepare, body)
    return JSONResponse(prepared.dry_run_dict())


@router.get("/runs/dry-run", include_in_schema=False)
def dry_run_is_a_post() -> JSONResponse:
    # without this, GET /runs/dry-run would be GET /runs/{run_id} with a bad id (a 422): it is a 405
    return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": "POST"})


@router.get("/runs", summary="Every run, newest first", response_model=RunListOut, responses=RUN_ERRORS)
def list_runs(request: Request) -> JSONResponse:
    rt = runtime(request.app)
    positions = rt.queue_positions()
    out = {"runs": [run_dict(r, positions.get(r.id)) for r in rt.list()]}
    orphans = rt.orphaned_run_dirs()
    if orphans:  # a store deleted or replaced: the runs' directories remain, their records do not
        from launcher.store import ORPHANS_SHOWN, orphans_todo

        out["warning"] = (f"{len(orphans)} run director{'y' if len(orphans) == 1 else 'ies'} under the data directory "
                          f"{'is' if len(orphans) == 1 else 'are'} not in the run store; " + orphans_todo(rt.data_dir))
        out["orphaned_run_dirs"] = orphans[:ORPHANS_SHOWN]
    return JSONResponse(out)


@router.get("/runs/{run_id}", summary="One run", response_model=RunOut, responses=RUN_ERRORS)
def get_run(request: Request, run_id: RunId) -> JSONResponse:
    return _run_response(request, runtime(request.app).get(run_id))


@router.get("/runs/{run_id}/metrics", summary="The run's logged steps (loss, learning rate, memory), per rank",
            response_model=MetricsOut, responses=RUN_ERRORS)
def get_metrics(request: Request, run_id: RunId,
                after_step: Annotated[int, Query(ge=-1, le=10**12, description="only steps after this one")] = -1) -> JSONResponse:
    rt = runtime(request.app)
    record = rt.get(run_id)
    return JSONResponse({"run_id": record.id, "metrics": [metric_dict(m) for m in rt.metrics(record.id, after_step)]})


@router.get("/runs/{run_id}/logs", summary="The run's log from a byte offset; download=true sends it whole as a file",
            response_model=LogsOut, responses={**RUN_ERRORS, 200: {"description": "a chunk (JSON), or with download=true the whole log",
                                                                   "content": {"application/json": {}, "text/plain": {}}}})
def get_logs(request: Request, run_id: RunId,
             offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
             limit: Annotated[int, Query(ge=1, le=1 << 20)] = LOG_CHUNK,
             download: Annotated[bool, Query(description="the whole log as a text file")] = False):
    rt = runtime(request.app)
    record = rt.get(run_id)
    if download:
        def chunks():
            position = 0
            while True:
                chunk = rt.logs(record, position, LOG_CHUNK)
                if chunk.text:
                    yield chunk.text.encode()
                if chunk.eof or chunk.next_offset == position:
                    return
                position = chunk.next_offset

        headers = {"Content-Disposition": f'attachment; filename="vramplan-run-{record.id[:8]}.log"'}
        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers=headers)
    chunk = rt.logs(record, offset, limit)
    return JSONResponse({"run_id": record.id, "offset": offset, "next_offset": chunk.next_offset, "eof": chunk.eof, "text": chunk.text})


@router.get("/runs/{run_id}/events", summary="Live updates (server-sent events); a reconnect with Last-Event-ID continues where it left off",
            responses={**RUN_ERRORS, 200: {"description": "events: state (a transition), metric (a logged step), log (new log text), "
                                                          "update (after each batch: the run's summary), end (the run ended and all was sent). "
                                                          "Every event's id is a cursor; send the last one as Last-Event-ID to resume.",
                                           "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def run_events(request: Request, run_id: RunId,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64, pattern=EVENT_ID,
                                                                      description="the id of the last event received: STEP.TRANSITIONS.LOG_OFFSET, as this server sent it")] = None,
                     after: Annotated[str | None, Query(max_length=64, pattern=EVENT_ID, description="an event id to start after when there is no Last-Event-ID "
                                                                                    "(a page that already shows the run so far): STEP.TRANSITIONS.LOG_OFFSET "
                                                                                    "as this server sent it (STEP -1 or more, the others 0 or more); empty: from the start")] = None):
    rt = runtime(request.app)
    try:
        cursor = Cursor.parse(last_event_id or after)
    except PlanInputError as exc:
        where = ["header", "Last-Event-ID"] if last_event_id else ["query", "after"]
        return JSONResponse(ErrorResponse(detail=[{"loc": where, "msg": exc.reason, "type": "value_error"}]).model_dump(), status_code=422)
    record = await run_in_threadpool(rt.get, run_id)
    return EventStreamResponse(event_stream(rt, record.id, cursor), headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.post("/runs/{run_id}/cancel", summary="Stop the run: it saves a checkpoint and exits (killed after the grace period)",
             response_model=RunOut, responses=RUN_ERRORS)
async def cancel_run(request: Request, run_id: RunId) -> JSONResponse:
    record = await run_in_threadpool(runtime(request.app).cancel, run_id)
    return _run_response(request, record)


@router.post("/runs/{run_id}/resume", status_code=201, summary="A new attempt from the run's last complete checkpoint",
             response_model=RunOut, responses={**RUN_ERRORS, **REFUSED})
async def resume_run(request: Request, run_id: RunId, body: ResumeRequest | None = None) -> JSONResponse:
    record = await run_in_threadpool(runtime(request.app).resume, run_id, bool(body and body.force))
    response = _run_response(request, record, 201)
    response.headers["Location"] = f"/api/v1/runs/{record.id}"
    return response


@router.get("/backends", summary="The trainer backends installed, and whether each can run here", response_model=BackendsOut, responses=RUN_ERRORS)
async def backends() -> JSONResponse:
    from launcher.registry import describe_backends

    infos = await run_in_threadpool(describe_backends)
    return JSONResponse({"backends": [i.to_dict() for i in infos]})
