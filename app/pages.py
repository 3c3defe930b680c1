"""The browser pages: one form, its result, compare-methods and what-fits views.

State lives in the query string, so every result has a shareable URL and works with plain GET
(JavaScript off). With htmx the form swaps only the result fragment as fields change. Numbers
come from the same planner objects the API returns; the templates only format them.
"""

from __future__ import annotations

import typing
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from app.charts import memory_bar_svg
from app.service import MAX_CONFIG_TEXT, AdviseRequest, resolve_web_model
from gpu_catalog.catalog import all_gpus, find_gpu
from gpu_catalog.detect import detect
from planner.advisor import advise
from planner.catalog import catalog_ids, load_catalog_spec
from planner.errors import PlanInputError
from planner.fit import smallest_fixes
from planner.plan import GIB, build_plan

ROOT = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=ROOT / "templates")
templates.env.filters["gib"] = lambda n: f"{n / GIB:,.2f} GiB" if n is not None else "-"
HTMX = ROOT / "node_modules" / "htmx.org" / "dist" / "htmx.min.js"
router = APIRouter()

COMPARE_METHODS = ("full", "lora", "qlora", "dora")
MATRIX_MODELS = (
    "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B",
    "mistralai/Mistral-7B-v0.3", "meta-llama/Llama-2-13b-hf", "Qwen/Qwen2.5-32B", "meta-llama/Llama-3.1-70B",
)
MATRIX_GPUS = ("RTX 3080 10GB", "RTX 4090", "RTX 4000 Ada", "L4", "A100 40GB SXM", "A100 80GB SXM", "H100 SXM", "H200")
# Form fields that are text inputs in the page but typed in the request model
FORM_FIELDS = (
    "model", "gpu", "gpu_memory_gib", "num_gpus", "method", "stage", "batch_size", "seq_len", "gradient_checkpointing",
    "optimizer", "precision", "weights_dtype", "attention", "trainer", "parallelism", "offload", "lora_r", "lora_alpha",
    "lora_targets", "lora_dropout", "goal", "data_kind", "num_examples", "tokens_per_example", "tenants", "config_json",
)


def _request_from(params: dict) -> tuple[AdviseRequest | None, dict, list[dict]]:
    """(request, the raw values for refilling the form, errors as {field, msg})."""
    raw = {k: v.strip() for k, v in params.items() if k in FORM_FIELDS and isinstance(v, str) and v.strip()}
    raw.setdefault("model", "meta-llama/Llama-3.1-8B")
    try:
        return AdviseRequest.model_validate(_form_booleans(raw)), raw, []
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "form", "msg": str(e["msg"]).removeprefix("Value error, ")} for e in exc.errors()]
        return None, raw, errors


_FORM_TRUE, _FORM_FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _mentions_bool(annotation) -> bool:
    return annotation is bool or any(_mentions_bool(arg) for arg in typing.get_args(annotation))


_BOOL_FIELDS = frozenset(name for name, info in AdviseRequest.model_fields.items() if _mentions_bool(info.annotation))


def _form_booleans(raw: dict) -> dict:
    """A form sends text; the JSON API takes only true/false, so the form's words become
    booleans here rather than loosening the shared model."""
    out = dict(raw)
    for name in _BOOL_FIELDS & out.keys():
        word = out[name].lower()
        out[name] = True if word in _FORM_TRUE else False if word in _FORM_FALSE else out[name]
    return out


def _gpu_choices() -> tuple[list[dict], str | None]:
    found = detect()
    detected = [{"value": "auto", "label": f"auto: {g.name} ({g.free_bytes / GIB:.1f} GiB free)"} for g in found.gpus[:1]]
    catalog = [{"value": g.name, "label": f"{g.name} ({g.memory_mib / 1024:.0f} GiB)"} for g in all_gpus()]
    return detected + catalog, found.reason


def _result(request_model: AdviseRequest) -> dict:
    spec = resolve_web_model(request_model.model, request_model.config_json)
    options = request_model.options()
    plan = build_plan(spec, options)
    result = {"plan": plan.to_dict(), "chart": memory_bar_svg(plan), "fixes": None, "advice": None}
    if not plan.fits:
        result["fixes"] = smallest_fixes(spec, options).to_dict()
    result["advice"] = advise(spec, request_model.task(), options).to_dict()
    return result


