"""Validation harness: the plan against measurements.

    python bench/validate.py           # CPU part and the committed calibration set
    python bench/validate.py --readme  # also regenerate docs/accuracy.md and README's summary of it

- CPU (always): bytes autograd saves for backward on tiny models of three catalog
  architectures x {full, LoRA, DoRA} x {eager, sdpa} x checkpointing x {sft, dpo}, against the
  planner's activation + logits terms.
- Calibration: every committed GPU measurement in bench/results/*calibration*.json against the
  planned peak (allocated, and NVML's total including the CUDA context).
- GPU (when CUDA is available): bench/gpu_runs.py's first runs (small catalog architectures with
  random weights, a fresh process each); max_memory_allocated, and max_memory_reserved plus what
  NVML sees outside the allocator, against the plan.
Results go to bench/results/<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = ROOT / "bench" / "results"
GIB = 1 << 30
# the rows this harness measures itself on a GPU (the others come from committed results)
GPU_SOURCE = "bench/validate.py on this GPU"
README_START = "<!-- accuracy-table:start -->"
README_END = "<!-- accuracy-table:end -->"


def _band(plan, measured_gib: float) -> dict:
    """The plan's band (GiB) and whether a measured process peak fell inside it."""
    low, high = plan.peak_low_bytes / GIB, plan.peak_high_bytes / GIB
    return {"band": [round(low, 2), round(high, 2)], "inside": low <= measured_gib <= high}


def _row(config: str, quantity: str, predicted, measured) -> dict:
    return {"config": config, "quantity": quantity, "predicted": predicted, "measured": measured, "error": round((predicted - measured) / measured, 4)}


def cpu_rows() -> list[dict]:
    from planner.introspect import spec_from_config
    from tests.conftest import TINY
    from tests.realstack import measure_saved_forward, predicted_saved
    from tests.test_activations import BATCH, CASES, SEQ

    rows = []
    for arch, method, attention, ckpt, stage, trainer in CASES:
        sequences = BATCH * (2 if stage == "dpo" else 1)
        measured = measure_saved_forward(TINY[arch], method, attention, ckpt, sequences, SEQ, trainer=trainer)
        predicted = predicted_saved(spec_from_config(TINY[arch], arch), method, attention, ckpt, stage, BATCH, SEQ, trainer=trainer)
        config = f"tiny {arch}, {method}, {attention}, ckpt {'on' if ckpt else 'off'}, {stage}, trainer {trainer}, {BATCH}x{SEQ} tokens"
        rows.append(_row(config, "saved activations + logits (bytes)", predicted, measured))
    return rows


def cpu_step_peak_rows() -> list[dict]:
    """Whole-step peaks on CPU from PyTorch's memory profiler, against the plan without runtime."""
    from planner.introspect import spec_from_config
    from tests.conftest import TINY
    from tests.realstack import measure_step_peak, predicted_step_peak
    from tests.test_step_peak import CASES, WIDE, WIDE_CASES

    rows = []
    for arch, method, attention, ckpt, trainer in CASES:
        measured = measure_step_peak(TINY[arch], method, attention, ckpt, sequences=2, seq_len=64, trainer=trainer)
        predicted, phase = predicted_step_peak(spec_from_config(dict(TINY[arch]), arch), method, attention, ckpt, 2, 64, trainer=trainer)
        config = f"tiny {arch}, {method}, {attention}, ckpt {'on' if ckpt else 'off'}, sft, trainer {trainer}, 2x64 tokens (peak in {phase.replace('_', ' ')})"
        rows.append(_row(config, "whole-step peak, CPU profiler (bytes)", predicted, measured.with_onednn))
    # wide layers, small vocabulary: the peak inside a layer's backward, with and without autocast
    for method, ckpt, autocast in WIDE_CASES:
        measured = measure_step_peak(WIDE, method, "sdpa", ckpt, sequences=2, seq_len=256, autocast=autocast)
        predicted, phase = predicted_step_peak(spec_from_config(dict(WIDE), "wide"), method, "sdpa", ckpt, 2, 256, autocast=autocast)
        config = (f"wide llama (hidden 256, intermediate 1024, vocab 64), {method}, sdpa, ckpt {'on' if ckpt else 'off'}, "
                  f"autocast {'on' if autocast else 'off'}, trainer hf, 2x256 tokens (peak in {phase.replace('_', ' ')})")
        rows.append(_row(config, "whole-step peak, CPU profiler (bytes)", predicted, measured.with_onednn))
    return rows


