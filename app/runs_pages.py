"""The pages for launched runs: signing in, the launch flow, /runs and /runs/{id}.

The launch flow is plain forms, JavaScript or not: the plan page's "Launch this plan" opens a short
form (dataset, output, steps or epochs, backend, device, GPUs when several) that posts to /launch,
the dry run (the files, the command, the admission against the GPUs' free memory now) with a
"Start the run" button posting to /launch/start, which starts it and redirects to the run's page.
The run page updates itself through server-sent events when htmx and its SSE extension are
installed (a live panel re-fetched on each `update` event), and refreshes every 5 s without them.
Numbers come from the run store and the plan the run carries; the templates only format them.
"""

from __future__ import annotations

import hmac
import re
import secrets
import shlex
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from app import auth
from app.charts import loss_chart_svg, memory_chart_svg
from app.forms import FORM_FIELDS, form_booleans, normalize_choices, query_string
from app.model_builder import BuildBusy
from app.run_feed import Cursor
from app.runs import (
    LaunchProblem,
    LaunchRequest,
    loss_per_step,
    measured_per_step,
    run_dict,
    runtime,
)
from app.templating import HTMX, SSE_EXT, signed_in, templates
from launcher.spec import LR_SCHEDULERS
from launcher.supervisor import RunNotFound
from planner.components import size_text
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.plan import GIB

router = APIRouter(include_in_schema=False)
PLAN_FIELDS = tuple(f for f in FORM_FIELDS if f in TrainingOptions.model_fields or f == "model")
RUN_TEXT_FIELDS = ("dataset", "output_dir", "max_steps", "epochs", "backend", "device", "learning_rate", "warmup_steps", "lr_scheduler_type")
# the advice's values the launch page shows as fields, filled in by the dry run (launcher.spec.with_advice)
ADVISED_FIELDS = (("learning_rate", "Learning rate"), ("warmup_steps", "Warmup (steps, or a fraction below 1)"),
                  ("lr_scheduler_type", "Schedule"), ("gradient_accumulation_steps", "Gradient accumulation"),
                  ("lora_alpha", "LoRA alpha"), ("lora_dropout", "LoRA dropout"))
ON_SHORT = {"refuse": (False, False), "queue": (False, True), "force": (True, False)}
RUN_ID = re.compile(r"^[0-9a-f]{4,32}$")
KEY = re.compile(r"^[!-~]{1,200}$")
LOG_TAIL = 16 * 1024
REFRESH_S = 5


# -- the plan page's launch button ---------------------------------------------------------------

_BACKENDS: dict[str, tuple[float, list]] = {}
_BACKENDS_LOCK = threading.Lock()


def _backends() -> list:
    """describe_backends(), kept 15 s: the plan page re-renders on every field change."""
    from launcher.registry import backend_names, describe_backends

    key = ",".join(backend_names())
    with _BACKENDS_LOCK:
        hit = _BACKENDS.get(key)
        if hit and time.monotonic() - hit[0] < 15:
            return hit[1]
    infos = describe_backends()
    with _BACKENDS_LOCK:
        _BACKENDS[key] = (time.monotonic(), infos)
    return infos


def _not_launchable(options: dict) -> str | None:
    from launcher.spec import RunSettings, check_launchable

    rewards = ["completion_length"] if options["stage"] in ("grpo", "rloo") else []
    try:
        check_launchable(options, RunSettings(dataset="-", reward_funcs=rewards))
    except PlanInputError as exc:
        return exc.reason
    return None


def _device_choices() -> tuple[list[dict], list[dict], str]:
    """(device options, GPUs to pick from when several, the default device)."""
    from gpu_catalog.detect import detect

    found = detect()
    gpus = [{"value": g.uuid or str(g.index), "label": f"GPU {g.index}: {g.name}, {g.free_bytes / GIB:.1f} GiB free"} for g in found.gpus]
    devices = [{"value": "cuda", "label": f"GPU ({found.gpus[0].name})" if found.gpus else "GPU (none detected here)"},
               {"value": "cpu", "label": "CPU (slow: small models and tests)"}]
    return devices, gpus if len(gpus) > 1 else [], "cuda" if found.gpus else "cpu"


