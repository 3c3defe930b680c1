"""The FastAPI application: the API, the pages, health, the guard, and the error contract.

Input errors are 422 naming the field: validation errors and PlanInputError. What is not the
request's fault is never answered as if it were (app/errors.py): a failure of the server's storage
is a 503 saying what failed and what to do, anything else a 500 with an id in the log; the
connection stays usable either way.

Every request passes RequestGuard first: the Host must be one of this server's names (DNS
rebinding), a state-changing request must not come from another site (Origin, Sec-Fetch-Site),
the routes that start, stop or show runs need the token (app/auth.py), and every response carries
the security headers (a Content-Security-Policy allowing only this server's scripts and styles,
nosniff, no framing, a same-origin referrer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import auth, health
from app.api import router as api_router
from app.api_serving import router as serving_router
from app.errors import ErrorBoundary
from app.http_policy import DEFAULT_ALLOWED_HOSTS, SECURITY_HEADERS, host_in
from app.model_builder import BuildBusy
from app.runs import LaunchProblem, runtime
from app.runs_api import router as runs_router
from app.service import MAX_BODY_BYTES
from app.templating import SWAGGER_UI
from launcher.runtime import follow_forever
from launcher.supervisor import RunNotFound
from planner.errors import PlanInputError

log = logging.getLogger("vramplan")
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
    """Before any handler: the Host and Origin are this server's, the guarded routes have their
    credentials (app/auth.py), every response gets the security headers, the body is at most
    MAX_BODY_BYTES whether or not it declares its length (read here in full, then replayed), and
    a JSON body to the API is strict JSON."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, allowed_hosts: str | None = None):
        self.app = app
        self.limit = limit
        names = (allowed_hosts if allowed_hosts is not None else os.environ.get("VRAMPLAN_ALLOWED_HOSTS", DEFAULT_ALLOWED_HOSTS)).split(",")
        self.allowed_hosts = {n.strip().lower() for n in names if n.strip()}

    def _host_allowed(self, host: str) -> bool:
        return host_in(host, self.allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("headers") or []
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        path = scope["path"]
        guarded = auth.needs_credentials(path)
        # /login?token= fills its form with the token: no cache may keep that page
        send = _with_security_headers(send, no_store=guarded or path == "/login")
        host = headers.get("host", "")
        if sum(1 for k, _ in raw if k.lower() == b"host") > 1:
            return await _error(["header", "host"], "a request has one Host header; this one has several", 400, "host_refused")(scope, receive, send)
        if not self._host_allowed(host):
            return await _error(["header", "host"], f"this server does not answer to {host[:100]!r}; set VRAMPLAN_ALLOWED_HOSTS to add a name", 400, "host_refused")(scope, receive, send)
        unsafe = scope["method"] not in auth.SAFE_METHODS
        origin = headers.get("origin")
        if unsafe and origin and origin != "null" and not _same_site_origin(origin, scope.get("scheme", "http"), host):
            return await _error(["header", "origin"], f"a page from {origin[:100]} may not post to this server", 403, "origin_refused")(scope, receive, send)
        fetch_site = headers.get("sec-fetch-site")
        if unsafe and fetch_site in ("cross-site", "same-site"):
            return await _error(["header", "sec-fetch-site"], f"the browser says this request comes from another site ({fetch_site}); "
                                "a page of another site may not post to this server", 403, "origin_refused")(scope, receive, send)
        # credentials are checked where needed, and read where they change what a route allows: the
        # plan page's launch button, and a model directory a signed-in client (cookie or Bearer) may plan
        presented = "cookie" in headers or "authorization" in headers
        who = auth.CREDENTIALS.identify(headers, host, bearer=guarded or "authorization" in headers) if guarded or presented else None
        scope.setdefault("state", {})["vramplan_auth"] = who if who in ("bearer", "cookie") else None
        if guarded:
            refusal = _auth_refusal(scope, headers, host, who, unsafe)
            if refusal is not None:
                return await refusal(scope, receive, send)
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


def _same_site_origin(origin: str, scheme: str, host: str) -> bool:
    """The Origin is this server: its scheme and its host and port (an https page is another
    origin than this http server, and the other way round)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme.lower() == scheme.lower() and parts.netloc.lower() == host.lower()


def _documented_methods(app: FastAPI, path: str) -> set[str]:
    """The methods /openapi.json documents for the path (with HEAD where GET is)."""
    paths = app.openapi()["paths"]
    if path in paths:  # a literal path (/api/v1/runs/dry-run) is its own resource, whatever the templates beside it
        methods = {m.upper() for m in paths[path]}
    else:
        patterns = getattr(app.state, "path_patterns", None)
        if patterns is None:
            patterns = app.state.path_patterns = [
                (re.compile("^" + "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]+\})", template)) + "$"),
                 {m.upper() for m in operations})
                for template, operations in paths.items() if "{" in template
            ]
        methods = {m for pattern, ms in patterns if pattern.match(path) for m in ms}
    return methods | {"HEAD"} if "GET" in methods else methods


def _with_security_headers(send, no_store: bool):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
            if no_store and b"cache-control" not in present:
                extra.append((b"cache-control", b"no-store"))  # logs and run details stay out of caches
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _auth_refusal(scope, headers: dict, host: str, who: str | None, unsafe: bool):
    """The response for a request to a guarded route that may not go on, or None."""
    path = scope["path"]
    api = path.startswith("/api/")
    if who in ("bearer", "cookie"):
        if who == "cookie" and unsafe and not auth.same_origin(headers, host):
            # the cookie goes along with any request the browser makes: it must prove where it comes from
            return _error(["header", "origin"], "a browser request that changes something must come from this server's own pages "
                          "(no Origin or Sec-Fetch-Site: same-origin was sent)", 403, "origin_refused")
        return None
    if not api and scope["method"] in ("GET", "HEAD"):
        query = scope.get("query_string", b"").decode("latin-1")
        return RedirectResponse(auth.login_url(path + (f"?{query}" if query else "")), status_code=303)
    msg = ("the token is wrong" if who == "bad_bearer" else
           "this needs the token: send Authorization: Bearer TOKEN (vramplan serve printed it; it is also in the data directory's token file), "
           "or sign in on /login")
    response = _error(["header", "authorization"], msg, 401, "unauthorized")
    response.headers["WWW-Authenticate"] = 'Bearer realm="vramplan"'
    return response


def _ensure_token() -> None:
    """The token is made at the first start (vramplan serve makes it earlier, to print it)."""
    try:
        _, created = auth.read_or_create_token()
    except (auth.TokenError, OSError) as exc:
        log.warning("launching is off until this is fixed: %s", exc)
        return
    if created:
        log.warning("made the token for launching runs: %s (mode 0600)", auth.data_dir() / auth.TOKEN_FILE)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    await asyncio.to_thread(_ensure_token)
    # the runs this server (or an earlier one) started: re-attached at once, then followed
    follower = asyncio.create_task(follow_forever(lambda: runtime(app)))
    try:
        yield
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        runs = getattr(app.state, "runs_runtime", None)
        if runs is not None:
            runs.close()
    # SIGTERM stops the server gracefully; the build worker is a child that must go with it
    from app.service import BUILDER

    BUILDER.shutdown()


SOURCE_REQUIRED = [{"required": ["model"]}, {"required": ["config_json"]}]
MEANING_422 = ("422 also when the request is well formed but refused by what it means, with the field named in `loc`: a `model` "
               "that is neither a catalog id nor a directory inside the roots, a `config_json` that is not a model config, "
               "a `dataset` or `output_dir` that does not exist or lies outside the roots, options that do not go together")


def _state_what_requests_need(app: FastAPI) -> None:
    """/openapi.json says what the models alone cannot: a request body that takes `model` and
    `config_json` needs one of them (anyOf), and a well-formed request can still be a 422 by
    what it means (a dataset that does not exist): said in each such operation's 422."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for component in schema.get("components", {}).get("schemas", {}).values():
            properties = component.get("properties", {})
            if "model" in properties and "config_json" in properties and not set(component.get("required", ())) & {"model", "config_json"}:
                component["anyOf"] = SOURCE_REQUIRED
                component["description"] = (component.get("description", "") + " One of `model` and `config_json` is required.").strip()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and "requestBody" in operation and "422" in operation.get("responses", {}):
                    answer = operation["responses"]["422"]
                    if MEANING_422 not in answer.get("description", ""):
                        answer["description"] = (answer.get("description", "") + ". " + MEANING_422).lstrip(". ")
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def create_app() -> FastAPI:
    app = FastAPI(
        title="vramplan", version="1", description="GPU memory plans for fine-tuning causal LMs.",
        docs_url=None, redoc_url=None,  # served below from the installed swagger-ui-dist: no CDN
        lifespan=_lifespan,
    )
    app.add_middleware(ErrorBoundary)  # inside the guard: its answers get the security headers too
    app.add_middleware(RequestGuard)

    @app.exception_handler(PlanInputError)
    async def plan_input_error(request: Request, exc: PlanInputError):
        return _error(["body", exc.field], exc.reason)

    @app.exception_handler(BuildBusy)
    async def build_busy(request: Request, exc: BuildBusy):
        response = _error(["body", "config_json"], str(exc), 503, "busy")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            # Starlette answers with the methods of one route on the path; GET and POST
            # /api/v1/runs are two routes: Allow names every method the path takes
            methods = _documented_methods(request.app, request.url.path)
            if methods:
                exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(sorted(methods))})
        return await http_exception_handler(request, exc)

    @app.exception_handler(RunNotFound)
    async def run_not_found(request: Request, exc: RunNotFound):
        return _error(["path", "run_id"], str(exc), 404, "not_found")

    @app.exception_handler(LaunchProblem)
    async def launch_problem(request: Request, exc: LaunchProblem):
        return JSONResponse(exc.body(), status_code=exc.status)

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

    def health_now():
        runs = getattr(app.state, "runs_runtime", None)
        return health.current(auth.data_dir(), runs.store_problem() if runs is not None else None)

    health.register(health_now)  # the server answers a probe at accept with it (app/server.py)

    @app.get("/healthz", summary="Health: the server answers, the run store reads and the data directory takes writes (503 when not)",
             responses={503: {"description": "the run store or the data directory's disk is failing: `store` and `disk` say what and what to do"}})
    async def healthz(request: Request):
        # on the event loop (never a thread behind the plans); the server answers it outside the
        # work limit (app/server.py); cached for a second (app/health.py)
        status, body = health_now()
        return Response(body, status_code=status, media_type="application/json", headers={"Cache-Control": "no-store"})

    @app.get("/docs", include_in_schema=False)
    def docs():
        if not (SWAGGER_UI / SWAGGER_FILES[0]).is_file():
            return HTMLResponse('<p>The API explorer needs swagger-ui-dist: run <code>npm ci</code>. The schema is at <a href="/openapi.json">/openapi.json</a>.</p>')
        # FastAPI's get_swagger_ui_html starts Swagger UI with an inline script, which the CSP
        # refuses: the same start is a file here (static/swagger-init.js)
        return HTMLResponse(
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>vramplan API</title>'
            '<link rel="stylesheet" href="/static/swagger-ui/swagger-ui.css"><link rel="icon" href="/static/swagger-ui/favicon-32x32.png">'
            '</head><body><div id="swagger-ui"></div><script src="/static/swagger-ui/swagger-ui-bundle.js"></script>'
            '<script src="/static/swagger-init.js"></script></body></html>'
        )

    @app.get("/static/swagger-ui/{name}", include_in_schema=False)
    def swagger_asset(name: str):
        path = SWAGGER_UI / name
        if name not in SWAGGER_FILES or not path.is_file():
            return _error(["path", "name"], "no such asset", 404, "not_found")
        return FileResponse(path)

    app.include_router(api_router)
    app.include_router(runs_router)
    app.include_router(serving_router)
    from app.pages import router as pages_router
    from app.runs_pages import router as runs_pages_router

    app.include_router(pages_router)
    app.include_router(runs_pages_router)
    _state_what_requests_need(app)
    return app


app = create_app()