def calibration_rows() -> list[dict]:
    from planner.introspect import spec_from_config
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    rows = []
    for path in sorted(RESULTS.glob("h100-calibration-*.json")):
        data = json.loads(path.read_text())
        spec = spec_from_config(data["model_config"], "calibration")
        setup = data["setup"]
        for row in data["rows"]:
            options = TrainingOptions(
                method=row["method"], weights_dtype=row["weights_dtype"], precision="bf16", batch_size=setup["batch_size"],
                seq_len=setup["seq_len"], gradient_checkpointing=row["gradient_checkpointing"], trainer="hf", lora_r=16,
                lora_dropout=0.0, gpu_memory_gib=80,
            )
            plan = build_plan(spec, options)
            allocated = sum(c.bytes for c in plan.components if not c.name.startswith("runtime")) / GIB
            total = plan.peak_bytes / GIB
            config = (f"{data['device']}: 886M Llama-shape, {row['method']}, weights {row['weights_dtype']}, "
                      f"ckpt {'on' if row['gradient_checkpointing'] else 'off'}, {setup['batch_size']}x{setup['seq_len']}")
            rows.append({"config": config, "quantity": "peak allocated (GiB)", "predicted": round(allocated, 2),
                         "measured": row["peak"], "error": round((allocated - row["peak"]) / row["peak"], 4), "source": data["source"]})
            rows.append({"config": config, "quantity": "NVML used (GiB)", "predicted": round(total, 2),
                         "measured": row["nvml"], "error": round((total - row["nvml"]) / row["nvml"], 4), "source": data["source"],
                         **_band(plan, row["nvml"]), "band_note": "in-sample: these runs are among the calibration's 22"})
    return rows


def process_peak_rows() -> list[dict]:
    """The 22 H100 runs of the runtime calibration: the plan's peak against the process peak
    (max_memory_reserved + memory outside the allocator), each from a fit that left it out, and
    whether it fell inside a band made without it (bench/calibrate.py's band check)."""
    newest = sorted(RESULTS.glob("calibration-20*.json"))
    if not newest:
        return []
    data = json.loads(newest[-1].read_text())
    source = f"{newest[-1].relative_to(ROOT)} (bench/calibrate.py, leave-one-out)"
    bands = {run["name"]: run for run in data.get("band_per_run", [])}
    rows = []
    for run in data["per_run"]:
        row = {"config": f"H100 run {run['name']}", "quantity": "process peak, fit left it out (GiB)", "predicted": run["after_gib"],
               "measured": run["measured_process_gib"], "error": run["after_error_left_out"], "source": source}
        if run["name"] in bands:
            band = bands[run["name"]]
            row |= {"band": [band["low_gib"], band["high_gib"]], "inside": band["inside"], "band_note": "band made without this run"}
        rows.append(row)
    simulated_source = f"{newest[-1].relative_to(ROOT)} (bench/calibrate.py, allocator simulated, nothing fitted)"
    for run in data.get("simulated", {}).get("per_run", []):
        if run["simulated"]:
            where = run["name"] if run["name"].startswith("published") else f"H100 run {run['name']}"
            rows.append({"config": where, "quantity": "process peak, allocator simulated (GiB)", "predicted": run["central"],
                         "measured": run["measured"], "error": run["error"], "source": simulated_source,
                         "band": [run["low"], run["high"]], "inside": run["inside"], "band_note": "band made without this run"})
    return rows


