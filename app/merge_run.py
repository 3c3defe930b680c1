"""Run a merge for real and measure it beside its plan: `vramplan merge BASE_DIR --run
--adapter-dir DIR --output DIR` (PEFT), or `vramplan merge MODEL_DIR --method ties --merge-with DIR
[--merge-with DIR ...] --run --output DIR` (mergekit; plan_mergekit_run).

The parent (this module, called by the CLI) checks the input before anything heavy starts: the
base is a local directory with a config.json and weights, the adapter a PEFT LoRA/DoRA adapter
whose every A and B matrix fits a Linear layer of that base, the output directory new or empty.
It plans the merge with the adapter's own rank, modules and DoRA flag, then starts the merge in a
child process (`python -m launcher.merge_job`, which measures it: see there) and holds the measured
host peak against the plan's range (`compare`). `vramplan merge --launch` runs the same merge as a
run of the launcher instead (launcher/merge_job.py's run_launched), kept in the run store.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher.merge_job import MALLOC_ENV

CHILD_TIMEOUT_S = 3600
WEIGHT_SUFFIXES = (".safetensors", ".bin")


# -- the parent: check, plan, start, compare ------------------------------------------------------


def _input_error(field: str, reason: str) -> Exception:
    from planner.errors import PlanInputError

    return PlanInputError(field, reason)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors file's header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise _input_error("adapter_dir", f"{path} is not a safetensors file ({exc})") from None
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def read_adapter(adapter_dir: str | os.PathLike) -> dict:
    """adapter_config.json and the shapes of adapter_model.safetensors; bad input raises PlanInputError."""
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise _input_error("adapter_dir", f"{adapter_dir}: no such directory")
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise _input_error("adapter_dir", f"{adapter_dir} has no adapter_config.json (not a PEFT adapter)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _input_error("adapter_dir", f"{config_path}: not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise _input_error("adapter_dir", f"{adapter_dir} is a {kind or 'unknown'} adapter; merge_and_unload is run here for LoRA and DoRA adapters")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise _input_error("adapter_dir", f"{adapter_dir} has no adapter_model.safetensors")
    return {"path": str(path.resolve()), "config": config, "shapes": safetensors_shapes(weights)}


def check_adapter(spec, adapter: dict) -> None:
    """Every lora_A [r, in] and lora_B [out, r] must sit on a Linear of the base with those sizes:
    an adapter trained on another model fails here, in one line, before the child starts."""
    linears = {lin.name: lin for lin in spec.linears()}
    seen = 0
    for name, shape in adapter["shapes"].items():
        for part, (rows_of, cols_of) in ((".lora_A.", (None, "in")), (".lora_B.", ("out", None))):
            if part not in name:
                continue
            module = name.split(part)[0].removeprefix("base_model.model.")
            lin = linears.get(module)
            if lin is None:
                raise _input_error("adapter_dir", f"the adapter adapts {module}, which {spec.name} does not have (an adapter for another model?)")
            want = lin.in_features if cols_of == "in" else lin.out_features
            got = shape[1] if cols_of == "in" else shape[0]
            if len(shape) != 2 or got != want:
                raise _input_error("adapter_dir", f"the adapter's {name} is {shape}, but {module} of {spec.name} is "
                                                  f"{lin.out_features} x {lin.in_features} (an adapter for another model?)")
            seen += 1
    if not seen:
        raise _input_error("adapter_dir", "the adapter holds no LoRA A or B matrices")


def options_for_adapter(options, adapter: dict):
    """The merge options of this adapter: its rank (the largest in its rank_pattern), its modules, DoRA."""
    config = adapter["config"]
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r") or 8, *(pattern.values() if isinstance(pattern, dict) else [pattern])]
    bad = next((r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1), None)
    if bad is not None:
        raise _input_error("adapter_dir", f"adapter_config.json's r and rank_pattern are ranks (whole numbers from 1), not {bad!r}")
    targets = config.get("target_modules") or "all-linear"
    if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise _input_error("adapter_dir", f"adapter_config.json's target_modules is a module name pattern or a list of names, not {targets!r}"[:300])
    if isinstance(targets, str):  # a regular expression or all-linear: take the modules the weights name
        targets = sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in adapter["shapes"] if ".lora_A." in n})
    else:
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    kind = "dora" if config.get("use_dora") else ("qlora" if options.adapter == "qlora" else "lora")
    return options.model_copy(update={"method": "peft", "adapter": kind, "lora_r": int(max(ranks)), "lora_targets": targets})


def check_base(model_dir: str) -> Path:
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise _input_error("model", f"{model_dir}: no such directory (a merge run needs the model's directory: config.json and weights)")
    if not path.is_dir():
        raise _input_error("model", f"{model_dir}: a merge run needs the model's directory (config.json and weights), not a file")
    if not (path / "config.json").is_file():
        raise _input_error("model", f"{model_dir} has no config.json")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("adapter_") for p in path.iterdir()):
        raise _input_error("model", f"{model_dir} holds no weights (*.safetensors or *.bin)")
    return path.resolve()


def check_output(output_dir: str) -> Path:
    path = Path(output_dir).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise _input_error("output", f"{output_dir} exists and is not an empty directory")
    if not path.parent.is_dir():
        raise _input_error("output", f"{path.parent}: no such directory")
    return path.resolve()


def plan_run(model_dir: str, adapter_dir: str, output_dir: str, options):
    """Check everything and plan the merge this adapter needs. Returns (plan, base, adapter, output)."""
    from planner.merge import plan_merge_request

    if options.method != "peft":
        raise _input_error("method", "a merge run is a PEFT merge_and_unload (--method peft); mergekit's methods are planned and exported")
    base = check_base(model_dir)
    output = check_output(output_dir)
    adapter = read_adapter(adapter_dir)
    from planner.request import resolve_source

    spec = resolve_source(str(base)).spec
    check_adapter(spec, adapter)
    run_options = options_for_adapter(options, adapter)
    return plan_merge_request(str(base), run_options), base, adapter, output


def checkpoint_shapes(model_dir: Path, field: str) -> dict[str, list[int]]:
    """Every tensor's shape from a model directory's safetensors headers (no tensor is read)."""
    files = sorted(p for p in model_dir.iterdir() if p.name.endswith(".safetensors") and not p.name.startswith("adapter_"))
    if not files:
        raise _input_error(field, f"{model_dir} holds no *.safetensors weights; a mergekit run here reads safetensors checkpoints "
                                  "(save_pretrained writes them)")
    from planner.errors import PlanInputError

    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            shapes.update(safetensors_shapes(path))
        except PlanInputError as exc:  # safetensors_shapes names the adapter's field; here it is this model
            raise _input_error(field, exc.reason) from None
    return shapes


def check_models_match(base: Path, others: list[Path]) -> None:
    """mergekit merges tensor by tensor: every model must hold the base's tensors, shape for shape."""
    want = checkpoint_shapes(base, "model")
    for other in others:
        got = checkpoint_shapes(other, "merge_with")
        missing = sorted(set(want) - set(got))
        if missing:
            raise _input_error("merge_with", f"{other} has no tensor {missing[0]}, which {base} has (a model of another architecture?)")
        for name, shape in want.items():
            if got[name] != shape:
                raise _input_error("merge_with", f"{other}'s {name} is {got[name]}, {base}'s is {shape}: mergekit merges models of one size")


