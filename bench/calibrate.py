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
out. Writes planner/calibration.json (unless --dry-run) and bench/results/calibration-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.catalog import load_catalog_spec  # noqa: E402
from planner.options import TrainingOptions  # noqa: E402
from planner.plan import build_plan  # noqa: E402
from planner.runtime import CALIBRATION_FILE, Calibration, calibration, reserve_inputs  # noqa: E402

GIB = 1 << 30
DEFAULT_RUNS = ROOT / "bench" / "results" / "calibration-runs.jsonl"
FEATURES = ("floor", "recompute", "logits")


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                runs.append(json.loads(line))
    return runs


def _spec(run: dict):
    if "model" in run:
        return load_catalog_spec(run["model"])
    from planner.introspect import spec_from_config

    return spec_from_config(dict(run["model_config"]), run["name"])


def plan_inputs(run: dict) -> dict:
    """What the fit needs from the plan of a run: allocated bytes at the peak and the reserve's
    inputs. The GPU is a large custom one, so no hardware rule or fit verdict interferes."""
    plan = build_plan(_spec(run), TrainingOptions(gpu_memory_gib=4096, **run["options"]))
    allocated = sum(c.bytes for c in plan.components if c.family != "runtime")
    recompute, logits = reserve_inputs(list(plan.all_components))
    measured = run["measured"]
    return {
        "name": run["name"],
        "allocated": allocated,
        "recompute": recompute,
        "logits": logits,
        "peak_before": plan.peak_bytes,
        "measured_allocated": measured["peak_allocated"],
        "measured_reserve": measured["peak_reserved"] - measured["peak_allocated"],
        "measured_process": measured["peak_reserved"] + measured["outside_allocator"],
        "outside_allocator": measured["outside_allocator"],
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


def summary(errors: list[float]) -> dict:
    return {
        "runs": len(errors),
        "median_abs_error": round(statistics.median(abs(e) for e in errors), 4),
        "worst_under": round(min(errors), 4),
        "worst_over": round(max(errors), 4),
        "more_than_5_percent_under": sum(e < -0.05 for e in errors),
        "within_10_percent": sum(abs(e) <= 0.10 for e in errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, default=[DEFAULT_RUNS])
    parser.add_argument("--name", default=None, help="the calibration's name (default: runs-<date>)")
    parser.add_argument("--dry-run", action="store_true", help="print, write nothing")
    args = parser.parse_args(argv)

    runs = load_runs(args.runs)
    rows = [plan_inputs(run) for run in runs]
    date = datetime.date.today().isoformat()
    name = args.name or f"{len(rows)}-runs-{date}"
    context = int(statistics.median(row["outside_allocator"] for row in rows))
    coef = fit_reserve(rows)

    before_errors, after_errors, table = [], [], []
    for i, row in enumerate(rows):
        # each run's "after" comes from a fit that never saw it
        held_out = _calibration(name, context, fit_reserve(rows[:i] + rows[i + 1:]))
        measured = row["measured_process"]
        before = (row["peak_before"] - measured) / measured
        loo = (predicted_process(row, held_out) - measured) / measured
        before_errors.append(before)
        after_errors.append(loo)
        table.append({"name": row["name"], "measured_process_gib": round(measured / GIB, 2),
                      "before_gib": round(row["peak_before"] / GIB, 2), "before_error": round(before, 4),
                      "after_gib": round(predicted_process(row, held_out) / GIB, 2), "after_error_left_out": round(loo, 4),
                      "allocated_error": round((row["allocated"] - row["measured_allocated"]) / row["measured_allocated"], 4)})
        print(f"{row['name']:<36} measured {measured / GIB:6.2f} GiB  before {before:+6.1%}  after (left out) {loo:+6.1%}")
    result = {
        "name": name,
        "date": date,
        "runs": [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in args.runs],
        "constants": {"cuda_context_bytes": context, "reserve_floor_bytes": int(coef[0]),
                      "reserve_per_recompute_byte": round(coef[1], 4), "reserve_per_logits_byte": round(coef[2], 4)},
        "before": {"calibration": calibration().name, **summary(before_errors)},
        "after_leave_one_out": summary(after_errors),
        "per_run": table,
    }
    print(json.dumps({k: result[k] for k in ("name", "constants", "before", "after_leave_one_out")}, indent=2))
    if args.dry_run:
        return 0
    CALIBRATION_FILE.write_text(json.dumps({
        "name": name,
        "description": f"fitted by bench/calibrate.py on {len(rows)} measured runs ({', '.join(result['runs'])}) on {date}",
        "constants": result["constants"],
        "leave_one_out": result["after_leave_one_out"],
    }, indent=2) + "\n")
    out = ROOT / "bench" / "results" / f"calibration-{date}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {CALIBRATION_FILE.relative_to(ROOT)} and {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