def _render_index(request: Request, params: dict, fragment: bool, status_code: int = 200) -> HTMLResponse:
    parsed, raw, errors = _request_from(params)
    result = None
    if parsed is not None:
        try:
            result = _result(parsed)
        except PlanInputError as exc:
            errors = [{"field": exc.field, "msg": exc.reason}]
    if errors and not fragment:
        status_code = 422  # htmx swaps only 2xx: the fragment shows its errors with a 200
    gpus, detect_reason = _gpu_choices()
    context = {
        "request": request,
        "form": raw,
        "errors": errors,
        "result": result,
        "gpus": gpus,
        "detect_reason": detect_reason,
        "models": sorted(catalog_ids().values()),
        "htmx": HTMX.is_file(),
        "query": request.url.query,
    }
    template = "_result.html" if fragment else "index.html"
    return templates.TemplateResponse(request, template, context, status_code=status_code)


@router.get("/static/htmx.min.js", include_in_schema=False)
def htmx_script():
    """htmx as the npm package `htmx.org` installed it (`npm ci`); the pages work without it."""
    if not HTMX.is_file():
        return Response("/* htmx not installed: run npm ci */", media_type="text/javascript", status_code=404)
    return FileResponse(HTMX, media_type="text/javascript")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(request: Request):
    return _render_index(request, dict(request.query_params), fragment=False)


@router.get("/result", response_class=HTMLResponse, include_in_schema=False)
def result_fragment(request: Request):
    return _render_index(request, dict(request.query_params), fragment=True)


@router.post("/", response_class=HTMLResponse, include_in_schema=False)
async def index_post(request: Request):
    """The form posted (needed for a config.json upload); the result renders as with GET."""
    form = await request.form()
    params = {k: v for k, v in form.items() if isinstance(v, str)}
    upload = form.get("config_file")
    # request.form() gives Starlette's UploadFile (FastAPI's is a subclass of it)
    if isinstance(upload, StarletteUploadFile) and upload.filename:
        data = await upload.read(MAX_CONFIG_TEXT + 1)
        if len(data) > MAX_CONFIG_TEXT:
            params["config_json"] = ""
            return await run_in_threadpool(_render_index, request, params | {"model": params.get("model", "")}, False, 413)
        params["config_json"] = data.decode("utf-8", errors="replace")
    # a pasted config builds a model: never on the event loop
    return await run_in_threadpool(_render_index, request, params, request.headers.get("hx-request") == "true")


@router.get("/compare", response_class=HTMLResponse, include_in_schema=False)
def compare(request: Request):
    parsed, raw, errors = _request_from(dict(request.query_params))
    rows = []
    if parsed is not None:
        try:
            spec = resolve_web_model(parsed.model, parsed.config_json)
            options = parsed.options()
            plans = {}
            for method in COMPARE_METHODS:
                try:
                    plans[method] = build_plan(spec, options.model_copy(update={"method": method, "quantization": None}))
                except PlanInputError as exc:
                    plans[method] = exc
            scale = max((p.peak_bytes for p in plans.values() if not isinstance(p, PlanInputError)), default=0)
            for method, plan in plans.items():
                if isinstance(plan, PlanInputError):
                    rows.append({"method": method, "error": plan.reason})
                else:
                    rows.append({"method": method, "plan": plan.to_dict(), "chart": memory_bar_svg(plan, compact=True, scale_bytes=scale)})
        except PlanInputError as exc:
            errors = [{"field": exc.field, "msg": exc.reason}]
    context = {"request": request, "form": raw, "errors": errors, "rows": rows, "query": request.url.query, "htmx": HTMX.is_file()}
    return templates.TemplateResponse(request, "compare.html", context, status_code=422 if errors else 200)


@router.get("/matrix", response_class=HTMLResponse, include_in_schema=False)
def matrix(request: Request):
    parsed, raw, errors = _request_from(dict(request.query_params))
    table = []
    gpus = [find_gpu(name) for name in MATRIX_GPUS]
    if parsed is not None:
        options = parsed.options()
        for model_id in MATRIX_MODELS:
            spec = load_catalog_spec(model_id)
            cells = []
            for gpu in gpus:
                try:
                    plan = build_plan(spec, options.model_copy(update={"gpu": gpu.name, "gpu_memory_gib": None}))
                    cells.append({"fits": plan.fits, "peak": plan.peak_bytes, "usable": plan.usable_bytes})
                except PlanInputError as exc:
                    cells.append({"error": exc.reason})
            table.append({"model": model_id, "cells": cells})
    context = {"request": request, "form": raw, "errors": errors, "gpus": gpus, "table": table, "htmx": HTMX.is_file()}
    return templates.TemplateResponse(request, "matrix.html", context, status_code=422 if errors else 200)

