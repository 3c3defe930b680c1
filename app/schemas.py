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
    label: str = Field(description="what the verdict is against: the GPU's name, or the custom memory size (gpu_memory_gib) with it")
    memory_bytes: int
    count: int


Verdict = Literal["fits", "tight", "does not fit"]
VERDICT_HELP = ("does the step run within the usable memory: fits when the high end of the least memory it runs in "
                "(runs_within_high_bytes) is within it; tight when the usable memory falls inside that band; does not fit when it is below its low end")


RESERVE_SOURCE_HELP = ("where the allocator's reserve came from: the calibration's formula, or simulated from the run's traced "
                       "allocations (option simulate_allocator; a single plan's default where the trace can stand in)")
BAND_SOURCE_HELP = "whose errors the band comes from: the simulated allocator's (narrower), or the formula's"
UNMEASURED_HELP = ("parts of a simulated step no GPU run has checked yet (TRL's fused LM head, expandable segments); "
                   "unmeasured_allowance_bytes, added to the band's high end, allows for them")


class RunsWithin(BaseModel):
    runs_within_bytes: int = Field(description="the least memory per GPU the step runs in: peak_bytes less what the allocator releases and retries "
                                               "with on a card too small for its reserved peak")
    runs_within_low_bytes: int
    runs_within_high_bytes: int = Field(description="the verdict uses it: fits when it is within the usable memory")
    allocator_release_bytes: int = Field(description="what the allocator gives back by releasing its cached segments (0 without a simulated step)")


class PlanResponse(RunsWithin):
    model: ModelOut
    gpu: GpuOut
    peak_bytes: int = Field(description="predicted peak per GPU; the components sum to it")
    peak_gib: float
    peak_low_bytes: int = Field(description="the band's low end: the central peak less the calibration's largest over-prediction")
    peak_high_bytes: int = Field(description="the band's high end: the central peak plus the calibration's largest under-prediction; what a card with room to spare reserves")
    peak_phase: str
    phase_totals: dict[str, int]
    usable_bytes: int
    headroom_bytes: int
    fits: bool = Field(description="true only when the verdict is fits: runs_within_high_bytes is within the usable memory")
    verdict: Verdict = Field(description=VERDICT_HELP)
    precision_mode: str
    components: list[ComponentOut] = Field(description="the peak phase's components")
    all_components: list[ComponentOut]
    assumptions: list[str]
    options: dict[str, Any] = Field(description="every option the plan used, defaults filled in")
    library_versions: dict[str, str] = Field(description="the library releases whose code paths the memory model describes")
    calibration: str = Field(description="the runtime calibration (CUDA context, allocator reserve) the plan used")
    reserve_source: Literal["formula", "simulated"] = Field(description=RESERVE_SOURCE_HELP)
    band_source: Literal["formula", "simulated"] = Field(description=BAND_SOURCE_HELP)
    unmeasured_parts: list[str] = Field(description=UNMEASURED_HELP)
    unmeasured_allowance_bytes: int = Field(description="bytes the band's high end adds for the unmeasured parts (0 when there are none)")
    could_simulate: bool = Field(description="the reserve came from the formula, and simulate_allocator would give this run a narrower band")
    trace: dict[str, Any] | None = Field(default=None, description="how this plan's traced step was had: seconds, kept_in_trace_cache (null for a formula plan); not the plan's content")


class CheckResponse(RunsWithin):
    fits: bool = Field(description="true only when the verdict is fits")
    verdict: Verdict = Field(description=VERDICT_HELP)
    peak_bytes: int = Field(description="the central figure")
    peak_low_bytes: int
    peak_high_bytes: int
    usable_bytes: int
    headroom_bytes: int
    gpu: GpuOut
    model: str
    reserve_source: Literal["formula", "simulated"] = Field(description=RESERVE_SOURCE_HELP)
    band_source: Literal["formula", "simulated"] = Field(description=BAND_SOURCE_HELP)
    unmeasured_parts: list[str] = Field(description=UNMEASURED_HELP)
    unmeasured_allowance_bytes: int = Field(description="bytes the band's high end adds for the unmeasured parts (0 when there are none)")


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


# -- launched runs (/api/v1/runs, /api/v1/backends) ----------------------------------------------

RunStateName = Literal["queued", "starting", "running", "cancelling", "succeeded", "failed", "cancelled", "lost"]