def gpu_rows() -> list[dict]:
    """Real peaks on a CUDA GPU, where one is present: bench/gpu_runs.py's first runs, each in a
    fresh process, against their plans (allocated, and the process peak with its band)."""
    import torch

    if not torch.cuda.is_available():
        return []
    from bench.gpu_runs import MATRIX, QUICK, run_in_process
    from planner.request import resolve_model
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    rows = []
    gpu = torch.cuda.get_device_name(0)
    for run in MATRIX[:QUICK]:
        measured, why = run_in_process(run, timeout=180)
        if measured is None:
            print(f"{run.name}: not measured ({why})", file=sys.stderr)
            continue
        plan = build_plan(resolve_model(run.model), TrainingOptions(gpu_memory_gib=4096, **run.options))
        predicted = sum(c.bytes for c in plan.components if c.family != "runtime") / GIB
        allocated = measured["peak_allocated"] / GIB
        name = f"{gpu}: {run.name}"
        rows.append({"config": name, "source": GPU_SOURCE, "quantity": "peak allocated (GiB)", "predicted": round(predicted, 2),
                     "measured": round(allocated, 2), "error": round((predicted - allocated) / allocated, 4)})
        if measured["outside_allocator"] is not None:
            process = (measured["peak_reserved"] + measured["outside_allocator"]) / GIB
            rows.append({"config": name, "source": GPU_SOURCE, "quantity": "process peak (GiB)", "predicted": round(plan.peak_bytes / GIB, 2),
                         "measured": round(process, 2), "error": round((plan.peak_bytes / GIB - process) / process, 4), **_band(plan, process)})
            # the same run with the allocator simulated: the check the trace's stand-ins (TRL's head among them) still lack
            simulated = build_plan(resolve_model(run.model), TrainingOptions(gpu_memory_gib=4096, simulate_allocator=True, **run.options))
            if simulated.reserve_source == "simulated":
                rows.append({"config": name, "source": GPU_SOURCE, "quantity": "process peak, allocator simulated (GiB)",
                             "predicted": round(simulated.peak_bytes / GIB, 2), "measured": round(process, 2),
                             "error": round((simulated.peak_bytes / GIB - process) / process, 4), **_band(simulated, process)})
    return rows


ACCURACY_DOC = ROOT / "docs" / "accuracy.md"
ACCURACY_INTRO = """# Accuracy: the plan against measurements

Generated by `python bench/validate.py --readme` from `bench/results/` (the README keeps a summary).
The first GPU rows are the 22 H100 runs of the runtime calibration: the plan's peak against the
process peak (`max_memory_reserved` plus memory outside the allocator), each predicted by a
reserve fit that left that run out (`bench/calibrate.py`): the formula that searches use, and
a single plan where the trace cannot stand in. The same 22 runs follow with the allocator
simulated, as a single plan of these runs is by default (`simulate_allocator`: the run's step
traced on the meta device and replayed through a model of PyTorch's caching allocator,
planner/step_trace.py), with the published runs of
the same stack (PEFT's method-comparison benchmark, variable-length data); nothing in it is
fitted, and each run's band comes from the other runs' errors. The next rows are the 7 hand-taken runs
of `bench/results/h100-calibration-2026-11-22.json` again, allocated and NVML, in-sample (they are
among the 22 the constants were fitted on). The last column says whether the measured process
peak fell inside the plan's band: for the 22 runs, a band made without that run; for the
hand-taken NVML rows, the committed band (in-sample). GPU rows from `bench/validate.py`'s own GPU
part appear when it has run on a GPU.

The "whole-step peak" rows follow every allocation of one real training step on CPU (forward
under bf16 autocast, backward, AdamW step) with PyTorch's memory profiler and compare its peak
with the plan's peak less the CUDA-only runtime components: this holds the phase model (what is
alive together, loss buffers, recomputation, a layer's backward, DoRA's forward temporaries,
QLoRA's NF4 base on CPU bitsandbytes, TRL's fused LM head) to a measurement. The other CPU rows
count the bytes autograd saves on tiny models against the planner's activation + logits terms.
Published runs from other projects are compared in `bench/results/published-*.md`.
"""
# row groups of the README's summary: (label, which rows)
SUMMARY_GROUPS = (
    ("GPU, process peak, formula held out (H100; searches)", lambda r: r["quantity"].startswith("process peak, fit left it out")),
    ("GPU, process peak, allocator simulated (H100, published; a single plan's default)", lambda r: r["quantity"].startswith("process peak, allocator simulated") and r.get("source") != GPU_SOURCE),
    ("GPU, in-sample (H100, hand-taken)", lambda r: r["quantity"] in ("peak allocated (GiB)", "NVML used (GiB)") and r.get("source") != GPU_SOURCE),
    ("GPU, bench/validate.py", lambda r: r.get("source") == GPU_SOURCE),
    ("CPU, whole-step peak", lambda r: r["quantity"].startswith("whole-step peak")),
    ("CPU, saved activations", lambda r: r["quantity"].startswith("saved activations")),
)


def _cell(row: dict) -> str:
    fmt = (lambda v: f"{v:,}") if "bytes" in row["quantity"] else (lambda v: f"{v:.2f}")
    band = f"{'yes' if row['inside'] else '**no**'} ({row['band'][0]:.2f} to {row['band'][1]:.2f})" if "band" in row else ""
    if band and row.get("band_note", "").startswith("in-sample"):
        band += ", in-sample"
    return f"| {row['config']} | {row['quantity']} | {fmt(row['predicted'])} | {fmt(row['measured'])} | {row['error']:+.1%} | {band} |"


