"""The JSON API, /api/v1: the same plan object the CLI prints, over HTTP.

Every handler translates: request -> planner call -> the planner's `to_dict()`. Bad input is
a 422 with `{"detail": [{"loc", "msg"}]}` (app/main.py turns PlanInputError into that).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.service import AdviseRequest, PlanRequest, resolve_web_model
from gpu_catalog.catalog import all_gpus
from gpu_catalog.detect import detect
from planner.advisor import advise
from planner.catalog import catalog_ids, load_catalog_spec
from planner.fit import fit_report
from planner.plan import build_plan

# plan and check are async: a plan takes well under a millisecond of CPU, less than the
# threadpool hop a sync handler pays, and they return JSONResponse to skip re-encoding plain
# dicts. advise and fit build dozens of plans and NVML can block: they stay in the threadpool.
router = APIRouter(prefix="/api/v1")


async def _spec(request: PlanRequest):
    """Catalog specs load in microseconds; a pasted config builds a model on the meta device
    (about a second the first time), which must not stall the event loop."""
    if request.config_json:
        return await run_in_threadpool(resolve_web_model, request.model, request.config_json)
    return resolve_web_model(request.model)


@router.post("/plan", summary="The memory plan, component by component")
async def plan(request: PlanRequest) -> JSONResponse:
    spec = await _spec(request)
    return JSONResponse(build_plan(spec, request.options()).to_dict())


@router.post("/check", summary="Does it fit? 200 either way, with `fits` and `peak_bytes`")
async def check(request: PlanRequest) -> JSONResponse:
    spec = await _spec(request)
    result = build_plan(spec, request.options())
    return JSONResponse({
        "fits": result.fits,
        "peak_bytes": result.peak_bytes,
        "usable_bytes": result.usable_bytes,
        "headroom_bytes": result.usable_bytes - result.peak_bytes,
        "gpu": {"name": result.gpu.name, "memory_bytes": result.gpu.memory_bytes, "count": result.gpu.count},
        "model": result.model_name,
    })


@router.post("/advise", summary="Approach, stage, method and settings, with reasons and alternatives")
def advise_route(request: AdviseRequest) -> dict:
    spec = resolve_web_model(request.model, request.config_json)
    return advise(spec, request.task(), request.options()).to_dict()


@router.post("/fit", summary="Largest batch, longest sequence, fewest GPUs, cheapest GPU, smallest fix")
def fit(request: PlanRequest) -> dict:
    return fit_report(resolve_web_model(request.model, request.config_json), request.options())


@router.get("/gpus", summary="Detected GPUs and the GPU catalog")
def gpus() -> dict:
    found = detect()
    return {
        "detected": [g.to_dict() for g in found.gpus],
        "driver_version": found.driver_version,
        "reason": found.reason,
        "catalog": [g.to_dict() for g in all_gpus()],
    }


@router.get("/models", summary="The model catalog")
async def models() -> dict:
    rows = []
    for model_id in sorted(catalog_ids().values()):
        spec = load_catalog_spec(model_id)
        rows.append({"id": model_id, "model_type": spec.model_type, "params": spec.total_params, "layers": spec.num_layers, "experts": spec.num_experts})
    return {"models": rows}