class RunOut(BaseModel):
    id: str = Field(description="32 hex digits; the API also takes an unambiguous prefix of 4 or more")
    state: RunStateName
    terminal: bool = Field(description="succeeded, failed, cancelled or lost: the state will not change again")
    reason: str | None = Field(description="why it is in this state: oom, host_oom, data_error, missing_package, nan_loss, disk_full "
                                           "(the trainer exits with code 4), killed (a signal no cancel asked for), shim_killed, "
                                           "path_outside_roots, exit_nonzero, timeout, preempted, node_fail, launch_failed, "
                                           "cancelled_by_user, killed_after_grace, server_restart, backend_unreachable, does_not_fit. "
                                           "A launch the host has no room for is refused with 429 host_busy, never a run")
    message: str | None = Field(description="one line: what happened, in the trainer's words where it said (a data error names the file and line)")
    hint: str | None = Field(default=None, description="what to do about a failure (the pip line for a missing package, what to lower after an OOM)")
    exit_code: int | None
    model: str
    stage: str
    method: str
    backend: str
    backend_options: dict[str, Any]
    attempt: int = Field(description="1, or one more than the run it resumed")
    resumed_from_run_id: str | None
    resume_checkpoint: str | None
    idempotency_key: str | None
    plan_hash: str
    predicted_peak_bytes: int = Field(description="the plan's central peak per GPU")
    predicted_high_bytes: int = Field(description="the plan's band high end per GPU: what admission holds free memory to")
    predicted_low_bytes: int | None
    num_gpus: int
    gpu_uuids: list[str]
    device: Literal["cuda", "cpu"]
    planned_gpu: str = Field(description="the GPU the plan was made for")
    gpu_name: str | None = Field(description="the GPU the run reported")
    driver: str | None
    run_dir: str
    output_dir: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested_at: float | None
    duration_s: float | None
    stopped_at_step: int | None
    last_step: int | None
    total_steps: int | None
    final_loss: float | None
    measured_peak_bytes: int | None = Field(description="the worst rank's max_memory_reserved plus its CUDA context; null on the CPU")
    measured_allocated_bytes: int | None
    measured_load_peak_bytes: int | None
    measured_cuda_context_bytes: int | None
    alloc_retries: int | None
    error_pct: float | None = Field(description="(predicted - measured) / measured, in percent")
    versions: dict[str, Any] | None
    queue_position: int | None = Field(description="1 for the next queued run to start; null when not queued")


class RunListOut(BaseModel):
    runs: list[RunOut] = Field(description="newest first")
    warning: str | None = Field(default=None, description="present when runs' directories under the data directory are not in the run store "
                                                          "(it was deleted or replaced): what happened and what to do")
    orphaned_run_dirs: list[str] | None = Field(default=None, description="those directories (the first 20)")


class MetricOut(BaseModel):
    step: int
    rank: int
    t: float | None
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    num_tokens: float | None
    max_reserved: int | None
    max_allocated: int | None
    nvml_process_used: int | None
    extra: dict[str, Any]


class MetricsOut(BaseModel):
    run_id: str
    metrics: list[MetricOut] = Field(description="by step, then rank")


class LogsOut(BaseModel):
    run_id: str
    offset: int
    next_offset: int = Field(description="the offset to ask for next")
    eof: bool = Field(description="nothing more to read now (a live run writes more later)")
    text: str


class AdmissionOut(BaseModel):
    ok: bool
    message: str
    device: str
    gpus: list[str]
    free_bytes: list[int]
    needed_bytes: int


class DatasetCheckOut(BaseModel):
    dataset: str
    checked: bool = Field(description="false: a hub dataset, not read before the run")
    rows: int | None = None
    fields: list[str] = Field(description="the fields the stage's TRL trainer will read")
    longest_row: str | None = Field(default=None, description='where the longest row is: "line 12" (JSONL, CSV) or "row 3"')
    longest_chars: int | None = None
    longest_tokens: int | None = None
    tokens_counted: bool = Field(description="true: the model's tokenizer counted them (with its chat template); false: estimated from characters")
    warnings: list[str] = Field(description="e.g. the longest row over the planned seq_len: the trainer truncates it")
    summary: str = Field(description="one line: rows, fields, the longest row")


class DryRunOut(BaseModel):
    run_id: str = Field(description="the id the run would get; a launch makes a new one")
    run_dir: str
    backend: str
    summary: str
    argv: list[str] = Field(description="the command the backend would run, never a shell string")
    env: dict[str, str] = Field(description="the run's environment; secrets shown as ***")
    files: dict[str, str] = Field(description="file name in the run directory -> content")
    admission: AdmissionOut = Field(description="the check against the GPUs' free memory now")
    predicted_peak_bytes: int
    predicted_high_bytes: int
    plan: PlanResponse = Field(description="the plan the run would follow (with the launch defaults: expandable segments, the detected GPU), as POST /api/v1/plan gives it")
    dataset_check: DatasetCheckOut | None = Field(default=None, description="the dataset read before planning: rows, fields, the longest row against seq_len")


class BackendOut(BaseModel):
    name: str
    target: str
    available: bool
    detail: str
    capabilities: list[str]


class BackendsOut(BaseModel):
    backends: list[BackendOut]


class RefusedResponse(ErrorResponse):
    admission: AdmissionOut | None = None
    predicted_peak_bytes: int | None = None
    predicted_high_bytes: int | None = None
    verdict: Verdict | None = None


RUN_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {"model": ErrorResponse, "description": "no token, or a wrong one: send `Authorization: Bearer TOKEN` (or sign in on /login)"},
    403: {"model": ErrorResponse, "description": "a cross-site request: the Origin or Sec-Fetch-Site is not this server's"},
    404: {"model": ErrorResponse, "description": "no such run"},
}
