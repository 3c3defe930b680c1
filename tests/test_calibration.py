"""The runtime constants: fitted from the committed measured runs, reproducibly, and used by plans."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import calibrate  # noqa: E402

from planner.catalog import load_catalog_spec  # noqa: E402
from planner.options import TrainingOptions  # noqa: E402
from planner.plan import build_plan  # noqa: E402
from planner.runtime import calibration  # noqa: E402

GIB = 1 << 30


def test_the_fit_recovers_known_constants():
    rows = [{"recompute": r * GIB, "logits": lg * GIB, "measured_reserve": int(0.5 * GIB + 1.25 * r * GIB + 0.2 * lg * GIB)}
            for r, lg in ((0, 2), (0.4, 2), (1.8, 8), (0.9, 9), (0, 9), (1.7, 1))]
    floor, per_recompute, per_logits = calibrate.fit_reserve(rows)
    assert floor == pytest.approx(0.5 * GIB, rel=1e-6) and per_recompute == pytest.approx(1.25) and per_logits == pytest.approx(0.2)


def test_the_fit_never_returns_a_negative_constant():
    # a reserve that shrinks as logits grow would fit these best with a negative slope
    rows = [{"recompute": 0, "logits": lg * GIB, "measured_reserve": int((3 - 0.2 * lg) * GIB)} for lg in (1, 2, 4, 8)]
    assert min(calibrate.fit_reserve(rows)) >= 0


def test_the_committed_calibration_is_what_the_committed_runs_give():
    """planner/calibration.json is the output of bench/calibrate.py on bench/results/calibration-runs.jsonl."""
    rows = [calibrate.plan_inputs(run) for run in calibrate.load_runs([calibrate.DEFAULT_RUNS])]
    floor, per_recompute, per_logits = calibrate.fit_reserve(rows)
    committed = json.loads((ROOT / "planner" / "calibration.json").read_text())["constants"]
    assert committed["reserve_floor_bytes"] == int(floor)
    assert committed["reserve_per_recompute_byte"] == round(per_recompute, 4)
    assert committed["reserve_per_logits_byte"] == round(per_logits, 4)


def test_checkpointing_and_large_logits_raise_the_reserve():
    spec = load_catalog_spec("Qwen/Qwen2.5-1.5B")

    def reserve(**options):
        plan = build_plan(spec, TrainingOptions(gpu="H100", trainer="hf", **options))
        return next(c.bytes for c in plan.all_components if c.name == "runtime.allocator")

    assert reserve(gradient_checkpointing=True) > reserve(gradient_checkpointing=False) > calibration().reserve_floor_bytes
    assert reserve(batch_size=8) > reserve(batch_size=1)


def test_a_plan_says_which_allocator_and_calibration_it_assumed():
    spec = load_catalog_spec("meta-llama/Llama-3.1-8B")
    default = build_plan(spec, TrainingOptions(gpu="H100"))
    expandable = build_plan(spec, TrainingOptions(gpu="H100", allocator="expandable_segments"))
    assert default.to_dict()["calibration"] == calibration().name
    assert any("default caching allocator" in a for a in default.assumptions)
    assert any("expandable_segments:True" in a for a in expandable.assumptions)
    assert expandable.peak_bytes < default.peak_bytes
