"""Refit the runtime constants (CUDA context, allocator reserve) from measured runs.

    python bench/calibrate.py [RUNS.jsonl ...] [--name NAME] [--dry-run]

Each line of a runs file is one measured training run in the calibration form:
    {"name", "model": catalog id | "model_config": {...}, "options": {plan options},
     "measured": {"peak_allocated", "peak_reserved", "outside_allocator"}, ...}
(bench/results/calibration-runs.jsonl holds the team's H100 runs; the launcher will export a
team's own runs in the same form). What decides an out-of-memory error is the process peak,
peak_reserved + outside_allocator; the fit explains the reserve, peak_reserved - peak_allocated,
from the plan's own short-lived blocks (planner/runtime.py) with non-negative constants.

Prints, per run and in summary, the error of the plan's peak against the measured process peak
before (the calibration in use) and after, the "after" of each run from a fit that left that run
out. Writes planner/calibration.json (unless --dry-run), bench/results/calibration-<date>.json
and bench/results/band-<date>.md.

The band (planner/runtime.py): the high constant is the largest leave-one-out under-prediction,
relative to each run's dynamic part (everything but the exact weights, gradients, optimizer state
and the CUDA context); the low constant the largest over-prediction, relative to the whole peak.
How well that band holds is itself checked on runs it never saw: for each run, the constants come
from the other runs' errors, each of those from a fit that left out both runs, and the run's
measured peak is compared with the band they give (coverage, how far above the high end, width).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.runtime import (
    CALIBRATION_FILE,
    Calibration,
    calibration,
    is_static,
    reserve_inputs,
    step_gradients_bytes,
)

GIB = 1 << 30
DEFAULT_RUNS = ROOT / "bench" / "results" / "calibration-runs.jsonl"
FEATURES = ("floor", "recompute", "logits")
# The goals for the band, on runs the fit never saw
BAND_GOALS = {"coverage": 0.90, "worst_above_high": 0.03, "median_width_single_gpu": 0.15}


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                runs.append(json.loads(line))
    return runs


def _spec(run: dict):
    if "model" in run:
        # a catalog id, or (in rows from `vramplan runs export`) the launched model's directory or hub id
        from planner.request import resolve_model

        return resolve_model(run["model"])
    from planner.introspect import spec_from_config

    return spec_from_config(dict(run["model_config"]), run["name"])


def plan_inputs(run: dict) -> dict:
    """What the fit needs from the plan of a run: allocated bytes at the peak and the reserve's
    inputs. The GPU is a large custom one, so no hardware rule or fit verdict interferes."""
    # rows from launched runs carry every option, their GPU's included: the fit plans on a large custom GPU
    options = {k: v for k, v in run["options"].items() if k not in ("gpu", "gpu_memory_gib")}
    plan = build_plan(_spec(run), TrainingOptions(gpu_memory_gib=4096, **options))
    allocated = sum(c.bytes for c in plan.components if c.family != "runtime")
    recompute, logits = reserve_inputs(list(plan.all_components))
    measured = run["measured"]
    return {
        "name": run["name"],
        "num_gpus": plan.gpu.count,
        "method": plan.options.method,
        "gpu": run.get("gpu", "?"),
        "allocated": allocated,
        # the exact part of the allocated peak (weights, gradients, optimizer state)
        "static": sum(c.bytes for c in plan.components if c.family != "runtime" and is_static(c)),
        # the step's gradients, whichever phase peaks: the band's second term (planner/runtime.band_bytes)
        "gradients": step_gradients_bytes(plan.all_components),
        "recompute": recompute,
        "logits": logits,
        "peak_before": plan.peak_bytes,
        "measured_allocated": measured["peak_allocated"],
        "measured_reserve": measured["peak_reserved"] - measured["peak_allocated"],
        # NVML cannot always tell the context (a container's PID namespace): the calibrated constant stands in
        "measured_process": measured["peak_reserved"] + (measured["outside_allocator"] if measured["outside_allocator"] is not None else calibration().cuda_context_bytes),
        "outside_allocator": measured["outside_allocator"] if measured["outside_allocator"] is not None else calibration().cuda_context_bytes,
    }


def _features(row: dict) -> list[float]:
    return [1.0, float(row["recompute"]), float(row["logits"])]


def _solve(rows: list[dict], keep: tuple[int, ...]) -> list[float] | None:
    """Least squares on the kept features (normal equations, 3 unknowns at most)."""
    n = len(keep)
    a = [[0.0] * n for _ in range(n)]
    b = [0.0] * n
    for row in rows:
        x = [_features(row)[k] for k in keep]
        for i in range(n):
            b[i] += x[i] * row["measured_reserve"]
            for j in range(n):
                a[i][j] += x[i] * x[j]
    # Gaussian elimination; a singular system means this subset cannot be fitted
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, abs(a[col][col])):
            return None
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
                b[r] -= f * b[col]
    coef = [b[i] / a[i][i] for i in range(n)]
    full = [0.0] * len(FEATURES)
    for k, c in zip(keep, coef):
        full[k] = c
    return full


def fit_reserve(rows: list[dict]) -> list[float]:
    """Non-negative least squares by trying every subset of the features (three of them): a
    negative constant would make a bigger step predict a smaller reserve."""
    best, best_sse = [0.0, 0.0, 0.0], float("inf")
    for size in range(1, len(FEATURES) + 1):
        for keep in itertools.combinations(range(len(FEATURES)), size):
            coef = _solve(rows, keep)
            if coef is None or min(coef) < 0:
                continue
            sse = sum((row["measured_reserve"] - sum(c * x for c, x in zip(coef, _features(row)))) ** 2 for row in rows)
            if sse < best_sse:
                best, best_sse = coef, sse
    return best


def _calibration(name: str, context: int, coef: list[float]) -> Calibration:
    return Calibration(name, "", context, int(coef[0]), coef[1], coef[2])


def predicted_process(row: dict, cal: Calibration) -> int:
    return row["allocated"] + cal.cuda_context_bytes + cal.reserve_bytes(row["recompute"], row["logits"])


def dynamic_part(row: dict, cal: Calibration) -> int:
    """The plan's peak less its exact part and the CUDA context: what the band scales."""
    return predicted_process(row, cal) - row["static"] - cal.cuda_context_bytes