def launch_block(request: Request, raw: dict, result: dict | None, query: str) -> dict | None:
    """What the plan page shows under the verdict: the launch form, or why there is none."""
    if result is None:
        return None
    plan = result["plan"]
    block = {"signed_in": signed_in(request), "why": None, "fields": {k: raw[k] for k in PLAN_FIELDS if raw.get(k)},
             "login": auth.login_url(f"/?{query}" if query else "/"), "tight": plan["verdict"] == "tight"}
    if result["pasted"]:
        block["why"] = ("A pasted config.json has no weights to train: to launch, plan a catalog model or (signed in) "
                        "a model directory on the server.")
    elif plan["verdict"] == "does not fit":
        block["why"] = (f"It does not fit: up to {plan['peak_high_bytes'] / GIB:,.2f} GiB per GPU at the band's high end, "
                        f"{plan['usable_bytes'] / GIB:,.2f} GiB usable on {plan['gpu']['label']}. Change the plan before launching.")
    else:
        block["why"] = _not_launchable(plan["options"])
    if block["why"] or not block["signed_in"]:
        return block
    infos = _backends()
    available = [i for i in infos if i.available]
    if not available:
        details = "; ".join(f"{i.name}: {i.detail}" for i in infos) or "none is installed"
        block["why"] = f"No backend can run it here ({details})."
        return block
    block["backends"] = [{"name": i.name, "detail": i.detail} for i in available]
    block["devices"], block["gpus"], block["device"] = _device_choices()
    block["rewards"] = _rewards(plan["options"]["stage"])
    return block


def _rewards(stage: str) -> tuple[str, ...]:
    from launcher.spec import BUILTIN_REWARDS

    return BUILTIN_REWARDS if stage in ("grpo", "rloo") else ()


# -- signing in ----------------------------------------------------------------------------------


def _login_page(request: Request, next_path: str, token: str = "", error: str | None = None, status: int = 200) -> HTMLResponse:
    context = {"request": request, "next": next_path, "token": token, "error": error, "htmx": False, "query": ""}
    return templates.TemplateResponse(request, "login.html", context, status_code=status)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/runs", token: str = ""):
    # the URL `vramplan serve` printed carries the token: it fills the form, and signing in is a POST
    shown = token if KEY.fullmatch(token or "") else ""
    return _login_page(request, auth.safe_next(next), shown)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request):
    form = await request.form()
    given = str(form.get("token") or "").strip()
    next_path = auth.safe_next(str(form.get("next") or ""))
    try:
        token = await run_in_threadpool(auth.CREDENTIALS.token, False)
    except (auth.TokenError, OSError) as exc:
        return _login_page(request, next_path, error=f"Signing in is off: {exc}", status=503)
    if token is None:
        return _login_page(request, next_path, error="This server has no token yet: it is made when the server starts (vramplan serve).", status=503)
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        return _login_page(request, next_path, error="That is not this server's token.", status=401)
    try:
        session = await run_in_threadpool(auth.CREDENTIALS.new_session, token)
    except OSError as exc:
        return _login_page(request, next_path, error=f"Signing in is off: the session could not be kept in the data directory ({exc.strerror or exc}).", status=503)
    response = RedirectResponse(next_path, status_code=303)
    host = request.headers.get("host", "")
    response.headers["set-cookie"] = auth.session_cookie(host, request.url.scheme == "https", session)
    return response


@router.post("/logout")
def logout(request: Request):
    # the session is revoked on the server: its cookie, kept anywhere, signs nobody in again
    auth.CREDENTIALS.end_session(request.cookies.get(auth.cookie_name(request.headers.get("host", ""))))
    response = RedirectResponse("/", status_code=303)
    response.headers["set-cookie"] = auth.session_cookie(request.headers.get("host", ""), request.url.scheme == "https", "", max_age=0)
    return response


# -- the launch flow -----------------------------------------------------------------------------


def _launch_request_from(form) -> tuple[LaunchRequest | None, dict, list[dict]]:
    """(request, the raw values to refill the forms, errors as {field, msg})."""
    plan = {k: str(v).strip() for k, v in form.items() if k in PLAN_FIELDS and isinstance(v, str) and v.strip()}
    run = {k: str(v).strip() for k, v in form.items() if k in RUN_TEXT_FIELDS and isinstance(v, str) and v.strip()}
    lists = {"gpus": [g for g in form.getlist("gpus") if isinstance(g, str) and g],
             "reward_funcs": [r for r in form.getlist("reward_funcs") if isinstance(r, str) and r]}
    on_short = str(form.get("on_short") or "refuse")
    force, queue = ON_SHORT.get(on_short, (False, False))
    raw = {**plan, **run, **lists, "on_short": on_short if on_short in ON_SHORT else "refuse"}
    data = {**form_booleans(normalize_choices(plan)), **run, "force": force, "queue": queue}
    data.update({k: v for k, v in lists.items() if v})
    try:
        return LaunchRequest.model_validate(data), raw, []
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "form",
                   "msg": str(e["msg"]).removeprefix("Value error, ")} for e in exc.errors()]
        return None, raw, errors


