"""The FastAPI application: the API, the pages, health, and the error contract.

No input may produce a 500: validation errors and PlanInputError become 422 with the field and
the reason; anything unexpected is logged and answered as a 422 naming the request, so a user
sees one readable line and the server keeps serving.
"""

from __future__ import annotations

import logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.api import router as api_router
from app.service import MAX_BODY_BYTES
from planner.errors import PlanInputError

log = logging.getLogger("vramplan")


def _error(loc: list, msg: str, status: int = 422) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": msg}]}, status_code=status)


class BodyLimit:
    """Refuses a request body over MAX_BODY_BYTES with a 413, whether or not it declares its
    length, before any handler reads it whole."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _error(["body"], f"request body over {self.limit:,} bytes", 413)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            return await _error(["body"], f"request body over {self.limit:,} bytes", 413)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app() -> FastAPI:
    app = FastAPI(title="vramplan", version="1", description="GPU memory plans for fine-tuning causal LMs.")
    app.add_middleware(BodyLimit)

    @app.exception_handler(PlanInputError)
    async def plan_input_error(request: Request, exc: PlanInputError):
        return _error(["body", exc.field], exc.reason)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            detail.append({"loc": [str(p) for p in err.get("loc", ())], "msg": msg})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(["body"], f"this input could not be planned ({type(exc).__name__}); the error is logged")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    app.include_router(api_router)
    from app.pages import router as pages_router

    app.include_router(pages_router)
    return app


app = create_app()
