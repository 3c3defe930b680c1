"""What the server answers when a handler raises something that is not a PlanInputError.

- the server's storage failed (the run store is damaged, deleted or replaced, the data directory
  is read-only or full): 503, saying what failed and what to do, with an id in the log;
- anything else is a bug: 500 with an id, and the traceback in the log under that id.

Neither is ever "this input could not be planned": the request was not at fault. Input errors are
PlanInputError (422 naming the field) where they are raised.

ErrorBoundary answers inside the app, so uvicorn never sees the exception: Starlette's
ServerErrorMiddleware re-raises after answering, and uvicorn then drops the keep-alive connection
without a `Connection: close`, so the client's next request on it fails.
"""

from __future__ import annotations

import errno
import logging
import secrets
import sqlite3

from fastapi.responses import JSONResponse

log = logging.getLogger("vramplan")

# errors of the disk itself, wherever they come from: the server's storage, not the request
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO}


def error_id() -> str:
    return secrets.token_hex(6)


def storage_problem(exc: BaseException) -> tuple[str, str] | None:
    """(what failed, what to do) when `exc` is a failure of the server's storage, else None."""
    from launcher.store import StoreUnavailable, storage_todo

    if isinstance(exc, StoreUnavailable):
        return f"the run store {exc.path} {exc.what}", exc.todo
    if isinstance(exc, sqlite3.Error):
        return f"the run store failed: {exc} ({type(exc).__name__})", storage_todo(exc)
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        where = f" on {exc.filename}" if exc.filename else ""
        return f"the server's storage failed{where}: {exc.strerror or exc}", storage_todo(exc)
    return None


def response_for(exc: BaseException, method: str, path: str) -> JSONResponse:
    """The 503 or 500 for an exception no handler took; logged with its id."""
    ident = error_id()
    storage = storage_problem(exc)
    if storage is not None:
        what, todo = storage
        log.error("storage failure %s on %s %s: %s", ident, method, path, what, exc_info=exc)
        response = JSONResponse({"detail": [{"loc": ["server", "storage"], "msg": f"{what}; {todo} (error {ident} in the server's log)",
                                             "type": "storage_unavailable", "id": ident}]}, status_code=503)
        response.headers["Retry-After"] = "30"
        return response
    log.error("internal error %s on %s %s", ident, method, path, exc_info=exc)
    return JSONResponse({"detail": [{"loc": ["server"], "msg": f"an internal error in the server ({type(exc).__name__}), not in the request: "
                                                              f"it is logged as error {ident}; please report it with that id",
                                     "type": "internal_error", "id": ident}]}, status_code=500)


class ErrorBoundary:
    """Answers an exception that escaped every handler (response_for), unless the response has
    started: then the connection can only be closed, which uvicorn does."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            await response_for(exc, scope.get("method", ""), scope.get("path", ""))(scope, receive, send)