def _dry_view(plan, prepared) -> dict:
    from launcher.spec import advised_words

    data = prepared.dry_run_dict()
    spec = prepared.spec
    values = {**spec.options, **spec.settings.model_dump(mode="json")}
    # the values this run takes, for the form's fields (LoRA's only for an adapter)
    shown = {k: values.get(k) for k, _ in ADVISED_FIELDS if spec.method in ("lora", "qlora", "dora") or not k.startswith("lora_")}
    if spec.method in ("lora", "qlora", "dora") and shown.get("lora_alpha") is None:
        shown["lora_alpha"] = 2 * spec.options["lora_r"]
    return {**data, "command": shlex.join(data["argv"]), "plan": plan.to_dict(), "values": shown, "epochs": spec.settings.epochs,
            "advised": spec.advised, "advised_words": advised_words(spec.advised, spec.method, spec.stage)}


def _number(value) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _render_launch(request: Request, raw: dict, errors: list[dict], dry: dict | None, status: int, refused: dict | None = None) -> HTMLResponse:
    infos = _backends()
    devices, gpus, default_device = _device_choices()
    # the advice's values as fields: what the user typed, else what the dry run settled
    settled = dry["values"] if dry else {}
    inputs = [{"name": k, "label": label, "value": raw.get(k) or _number(settled.get(k))}
              for k, label in ADVISED_FIELDS if k in raw or k in settled]
    context = {
        "request": request, "htmx": False, "query": "", "raw": raw, "errors": errors, "dry": dry, "refused": refused,
        "plan_fields": {k: raw[k] for k in PLAN_FIELDS if raw.get(k) and k not in {i["name"] for i in inputs}},
        "advised_inputs": inputs,
        "backends": [{"name": i.name, "detail": i.detail, "available": i.available} for i in infos],
        "devices": devices, "gpus": gpus, "device": raw.get("device") or default_device,
        "rewards": _rewards(str(raw.get("stage") or "sft")), "key": secrets.token_urlsafe(18),
        "schedulers": LR_SCHEDULERS,
        "plan_query": query_string({k: raw[k] for k in PLAN_FIELDS if raw.get(k)}),
    }
    return templates.TemplateResponse(request, "launch.html", context, status_code=status)


def _problem(exc: Exception) -> list[dict]:
    if isinstance(exc, PlanInputError):
        return [{"field": exc.field, "msg": exc.reason}]
    return [{"field": "form", "msg": str(exc)}]


@router.post("/launch", response_class=HTMLResponse)
async def launch_dry_run(request: Request):
    """The dry run: nothing starts. Posting the form again with "Start the run" starts it."""
    form = await request.form()
    parsed, raw, errors = _launch_request_from(form)
    dry = None
    if parsed is not None:
        try:
            plan, prepared = await run_in_threadpool(runtime(request.app).prepare, parsed)
            dry = _dry_view(plan, prepared)
        except (PlanInputError, BuildBusy) as exc:
            errors = _problem(exc)
    return await run_in_threadpool(_render_launch, request, raw, errors, dry, 422 if errors else 200)


@router.post("/launch/start", response_class=HTMLResponse)
async def launch_start(request: Request):
    form = await request.form()
    parsed, raw, errors = _launch_request_from(form)
    key = str(form.get("idempotency_key") or "")
    key = key if KEY.fullmatch(key) else None  # a double click or a reload starts one run
    refused = None
    if parsed is not None:
        try:
            record, _ = await run_in_threadpool(runtime(request.app).launch, parsed, key)
            return RedirectResponse(f"/runs/{record.id}", status_code=303)
        except LaunchProblem as exc:
            errors, refused = [{"field": exc.loc[-1], "msg": exc.msg}], exc.extra
            status = exc.status
        except (PlanInputError, BuildBusy) as exc:
            errors, status = _problem(exc), 422
    else:
        status = 422
    return await run_in_threadpool(_render_launch, request, raw, errors, None, status, refused)


