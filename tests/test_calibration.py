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
from planner.runtime import band_bytes, calibration  # noqa: E402

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


def _refit() -> dict:
    rows = [calibrate.plan_inputs(run) for run in calibrate.load_runs([calibrate.DEFAULT_RUNS])]
    matrix = max((ROOT / "bench" / "results").glob("simulated-matrix-*.jsonl"))
    simulated = [calibrate.plan_inputs(run) for run in calibrate.load_runs([matrix])]
    return calibrate.refit(rows, "test", "2026-11-28", ["runs"], simulated)


def test_the_band_holds_the_simulated_steps_of_larger_models():
    """bench/simulate_matrix.py's rows (0.5B-13B, the allocator model over traced steps) are not
    fitted, but the committed band covers every one of them: the measured runs reach 1.5B only."""
    result = _refit()
    assert result["band"]["simulated_rows"] > 100
    final = calibrate._calibration("t", result["constants"]["cuda_context_bytes"], [
        result["constants"]["reserve_floor_bytes"], result["constants"]["reserve_per_recompute_byte"], result["constants"]["reserve_per_logits_byte"]])
    matrix = max((ROOT / "bench" / "results").glob("simulated-matrix-*.jsonl"))
    for row in (calibrate.plan_inputs(run) for run in calibrate.load_runs([matrix])):
        low, high = calibrate.band_of(row, final, result["band"]["peak_low"], result["band"]["dynamic_high"], result["band"]["gradients_high"])
        assert low <= row["measured_process"] <= high + 1, row["name"]


def test_the_committed_band_is_what_the_committed_runs_give():
    committed = json.loads((ROOT / "planner" / "calibration.json").read_text())["band"]
    band = _refit()["band"]
    assert (committed["peak_low"], committed["dynamic_high"], committed["runs"]) == (band["peak_low"], band["dynamic_high"], band["runs"])
    assert (calibration().band_low, calibration().band_high) == (band["peak_low"], band["dynamic_high"])


def test_the_band_covers_every_leave_one_out_error_it_was_made_from():
    result = _refit()
    low, high = result["band"]["peak_low"], result["band"]["dynamic_high"]
    assert low < 0 < high
    for run in result["per_run"]:
        # dynamic_error_left_out: predicted minus measured, relative to the dynamic part
        assert -run["dynamic_error_left_out"] <= high
        predicted, measured = run["after_gib"], run["measured_process_gib"]
        assert (measured - predicted) / predicted >= low - 0.002  # the GiB figures are rounded


def test_calibrate_writes_the_band_constants_and_its_report(tmp_path):
    target = tmp_path / "calibration.json"
    assert calibrate.main([str(calibrate.DEFAULT_RUNS), "--name", "t", "--calibration-file", str(target), "--results-dir", str(tmp_path), "--no-simulate"]) == 0
    written = json.loads(target.read_text())
    assert set(written["band"]) >= {"peak_low", "dynamic_high", "runs"} and written["band"]["runs"] == 22
    assert written["band"]["peak_low"] < 0 < written["band"]["dynamic_high"]
    assert {"coverage", "worst_above_high", "median_width_single_gpu"} <= set(written["band_leave_one_out"])
    output = json.loads(next(tmp_path.glob("calibration-*.json")).read_text())
    assert output["band"] == written["band"] and len(output["band_per_run"]) == 22
    report = next(tmp_path.glob("band-*.md")).read_text()
    assert f"{output['band_leave_one_out']['inside']} of 22" in report and "goal" in report


def test_the_band_leaves_exact_memory_exact():
    """Weights, gradients and optimizer state are exact: the high end scales only the rest, and
    the low end never goes below the exact part."""
    from planner.components import Component

    cal = calibrate._calibration("t", 0, [0, 0, 0])
    cal = type(cal)(**{**cal.__dict__, "band_low": -0.5, "band_high": 0.25})
    static = [Component("weights.base", 8 * GIB, "w"), Component("optimizer_state", 4 * GIB, "o")]
    dynamic = [Component("activations.layers", 3 * GIB, "a"), Component("runtime.allocator", 1 * GIB, "r")]
    low, high = band_bytes(static + dynamic, cal)
    assert high == 16 * GIB + 1 * GIB  # a quarter of the 4 GiB dynamic part
    assert low == 12 * GIB  # half of 16 GiB would be below the exact 12 GiB


