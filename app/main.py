"""The FastAPI application: the API, the pages, health, and the error contract.

No input may produce a 500: validation errors and PlanInputError become 422 with the field and
the reason; anything unexpected is logged and answered as a 422 naming the request, so a user
sees one readable line and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from app.api import router as api_router
from app.model_builder import BuildBusy
from app.server import DEFAULT_ALLOWED_HOSTS
from app.service import MAX_BODY_BYTES
from planner.errors import PlanInputError

log = logging.getLogger("vramplan")
SWAGGER_UI = Path(__file__).resolve().parent.parent / "node_modules" / "swagger-ui-dist"
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
MAX_JSON_DEPTH = 32  # a plan request nests two levels; deep nesting only costs the parser


def _error(loc: list, msg: str, status: int = 422, kind: str = "value_error") -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": kind}]}, status_code=status)


def _strict_json_problem(body: bytes) -> str | None:
    """Why this body is not JSON a plan can come from, or None. Python's parser takes NaN,
    Infinity, 1e999 (as inf) and 4,300-digit integers; none is an option value."""

    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a number JSON allows")

    def finite_float(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"{text[:20]} is too large for a number")
        return value

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=refuse_constant, parse_float=finite_float)
    except UnicodeDecodeError:
        return "the body is not UTF-8 text"
    except RecursionError:
        return f"the body nests deeper than {MAX_JSON_DEPTH} levels"
    except ValueError as exc:
        return f"the body is not valid JSON: {exc}"
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the body nests deeper than {MAX_JSON_DEPTH} levels"
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return None


class RequestGuard:
    """Before any handler: the Host and Origin are this server's, the body is at most
    MAX_BODY_BYTES whether or not it declares its length (read here in full, then replayed), and
    a JSON body to the API is strict JSON."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, allowed_hosts: str | None = None):
        self.app = app
        self.limit = limit
        names = (allowed_hosts if allowed_hosts is not None else os.environ.get("VRAMPLAN_ALLOWED_HOSTS", DEFAULT_ALLOWED_HOSTS)).split(",")
        self.allowed_hosts = {n.strip().lower() for n in names if n.strip()}

    def _host_allowed(self, host: str) -> bool:
        return "*" in self.allowed_hosts or (urlsplit(f"//{host}").hostname or "") in self.allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        if not self._host_allowed(host):
            return await _error(["header", "host"], f"this server does not answer to {host[:100]!r}; set VRAMPLAN_ALLOWED_HOSTS to add a name", 400, "host_refused")(scope, receive, send)
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin and origin != "null" and urlsplit(origin).netloc.lower() != host.lower():
            return await _error(["header", "origin"], f"a page from {origin[:100]} may not post to this server", 403, "origin_refused")(scope, receive, send)
        declared = headers.get("content-length")
        too_large = _error(["body"], f"request body over {self.limit:,} bytes", 413, "too_large")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        content_type = headers.get("content-type", "")
        # an empty body is left to routing (405 for a GET-only path, "field required" otherwise)
        if body and scope["method"] == "POST" and scope["path"].startswith("/api/") and ("json" in content_type or not content_type):
            problem = _strict_json_problem(body)
            if problem:
                return await _error(["body"], problem, 422, "json_invalid")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    # SIGTERM stops the server gracefully; the build worker is a child that must go with it
    from app.service import BUILDER

    BUILDER.shutdown()


def create_app() -> FastAPI:
    app = FastAPI(
        title="vramplan", version="1", description="GPU memory plans for fine-tuning causal LMs.",
        docs_url=None, redoc_url=None,  # served below from the installed swagger-ui-dist: no CDN
        lifespan=_lifespan,
    )
    app.add_middleware(RequestGuard)

    @app.exception_handler(PlanInputError)
    async def plan_input_error(request: Request, exc: PlanInputError):
        return _error(["body", exc.field], exc.reason)

    @app.exception_handler(BuildBusy)
    async def build_busy(request: Request, exc: BuildBusy):
        response = _error(["body", "config_json"], str(exc), 503, "busy")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = []
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, PlanInputError):  # raised inside a validator: name its field
                detail.append({"loc": ["body", cause.field], "msg": cause.reason, "type": "value_error"})
                continue
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            detail.append({"loc": [str(p) for p in err.get("loc", ())], "msg": msg, "type": str(err.get("type", "value_error"))})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(["body"], f"this input could not be planned ({type(exc).__name__}); the error is logged", kind="unexpected")

    @app.get("/healthz", summary="Liveness: answers while plans are being built")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/docs", include_in_schema=False)
    def docs():
        if not (SWAGGER_UI / SWAGGER_FILES[0]).is_file():
            return HTMLResponse('<p>The API explorer needs swagger-ui-dist: run <code>npm ci</code>. The schema is at <a href="/openapi.json">/openapi.json</a>.</p>')
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="vramplan API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js", swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )

    @app.get("/static/swagger-ui/{name}", include_in_schema=False)
    def swagger_asset(name: str):
        path = SWAGGER_UI / name
        if name not in SWAGGER_FILES or not path.is_file():
            return _error(["path", "name"], "no such asset", 404, "not_found")
        return FileResponse(path)

    app.include_router(api_router)
    from app.pages import router as pages_router

    app.include_router(pages_router)
    return app


app = create_app()