# -- a merge launched from the merge page -------------------------------------------------------

MERGE_LAUNCH_FIELDS = ("model", "method", "adapter_dir", "output_dir", "dtype", "device", "backend")


@router.post("/launch/merge", response_class=HTMLResponse)
async def launch_merge(request: Request):
    """The merge page's "Run this merge" form (signed in: /launch is a guarded prefix): the same
    request as POST /api/v1/merges, one model directory per line in merge_with."""
    from app.api_serving import merge_page_response
    from app.runs import MergeLaunchRequest

    form = await request.form()
    raw = {k: str(form.get(k) or "").strip() for k in (*MERGE_LAUNCH_FIELDS, "merge_with")}
    data = {k: raw[k] for k in MERGE_LAUNCH_FIELDS if raw[k]}
    data["merge_with"] = [line.strip() for line in raw["merge_with"].splitlines() if line.strip()]
    key = str(form.get("idempotency_key") or "")
    key = key if KEY.fullmatch(key) else None  # a double click starts one merge
    try:
        parsed = MergeLaunchRequest.model_validate(data)
        record, _ = await run_in_threadpool(runtime(request.app).launch_merge, parsed, key)
        return RedirectResponse(f"/runs/{record.id}", status_code=303)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "form",
                   "msg": str(e["msg"]).removeprefix("Value error, ")} for e in exc.errors()]
        status = 422
    except LaunchProblem as exc:
        errors, status = [{"field": exc.loc[-1], "msg": exc.msg}], exc.status
    except (PlanInputError, BuildBusy) as exc:
        errors, status = _problem(exc), 422
    return await run_in_threadpool(merge_page_response, request, {k: raw[k] for k in ("model", "method", "dtype", "device") if raw[k]},
                                   errors, status, raw)


# -- the runs ------------------------------------------------------------------------------------


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "–"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _gib(n: int | None) -> str:
    return f"{n / GIB:,.2f} GiB" if n is not None else "–"


def _size(n: int | None) -> str:
    return "–" if n is None else size_text(n)


def run_view(record, position: int | None) -> dict:
    data = run_dict(record, position)
    if data["device"] == "cpu":
        gpu = "CPU"
    elif record.gpu_name:
        gpu = f"{record.num_gpus} × {record.gpu_name}"
    else:
        gpu = f"{record.num_gpus} × {data['planned_gpu']} (planned)"
    step = f"{record.last_step or 0}" + (f"/{record.total_steps}" if record.total_steps else "")
    view = {**data, "short": record.id[:8], "gpu": gpu, "step": step, "started": _when(record.started_at),
            "created": _when(record.created_at), "duration": _duration(data["duration_s"]),
            "predicted": _gib(record.predicted_peak_bytes), "measured": _gib(record.measured_peak_bytes), "merge": None}
    if record.stage == "merge":  # launcher/merge_job.py: on the CPU its peak is the host's, above the imported runtime
        job = record.spec.get("merge") or {}
        mergekit = job.get("engine") == "mergekit"
        others = []
        if mergekit:
            from planner.merge import mergekit_models

            others = [m for m in mergekit_models(job.get("mergekit_config") or {}) if m != record.spec["model"]["location"]]
        view.update(predicted=_size(record.predicted_peak_bytes), measured=_size(record.measured_peak_bytes),
                    merge={"where": "GPU" if data["device"] == "cuda" else "host", "floor": _size(job.get("host_floor_bytes")),
                           "engine": "mergekit" if mergekit else "peft", "method": record.method, "others": others})
    return view


def _live_scripts() -> bool:
    return HTMX.is_file() and SSE_EXT.is_file()


@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request):
    rt = runtime(request.app)
    positions = rt.queue_positions()
    rows = [run_view(r, positions.get(r.id)) for r in rt.list()]
    live = any(not r["terminal"] for r in rows)
    context = {"request": request, "htmx": HTMX.is_file(), "query": "", "rows": rows, "live": live, "refresh_s": REFRESH_S}
    return templates.TemplateResponse(request, "runs.html", context)