def test_a_plan_carries_the_band_of_the_committed_calibration():
    plan = build_plan(load_catalog_spec("meta-llama/Llama-2-13b-hf"), TrainingOptions(method="qlora", gpu="RTX 4000 Ada", batch_size=4))
    gradients = sum(c.bytes for c in plan.all_components if c.family == "gradients")
    assert (plan.peak_low_bytes, plan.peak_high_bytes) == band_bytes(plan.components, gradients_bytes=gradients)
    assert plan.peak_low_bytes < plan.peak_bytes < plan.peak_high_bytes
    assert any(a.startswith("band ") and calibration().name in a for a in plan.assumptions)


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
    # not planned lower until a GPU run measures it: the simulated allocator reserves about as much
    assert expandable.peak_bytes == default.peak_bytes


def test_expandable_segments_grow_one_segment_where_the_default_reserves_anew():
    """The allocator model's two settings on the same requests: two freed 50 MiB blocks cannot
    serve 80 MiB in separate segments, but do at the end of one expandable segment."""
    from planner.allocator import replay

    mib = 1 << 20
    events = [("alloc", 1, 50 * mib), ("alloc", 2, 50 * mib), ("free", 1), ("free", 2), ("alloc", 3, 80 * mib)]
    assert replay(events, "default").peak_reserved == 180 * mib
    # pages of 20 MiB: 60 mapped for the first block, 40 more extend its free 10 MiB tail to the
    # second, and the 80 MiB request fits in the two merged again
    assert replay(events, "expandable_segments").peak_reserved == 100 * mib


def test_runs_a_team_launched_refit_the_model(tmp_path, capsys):
    """`vramplan runs export` rows join the committed runs in `bench/calibrate.py` (refit from real runs)."""
    from app.cli import main
    from tests.test_launcher_store import _row
    from launcher.supervisor import Supervisor

    supervisor = Supervisor(tmp_path / "data")
    run_id = "f" * 32
    run_dir = supervisor.runs_root / run_id
    run_dir.mkdir()
    options = TrainingOptions(method="lora", batch_size=4, seq_len=1024, gpu="H100").model_dump(mode="json")
    row = _row(run_id, run_dir, state="starting", handle_json=json.dumps({"backend": "local", "data": {"pid": 999999999, "create_time": 1.0, "pgid": 1, "marker": run_id}}))
    spec = json.loads(row["spec_json"])
    spec.update(model={"kind": "hub", "location": "meta-llama/Llama-3.2-1B"}, options=options)
    row["spec_json"] = json.dumps(spec)
    supervisor.store.create(row)
    events = [{"event": "train_begin", "rank": 0, "max_steps": 3, "gpu_name": "NVIDIA H100 80GB HBM3", "cuda_context": 1307377664},
              {"event": "log", "rank": 0, "step": 3, "loss": 1.0, "max_memory_reserved": 12 * GIB, "max_memory_allocated": 10 * GIB}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps({"run_id": run_id, "t": 1.0, **e}) + "\n" for e in events))
    (run_dir / "exit.json").write_text('{"exit_code": 0}')
    assert supervisor.refresh(run_id).state == "succeeded"
    exported = tmp_path / "team-runs.jsonl"
    assert main(["runs", "export", "--out", str(exported), "--data-dir", str(tmp_path / "data")]) == 0
    capsys.readouterr()

    team = calibrate.load_runs([exported])
    inputs = calibrate.plan_inputs(team[0])
    assert inputs["measured_process"] == 12 * GIB + 1307377664
    target = tmp_path / "calibration.json"
    assert calibrate.main([str(calibrate.DEFAULT_RUNS), str(exported), "--name", "team", "--calibration-file", str(target), "--results-dir", str(tmp_path), "--no-simulate"]) == 0
    written = json.loads(target.read_text())
    assert written["name"] == "team" and written["band"]["runs"] == 23