def dynamic_residual(row: dict, cal: Calibration) -> float:
    """Measured minus predicted process peak, relative to the dynamic part (> 0: under-predicted)."""
    return (row["measured_process"] - predicted_process(row, cal)) / dynamic_part(row, cal)


def central_residual(row: dict, cal: Calibration) -> float:
    """Measured minus predicted process peak, relative to the predicted peak (< 0: over-predicted)."""
    return (row["measured_process"] - predicted_process(row, cal)) / predicted_process(row, cal)


def band_constants(over: list[float], under: list[float]) -> tuple[float, float]:
    """(low, high): the largest over-prediction (relative to the peak) and the largest
    under-prediction (relative to the dynamic part), widened to 4 decimals, never narrowed; the
    central figure is always inside."""
    return min(0.0, math.floor(min(over) * 1e4) / 1e4), max(0.0, math.ceil(max(under) * 1e4) / 1e4)


def band_of(row: dict, cal: Calibration, low: float, high: float, gradients_high: float = 0.0) -> tuple[int, int]:
    """The same arithmetic as planner.runtime.band_bytes, on a calibration row."""
    central, dynamic = predicted_process(row, cal), dynamic_part(row, cal)
    return (max(central - dynamic, central + math.floor(central * low)),
            central + math.ceil(dynamic * high) + math.ceil(row.get("gradients", 0) * gradients_high))


