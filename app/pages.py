"""The browser pages: one form, its result, compare-methods and what-fits views.

State lives in the query string, so every result has a shareable URL and works with plain GET
(JavaScript off). With htmx the form fetches only the result fragment from /result as fields
change, and the response tells htmx to put `/?same query` in the address bar: every address the
page shows reopens the full page with the same result. Numbers come from the same planner
objects the API returns; the templates only format them.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import shlex

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile as StarletteUploadFile

from app.charts import (
    band_swatch_uri,
    family_totals,
    line_swatch_uri,
    memory_bar_svg,
    swatch_uri,
)
from app.forms import FORM_FIELDS, form_booleans, normalize_choices, query_string
from app.runs import signed_in_roots
from app.runs_pages import launch_block
from app.service import BUILD_THREADS, MAX_CONFIG_TEXT, TRACE_AHEAD, AdviseRequest, trace_would_run, web_plan, web_source
from app.templating import ASSETS, HTMX, templates
from gpu_catalog.catalog import all_gpus, find_gpu, lookup_gpu
from gpu_catalog.detect import detect
from planner.advisor import advise
from planner.catalog import catalog_ids, load_catalog_spec
from planner.errors import PlanInputError
from planner.fit import fit_report
from planner.options import TrainingOptions
from planner.plan import DEFAULT_GPU, GIB, build_plan, resolve_gpu
from planner.request import single_plan_options

router = APIRouter()

COMPARE_METHODS = ("full", "lora", "qlora", "dora")
MATRIX_MODELS = (
    "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B",
    "mistralai/Mistral-7B-v0.3", "meta-llama/Llama-2-13b-hf", "Qwen/Qwen2.5-32B", "meta-llama/Llama-3.1-70B",
)
MATRIX_GPUS = ("RTX 3080 10GB", "RTX 4090", "RTX 4000 Ada", "L4", "A100 40GB SXM", "A100 80GB SXM", "H100 SXM", "H200")
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B"
# The GPU list's groups, in the order a user scans them (the detected card goes first)
GPU_GROUPS = (("datacenter", "nvidia", "Data centre"), ("workstation", "nvidia", "Workstation"), ("consumer", "nvidia", "Consumer (GeForce)"), (None, "amd", "AMD"))
NO_GPU_HINT = "No GPU detected on this server; pick one from the list."
# a page answered with the formula's plan reloads itself this often without JavaScript, until the
# trace running in the background is done (2 s for a 1B model to 12 s for 70B on 2 cores)
NO_JS_REFRESH_S = 3
# how long a page waits for a pasted config's model to build before it answers that it is building
BUILD_WAIT_S = 0.5


def _request_from(params: dict) -> tuple[AdviseRequest | None, dict, list[dict]]:
    """(request, the raw values for refilling the form, errors as {field, msg})."""
    raw = {k: v.strip() for k, v in params.items() if k in FORM_FIELDS and isinstance(v, str) and v.strip()}
    raw.setdefault("model", DEFAULT_MODEL)
    raw = normalize_choices(raw)
    try:
        return AdviseRequest.model_validate(form_booleans(raw)), raw, []
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]) or "form", "msg": str(e["msg"]).removeprefix("Value error, ")} for e in exc.errors()]
        return None, raw, errors


# -- what the form shows ------------------------------------------------------------------------


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _shown(raw: dict) -> dict:
    """Every field's value as the plan used it: what was given, else the request model's default.
    The selects show these, so an untouched form never contradicts its result."""
    defaults = {name: _as_text(info.get_default()) for name, info in AdviseRequest.model_fields.items() if name in FORM_FIELDS}
    given = {name: _as_text(value) for name, value in form_booleans(raw).items()}  # "off" shows as "false"
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
        groups.append({"label": label, "options": [{"value": g.name, "label": f"{g.name} ({g.memory_mib / 1024:.1f} GiB)"} for g in cards]})
    if not any(o["value"] == selected for group in groups for o in group["options"]):
        # what was asked for stays visible (and is sent again) until the user picks a card
        groups.insert(0, {"label": "As given", "options": [{"value": selected, "label": f"{selected} (not found: pick one below)"}]})
    return groups, None if found.gpus else NO_GPU_HINT


# -- planning -------------------------------------------------------------------------------------


def _result(request_model: AdviseRequest, roots: list | None = None, base_url: str = "http://127.0.0.1:8000",
            defer_simulation: bool = False, trace_ahead: list | None = None) -> dict:
    """The page's result. `defer_simulation`: a plan whose simulation would trace a step now (for
    seconds) uses the formula at once and says `refine`, so the page asks again for the simulated
    plan: as fields change, once they settle (not a trace per keystroke); on a page opened whole
    (a first visit, a shared link, an upload), while the trace runs in the background, started
    when `trace_ahead` (a list) is given: the event saying the page was sent is appended to it.
    Not deferred, a plan waits for its trace under way in the background rather than trace twice."""
    # the planner's assumptions already say which card a line name meant and which base spec
    # an instruct variant used; a signed-in user may also plan a model directory inside the roots
    source = web_source(request_model.model, request_model.config_json, roots=roots)
    spec = source.spec
    options = single_plan_options(spec, request_model.options())
    deferred = defer_simulation and options.simulate_allocator and trace_would_run(source, options)
    if deferred:
        if trace_ahead is not None:
            sent = TRACE_AHEAD.start(source, options)
            if sent is not None:
                trace_ahead.append(sent)
        options = options.model_copy(update={"simulate_allocator": False})
    elif options.simulate_allocator:
        TRACE_AHEAD.wait(source, options)
    plan = web_plan(source, options)
    # the fit searches and the fixes: the very object POST /api/v1/fit returns. A simulated
    # allocator traces each candidate for seconds (an 8B search: over a minute), so the page
    # searches with the formula's band, and says so; `vramplan fit --simulate-allocator` does not
    searched = options.model_copy(update={"simulate_allocator": None if request_model.simulate_allocator is None else False})
    fit = fit_report(spec, searched)
    plan_dict = plan.to_dict()
    result = {
        "plan": plan_dict,
        "chart": memory_bar_svg(plan),
        "fit": fit,
        "fit_with_formula": options.simulate_allocator,
        "fixes": None if plan.fits else fit["fixes"],
        "advice": advise(spec, request_model.task(), searched).to_dict(),
        "pasted": bool(request_model.config_json and request_model.config_json.strip()),
        "refine": bool(deferred and plan.could_simulate),
    }
    result["reproduce"] = reproduce(request_model, plan_dict, base_url)
    result["markdown"] = markdown_summary(result)
    return result


# -- the same result elsewhere: the CLI command, the curl call, Markdown ----------------------------


def _planned_options(request_model: AdviseRequest, plan: dict) -> dict:
    """The plan options the user gave, as JSON values, with the GPU written as the catalog card the
    plan used (a fuzzy name, the default or `auto` on this server would mean another card elsewhere)."""
    given = request_model.options()
    options = given.model_dump(mode="json", include=given.model_fields_set)
    if options.get("gpu_memory_gib") is None:
        options["gpu"] = plan["gpu"]["name"]
    if plan["gpu"]["count"] > 1 or "num_gpus" in options:
        options["num_gpus"] = plan["gpu"]["count"]
    # the form's order, then any other option, so one state always gives one command
    order = [n for n in FORM_FIELDS if n in TrainingOptions.model_fields] + list(TrainingOptions.model_fields)
    return {name: options[name] for name in dict.fromkeys(order) if name in options and options[name] is not None}


def _cli_flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return [flag, str(value)]


def reproduce(request_model: AdviseRequest, plan: dict, base_url: str) -> dict:
    """`vramplan check ...` and the `curl` call to POST /api/v1/plan that give this result again."""
    options = _planned_options(request_model, plan)
    pasted = bool(request_model.config_json and request_model.config_json.strip())
    model_arg = "config.json" if pasted else (request_model.model or "").strip()
    words = ["vramplan", "check", model_arg] + [w for name, value in options.items() for w in _cli_flag(name, value)]
    body = ({"config_json": request_model.config_json.strip()} if pasted else {"model": model_arg}) | options
    curl = (f"curl -sS -X POST {shlex.quote(base_url.rstrip('/') + '/api/v1/plan')} "
            f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body, separators=(',', ':')))}")
    return {"cli": shlex.join(words), "curl": curl, "body": body, "pasted": pasted}


def markdown_summary(result: dict) -> str:
    """The plan as Markdown, to paste into an issue or a pull request."""
    return templates.get_template("plan.md").render(result=result, plan=result["plan"]).strip() + "\n"


def _render_index(request: Request, params: dict, fragment: bool, status_code: int | None = None) -> HTMLResponse:
    """The form page, or (fragment) the result alone with the bits of the page it updates. A fragment
    asked for as fields change is planned with the formula and refined after (`refine=1`)."""

    refining = params.pop("refine", None) == "1"
    parsed, raw, errors = _request_from(params)
    result = None
    # a page opened whole starts its trace in the background and answers with the formula at once
    trace_ahead: list | None = None if fragment else []
    building = (parsed is not None and not fragment and not refining and _browser(request)
                and not _built_soon(parsed, signed_in_roots(request)))
    if parsed is not None and not building:
        try:
            result = _result(parsed, signed_in_roots(request), str(request.base_url), defer_simulation=not refining, trace_ahead=trace_ahead)
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
        "query": query_string(raw),
        "oob": fragment,
        "launch": launch_block(request, raw, result, query_string(raw)),
        "fit_links": _fit_links(raw, result),
        "refresh_s": NO_JS_REFRESH_S,
        "building": building,
    }
    if status_code is None:
        # htmx swaps only 2xx: the fragment shows its errors with a 200
        status_code = 422 if errors and not fragment else 200
    template = "_fragment.html" if fragment else "index.html"
    # the trace waits until this page is sent, so the page's first byte never waits for it
    background = BackgroundTask(lambda: [sent.set() for sent in trace_ahead]) if trace_ahead else None
    response = templates.TemplateResponse(request, template, context, status_code=status_code, background=background)
    if fragment:
        # the refined answer replaces the address its formula answer pushed: one history entry per state
        response.headers["HX-Replace-Url" if refining else "HX-Push-Url"] = f"/?{context['query']}"
    return response


def _browser(request: Request) -> bool:
    """A client that renders HTML pages, so a page that says "on its way" is followed up (htmx, or
    the reload without JavaScript): a browser's navigation accepts text/html by name. A script
    posting the form (`*/*`) keeps getting the page with its plan, however long the build takes."""
    return "text/html" in request.headers.get("accept", "")


def _built_soon(parsed: AdviseRequest, roots: list | None) -> bool:
    """A pasted or uploaded config's model is built (app/model_builder.py: a worker process that
    imports torch on its first build, seconds on a fresh server) within BUILD_WAIT_S. Not: the page
    answers at once that it is being read, and asks again (htmx; a reload without JavaScript) while
    the build goes on; built, its plan is kept by the config's bytes. A catalog model needs none."""
    if not (parsed.config_json and parsed.config_json.strip()):
        return True
    future = BUILD_THREADS.submit(web_source, parsed.model, parsed.config_json, roots)
    try:
        future.result(BUILD_WAIT_S)
    except concurrent.futures.TimeoutError:
        return False
    except Exception:  # noqa: BLE001 - the page's plan says it again, from the builder's cache
        pass
    return True


