"""The simulator distilled into a formula (bench/distill.py, bench/distilled.py): the committed
coefficients are the fit of the committed traced rows; the planner computes, for a row's options,
the terms the fit saw and reproduces the fit's distilled figure for a measured run. Held to the H100
runs it was no better than the calibrated formula (bench/results/distill-2026-12-05.md), so a plan
keeps the calibrated reserve.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.runtime import calibration, reserve_inputs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import calibrate  # noqa: E402
import distill  # noqa: E402
from distilled import DISTILLED_FILE, distilled, features, not_applicable, predict, regime  # noqa: E402

GIB = 1 << 30
COMMITTED = json.loads(DISTILLED_FILE.read_text())


def _rows() -> list[dict]:
    return [json.loads(line) for line in (ROOT / COMMITTED["rows"]).read_text().splitlines() if line.strip()]


def _reserve(plan) -> int:
    return next(c.bytes for c in plan.components if c.name == "runtime.allocator")


def test_the_committed_coefficients_are_the_fit_of_the_committed_rows():
    rows = [r for r in _rows() if r["set"] == "matrix"]
    assert distill.fit_regimes(rows, tuple(COMMITTED["terms"])) == distilled().regimes
    assert distilled().name == f"distilled-{len(rows)}-traces-{distill.DATE}"
    assert len(rows) >= 60 and len({r["model"] for r in rows}) >= 8


def test_the_planner_reproduces_the_fits_figure_for_a_measured_run():
    name = "l1b-lora16all-b8s2048-gc"
    row = next(r for r in _rows() if r["name"] == name)
    run = next(r for r in distill.measured_runs() if r["name"] == name)
    spec = calibrate._spec(run)
    options = TrainingOptions(gpu_memory_gib=4096, **row["options"])
    assert not_applicable(spec, options) is None
    plan = build_plan(spec, options)
    terms = features(plan.all_components)
    assert terms == {k: row[k] for k in terms}  # the terms the fit saw, computed without torch
    peak = plan.peak_bytes - _reserve(plan) + predict(distilled().regimes[regime(row["gc"])], terms)
    result = json.loads(distill.RESULT_JSON.read_text())
    assert round(peak / GIB, 2) == next(p for p in result["per_run"] if p["name"] == name)["distilled_gib"]


def test_a_plan_keeps_the_calibrated_reserve():
    """Not wired in (no better than the calibrated formula on the measured runs): a single-GPU SFT
    plan the distillation covers still takes the calibrated reserve."""
    run = next(r for r in distill.measured_runs() if r["name"] == "l1b-lora16all-b8s2048-gc")
    plan = build_plan(calibrate._spec(run), TrainingOptions(gpu_memory_gib=4096, **run["options"]))
    assert _reserve(plan) == calibration().reserve_bytes(*reserve_inputs(list(plan.all_components)))
    assert not any("distilled" in a for a in plan.assumptions)
    assert json.loads(distill.RESULT_JSON.read_text())["better_than_calibrated_on_h100"] is False


def test_the_distillation_has_no_data_for_other_stages_or_several_gpus():
    run = next(r for r in distill.measured_runs() if r["name"] == "l1b-lora16all-b8s2048-gc")
    spec = calibrate._spec(run)
    assert not_applicable(spec, TrainingOptions(method="lora", stage="dpo")) is not None
    assert not_applicable(spec, TrainingOptions(method="full", num_gpus=2, parallelism="zero2")) is not None
    assert not_applicable(spec, TrainingOptions(method="dora")) is not None
