"""Serving and merge plans on the web: the JSON API (POST /api/v1/inference, /api/v1/merge: the
objects `vramplan inference --json` and `vramplan merge --json` print, exports included; 200
whether it serves/fits or not, read `verdict`; 422 for bad input) and their pages (GET /serving,
GET /merge: a form and the result, without JS; every number on them is read from the same
`to_dict()` object the API returns). A web request names a catalog model (or an instruct
variant of one); local paths and merge runs are the CLI's.

Included by app/main.py: `app.include_router(serving_router)` with
`from app.api_serving import router as serving_router`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from markupsafe import Markup, escape
from pydantic import ValidationError

from planner.errors import PlanInputError
from planner.merge import MergeOptions, plan_merge_request
from planner.serving import GIB, ServingOptions, plan_serving_request, serving_searches

router = APIRouter()


class InferenceRequest(ServingOptions):
    model: str
    concurrency: int | None = None


class MergeRequest(MergeOptions):
    model: str


def inference_result(request: InferenceRequest) -> dict:
    options = ServingOptions.model_validate(request.model_dump(exclude={"model", "concurrency"}, exclude_unset=True))
    plan = plan_serving_request(request.model, options, roots=())
    data = plan.to_dict()
    if request.concurrency:
        data["search"] = serving_searches(plan, concurrency=request.concurrency, request_tokens=options.request_tokens)
    return data


def merge_result(request: MergeRequest) -> dict:
    options = MergeOptions.model_validate(request.model_dump(exclude={"model"}, exclude_unset=True))
    return plan_merge_request(request.model, options, roots=()).to_dict()


@router.post("/api/v1/inference", summary="Serving with vLLM: KV cache tokens, maximum concurrency, verdict, the vllm serve line (200 either way)")
def inference(request: InferenceRequest) -> JSONResponse:
    return JSONResponse(inference_result(request))


@router.post("/api/v1/merge", summary="Merge memory on the GPU, in host memory and on disk, and mergekit's YAML (200 either way)")
def merge(request: MergeRequest) -> JSONResponse:
    return JSONResponse(merge_result(request))


# -- the pages ------------------------------------------------------------------------------------

COLOURS = {"weights": "#4e79a7", "activations": "#76b7b2", "temporary": "#edc948", "kv_cache": "#bab0ac",
           "runtime": "#79706e", "host": "#9c755f", "output": "#59a14f"}


def split_bar_svg(components: list[dict], total_bytes: int | None, title: str) -> Markup:
    """One horizontal bar of the components (each its own part, coloured by family), and the
    memory it is held against as a line: the same components the API returns, nothing recomputed
    but their widths."""
    parts = [c for c in components if c["bytes"] > 0]
    used = sum(c["bytes"] for c in parts)
    scale = max(used, total_bytes or 0) or 1
    bar_y, bar_h = 8, 28
    height = bar_y + bar_h + 24 + ((len(parts) + 1) // 2) * 18
    shapes, x = [], 0.0
    for c in parts:
        w = c["bytes"] / scale * 100
        colour = COLOURS.get(c["name"].split(".")[0], "#999999")
        shapes.append(f'<rect x="{x:.2f}%" y="{bar_y}" width="{max(w, 0.1):.2f}%" height="{bar_h}" fill="{colour}" stroke="#fff" stroke-width="1">'
                      f"<title>{escape(c['name'])}: {c['bytes'] / GIB:.2f} GiB</title></rect>")
        x += w
    if total_bytes:
        tx = min(total_bytes / scale * 100, 99.8)
        shapes.append(f'<line x1="{tx:.2f}%" y1="{bar_y - 6}" x2="{tx:.2f}%" y2="{bar_y + bar_h + 6}" stroke="currentColor" stroke-width="2" stroke-dasharray="4 2">'
                      f"<title>{total_bytes / GIB:.2f} GiB</title></line>")
    for i, c in enumerate(parts):
        column, ly = ("0%" if i % 2 == 0 else "50%"), bar_y + bar_h + 14 + (i // 2) * 18
        colour = COLOURS.get(c["name"].split(".")[0], "#999999")
        shapes.append(f'<rect x="{column}" y="{ly}" width="14" height="12" fill="{colour}" stroke="currentColor"/>')
        shapes.append(f'<text x="{column}" dx="20" y="{ly + 10}" font-size="12" fill="currentColor">{escape(c["name"])}: {c["bytes"] / GIB:.2f} GiB</text>')
    return Markup(f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" height="{height}" role="img" aria-label="{escape(title)}">'
                  f"<title>{escape(title)}</title>{''.join(shapes)}</svg>")


def _form(request: Request, fields) -> dict:
    """The query's values for the option fields, blanks left out (a blank field takes the default)."""
    return {k: v for k, v in request.query_params.items() if k in fields and v.strip() != ""}