def _fit_links(raw: dict, result: dict | None) -> dict:
    """The page address of each fit search's answer: this state with the one option changed."""
    if not result:
        return {}
    fit, links = result["fit"], {}
    for key in ("largest_batch", "longest_sequence", "fewest_gpus"):
        if fit[key]["value"] is not None:
            links[key] = query_string(raw, **{fit[key]["option"]: str(fit[key]["value"])})
    if fit["fewest_gpus"]["value"] is not None:
        # the search shards across several GPUs (planner/fit.py's own choice) and uses ddp on one;
        # its dict names only the count, so the link asks the planner which layout that is
        from planner.fit import _sharded

        count = fit["fewest_gpus"]["value"]
        layout = _sharded(TrainingOptions.model_validate(result["plan"]["options"])).parallelism if count > 1 else "ddp"
        links["fewest_gpus"] = query_string(raw, num_gpus=str(count), parallelism=layout)
    if fit["cheapest_gpu"]:
        c = fit["cheapest_gpu"]
        links["cheapest_gpu"] = query_string(raw, gpu=c["gpu"], num_gpus=str(c["count"]), parallelism=c["parallelism"], gpu_memory_gib="")
    return links


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


# -- every page's JSON twin: the page's address with .json (/plan.json for /) ----------------------
# The same objects the API returns (POST /api/v1/plan, /fit, /advise, /check), never a copy made
# for the page; errors are the API's 422 {"detail": [{"loc", "msg"}]}.