def _log_tail(rt, record) -> tuple[str, bool, int]:
    """The last LOG_TAIL bytes of the log, from a line start; whether it was cut; where it ends."""
    path = Path(record.run_dir) / "train.log"
    size = path.stat().st_size if path.is_file() else 0
    offset = max(0, size - LOG_TAIL)
    chunk = rt.logs(record, offset, LOG_TAIL)
    text = chunk.text
    if offset and "\n" in text:
        text = text.split("\n", 1)[1]
    return text, offset > 0, chunk.next_offset


def _run_context(request: Request, record, error: str | None = None) -> dict:
    from launcher.supervisor import last_complete_checkpoint

    rt = runtime(request.app)
    view = run_view(record, rt.queue_positions().get(record.id))
    rows = rt.metrics(record.id)
    note = "this run is on the CPU: there is no GPU memory to measure" if view["device"] == "cpu" else None
    log_text, log_cut, log_end = _log_tail(rt, record)
    transitions = rt.transitions(record.id)
    spec = record.spec
    resumable = record.terminal and record.state != "succeeded" and last_complete_checkpoint(Path(record.output_dir)) is not None
    return {
        "request": request, "htmx": HTMX.is_file(), "query": "", "run": view, "error": error,
        "loss_chart": loss_chart_svg(loss_per_step(rows), record.total_steps),
        "memory_chart": memory_chart_svg(measured_per_step(record, rows), record.predicted_peak_bytes, view["predicted_low_bytes"],
                                         record.predicted_high_bytes, record.measured_peak_bytes, record.error_pct, record.total_steps, note),
        "steps": [{"step": s, "loss": v} for s, v in loss_per_step(rows)][-20:],
        "transitions": [{**t, "when": _when(t["at"])} for t in transitions],
        # the live feed starts after what this page shows (a reconnect sends Last-Event-ID instead)
        "cursor": str(Cursor(rows[-1]["step"] if rows else -1, len(transitions), log_end)),
        "log": log_text, "log_cut": log_cut, "resumable": resumable,
        "dataset": spec["dataset"]["location"], "plan_gpu": spec["plan"].get("gpu"), "sse": _live_scripts() and not record.terminal,
        "live_scripts": _live_scripts(), "refresh_s": REFRESH_S,
    }


def _not_found(request: Request, run_id: str) -> HTMLResponse:
    context = {"request": request, "htmx": False, "query": "", "run_id": run_id[:40]}
    return templates.TemplateResponse(request, "run_missing.html", context, status_code=404)


def _record(request: Request, run_id: str):
    if not RUN_ID.fullmatch(run_id):
        raise RunNotFound(run_id)
    return runtime(request.app).get(run_id)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str):
    try:
        record = _record(request, run_id)
    except RunNotFound:
        return _not_found(request, run_id)
    return templates.TemplateResponse(request, "run.html", _run_context(request, record))


@router.get("/runs/{run_id}/live", response_class=HTMLResponse)
def run_live(request: Request, run_id: str):
    """The part of the run page that changes, for htmx on each `update` event; opened directly, the whole page."""
    try:
        record = _record(request, run_id)
    except RunNotFound:
        return _not_found(request, run_id)
    template = "_run_live.html" if request.headers.get("hx-request") == "true" else "run.html"
    response = templates.TemplateResponse(request, template, _run_context(request, record))
    response.headers["Vary"] = "HX-Request"
    return response


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
async def cancel_page(request: Request, run_id: str):
    try:
        record = await run_in_threadpool(lambda: runtime(request.app).cancel(_record(request, run_id).id))
    except RunNotFound:
        return _not_found(request, run_id)
    return RedirectResponse(f"/runs/{record.id}", status_code=303)


@router.post("/runs/{run_id}/resume", response_class=HTMLResponse)
async def resume_page(request: Request, run_id: str):
    form = await request.form()
    try:
        record = _record(request, run_id)
        new = await run_in_threadpool(runtime(request.app).resume, record.id, form.get("force") == "on")
    except RunNotFound:
        return _not_found(request, run_id)
    except (LaunchProblem, PlanInputError) as exc:
        message = exc.msg if isinstance(exc, LaunchProblem) else exc.reason
        context = await run_in_threadpool(_run_context, request, runtime(request.app).get(record.id), message)
        return templates.TemplateResponse(request, "run.html", context, status_code=409)
    return RedirectResponse(f"/runs/{new.id}", status_code=303)