def gradients_constant(rows_and_fits: list[tuple[dict, Calibration]], high: float) -> float:
    """The share of the gradients the high end must add so that it covers every row the dynamic
    term leaves uncovered (full fine-tuning, whose gradients fragment the pool); widened to 4
    decimals."""
    needed = [max(0.0, row["measured_process"] - predicted_process(row, cal) - dynamic_part(row, cal) * high) / row["gradients"]
              for row, cal in rows_and_fits if row.get("gradients", 0) > 0]
    return math.ceil(max(needed, default=0.0) * 1e4) / 1e4


def band_check(rows: list[dict], name: str, context: int, simulated_rows: list[dict] = ()) -> tuple[list[dict], dict]:
    """The band held to runs it never saw: for run i, the band constants come from the other
    runs' residuals, each from a fit that left out both i and that run; i's central figure from
    a fit without i. Returns per-run rows and the summary against the goals."""
    fits: dict[frozenset, Calibration] = {}

    def without(*left_out: int) -> Calibration:
        key = frozenset(left_out)
        if key not in fits:
            fits[key] = _calibration(name, context, fit_reserve([r for k, r in enumerate(rows) if k not in key]))
        return fits[key]

    per_run = []
    for i, row in enumerate(rows):
        others = [(other, without(i, j)) for j, other in enumerate(rows) if j != i]
        # the simulated rows are never fitted: their errors come from the fit without run i
        simulated = [(row, without(i)) for row in simulated_rows]
        dynamic_rows = others + [(o, cal) for o, cal in simulated if o.get("method") != "full"]
        others += simulated
        low = band_constants([central_residual(o, cal) for o, cal in others], [0.0])[0]
        high = band_constants([0.0], [dynamic_residual(o, cal) for o, cal in dynamic_rows])[1]
        gradients_high = gradients_constant(others, high)
        cal = without(i)
        central = predicted_process(row, cal)
        low_bytes, high_bytes = band_of(row, cal, low, high, gradients_high)
        measured = row["measured_process"]
        per_run.append({
            "name": row["name"], "num_gpus": row["num_gpus"], "measured_gib": round(measured / GIB, 2),
            "central_gib": round(central / GIB, 2), "low_gib": round(low_bytes / GIB, 2), "high_gib": round(high_bytes / GIB, 2),
            "inside": low_bytes <= measured <= high_bytes,
            "above_high": round(max(0.0, (measured - high_bytes) / high_bytes), 4),
            "below_low": round(max(0.0, (low_bytes - measured) / low_bytes), 4),
            "width_of_central": round((high_bytes - low_bytes) / central, 4),
        })
    single = [r["width_of_central"] for r in per_run if r["num_gpus"] == 1]
    inside = sum(r["inside"] for r in per_run)
    figures = {
        "runs": len(per_run),
        "inside": inside,
        "coverage": round(inside / len(per_run), 4),
        "worst_above_high": max(r["above_high"] for r in per_run),
        "worst_below_low": max(r["below_low"] for r in per_run),
        "single_gpu_runs": len(single),
        "median_width_single_gpu": round(statistics.median(single), 4) if single else None,
        "widest_single_gpu": max(single) if single else None,
        "narrowest_single_gpu": min(single) if single else None,
    }
    figures["goals"] = {
        "coverage": {"goal": f">= {BAND_GOALS['coverage']:.0%}", "met": figures["coverage"] >= BAND_GOALS["coverage"]},
        "worst_above_high": {"goal": f"<= {BAND_GOALS['worst_above_high']:.0%}", "met": figures["worst_above_high"] <= BAND_GOALS["worst_above_high"]},
        "median_width_single_gpu": {"goal": f"<= {BAND_GOALS['median_width_single_gpu']:.0%} of the central figure",
                                    "met": bool(single) and figures["median_width_single_gpu"] <= BAND_GOALS["median_width_single_gpu"]},
    }
    return per_run, figures


def _described(result: dict, name: str) -> str:
    run = next((r for r in result["per_run"] if r["name"] == name), None)
    if run is None:
        return f"{name}, a simulated step (bench/simulate_matrix.py)"
    return f"{name}, {run['measured_process_gib']:.2f} GiB measured, allocated {run['allocated_error']:+.1%}"