def _errors(exc: Exception) -> list[dict]:
    if isinstance(exc, ValidationError):
        return [{"field": ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "options",
                 "msg": e["msg"].removeprefix("Value error, ")} for e in exc.errors()]
    return [{"field": exc.field, "msg": exc.reason}]


def _page(request: Request, template: str, form: dict, compute, chart, extra: dict | None = None) -> HTMLResponse:
    import secrets

    from app import auth
    from app.templating import templates

    data, errors = None, []
    if form.get("model"):
        try:
            data = compute(form)
        except (ValidationError, PlanInputError) as exc:
            errors = _errors(exc)
    charts = chart(data) if data else []
    context = {"form": form, "data": data, "errors": errors, "charts": charts, "query": "", "htmx": False,
               "launch_form": {}, "launch_errors": [], "key": secrets.token_urlsafe(18), "login": auth.login_url(request.url.path)}
    status = 422 if errors else 200
    if extra:
        context.update(extra)
        status = extra.get("status", status)
    return templates.TemplateResponse(request, template, context, status_code=status)


@router.get("/serving", response_class=HTMLResponse, summary="The serving plan's page (form and result)")
def serving_page(request: Request) -> HTMLResponse:
    form = _form(request, set(InferenceRequest.model_fields))

    def chart(data):
        used = [c for c in data["components"] if c["name"] not in ("runtime.cuda_graphs", "runtime.cuda_context")]
        return [("Requested memory per GPU", split_bar_svg(used, data["requested_bytes"],
                                                           f"vLLM's requested {data['requested_bytes'] / GIB:.2f} GiB per GPU: {data['verdict']}"))]

    return _page(request, "serving.html", form, lambda f: inference_result(InferenceRequest.model_validate(f)), chart)


@router.get("/merge", response_class=HTMLResponse, summary="The merge plan's page (form and result)")
def merge_page(request: Request) -> HTMLResponse:
    form = _form(request, set(MergeRequest.model_fields))
    return _page(request, "merge.html", form, lambda f: merge_result(MergeRequest.model_validate(f)), _merge_chart)


def _merge_chart(data):
    out = [("Host memory", split_bar_svg(data["host_components"], data["host_memory_bytes"], f"host peak {data['host_peak_bytes'] / GIB:.2f} GiB"))]
    if data["gpu_components"]:
        out.append(("GPU memory", split_bar_svg(data["gpu_components"], data["gpu_memory_bytes"], f"GPU peak {data['gpu_peak_bytes'] / GIB:.2f} GiB")))
    return out


def merge_page_response(request: Request, form: dict, launch_errors: list[dict], status: int, launch_form: dict) -> HTMLResponse:
    """The merge page again after a refused "Run this merge": the launch form refilled, its errors
    beside it (the plan above is of the catalog model the form named, if any)."""
    return _page(request, "merge.html", {}, lambda f: None, _merge_chart,
                 {"launch_errors": launch_errors, "launch_form": launch_form, "status": status})
