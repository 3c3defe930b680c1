"""The JSON API, /api/v1: the same plan object the CLI prints, over HTTP.

Every handler translates: request -> planner call -> the planner's `to_dict()`. Bad input is
a 422 with `{"detail": [{"loc", "msg"}]}` (app/main.py turns PlanInputError into that).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.runs import signed_in_roots
from app.schemas import ERROR_RESPONSES, CheckResponse, PlanResponse
from app.service import AdviseRequest, PlanRequest, spec_of, web_plan, with_source
from gpu_catalog.catalog import all_gpus
from gpu_catalog.detect import detect
from planner.advisor import advise
from planner.catalog import catalog_ids, load_catalog_spec
from planner.fit import fit_report

router = APIRouter(prefix="/api/v1")


@router.post("/plan", summary="The memory plan, component by component", response_model=PlanResponse, responses=ERROR_RESPONSES)
async def plan(request: PlanRequest, http: Request) -> JSONResponse:
    result = await with_source(request, web_plan, request.options(), roots=signed_in_roots(http), inline_if_quick=True)
    return JSONResponse(result.to_dict())


@router.post("/check", summary="Does it fit? 200 either way, with `verdict` (fits, tight, does not fit), `fits` and the band around `peak_bytes`", response_model=CheckResponse, responses=ERROR_RESPONSES)
async def check(request: PlanRequest, http: Request) -> JSONResponse:
    result = await with_source(request, web_plan, request.options(), roots=signed_in_roots(http), inline_if_quick=True)
    return JSONResponse(result.check_dict())


@router.post("/advise", summary="Approach, stage, method and settings, with reasons and alternatives", responses=ERROR_RESPONSES)
async def advise_route(request: AdviseRequest, http: Request) -> JSONResponse:
    advice = await with_source(request, spec_of(advise), request.task(), request.options(), roots=signed_in_roots(http))
    return JSONResponse(advice.to_dict())


@router.post("/fit", summary="Largest batch, longest sequence, fewest GPUs, cheapest GPU, smallest fix", responses=ERROR_RESPONSES)
async def fit(request: PlanRequest, http: Request) -> JSONResponse:
    return JSONResponse(await with_source(request, spec_of(fit_report), request.options(), roots=signed_in_roots(http)))


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
def models() -> dict:
    rows = []
    for model_id in sorted(catalog_ids().values()):
        spec = load_catalog_spec(model_id)
        rows.append({"id": model_id, "model_type": spec.model_type, "params": spec.total_params, "layers": spec.num_layers, "experts": spec.num_experts})
    return {"models": rows}
