"""The live feed of a run (server-sent events): its state changes, metrics and log, resumable
with Last-Event-ID."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi.concurrency import run_in_threadpool

from app.runs import finite, metric_dict
from launcher.runtime import RunsRuntime
from planner.errors import PlanInputError


class Cursor:
    """Where a client is in a run's feed: the last metric step, transitions and log bytes it has.
    Sent as every event's id, so a reconnect with Last-Event-ID continues exactly there."""

    def __init__(self, step: int = -1, transitions: int = 0, log_offset: int = 0):
        self.step, self.transitions, self.log_offset = step, transitions, log_offset

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        if not text:
            return cls()
        parts = text.strip().split(".")
        try:
            step, transitions, offset = (int(p) for p in parts)
        except ValueError:
            raise PlanInputError("Last-Event-ID", "an event id is STEP.TRANSITIONS.LOG_OFFSET, as this server sent it") from None
        if step < -1 or transitions < 0 or offset < 0:
            raise PlanInputError("Last-Event-ID", "an event id's parts are not negative")
        return cls(step, transitions, offset)

    def __str__(self) -> str:
        return f"{self.step}.{self.transitions}.{self.log_offset}"


LOG_CHUNK = 64 * 1024
SSE_RETRY_MS = 3000
SSE_MAX_SECONDS = 600  # then the client reconnects with Last-Event-ID (no connection is held for good)
SSE_HEARTBEAT_S = 15


def _event(kind: str, data: Any, cursor: Cursor | None) -> str:
    head = f"id: {cursor}\n" if cursor is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(finite(data), separators=(',', ':'), allow_nan=False)}\n\n"


def summary(record) -> dict:
    return {"id": record.id, "state": record.state, "reason": record.reason, "message": record.message, "last_step": record.last_step,
            "total_steps": record.total_steps, "final_loss": record.final_loss, "measured_peak_bytes": record.measured_peak_bytes,
            "predicted_peak_bytes": record.predicted_peak_bytes, "error_pct": record.error_pct, "terminal": record.terminal}


def feed_batch(rt: RunsRuntime, run_id: str, cursor: Cursor) -> tuple[list[str], bool]:
    """The events past `cursor` (advancing it) and whether the feed is complete (the run ended and
    everything it wrote was sent). Blocking: call from a thread."""
    record = rt.get(run_id)
    done = record.terminal  # read first: what it wrote before ending is all read below
    out: list[str] = []
    for t in rt.transitions(record.id)[cursor.transitions:]:
        cursor.transitions += 1
        out.append(_event("state", {**t, "state": t["to_state"]}, cursor))
    rows = rt.metrics(record.id, cursor.step)
    if rows:
        last = rows[-1]["step"]
        for row in rows:
            if row["step"] == last and record.num_gpus > 1 and not done:
                break  # the newest step may still get its other ranks' rows: sent with the next
            cursor.step = row["step"]
            out.append(_event("metric", metric_dict(row), cursor))
    for _ in range(4):  # up to 256 KiB of log per batch
        chunk = rt.logs(record, cursor.log_offset, LOG_CHUNK)
        if chunk.text:
            cursor.log_offset = chunk.next_offset
            out.append(_event("log", {"text": chunk.text, "next_offset": chunk.next_offset}, cursor))
        if chunk.eof:
            break
    else:
        done = False  # more log to send: not complete yet
    record = rt.get(record.id)
    if out:
        out.append(_event("update", summary(record), cursor))
    if done:
        out.append(_event("end", summary(record), cursor))
    return out, done


async def event_stream(rt: RunsRuntime, run_id: str, cursor: Cursor, interval: float = 0.5):
    yield f"retry: {SSE_RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    while True:
        events, done = await run_in_threadpool(feed_batch, rt, run_id, cursor)
        for event in events:
            yield event
        now = time.monotonic()
        if events:
            last_sent = now
        if done or now - started > SSE_MAX_SECONDS:
            return
        if now - last_sent > SSE_HEARTBEAT_S:
            last_sent = now
            yield ": still here\n\n"
        await asyncio.sleep(interval)