def plan_mergekit_run(model_dir: str, merge_with: list[str], output_dir: str, options):
    """Check everything and plan a mergekit merge of MODEL_DIR (the base, for the methods that take
    one) with the `merge_with` directories. Returns (plan, base, others, output, mergekit config)."""
    import importlib.util

    from pydantic import ValidationError

    from planner.errors import PlanInputError
    from planner.merge import MergeOptions, mergekit_config, plan_merge_request

    if importlib.util.find_spec("mergekit") is None:
        raise _input_error("method", "mergekit is not installed here: pip install 'vramplan[merge]' (mergekit 0.1.5 or later)")
    if not merge_with:
        raise _input_error("merge_with", f"a mergekit {options.method} run merges MODEL with other models: give each with --merge-with DIR")
    base = check_base(model_dir)
    others = []
    for directory in merge_with:
        try:
            others.append(check_base(directory))
        except PlanInputError as exc:  # the base's checks, named for this field
            raise _input_error("merge_with", exc.reason) from None
    if len({base, *others}) != 1 + len(others):
        raise _input_error("merge_with", "each model is merged once: a directory is named twice")
    try:
        run_options = MergeOptions.model_validate({**options.model_dump(), "num_models": 1 + len(others)})
    except ValidationError as exc:
        raise _input_error("merge_with", exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    check_models_match(base, others)
    output = check_output(output_dir)
    plan = plan_merge_request(str(base), run_options)
    return plan, base, others, output, mergekit_config(plan, [str(base), *map(str, others)])


def compare(plan, measured: dict) -> dict:
    """The measured peaks beside the planned ones: error = (planned - measured) / measured. The
    host peak is within the band when the plan is not more than HOST_BAND under it and it is at
    least the plan's floor less HOST_BAND (MergePlan.host_floor_bytes: a zero-copy load leaves the
    plan's temporaries and loader allowance an upper bound, met or not depending on the load)."""
    from planner.merge import HOST_BAND

    planned_host = plan.host_merge_bytes
    got_host = measured["host_peak_bytes"]
    out = {
        "host_planned_bytes": planned_host,
        "host_measured_bytes": got_host,
        "host_error": round((planned_host - got_host) / got_host, 4) if got_host else None,
        "host_band": HOST_BAND,
        "host_floor_bytes": plan.host_floor_bytes,
        "runtime_planned_bytes": next((t.bytes for t in plan.host_terms if t.name == "host.runtime"), 0),
        "runtime_measured_bytes": measured["rss_after_imports_bytes"],
    }
    if "host_page_cache_bytes" in measured:  # mergekit: the mapped checkpoints' pages, outside the plan's peak
        out.update(host_page_cache_planned_bytes=plan.host_page_cache_bytes, host_page_cache_measured_bytes=measured["host_page_cache_bytes"],
                   host_resident_measured_bytes=measured["host_resident_peak_bytes"])
    out["host_within_band"] = (out["host_error"] is not None and out["host_error"] >= -HOST_BAND
                               and got_host >= plan.host_floor_bytes * (1 - HOST_BAND))
    if measured.get("gpu_peak_bytes") is not None:
        planned_gpu = plan.device_peak_bytes
        out.update(gpu_planned_bytes=planned_gpu, gpu_measured_bytes=measured["gpu_peak_bytes"],
                   gpu_error=round((planned_gpu - measured["gpu_peak_bytes"]) / measured["gpu_peak_bytes"], 4) if measured["gpu_peak_bytes"] else None)
    return out


class MergeFailed(Exception):
    """The child ended without merging (not bad input): its last words."""


def run_merge(plan, base: Path, adapter: dict | None, output: Path, timeout: float = CHILD_TIMEOUT_S, mergekit_config: dict | None = None) -> dict:
    """Start the child, wait, return {"plan", "measured", "comparison", "output"}. Bad input the
    child finds (PEFT refuses the adapter, mergekit the models) raises PlanInputError; anything
    else MergeFailed. A mergekit merge passes its config instead of an adapter."""
    o = plan.options
    fd, result_path = tempfile.mkstemp(prefix="vramplan-merge-", suffix=".json")
    os.close(fd)
    args = {"base": str(base), "adapter": adapter["path"] if adapter else None, "output": str(output), "dtype": o.dtype,
            "device": o.device, "max_shard_size": f"{int(o.out_shard_size_gb * 1000)}MB", "result": result_path}
    if mergekit_config is not None:
        args.update(engine="mergekit", mergekit_config=mergekit_config, low_cpu_memory=o.low_cpu_memory, out_shard_bytes=int(o.out_shard_size_gb * 10**9))
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), **MALLOC_ENV}
    try:
        proc = subprocess.run([sys.executable, "-m", "launcher.merge_job", json.dumps(args)], env=env, cwd=root,
                              capture_output=True, text=True, timeout=timeout)
        text = Path(result_path).read_text() if os.path.getsize(result_path) else ""
    except subprocess.TimeoutExpired:
        raise MergeFailed(f"the merge did not finish in {timeout:g} s") from None
    finally:
        Path(result_path).unlink(missing_ok=True)
    result = json.loads(text) if text else {}
    if proc.returncode == 2 and result.get("error"):
        raise _input_error("merge_with" if mergekit_config is not None else "adapter_dir", result["error"])
    if proc.returncode != 0 or "host_peak_bytes" not in result:
        tail = (result.get("error") or proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
        raise MergeFailed(tail if isinstance(tail, str) else tail[0])
    return {"plan": plan.to_dict(), "measured": result, "comparison": compare(plan, result), "output": str(output)}