def band_report(result: dict) -> str:
    """bench/results/band-<date>.md: the band's figures on runs it never saw, against the goals."""
    band, check = result["band"], result["band_leave_one_out"]
    yes = lambda ok: "met" if ok else "**not met**"
    goals = check["goals"]
    lines = [
        f"# The band around the peak: leave-one-out figures ({result['date']})",
        "",
        f"Written by `python bench/calibrate.py` from {', '.join(result['runs'])} ({check['runs']} runs, "
        f"calibration `{result['name']}`). The figures below are for runs the band never saw.",
        "",
        "## How the band is made",
        "",
        "Weights, gradients and optimizer state are exact (held to the byte on CPU) and the CUDA context is a",
        "measured constant; the rest of a plan's peak (activations, logits, temporaries, KV cache, the allocator's",
        "reserve) is its dynamic part. Each run is predicted by a reserve fit that left it out. The high end",
        "adds to the central figure its dynamic part times the largest under-prediction seen, relative to",
        "each run's dynamic part: under-prediction comes from memory the model misses, which is dynamic. The",
        "low end takes off the largest over-prediction seen, relative to the whole peak, and never goes below",
        "the exact part: the over-predictions are on small runs where the reserve's floor is a large share of",
        f"a small dynamic part, so relative to the dynamic part ({max(r['dynamic_error_left_out'] for r in result['per_run']):.0%} over on one run) they would put a large plan's",
        "low end absurdly low. For n exchangeable errors a new one falls between their smallest and",
        f"largest with probability (n - 1) / (n + 1), {(check['runs'] - 1) / (check['runs'] + 1):.0%} for {check['runs']} runs.",
        "",
        f"Constants written to `planner/calibration.json`: low {band['peak_low']:+.2%} of the central figure, high "
        f"{band['dynamic_high']:+.2%} of the dynamic part"
        + (f" plus {band['gradients_high']:.2%} of the step's gradients (full fine-tuning: its gradients, allocated through "
           "the backward beside recomputed layers, fragment the pool, which the formula's terms do not follow)" if band.get("gradients_high") else "")
        + f", from {band['runs']} leave-one-out errors"
        + (f" and the formula's errors on {band['simulated_rows']} simulated steps of 0.5B-13B catalog models "
           "(bench/simulate_matrix.py: the allocator model over traced steps, which reproduces the measured runs' reserved peak "
           "within -1.1% to +1.4%; never fitted). The measured runs reach 1.5B only; the simulated steps hold the band to what "
           f"the allocator does on larger models (formula against them: median {result['simulated_rows']['median_abs_error']:.1%}, "
           f"worst {result['simulated_rows']['worst_under']:+.1%} / {result['simulated_rows']['worst_over']:+.1%})."
           if band.get("simulated_rows") else "."),
        "",
        "## Held to runs it never saw",
        "",
        "For each run, the band's constants come from the other runs' residuals (each from a fit that left out",
        "both), its central figure from a fit that left it out; then the measured process peak",
        "(`max_memory_reserved` + memory outside the allocator) is compared with that band.",
        "",
        "| figure | measured | goal | |",
        "| --- | --- | --- | --- |",
        f"| measured peak inside the band | {check['inside']} of {check['runs']} ({check['coverage']:.1%}) | {goals['coverage']['goal']} | {yes(goals['coverage']['met'])} |",
        f"| worst above the high end | {check['worst_above_high']:.1%} | {goals['worst_above_high']['goal']} | {yes(goals['worst_above_high']['met'])} |",
        f"| band width, median of single-GPU runs | {check['median_width_single_gpu']:.1%} of central (narrowest {check['narrowest_single_gpu']:.1%}, widest {check['widest_single_gpu']:.1%}) | {goals['median_width_single_gpu']['goal']} | {yes(goals['median_width_single_gpu']['met'])} |",
        f"| worst below the low end | {check['worst_below_low']:.1%} | - | |",
        "",
    ]
    if not goals["median_width_single_gpu"]["met"]:
        lines += [
            "The width goal is not met, and cannot be with the central figure as it is: the band is as wide as",
            f"the central figure's own leave-one-out errors, which run from {-band['peak_low']:.1%} over the peak",
            f"({_described(result, band['low_from'])}) to {band['dynamic_high']:.1%} of the dynamic part under",
            (f"({_described(result, band['high_from'])}). The tensors the plan counts are within"
             f" {min(r['allocated_error'] for r in result['per_run']):+.1%} to {max(r['allocated_error'] for r in result['per_run']):+.1%}"
             " of `max_memory_allocated` on every run, so what is left of those errors is"),
            "the allocator's reserve (reserved minus allocated), which the fit's three terms follow only roughly. A",
            "narrower band needs a better reserve model, or runs with `expandable_segments:True`, which leave",
            "little reserve; not a narrower rule. The low end",
            "only separates \"tight\" from \"does not fit\"; \"fits\" is decided by the high end alone.",
            "",
        ]
    if not goals["worst_above_high"]["met"]:
        worst = max(result["band_per_run"], key=lambda r: r["above_high"])
        lines += [
            f"Above the high end by more than the goal: {worst['name']} ({worst['above_high']:.1%}; measured {worst['measured_gib']:.2f} GiB,",
            f"high end {worst['high_gib']:.2f} GiB)."
            + (" It is the run with the largest under-prediction of all, so without it the other runs' errors do not reach"
               " it; in the committed calibration, which has it, its error is the high constant." if worst["name"] == band["high_from"] else ""),
            "",
        ]
    gpus = sorted({r.get("gpu", "?") for r in result.get("run_gpus", [])})
    lines += [
        "## Limits",
        "",
        f"- {check['runs']} runs, on {', '.join(gpus) if gpus else 'the GPUs of the runs files'}, of a few small architectures: the",
        "  (n - 1) / (n + 1) coverage assumes a new run's error is like theirs, which a larger model, another",
        "  GPU or another stack may not be.",
        *(["- Only single-GPU runs: how the band holds for sharded (ZeRO/FSDP) runs is not measured."]
          if check["single_gpu_runs"] == check["runs"] else []),
        "- The default caching allocator only: with `expandable_segments:True` the same constants are",
        "  applied, unmeasured.",
        "- The CUDA context is taken as exact at its measured value; it differs between GPUs and drivers.",
        "",
    ]
    if "simulated" in result:
        sim = result["simulated"]
        central, held = sim["central"], sim["band_leave_one_out"]
        lines += [
            "## With the allocator simulated (`simulate_allocator`)",
            "",
            "planner/step_trace.py traces each run's allocations on the meta device and replays them through a",
            "model of PyTorch's caching allocator (planner/allocator.py). Nothing is fitted, so every error below is",
            "on a run the simulation never saw; each run's band comes from the other runs' errors. Beside the 22",
            "fixed-shape runs are the published runs of the same stack (`published ...`: PEFT's method-comparison",
            "benchmark, a transformers forward with PEFT adapters over many steps of variable-length data), so the",
            "band is held to real data too.",
            "",
            "| figure | measured | goal |",
            "| --- | --- | --- |",
            f"| median error of the central figure | {central['median_abs_error']:.1%} | <= 4% |",
            f"| worst under / over | {central['worst_under']:+.1%} / {central['worst_over']:+.1%} | every run within 10% |",
            f"| measured peak inside the band | {held['inside']} of {held['runs']} | >= 90% |",
            f"| worst above the high end | {held['worst_above_high']:.1%} | <= 3% |",
            f"| band width, median (widest) | {held['median_width_single_gpu']:.1%} ({held['widest_single_gpu']:.1%}) | <= 15% |",
            "",
            f"Band constants written: low {sim['band']['peak_low']:+.2%} of the central figure, high {sim['band']['dynamic_high']:+.2%} of the dynamic part."
            + (f" Not simulated: {', '.join(sim['not_simulated'])}." if sim["not_simulated"] else ""),
            *([""] + [f"Left out: published {r['id']}: {r['why']}." for r in sim["published_skipped"]] if sim.get("published_skipped") else []),
            "",
            "| run | measured GiB | central | error | low | high | inside | width |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *[f"| {r['name']} | {r['measured']:.2f} | {r['central']:.2f} | {r['error']:+.1%} | {r['low']:.2f} | {r['high']:.2f} | "
              f"{'yes' if r['inside'] else 'no'} | {r['width']:.1%} |"
              for r in sim["per_run"] if r["simulated"]],
            "",
        ]
    lines += ["## Per run", "", "| run | measured GiB | low | central | high | inside | width |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["band_per_run"]:
        lines.append(f"| {r['name']} | {r['measured_gib']:.2f} | {r['low_gib']:.2f} | {r['central_gib']:.2f} | {r['high_gib']:.2f} | "
                     f"{'yes' if r['inside'] else 'no'} | {r['width_of_central']:.1%} |")
    return "\n".join(lines) + "\n"


def summary(errors: list[float]) -> dict:
    return {
        "runs": len(errors),
        "median_abs_error": round(statistics.median(abs(e) for e in errors), 4),
        "worst_under": round(min(errors), 4),
        "worst_over": round(max(errors), 4),
        "more_than_5_percent_under": sum(e < -0.05 for e in errors),
        "within_10_percent": sum(abs(e) <= 0.10 for e in errors),
    }


def refit(rows: list[dict], name: str, date: str, sources: list[str], simulated_rows: list[dict] = ()) -> dict:
    """The constants, the band and their errors on runs the fit left out, from planned runs."""
    context = int(statistics.median(row["outside_allocator"] for row in rows))
    coef = fit_reserve(rows)
    before_errors, after_errors, table, under, over, held_out_fits = [], [], [], [], [], []
    for i, row in enumerate(rows):
        # each run's "after" comes from a fit that never saw it
        held_out = _calibration(name, context, fit_reserve(rows[:i] + rows[i + 1:]))
        held_out_fits.append((row, held_out))
        measured = row["measured_process"]
        before = (row["peak_before"] - measured) / measured
        loo = (predicted_process(row, held_out) - measured) / measured
        before_errors.append(before)
        after_errors.append(loo)
        under.append(dynamic_residual(row, held_out))
        over.append(central_residual(row, held_out))
        table.append({"name": row["name"], "measured_process_gib": round(measured / GIB, 2),
                      "before_gib": round(row["peak_before"] / GIB, 2), "before_error": round(before, 4),
                      "after_gib": round(predicted_process(row, held_out) / GIB, 2), "after_error_left_out": round(loo, 4),
                      "allocated_error": round((row["allocated"] - row["measured_allocated"]) / row["measured_allocated"], 4),
                      "dynamic_error_left_out": round(-under[-1], 4)})
    # simulated steps of larger models (bench/simulate_matrix.py): not fitted, but the band holds them
    final = _calibration(name, context, coef)
    simulated_errors = [(predicted_process(row, final) - row["measured_process"]) / row["measured_process"] for row in simulated_rows]
    all_over = over + [central_residual(row, final) for row in simulated_rows]
    named = list(rows) + list(simulated_rows)
    fits = held_out_fits + [(row, final) for row in simulated_rows]
    # the dynamic term from the measured runs and the adapter rows; full fine-tuning's excess, which
    # follows its gradients, goes to the gradients term
    all_under = under + [dynamic_residual(row, final) if row.get("method") != "full" else -1.0 for row in simulated_rows]
    low, high = band_constants(all_over, all_under)
    gradients_high = gradients_constant(fits, high)
    band_per_run, band_figures = band_check(rows, name, context, simulated_rows)
    return {
        "name": name,
        "date": date,
        "runs": sources,
        "constants": {"cuda_context_bytes": context, "reserve_floor_bytes": int(coef[0]),
                      "reserve_per_recompute_byte": round(coef[1], 4), "reserve_per_logits_byte": round(coef[2], 4)},
        "before": {"calibration": calibration().name, **summary(before_errors)},
        "after_leave_one_out": summary(after_errors),
        "band": {"peak_low": low, "dynamic_high": high, "gradients_high": gradients_high, "runs": len(under), "simulated_rows": len(simulated_rows),
                 "low_from": named[all_over.index(min(all_over))]["name"], "high_from": named[all_under.index(max(all_under))]["name"],
                 "method": ("leave-one-out errors of the process peak on the measured runs, and errors on the simulated steps of larger "
                            "models (bench/simulate_matrix.py, never fitted): low = central x (1 + peak_low), the largest over-prediction, "
                            "never below the exact part; high = central + dynamic part x dynamic_high, the largest under-prediction "
                            "relative to the dynamic part (of the measured runs and the adapter rows) + gradients x gradients_high, "
                            "what full fine-tuning's rows need beyond it")},
        "band_leave_one_out": band_figures,
        "simulated_rows": {"runs": len(simulated_rows), **(summary(simulated_errors) if simulated_rows else {}),
                           "worst_under_row": simulated_rows[simulated_errors.index(min(simulated_errors))]["name"] if simulated_rows else None},
        "per_run": table,
        "band_per_run": band_per_run,
        "run_gpus": [{"name": row["name"], "gpu": row["gpu"]} for row in rows],
    }


def simulated_check(runs: list[dict]) -> dict:
    """The plan with the allocator simulated (planner/step_trace.py) against each measured run.
    Nothing is fitted, so every error is on a run the simulation never saw; the band's constants
    for run i come from the other runs' errors."""
    per_run = []
    for run in runs:
        options = {k: v for k, v in run["options"].items() if k not in ("gpu", "gpu_memory_gib")}
        plan = build_plan(_spec(run), TrainingOptions(gpu_memory_gib=4096, simulate_allocator=True, **options), config=run.get("model_config"))
        if plan.reserve_source != "simulated":
            per_run.append({"name": run["name"], "simulated": False, "why": next(a for a in plan.assumptions if "no simulation" in a)})
            continue
        measured = run["measured"]
        context = measured["outside_allocator"] if measured["outside_allocator"] is not None else calibration().cuda_context_bytes
        process = measured["peak_reserved"] + context
        central = plan.peak_bytes
        exact = sum(c.bytes for c in plan.components if is_static(c))
        per_run.append({"name": run["name"], "gpu": run.get("gpu", "?"), "simulated": True, "measured": process, "central": central, "exact": exact,
                        "error": (central - process) / process,
                        "over": (process - central) / central, "under": (process - central) / (central - exact)})
    done = [r for r in per_run if r["simulated"]]
    for i, row in enumerate(done):
        others = [r for j, r in enumerate(done) if j != i]
        low, high = band_constants([r["over"] for r in others], [r["under"] for r in others])
        dynamic = row["central"] - row["exact"]
        low_bytes = max(row["exact"], row["central"] + math.floor(row["central"] * low))
        high_bytes = row["central"] + math.ceil(dynamic * high)
        row.update(low=low_bytes, high=high_bytes, inside=low_bytes <= row["measured"] <= high_bytes,
                   above_high=max(0.0, (row["measured"] - high_bytes) / high_bytes), width=(high_bytes - low_bytes) / row["central"])
    low, high = band_constants([r["over"] for r in done], [r["under"] for r in done])
    return {
        "band": {"peak_low": low, "dynamic_high": high, "runs": len(done)},
        "central": summary([r["error"] for r in done]),
        "band_leave_one_out": {
            "runs": len(done), "inside": sum(r["inside"] for r in done),
            "worst_above_high": round(max(r["above_high"] for r in done), 4),
            "median_width_single_gpu": round(statistics.median(r["width"] for r in done), 4),
            "widest_single_gpu": round(max(r["width"] for r in done), 4),
        },
        "per_run": [{k: (round(v / GIB, 2) if k in ("measured", "central", "exact", "low", "high") else round(v, 4) if isinstance(v, float) else v)
                     for k, v in r.items()} for r in per_run],
        "not_simulated": [r["name"] for r in per_run if not r["simulated"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, default=[DEFAULT_RUNS])
    parser.add_argument("--name", default=None, help="the calibration's name (default: runs-<date>)")
    parser.add_argument("--dry-run", action="store_true", help="print, write nothing")
    parser.add_argument("--calibration-file", type=Path, default=CALIBRATION_FILE, help="where the planner's constants go")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results", help="where calibration-<date>.json and band-<date>.md go")
    parser.add_argument("--no-simulate", action="store_true", help="skip the simulated allocator's check (a few seconds a run)")
    committed = sorted((ROOT / "bench" / "results").glob("simulated-matrix-*.jsonl"))
    parser.add_argument("--simulated-rows", type=Path, default=committed[-1] if committed else None, metavar="FILE",
                        help="simulated steps the band must also hold (default: the newest bench/results/simulated-matrix-*.jsonl)")
    parser.add_argument("--no-simulated-rows", action="store_true", help="a band from the measured runs alone")
    args = parser.parse_args(argv)

    rows = [plan_inputs(run) for run in load_runs(args.runs)]
    date = datetime.date.today().isoformat()
    name = args.name or f"{len(rows)}-runs-{date}"
    simulated_rows = [] if args.no_simulated_rows or args.simulated_rows is None else [plan_inputs(run) for run in load_runs([args.simulated_rows])]
    result = refit(rows, name, date, [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in args.runs], simulated_rows)
    for row in result["per_run"]:
        print(f"{row['name']:<36} measured {row['measured_process_gib']:6.2f} GiB  before {row['before_error']:+6.1%}  "
              f"after (left out) {row['after_error_left_out']:+6.1%}")
    print(json.dumps({k: result[k] for k in ("name", "constants", "before", "after_leave_one_out", "band", "band_leave_one_out")}, indent=2))
    if not args.no_simulate:
        print("simulating the allocator over each run's traced step...", file=sys.stderr, flush=True)
        from published import calibration_rows, skipped_traced_cases

        # published runs of the stack the trace reproduces (many steps of variable-length data)
        # join the fixed-shape ones: the band is held to real data too
        result["simulated"] = simulated_check(load_runs(args.runs) + calibration_rows())
        result["simulated"]["published_skipped"] = [{"id": case_id, "why": why} for case_id, why in skipped_traced_cases()]
        for row in result["simulated"]["per_run"]:
            print(f"{row['name']:<36} simulated " + (f"{row['error']:+6.1%}" if row["simulated"] else f"no: {row['why']}"))
        print(json.dumps({k: v for k, v in result["simulated"].items() if k != "per_run"}, indent=2))
    if args.dry_run:
        return 0
    args.calibration_file.write_text(json.dumps({
        "name": name,
        "description": f"fitted by bench/calibrate.py on {len(rows)} measured runs ({', '.join(result['runs'])}) on {date}",
        "constants": result["constants"],
        "band": result["band"],
        "leave_one_out": result["after_leave_one_out"],
        "band_leave_one_out": {k: v for k, v in result["band_leave_one_out"].items() if k != "goals"},
        **({"simulated_band": {**result["simulated"]["band"], "central": result["simulated"]["central"],
                               "band_leave_one_out": result["simulated"]["band_leave_one_out"]}} if "simulated" in result else {}),
    }, indent=2) + "\n")
    out = args.results_dir / f"calibration-{date}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    report = args.results_dir / f"band-{date}.md"
    report.write_text(band_report(result))
    print(f"wrote {args.calibration_file}, {out} and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
