"""Launched runs, for the web: the launch request, the runs runtime the app holds, and its views.

The launcher decides everything about a run; this module only translates. A launch request is
the plan options, the run's settings (launcher.spec.RunSettings), a registered backend's name and
bounded options: never a command. Its model is resolved and planned by planner/request.py, the
recipe every door uses, with the server's roots (launcher/paths.py): every path a request names
must resolve, symlinks followed, inside them; the run directory, its logs and its checkpoints live
under the data directory. Following the runs is launcher/runtime.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from pydantic import ValidationError as PydanticValidationError

from launcher.runtime import IdempotencyConflict, RunsRuntime
from launcher.spec import RunSettings, with_advice
from planner.errors import PlanInputError
from planner.merge import MergeOptions
from planner.options import TrainingOptions

BackendOptionValue = StrictBool | int | float | Annotated[str, Field(max_length=1000)]


class LaunchRequest(TrainingOptions, RunSettings):
    """POST /api/v1/runs and /api/v1/runs/dry-run: the plan options, the run's settings, where it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, json_schema_extra={"examples": [
        {"model": "Qwen/Qwen2.5-0.5B", "method": "lora", "dataset": "data/train.jsonl", "max_steps": 100, "device": "cpu"},
        {"model": "Qwen/Qwen2.5-0.5B", "method": "qlora", "dataset": "data/train.jsonl", "epochs": 1, "device": "cuda", "queue": True},
    ]})

    model: str = Field(min_length=1, max_length=4096, description="a catalog id (GET /api/v1/models) or a model directory with weights inside the server's roots")
    backend: str = Field(default="local", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="a backend from GET /api/v1/backends")
    backend_options: dict[Annotated[str, Field(max_length=64)], BackendOptionValue] = Field(
        default_factory=dict, max_length=32, description="the backend's own options (local: grace_period_s)")
    gpus: list[Annotated[str, Field(min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_-]+$")]] = Field(
        default_factory=list, max_length=64, description="NVML UUIDs or indexes of the GPUs to use (default: those with most free memory)")
    force: StrictBool = Field(default=False, description="start even when the GPUs' free memory is short of the plan")
    queue: StrictBool = Field(default=False, description="when memory is short, wait in the queue instead of a 409")

    def plan_options(self) -> TrainingOptions:
        """The plan options as given (the launch defaults are planner/request.py's)."""
        return TrainingOptions.model_validate(self.model_dump(include=self.model_fields_set & set(TrainingOptions.model_fields)))

    def settings(self, **changes: Any) -> RunSettings:
        given = self.model_dump(include=self.model_fields_set & set(RunSettings.model_fields))
        return RunSettings.model_validate({"dataset": self.dataset, **given, **changes})


class MergeLaunchRequest(MergeOptions):
    """POST /api/v1/merges: a merge as a run of the launcher, every path inside the server's roots:
    a PEFT adapter into its base (method peft, adapter_dir), or mergekit's method over model and
    merge_with. The rest are the merge plan's options (POST /api/v1/merge)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, json_schema_extra={"examples": [
        {"model": "models/base", "method": "peft", "adapter_dir": "runs/out/adapter", "output_dir": "merged/base-sft"},
        {"model": "models/a", "method": "ties", "merge_with": ["models/b", "models/c"], "output_dir": "merged/ties"},
    ]})
    model: str = Field(min_length=1, max_length=4096, description="the base model's directory (config.json and safetensors weights) inside the server's roots")
    adapter_dir: str | None = Field(default=None, min_length=1, max_length=4096, description="method peft: the PEFT LoRA/DoRA adapter's directory")
    merge_with: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, max_length=63, description="mergekit's methods: the other models' directories, merged with model")
    output_dir: str = Field(min_length=1, max_length=4096, description="where the merged model is saved: a new or empty directory")
    backend: str = Field(default="local", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="a backend from GET /api/v1/backends")
    backend_options: dict[Annotated[str, Field(max_length=64)], BackendOptionValue] = Field(
        default_factory=dict, max_length=32, description="the backend's own options")

    def merge_options(self) -> MergeOptions:
        return MergeOptions.model_validate(self.model_dump(include=set(MergeOptions.model_fields)))


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: StrictBool = Field(default=False, description="start even when the GPUs' free memory is short of the plan")



def request_fingerprint(request: LaunchRequest | MergeLaunchRequest) -> str:
    """What an Idempotency-Key retry must repeat: the launch request's fields as JSON, sorted
    (force and queue are how to start it, not what: a retry may add them)."""
    body = request.model_dump(mode="json", exclude={"force", "queue"})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class LaunchProblem(Exception):
    """A request the launcher refused: status, loc and message for the error shape, plus extras."""

    def __init__(self, status: int, loc: list, msg: str, kind: str, **extra: Any):
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind, self.extra = status, loc, msg, kind, extra

    def body(self) -> dict:
        return {"detail": [{"loc": self.loc, "msg": self.msg, "type": self.kind}], **self.extra}


@contextlib.contextmanager
def _backend_refusals():
    """A backend's refusal of a run as bad input, naming the field: an unknown backend, a run it
    cannot place (say, GPUs that do not split into nodes), options its Options model refuses."""
    from launcher.backend import LaunchError
    from launcher.registry import UnknownBackend

    try:
        yield
    except UnknownBackend as exc:
        raise PlanInputError("backend", str(exc)) from None
    except LaunchError as exc:
        raise PlanInputError("backend_options", str(exc)) from None
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise PlanInputError("backend_options", f"{where}: {err['msg']}" if where else err["msg"]) from None


class WebRuns(RunsRuntime):
    """The app's runs runtime: launch requests planned by the recipe, refusals as LaunchProblem."""

    def prepare(self, request: LaunchRequest):
        """(plan, Prepared): the dry run. Blocks (builds a model, loads a backend): call from a thread."""
        from app.service import web_plan, web_source
        from launcher.paths import check_output_dir, check_path_text, path_or_hub
        from launcher.preflight import preflight
        from planner.request import confine, launch_target

        allowed = self.roots()
        source = web_source(request.model, None, allowed)
        target = launch_target(request.device, request.backend)
        changes: dict[str, Any] = {"device": target.device, "dataset": path_or_hub("dataset", request.dataset, allowed)}
        from launcher.admission import check_dataset_size

        check_dataset_size(changes["dataset"])  # before the preflight reads it whole: a 422 naming the limit
        if request.output_dir is not None:
            check_path_text("output_dir", request.output_dir)
            output_dir = confine("output_dir", request.output_dir, allowed, must_exist=False)
            # the dry run refuses what the launch would (another run's directory is checked at launch)
            model_dir = Path(source.argument) if Path(source.argument).is_absolute() else None
            check_output_dir(output_dir, self.data_dir, model_dir)
            changes["output_dir"] = str(output_dir)
        if request.reward_model is not None:
            changes["reward_model"] = path_or_hub("reward_model", request.reward_model, allowed)
        settings = request.settings(**changes)
        # the dataset is read before the plan is built: a bad one is a 422 on `dataset` at once
        dataset_check = preflight(settings, request.plan_options().model_dump(mode="json"), source.argument)
        # what the user left unset runs with the advice's values for the method and stage
        options, settings, advised = with_advice(source.spec, request.plan_options(), settings,
                                                 dataset_check.rows if dataset_check is not None else None)
        plan = web_plan(source, options, launch=target)
        try:
            with _backend_refusals():
                prepared = self.supervisor().prepare(plan, source.argument, settings, backend=request.backend, backend_options=request.backend_options,
                                                     device=target.device, gpus=tuple(request.gpus), dataset_check=dataset_check,
                                                     confine_to=tuple(allowed))
        except PlanInputError:
            raise
        except ValueError as exc:  # a backend that failed to import or start
            raise PlanInputError("backend", str(exc)) from None
        return plan, replace(prepared, spec=prepared.spec.with_advised(advised))

    def launch(self, request: LaunchRequest, idempotency_key: str | None, force: bool | None = None, queue: bool | None = None):
        """(record, replayed): starts the run, or returns the run this key already started."""
        from app.model_builder import BuildBusy
        from launcher.admission import HostBusy
        from launcher.supervisor import LaunchRefused

        key_hash, existing = self._replay(request, idempotency_key)
        if existing is not None:
            return existing, True
        try:
            plan, prepared = self.prepare(request)
        except BuildBusy:
            # a run stored before fingerprints were kept: answered from the store while builds are busy
            existing = self.read(lambda store: store.by_idempotency_key(idempotency_key)) if idempotency_key else None
            if existing is not None:
                return existing, True
            raise
        try:
            return super().launch(prepared, force=request.force if force is None else force, queue=request.queue if queue is None else queue,
                                  idempotency_key=idempotency_key, request_hash=key_hash)
        except IdempotencyConflict as exc:
            raise LaunchProblem(422, ["header", "Idempotency-Key"], str(exc), "idempotency_key_reused", run_id=exc.run_id) from None
        except HostBusy as exc:
            raise LaunchProblem(429, ["body", "queue"], _api_words(exc), "host_busy") from None
        except LaunchRefused as exc:
            raise LaunchProblem(409, ["body", "force"], _api_words(exc), "does_not_fit", admission=exc.numbers,
                                predicted_peak_bytes=plan.peak_bytes, predicted_high_bytes=plan.peak_high_bytes, verdict=plan.verdict) from None

    def _replay(self, request, idempotency_key: str | None):
        """(the request's fingerprint, the run this key already started for it or None): a retry is
        answered from the stored run before anything is planned or built; the same key with another
        body is the conflict at once."""
        key_hash = request_fingerprint(request) if idempotency_key else None
        try:
            return key_hash, self.replayed(idempotency_key, key_hash)
        except IdempotencyConflict as exc:
            raise LaunchProblem(422, ["header", "Idempotency-Key"], str(exc), "idempotency_key_reused", run_id=exc.run_id) from None

    def launch_merge(self, request: MergeLaunchRequest, idempotency_key: str | None = None):
        """(record, replayed): a merge started as a run, its paths confined to the server's roots
        (and confined again by the merge job when it opens them). Blocks: call from a thread."""
        from app.merge_run import plan_mergekit_run, plan_run
        from launcher.paths import check_output_dir, check_path_text
        from planner.request import confine

        key_hash, existing = self._replay(request, idempotency_key)
        if existing is not None:
            return existing, True
        allowed = self.roots()
        for field, text in (("model", request.model), ("output_dir", request.output_dir), ("adapter_dir", request.adapter_dir),
                            *(("merge_with", other) for other in request.merge_with)):
            if text is not None:
                check_path_text(field, text)
        base = confine("model", request.model, allowed)
        output = confine("output_dir", request.output_dir, allowed, must_exist=False)
        check_output_dir(output, self.data_dir, base)
        options = request.merge_options()
        if options.method == "peft":
            if request.adapter_dir is None or request.merge_with:
                raise PlanInputError("adapter_dir", "a PEFT merge takes adapter_dir (the adapter's directory) and no merge_with")
            adapter_dir = confine("adapter_dir", request.adapter_dir, allowed)
            plan, base, adapter, output = plan_run(str(base), str(adapter_dir), str(output), options)
            adapter_path, config = adapter["path"], None
        else:
            if request.adapter_dir is not None:
                raise PlanInputError("adapter_dir", "mergekit's methods take merge_with (the other models), not an adapter")
            others = [str(confine("merge_with", other, allowed)) for other in request.merge_with]
            plan, base, _, output, config = plan_mergekit_run(str(base), others, str(output), options)
            adapter_path = None
        if not plan.fits:
            raise LaunchProblem(409, ["body", "host_memory_gib"], f"refused: the merge needs {plan.host_peak_bytes / (1 << 30):.2f} GiB of host memory",
                                "does_not_fit", plan=plan.to_dict())
        with _backend_refusals():
            prepared = self.supervisor().prepare_merge(plan, str(base), adapter_path, str(output), backend=request.backend,
                                                       backend_options=request.backend_options, mergekit_config=config, confine_to=tuple(map(str, allowed)))
        try:
            return super().launch(prepared, force=False, queue=False, idempotency_key=idempotency_key, request_hash=key_hash)
        except IdempotencyConflict as exc:
            raise LaunchProblem(422, ["header", "Idempotency-Key"], str(exc), "idempotency_key_reused", run_id=exc.run_id) from None

    def resume(self, run_id: str, force: bool = False):
        from launcher.backend import LaunchError
        from launcher.supervisor import LaunchRefused

        try:
            return super().resume(run_id, force=force)
        except LaunchRefused as exc:
            raise LaunchProblem(409, ["body", "force"], _api_words(exc), "does_not_fit", admission=exc.numbers) from None
        except LaunchError as exc:
            raise LaunchProblem(409, ["path", "run_id"], str(exc), "conflict") from None


def _api_words(refusal: Exception) -> str:
    """The launcher's refusal names the CLI's flags; the API's fields have no dashes."""
    return str(refusal).replace("--force", "force").replace("--queue", "queue")


_RUNTIMES_LOCK = threading.Lock()


def runtime(app) -> WebRuns:
    """The app's runtime for the data directory named now (tests point VRAMPLAN_DATA_DIR elsewhere)."""
    from app.auth import data_dir

    wanted = data_dir()
    with _RUNTIMES_LOCK:
        current = getattr(app.state, "runs_runtime", None)
        if current is None or current.data_dir != wanted:
            if current is not None:
                current.close()
            current = app.state.runs_runtime = WebRuns(wanted)
        return current


def signed_in_roots(request: Request) -> list | None:
    """The directories a signed-in user's model paths may be in (None: catalog ids and pasted
    configs only). The page, its JSON twins and the API ask the same, cookie or Bearer."""
    from app.templating import signed_in

    return runtime(request.app).roots() if signed_in(request) else None


# -- views ---------------------------------------------------------------------------------------


def finite(value):
    """JSON has no NaN or Infinity (a diverged loss is NaN): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def run_dict(record, queue_position: int | None = None) -> dict:
    data = record.to_dict()
    spec = record.spec
    data["device"] = spec["resources"]["device"]
    data["planned_gpu"] = (spec["plan"].get("gpu") or {}).get("name")  # a merge plan names none
    data["predicted_low_bytes"] = spec["plan"].get("peak_low_bytes")
    data["queue_position"] = queue_position
    data["terminal"] = record.terminal
    return finite(data)


def metric_dict(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in ("run_id", "extra_json")}
    try:
        out["extra"] = json.loads(row.get("extra_json") or "{}")
    except ValueError:
        out["extra"] = {}
    return finite(out)


def measured_per_step(record, rows: list[dict]) -> list[tuple[int, int]]:
    """(step, bytes) for the steps that logged memory: the worst rank's reserved memory plus its
    CUDA context, the measure the supervisor's measured peak uses."""
    context = record.measured_cuda_context_bytes
    if context is None:
        context = next((c["bytes"] for c in record.spec["plan"].get("components", ()) if c["name"] == "runtime.cuda_context"), 0)
    by_step: dict[int, int] = {}
    for row in rows:
        if row.get("max_reserved") is not None:
            by_step[row["step"]] = max(by_step.get(row["step"], 0), int(row["max_reserved"]) + int(context))
    return sorted(by_step.items())


def loss_per_step(rows: list[dict]) -> list[tuple[int, float]]:
    out = {}
    for row in rows:
        loss = row.get("loss")
        if loss is not None and math.isfinite(loss) and (row["step"] not in out or row["rank"] == 0):
            out[row["step"]] = float(loss)
    return sorted(out.items())