def _json_errors(errors: list[dict]) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["query", *e["field"].split(".")], "msg": e["msg"]} for e in errors]}, status_code=422)


def _plan_twin(request: Request, params: dict) -> dict | JSONResponse:

    parsed, raw, errors = _request_from(params)
    if parsed is None:
        return _json_errors(errors)
    try:
        result = _result(parsed, signed_in_roots(request), str(request.base_url))
    except PlanInputError as exc:
        return _json_errors([{"field": exc.field, "msg": exc.reason}])
    return {"page": f"/?{query_string(raw)}", "plan": result["plan"], "fit": result["fit"], "advice": result["advice"],
            "reproduce": result["reproduce"], "markdown": result["markdown"]}


@router.get("/plan.json", include_in_schema=False)
def plan_json(request: Request):
    """The plan page's JSON twin: the plan, the fit searches and the advice for the same query."""
    twin = _plan_twin(request, dict(request.query_params))
    return twin if isinstance(twin, JSONResponse) else JSONResponse(twin)


@router.get("/plan.md", include_in_schema=False)
def plan_markdown(request: Request):
    """The plan's Markdown summary as a file, for an issue or a pull request."""
    twin = _plan_twin(request, dict(request.query_params))
    if isinstance(twin, JSONResponse):
        return PlainTextResponse("\n".join(f"{'.'.join(map(str, d['loc'][1:]))}: {d['msg']}" for d in json.loads(twin.body)["detail"]) + "\n", status_code=422)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", twin["plan"]["model"]["name"]).strip("-") or "plan"
    return PlainTextResponse(twin["markdown"], media_type="text/markdown; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="vramplan-{name}.md"'})


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


def _formula_unless_asked(options: TrainingOptions) -> TrainingOptions:
    """A view of many plans (compare, matrix) takes the calibrated formula's reserve unless the
    simulation was asked for: a trace per cell would take minutes. It is said in the options, so
    each cell is what the API returns for them."""
    return options if options.simulate_allocator is not None else options.model_copy(update={"simulate_allocator": False})


def _compare_rows(parsed: AdviseRequest, roots: list | None = None) -> list[dict]:
    spec = web_source(parsed.model, parsed.config_json, roots).spec
    options = _formula_unless_asked(parsed.options())
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


def _compare_data(params: dict, roots: list | None = None) -> tuple[list[dict], dict, list[dict]]:
    parsed, raw, errors = _request_from(params)
    rows = []
    if parsed is not None:
        try:
            rows = _compare_rows(parsed, roots)
        except PlanInputError as exc:
            errors = [{"field": exc.field, "msg": exc.reason}]
    return rows, raw, errors


@router.get("/compare.json", include_in_schema=False)
def compare_json(request: Request):
    """/compare's JSON twin: each method's plan, as POST /api/v1/plan returns it with that method (and
    simulate_allocator false unless the page was asked to simulate)."""
    rows, raw, errors = _compare_data(dict(request.query_params), signed_in_roots(request))
    if errors:
        return _json_errors(errors)
    return JSONResponse({"page": f"/compare?{query_string(raw)}", "methods": [
        {"method": r["method"], "plan": r["plan"]} if "plan" in r else {"method": r["method"], "error": r["error"]} for r in rows]})


@router.get("/compare", response_class=HTMLResponse, include_in_schema=False)
def compare(request: Request):
    rows, raw, errors = _compare_data(dict(request.query_params), signed_in_roots(request))
    context = {
        "request": request, "form": raw, "errors": errors, "rows": rows, "query": query_string(raw), "htmx": HTMX.is_file(),
        "links": {m: query_string(raw, method=m) for m in COMPARE_METHODS},
        # the other fields ride along when the model or GPU is changed here
        "carried": {k: v for k, v in raw.items() if k not in ("model", "gpu", "method")},
        "gpu_used": next((r["plan"]["gpu"]["name"] for r in rows if "plan" in r), _shown_gpu(raw.get("gpu"))),
        "legend": _compare_legend(rows),
    }
    return templates.TemplateResponse(request, "compare.html", context, status_code=422 if errors else 200)


def _matrix_data(params: dict) -> tuple[list[dict], list[dict], dict, list[dict], AdviseRequest | None]:
    parsed, raw, errors = _request_from(params)
    table = []
    gpus = [{"label": label, "name": find_gpu(label).name} for label in MATRIX_GPUS]
    if parsed is not None:
        options = _formula_unless_asked(parsed.options())
        for model_id in MATRIX_MODELS:
            spec = load_catalog_spec(model_id)
            cells = []
            for gpu in gpus:
                try:
                    plan = build_plan(spec, options.model_copy(update={"gpu": gpu["name"], "gpu_memory_gib": None}))
                    cells.append({"fits": plan.fits, "verdict": plan.verdict, "peak": plan.peak_bytes, "high": plan.peak_high_bytes,
                                  "usable": plan.usable_bytes, "check": plan.check_dict()})
                except PlanInputError as exc:
                    cells.append({"error": exc.reason})
            table.append({"model": model_id, "cells": cells})
    return table, gpus, raw, errors, parsed


@router.get("/matrix.json", include_in_schema=False)
def matrix_json(request: Request):
    """/matrix's JSON twin: for each model and GPU, what POST /api/v1/check returns for it (with
    simulate_allocator false unless the page was asked to simulate)."""
    table, gpus, raw, errors, _ = _matrix_data(dict(request.query_params))
    if errors:
        return _json_errors(errors)
    return JSONResponse({"page": f"/matrix?{query_string(raw)}", "gpus": [g["name"] for g in gpus], "models": [
        {"model": row["model"], "checks": [{"gpu": g["name"], **(c["check"] if "check" in c else {"error": c["error"]})} for g, c in zip(gpus, row["cells"])]}
        for row in table]})


@router.get("/matrix", response_class=HTMLResponse, include_in_schema=False)
def matrix(request: Request):
    table, gpus, raw, errors, parsed = _matrix_data(dict(request.query_params))
    context = {"request": request, "form": raw, "shown": _shown(raw), "errors": errors, "gpus": gpus, "table": table, "htmx": HTMX.is_file(), "query": query_string(raw)}
    return templates.TemplateResponse(request, "matrix.html", context, status_code=422 if errors else 200)
