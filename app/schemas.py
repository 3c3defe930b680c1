"""What the API answers, as schemas for /openapi.json.

The handlers return the planner's own dicts (Plan.to_dict()), so these models document and are
tested against those dicts (tests/test_contract.py runs schemathesis over every operation); they
never reshape a number.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ComponentOut(BaseModel):
    name: str = Field(description="family, then an optional detail after a dot: weights.base, activations.layers, ...")
    bytes: int
    note: str


class ModelOut(BaseModel):
    name: str
    params: dict[str, int] = Field(description="total and trainable parameters, and their parts")


class GpuOut(BaseModel):
    name: str
    memory_bytes: int
    count: int


Verdict = Literal["fits", "tight", "does not fit"]
VERDICT_HELP = ("fits: the band's high end is within the usable memory; tight: the usable memory falls inside the band; "
                "does not fit: it is below the band's low end")


class PlanResponse(BaseModel):
    model: ModelOut
    gpu: GpuOut
    peak_bytes: int = Field(description="predicted peak per GPU; the components sum to it")
    peak_gib: float
    peak_low_bytes: int = Field(description="the band's low end: the central peak less the calibration's largest over-prediction")
    peak_high_bytes: int = Field(description="the band's high end: the central peak plus the calibration's largest under-prediction; the verdict uses it")
    peak_phase: str
    phase_totals: dict[str, int]
    usable_bytes: int
    headroom_bytes: int
    fits: bool = Field(description="true only when the verdict is fits: the band's high end is within the usable memory")
    verdict: Verdict = Field(description=VERDICT_HELP)
    precision_mode: str
    components: list[ComponentOut] = Field(description="the peak phase's components")
    all_components: list[ComponentOut]
    assumptions: list[str]
    options: dict[str, Any] = Field(description="every option the plan used, defaults filled in")
    library_versions: dict[str, str] = Field(description="the library releases whose code paths the memory model describes")
    calibration: str = Field(description="the runtime calibration (CUDA context, allocator reserve) the plan used")


class CheckResponse(BaseModel):
    fits: bool = Field(description="true only when the verdict is fits")
    verdict: Verdict = Field(description=VERDICT_HELP)
    peak_bytes: int = Field(description="the central figure")
    peak_low_bytes: int
    peak_high_bytes: int
    usable_bytes: int
    headroom_bytes: int
    gpu: GpuOut
    model: str


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description='where: ["body", FIELD]')
    msg: str = Field(description="the reason, one readable line")
    type: str = Field(description="a short machine-readable kind: value_error, missing, json_invalid, too_large, ...")


class ErrorResponse(BaseModel):
    detail: list[ErrorItem]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the request is not for this server (Host or Origin refused)"},
    413: {"model": ErrorResponse, "description": "the body is over the size limit"},
    422: {"model": ErrorResponse, "description": "bad input: the field and the reason"},
    503: {"model": ErrorResponse, "description": "busy: too many requests or builds at once; retry shortly"},
}
