"""bench/gpu_runs.py, the device check: its runs must plan and its rows must refit, before a GPU
session spends its minutes on them. The measurement itself needs CUDA (absent here and in CI)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import calibrate
import gpu_runs


def test_run_names_are_unique_and_the_quick_set_covers_what_the_committed_runs_lack():
    names = [run.name for run in gpu_runs.MATRIX]
    assert len(names) == len(set(names))
    quick = [run.options for run in gpu_runs.MATRIX[: gpu_runs.QUICK]]
    assert any(o.get("allocator") == "expandable_segments" for o in quick)
    assert any(o["trainer"] == "trl" for o in quick)
    assert any(o.get("autocast", True) and o["trainer"] == "hf" for o in quick)
    assert any(o["optimizer"] == "paged_adamw_8bit" for o in quick)


@pytest.mark.parametrize("run", gpu_runs.MATRIX, ids=lambda run: run.name)
def test_every_run_has_its_config_and_its_row_refits(run):
    """A row in the form the script writes goes through bench/calibrate.py's planning as it is."""
    assert run.config_file.is_file()
    measured = {"peak_allocated": 10 * 2**30, "peak_reserved": 11 * 2**30, "outside_allocator": 2**30, "step_seconds": 1.0}
    row = gpu_runs.calibration_row(run, measured, "NVIDIA H200", {"torch": torch.__version__}, "2026-11-28")
    inputs = calibrate.plan_inputs(row)
    assert inputs["allocated"] > 0 and inputs["measured_process"] == 12 * 2**30
    assert inputs["gpu"] == "NVIDIA H200" and inputs["num_gpus"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the script would measure")
def test_without_a_gpu_the_script_says_so_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_runs.py"), "--quick"], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["gpu_runs: no CUDA GPU here: nothing to measure (run this on the GPU machine)"]


@pytest.mark.parametrize("name", ["l1b-lora16all-b4s2048-gc-trl", "l1b-lora16all-b8s2048-gc-hf-autocast", "l1b-qlora16all-b2s2048-gc-trl",
                                  "l1b-dora16all-b4s1024-gc-trl", "l1b-lora16all-b2s2048-trl", "l1b-full-b4s1024-gc-hf-paged8bit",
                                  "l1b-full-b4s1024-gc-trl-ga2"])
def test_the_training_steps_run_on_cpu_with_a_tiny_model_of_the_same_family(name):
    """The code a GPU session would run, end to end on CPU (the model shrunk, the batch one short
    sequence): a broken step costs here seconds, there a share of fifteen minutes."""
    from dataclasses import replace

    from tests.conftest import TINY

    run = gpu_runs.run_by_name(name)
    small = replace(run, options=dict(run.options, batch_size=1, seq_len=16))
    assert gpu_runs.train_steps(small, "cpu", config=dict(TINY["llama"])) > 0


def test_the_capped_runs_sit_either_side_of_the_least_pool_the_replay_predicts():
    """The release-and-retry check: one run capped just above the least pool the planner's replay
    gives (it should survive), one below (it should run out of memory), where the reserved peak a
    larger card shows is above both."""
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.step_trace import simulated_for

    above, below = (gpu_runs.run_by_name(f"l1b-lora16all-b8s2048-gc-hf-autocast-cap{n}") for n in ("102", "095"))
    assert above.cap > 1 > below.cap and above.options == below.options
    least = gpu_runs.predicted_least_pool(above)
    options = {k: v for k, v in above.options.items() if k in TrainingOptions.model_fields} | {"lora_targets": above.options["lora_targets"].split(",")}
    step = simulated_for(load_catalog_spec(above.model), TrainingOptions(simulate_allocator=True, gpu_memory_gib=4096, **options))
    assert step.peaks.peak_allocated <= least < step.peaks.peak_reserved
    assert above.cap * least < step.peaks.peak_reserved