def _band_line(all_rows: list[dict]) -> str | None:
    held_out = [r for r in all_rows if "band" in r and r.get("band_note") == "band made without this run"]
    if not held_out:
        return None
    reports = sorted(RESULTS.glob("band-20*.md"))
    return (f"Measured process peak inside a band made without it: {sum(r['inside'] for r in held_out)} of {len(held_out)} runs"
            + (f" ({reports[-1].relative_to(ROOT)} has the band's figures against the goals)." if reports else "."))


def accuracy_doc(all_rows: list[dict]) -> str:
    """docs/accuracy.md: every row, with its signed error and whether the peak fell inside the band."""
    lines = [ACCURACY_INTRO, "| configuration | quantity | predicted | measured | error | measured inside the band |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [_cell(row) for row in all_rows]
    worst = max(all_rows, key=lambda r: abs(r["error"]))
    lines += ["", f"Worst error: {worst['error']:+.1%} ({worst['config']}, {worst['quantity']})."]
    band = _band_line(all_rows)
    if band:
        lines.append(band)
    lines += ["", *published_section()]
    return "\n".join(lines) + "\n"


def published_section() -> list[str]:
    """The published runs' part of docs/accuracy.md: bench/published.py's summary of its committed by-stack report."""
    import published

    return published.accuracy_section()


def readme_table(all_rows: list[dict]) -> str:
    """The README's summary: per group of rows, the median and worst signed errors and the band's coverage."""
    import statistics

    lines = [README_START, "", "| rows | count | median error | most under | most over | inside the band |", "| --- | --- | --- | --- | --- | --- |"]
    for label, member in SUMMARY_GROUPS:
        rows = [r for r in all_rows if member(r)]
        if not rows:
            continue
        banded = [r for r in rows if "band" in r]
        inside = f"{sum(r['inside'] for r in banded)} of {len(banded)}" if banded else ""
        lines.append(f"| {label} | {len(rows)} | {statistics.median(abs(r['error']) for r in rows):.1%} | {min(r['error'] for r in rows):+.1%} "
                     f"| {max(r['error'] for r in rows):+.1%} | {inside} |")
    lines += ["", f"Every row, with its configuration and band: [{ACCURACY_DOC.relative_to(ROOT)}]({ACCURACY_DOC.relative_to(ROOT)}).",
              "", README_END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="rewrite README's accuracy table")
    parser.add_argument("--cpu-from", type=Path, default=None, metavar="RESULTS.json",
                        help="take the CPU rows (minutes to measure) from a committed results file instead of measuring them again; "
                             "the calibration and GPU rows are computed as usual")
    args = parser.parse_args()
    import torch
    import transformers

    gpu = gpu_rows()
    device = torch.cuda.get_device_name().replace(" ", "-") if gpu else "cpu"
    if args.cpu_from is not None:
        earlier = json.loads(args.cpu_from.read_text())
        cpu, cpu_step_peak, machine, versions = earlier["cpu"], earlier["cpu_step_peak"], earlier["machine"], earlier["versions"]
    else:
        cpu, cpu_step_peak = cpu_rows(), cpu_step_peak_rows()
        machine = f"{platform.machine()}, Python {platform.python_version()}"
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "machine": machine,
        "versions": versions,
        "cpu": cpu,
        "cpu_step_peak": cpu_step_peak,
        "calibration": calibration_rows(),
        "process_peak": process_peak_rows(),
        "gpu": gpu,
    }
    out = RESULTS / f"{device}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    rows = result["process_peak"] + result["calibration"] + result["gpu"] + result["cpu_step_peak"] + result["cpu"]
    for row in rows:
        print(f"{row['error']:+7.1%}  {row['quantity']:<36} {row['config']}")
    print(f"wrote {out.relative_to(ROOT)}")
    if args.readme:
        ACCURACY_DOC.parent.mkdir(exist_ok=True)
        ACCURACY_DOC.write_text(accuracy_doc(rows))
        readme = ROOT / "README.md"
        text = readme.read_text()
        start, end = text.index(README_START), text.index(README_END) + len(README_END)
        readme.write_text(text[:start] + readme_table(rows) + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
