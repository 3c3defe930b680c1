"""/api/v1/inference and /api/v1/merge: serving and merge plans over HTTP, the objects
`vramplan inference --json` and `vramplan merge --json` print. 200 whether it serves/fits or not
(read `verdict`), 422 for bad input. A web request names a catalog model (or an instruct variant
of one); local paths are the CLI's.

Included by app/main.py: `app.include_router(serving_router)` with
`from app.api_serving import router as serving_router`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from planner.merge import MergeOptions, plan_merge_request
from planner.serving import ServingOptions, plan_serving_request, serving_searches

router = APIRouter(prefix="/api/v1")


class InferenceRequest(ServingOptions):
    model: str
    concurrency: int | None = None


class MergeRequest(MergeOptions):
    model: str


@router.post("/inference", summary="Serving with vLLM: KV cache tokens, maximum concurrency, verdict (200 either way)")
def inference(request: InferenceRequest) -> JSONResponse:
    options = ServingOptions.model_validate(request.model_dump(exclude={"model", "concurrency"}, exclude_unset=True))
    plan = plan_serving_request(request.model, options, roots=())
    data = plan.to_dict()
    if request.concurrency:
        data["search"] = serving_searches(plan, concurrency=request.concurrency, request_tokens=options.request_tokens)
    return JSONResponse(data)


@router.post("/merge", summary="Merge memory on the GPU, in host memory and on disk (200 either way)")
def merge(request: MergeRequest) -> JSONResponse:
    options = MergeOptions.model_validate(request.model_dump(exclude={"model"}, exclude_unset=True))
    return JSONResponse(plan_merge_request(request.model, options, roots=()).to_dict())
