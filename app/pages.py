"""The browser pages: one form, its result, compare-methods and what-fits views.

State lives in the query string, so every result has a shareable URL and works with plain GET
(JavaScript off). With htmx the form fetches only the result fragment from /result as fields
change, and the response tells htmx to put `/?same query` in the address bar: every address the
page shows reopens the full page with the same result. Numbers come from the same planner
objects the API returns; the templates only format them.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from app.charts import band_swatch_uri, family_totals, line_swatch_uri, memory_bar_svg, swatch_uri
from app.service import MAX_CONFIG_TEXT, AdviseRequest, resolve_web_model
from gpu_catalog.catalog import all_gpus, find_gpu, lookup_gpu
from gpu_catalog.detect import detect
from planner.advisor import advise
from planner.catalog import catalog_ids, load_catalog_spec
from planner.errors import PlanInputError
from planner.fit import smallest_fixes
from planner.plan import DEFAULT_GPU, GIB, build_plan, resolve_gpu

ROOT = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=ROOT / "templates")
templates.env.filters["gib"] = lambda n: f"{n / GIB:,.2f} GiB" if n is not None else "-"


def _break_after(text: str, separator: str) -> Markup:
    """Escaped text with a line-break opportunity after each separator, so a long dotted or
    slashed name wraps at its parts ("activations.<wbr>checkpoints"), never inside a word."""
    return Markup(f"{separator}<wbr>").join(escape(part) for part in str(text).split(separator))


templates.env.filters["break_dots"] = lambda text: _break_after(text, ".")
templates.env.filters["break_slash"] = lambda text: _break_after(text, "/")
HTMX = ROOT / "node_modules" / "htmx.org" / "dist" / "htmx.min.js"
# htmx's server-sent-events extension (npm htmx-ext-sse): the run page's live updates
SSE_EXT = ROOT / "node_modules" / "htmx-ext-sse" / "dist" / "sse.min.js"
STATIC = ROOT / "static"
# what /static/NAME serves: the npm packages' files and the app's own; nothing else
ASSETS = {
    "htmx.min.js": (HTMX, "text/javascript", "htmx not installed: run npm ci"),
    "htmx-ext-sse.js": (SSE_EXT, "text/javascript", "htmx-ext-sse not installed: run npm ci"),
    "app.css": (STATIC / "app.css", "text/css", "missing"),
    "swagger-init.js": (STATIC / "swagger-init.js", "text/javascript", "missing"),
}


def _asset_version() -> str:
    import hashlib

    path = STATIC / "app.css"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "0"


def signed_in(request: Request) -> bool:
    """The request carries this server's sign-in cookie or token (app/main.py's guard read it)."""
    return bool((request.scope.get("state") or {}).get("vramplan_auth"))


templates.env.globals["asset_version"] = _asset_version()  # a new stylesheet is fetched anew, never a stale cached one
templates.env.globals["signed_in"] = signed_in
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
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B"
# The GPU list's groups, in the order a user scans them (the detected card goes first)
GPU_GROUPS = (("datacenter", "nvidia", "Data centre"), ("workstation", "nvidia", "Workstation"), ("consumer", "nvidia", "Consumer (GeForce)"), (None, "amd", "AMD"))
NO_GPU_HINT = "No GPU detected on this server; pick one from the list."


# -- the form's text -> the request model ------------------------------------------------------


def _literal_choices(annotation) -> tuple[str, ...]:
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(a for a in typing.get_args(annotation) if isinstance(a, str))
    return tuple(c for arg in typing.get_args(annotation) for c in _literal_choices(arg))


def _choice_key(text: str) -> str:
    return re.sub(r"[\s_-]+", "", text.lower())


# field -> {"qlora": "qlora", "pagedadamw8bit": "paged_adamw_8bit", ...}
_CHOICES = {
    name: {_choice_key(c): c for c in choices}
    for name, info in AdviseRequest.model_fields.items()
    if (choices := _literal_choices(info.annotation))
}


def _normalize_choices(raw: dict) -> dict:
    """People type "QLoRA", "ZeRO-3", "paged AdamW 8bit": the API takes the exact names, so the
    page maps case, spaces, hyphens and underscores onto them before validation."""
    return {name: _CHOICES.get(name, {}).get(_choice_key(value), value) for name, value in raw.items()}


def _request_from(params: dict) -> tuple[AdviseRequest | None, dict, list[dict]]:
    """(request, the raw values for refilling the form, errors as {field, msg})."""
    raw = {k: v.strip() for k, v in params.items() if k in FORM_FIELDS and isinstance(v, str) and v.strip()}
    raw.setdefault("model", DEFAULT_MODEL)
    raw = _normalize_choices(raw)
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


def _query(raw: dict, **changes: str) -> str:
    """The query string of a page state: given fields only, in the form's order, so the address
    is short and the same state always has the same address."""
    state = {**raw, **changes}
    return urlencode([(name, state[name]) for name in FORM_FIELDS if state.get(name)], safe="/")  # model ids stay legible


# -- what the form shows ------------------------------------------------------------------------


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _shown(raw: dict) -> dict:
    """Every field's value as the plan used it: what was given, else the request model's default.
    The selects show these, so an untouched form never contradicts its result."""
    defaults = {name: _as_text(info.get_default()) for name, info in AdviseRequest.model_fields.items() if name in FORM_FIELDS}
    given = {name: _as_text(value) for name, value in _form_booleans(raw).items()}  # "off" shows as "false"
    return {**defaults, **given, "gpu": _shown_gpu(raw.get("gpu"))}


def _shown_gpu(given: str | None) -> str:
    """The catalog name of the GPU the plan is for, so the select shows the card the plan used
    (the planner's default when none was given); a name that resolves to nothing stays as typed."""
    wanted = given or DEFAULT_GPU
    if wanted.strip().lower() == "auto":
        return "auto"
    try:
        return lookup_gpu(wanted).gpu.name
    except PlanInputError:
        return wanted


def _gpu_groups(selected: str) -> tuple[list[dict], str | None]:
    """The GPU select's <optgroup>s (detected first, then by segment) and the hint under it."""
    found = detect()
    groups = []
    if found.gpus:
        first = found.gpus[0]
        groups.append({"label": "Detected on this server", "options": [{"value": "auto", "label": f"auto: {first.name} ({first.free_bytes / GIB:.1f} GiB free)"}]})
    for segment, vendor, label in GPU_GROUPS:
        cards = [g for g in all_gpus() if g.vendor == vendor and segment in (None, g.segment)]
        groups.append({"label": label, "options": [{"value": g.name, "label": f"{g.name} ({g.memory_mib / 1024:.0f} GiB)"} for g in cards]})
    if not any(o["value"] == selected for group in groups for o in group["options"]):
        # what was asked for stays visible (and is sent again) until the user picks a card
        groups.insert(0, {"label": "As given", "options": [{"value": selected, "label": f"{selected} (not found: pick one below)"}]})
    return groups, None if found.gpus else NO_GPU_HINT


# -- planning -------------------------------------------------------------------------------------


def _result(request_model: AdviseRequest, roots: list | None = None) -> dict:
    # the planner's assumptions already say which card a line name meant and which base spec
    # an instruct variant used; a signed-in user may also plan a model directory inside the roots
    spec = resolve_web_model(request_model.model, request_model.config_json, roots=roots)
    options = request_model.options()
    plan = build_plan(spec, options)
    result = {
        "plan": plan.to_dict(),
        "chart": memory_bar_svg(plan),
        "fixes": None,
        "advice": None,
        "pasted": bool(request_model.config_json and request_model.config_json.strip()),
    }
    if not plan.fits:
        result["fixes"] = smallest_fixes(spec, options).to_dict()
    result["advice"] = advise(spec, request_model.task(), options).to_dict()
    return result


def _render_index(request: Request, params: dict, fragment: bool, status_code: int | None = None) -> HTMLResponse:
    """The form page, or (fragment) the result alone with the bits of the page it updates."""
    from app.runs_pages import launch_block, local_roots

    parsed, raw, errors = _request_from(params)
    result = None
    if parsed is not None:
        try:
            result = _result(parsed, local_roots(request))
        except PlanInputError as exc:
            errors = [{"field": exc.field, "msg": exc.reason}]
    shown = _shown(raw)
    gpu_groups, gpu_hint = _gpu_groups(shown["gpu"])
    context = {
        "request": request,
        "form": raw,
        "shown": shown,
        "errors": errors,
        "result": result,
        "gpu_groups": gpu_groups,
        "gpu_hint": gpu_hint,
        "models": sorted(catalog_ids().values()),
        "htmx": HTMX.is_file(),
        "query": _query(raw),
        "oob": fragment,
        "launch": launch_block(request, raw, result, _query(raw)),
    }
    if status_code is None:
        # htmx swaps only 2xx: the fragment shows its errors with a 200
        status_code = 422 if errors and not fragment else 200
    template = "_fragment.html" if fragment else "index.html"
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    if fragment:
        response.headers["HX-Push-Url"] = f"/?{context['query']}"
    return response


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


@router.get("/static/{name}", include_in_schema=False)
def static_asset(name: str):
    """htmx and its SSE extension as npm installed them (`npm ci`), and the app's stylesheet and
    scripts; the pages work without the npm files."""
    if name not in ASSETS:
        return Response("not found", media_type="text/plain", status_code=404)
    path, media_type, missing = ASSETS[name]
    if not path.is_file():
        return Response(f"/* {missing} */", media_type=media_type, status_code=404)
    return FileResponse(path, media_type=media_type)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(request: Request):
    return _render_index(request, dict(request.query_params), fragment=False)


@router.get("/result", response_class=HTMLResponse, include_in_schema=False)
def result_fragment(request: Request):
    """The fragment for htmx. Opened directly (an address saved before the address bar held
    /?…), it is the full page, never an unstyled fragment; with the fragment's 200, so clients
    that read its status see no change."""
    htmx = _is_htmx(request)
    response = _render_index(request, dict(request.query_params), fragment=htmx, status_code=None if htmx else 200)
    response.headers["Vary"] = "HX-Request"  # one address, two bodies: caches must not mix them
    return response


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
    return await run_in_threadpool(_render_index, request, params, _is_htmx(request))


# -- compare and matrix -------------------------------------------------------------------------


def _compare_rows(parsed: AdviseRequest) -> list[dict]:
    spec = resolve_web_model(parsed.model, parsed.config_json)
    options = parsed.options()
    # every method plans on the same card: a name that matches none (or several) is one error
    # for the page, raised here, not the same message in each method's row
    resolve_gpu(options)
    plans = {}
    for method in COMPARE_METHODS:
        try:
            plans[method] = build_plan(spec, options.model_copy(update={"method": method, "quantization": None}))
        except PlanInputError as exc:
            plans[method] = exc
    scale = max((p.peak_high_bytes for p in plans.values() if not isinstance(p, PlanInputError)), default=0)
    rows = []
    for method, plan in plans.items():
        if isinstance(plan, PlanInputError):
            rows.append({"method": method, "error": plan.reason})
        else:
            rows.append({
                "method": method, "plan": plan.to_dict(), "chart": memory_bar_svg(plan, compact=True, scale_bytes=scale),
                "families": [family for family, _ in family_totals(plan)],
            })
    return rows


def _compare_legend(rows: list[dict]) -> list[dict]:
    """What the compact bars' fills mean (they have no legend of their own): each family drawn in
    any bar once, in the order the bars stack them, and the two lines."""
    families = list(dict.fromkeys(f for row in rows for f in row.get("families", ())))
    items = [{"label": f.replace("_", " "), "swatch": swatch_uri(f)} for f in families]
    if families:
        items += [{"label": "bracket: the band, low to high end (the verdict uses the high end)", "swatch": band_swatch_uri()},
                  {"label": "dashed line: usable memory", "swatch": line_swatch_uri(dashed=True)},
                  {"label": "thin line: the GPU's total memory", "swatch": line_swatch_uri(dashed=False)}]
    return items


@router.get("/compare", response_class=HTMLResponse, include_in_schema=False)
def compare(request: Request):
    parsed, raw, errors = _request_from(dict(request.query_params))
    rows = []
    if parsed is not None:
        try:
            rows = _compare_rows(parsed)
        except PlanInputError as exc:
            errors = [{"field": exc.field, "msg": exc.reason}]
    context = {
        "request": request, "form": raw, "errors": errors, "rows": rows, "query": _query(raw), "htmx": HTMX.is_file(),
        "links": {m: _query(raw, method=m) for m in COMPARE_METHODS},
        # the other fields ride along when the model or GPU is changed here
        "carried": {k: v for k, v in raw.items() if k not in ("model", "gpu", "method")},
        "gpu_used": next((r["plan"]["gpu"]["name"] for r in rows if "plan" in r), _shown_gpu(raw.get("gpu"))),
        "legend": _compare_legend(rows),
    }
    return templates.TemplateResponse(request, "compare.html", context, status_code=422 if errors else 200)


@router.get("/matrix", response_class=HTMLResponse, include_in_schema=False)
def matrix(request: Request):
    parsed, raw, errors = _request_from(dict(request.query_params))
    table = []
    gpus = [{"label": label, "name": find_gpu(label).name} for label in MATRIX_GPUS]
    if parsed is not None:
        options = parsed.options()
        for model_id in MATRIX_MODELS:
            spec = load_catalog_spec(model_id)
            cells = []
            for gpu in gpus:
                try:
                    plan = build_plan(spec, options.model_copy(update={"gpu": gpu["name"], "gpu_memory_gib": None}))
                    cells.append({"fits": plan.fits, "verdict": plan.verdict, "peak": plan.peak_bytes, "high": plan.peak_high_bytes, "usable": plan.usable_bytes})
                except PlanInputError as exc:
                    cells.append({"error": exc.reason})
            table.append({"model": model_id, "cells": cells})
    context = {"request": request, "form": raw, "shown": _shown(raw), "errors": errors, "gpus": gpus, "table": table, "htmx": HTMX.is_file(), "query": _query(raw)}
    return templates.TemplateResponse(request, "matrix.html", context, status_code=422 if errors else 200)
