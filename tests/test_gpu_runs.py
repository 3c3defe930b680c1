"""bench/gpu_runs.py, the device check: its runs must plan and its rows must refit, before a GPU
session spends its minutes on them. The measurement itself needs CUDA (absent here and in CI)."""

import json
import math
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
    stepped = gpu_runs.train_steps(small, "cpu", config=dict(TINY["llama"]))
    assert stepped.seconds > 0
    micro_batches = run.steps * run.options.get("gradient_accumulation_steps", 1)
    assert len(stepped.losses) == micro_batches and all(math.isfinite(loss) and loss > 0 for loss in stepped.losses)
    assert stepped.lengths == [16] * micro_batches


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



# -- the runs this file's later additions cover: trainers, padding, memory history, libraries ------


def _tiny(run, **options):
    from dataclasses import replace

    return replace(run, options=dict(run.options, **options))


def test_the_matrix_has_the_trainers_padding_history_and_context_runs_on_their_bare_loops_configs():
    by_kind = {}
    for run in gpu_runs.MATRIX:
        by_kind.setdefault(run.kind, []).append(run)
    assert {"loop", "trainer", "sft", "dpo", "history", "context"} <= set(by_kind)
    loops = {run.name: run for run in by_kind["loop"]}
    # each trainer repeats a bare loop's plan options (DPO adds its stage by the planner's names)
    hf, sft, dpo = by_kind["trainer"][0], by_kind["sft"][0], by_kind["dpo"][0]
    assert hf.options == loops["l1b-lora16all-b8s2048-gc-hf-autocast"].options and hf.options["trainer"] == "hf"
    assert sft.options == loops["l1b-lora16all-b4s2048-gc-trl"].options
    assert dpo.options == loops["l1b-lora16all-b4s2048-gc-trl"].options | {"stage": "dpo", "beta": 0.1, "precompute_ref_log_probs": False}
    padded, fixed = gpu_runs.run_by_name("l1b-lora16all-b4s1024-gc-trl-padded40"), gpu_runs.run_by_name("l1b-lora16all-b4s1024-gc-trl-fixed40")
    assert padded.steps == fixed.steps == 40 and padded.options == fixed.options | {"padding": "longest"}
    assert by_kind["history"][0].steps == 2
    assert by_kind["context"][0].options == loops["l1b-lora16all-b4s2048-gc-trl"].options
    # the quick set is as it was: the first seven bare-loop runs
    assert all(run.kind == "loop" for run in gpu_runs.MATRIX[: gpu_runs.QUICK])


def test_the_default_set_is_estimated_under_ten_minutes_on_one_h100(capsys, monkeypatch):
    total = gpu_runs.estimate_total(gpu_runs.MATRIX)
    assert 300 < total < 600
    assert gpu_runs.estimate_total(gpu_runs.MATRIX[: gpu_runs.QUICK]) < 240
    # more tokens, more seconds; DPO's pairs and reference forward cost more than SFT on the same config
    by_name = {run.name: gpu_runs.estimate_seconds(run) for run in gpu_runs.MATRIX}
    assert by_name["l1b-lora16all-b4s2048-gc-trl-dpotrainer"] > by_name["l1b-lora16all-b4s2048-gc-trl-sfttrainer"]
    assert by_name["l1b-lora16all-b4s1024-gc-trl-fixed40"] > by_name["l1b-lora16all-b4s2048-gc-trl"]
    monkeypatch.setattr(sys, "argv", ["gpu_runs.py", "--estimate"])
    assert gpu_runs.main() == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(gpu_runs.MATRIX) + 1 and lines[-1].split()[0] == f"{total:.0f}"


def test_config_params_counts_llama_3_2_1b():
    config = json.loads(gpu_runs.run_by_name("l1b-lora16all-b4s2048-gc-trl").config_file.read_text())
    assert gpu_runs.config_params(config) == 1_235_814_400  # the published count (tied embeddings)


@pytest.fixture(scope="module")
def tokenizer():
    return gpu_runs.word_tokenizer()


def test_the_word_tokenizer_is_one_token_a_word_with_its_pad_token(tokenizer):
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 3 and tokenizer.eos_token_id == 2
    assert len(tokenizer) == 4 + gpu_runs.TOKENIZER_WORDS
    rows = gpu_runs.token_rows(tokenizer, 3, 17)
    assert [len(row) for row in rows] == [17] * 3 and len({tuple(row) for row in rows}) == 3
    assert all(4 <= token < len(tokenizer) for row in rows for token in row)
    pairs = gpu_runs.preference_rows(2, 16)
    for key in ("prompt", "chosen", "rejected"):
        assert len(pairs[key]) == 2
    # prompt and completion, with the EOS the DPOTrainer appends, fill the length exactly
    prompt = tokenizer(pairs["prompt"][0])["input_ids"]
    whole = tokenizer(pairs["prompt"][0] + pairs["chosen"][0] + tokenizer.eos_token)["input_ids"]
    assert len(whole) == 16 and whole[: len(prompt)] == prompt and whole[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["trainer", "sft", "dpo"])
def test_the_real_trainers_take_their_steps_on_cpu_and_name_their_settings(kind, tmp_path):
    """transformers' Trainer, TRL's SFTTrainer and DPOTrainer, as the GPU session runs them, on a
    tiny model of the same family: the steps ran, a loss came back, the settings are the trainer's."""
    from importlib.metadata import version

    from tests.conftest import TINY

    run = next(run for run in gpu_runs.MATRIX if run.kind == kind)
    small = _tiny(run, batch_size=2, seq_len=16)
    from dataclasses import replace

    small = replace(small, steps=2)
    trained = gpu_runs.trainer_steps(small, "cpu", config=dict(TINY["llama"]), workdir=tmp_path)
    assert trained.global_step == 2 and math.isfinite(trained.loss) and trained.seconds > 0
    settings = trained.settings
    assert settings["per_device_train_batch_size"] == 2 and settings["gradient_accumulation_steps"] == 1
    assert settings["optim"] == "adamw_torch_fused" and settings["bf16"] is True and settings["max_steps"] == 2
    assert settings.get("activation_checkpointing", settings.get("gradient_checkpointing")) is True
    json.dumps(settings)  # goes into the row as it is
    if kind == "trainer":
        assert trained.trainer == f"transformers {version('transformers')} Trainer"
        assert 3 < trained.loss < 6  # cross-entropy near ln(128) for random weights over the tiny vocabulary
    elif kind == "sft":
        assert trained.trainer == f"trl {version('trl')} SFTTrainer"
        assert settings["max_length"] == 16 and settings["packing"] is False and settings["padding_free"] is False
        assert 3 < trained.loss < 6
    else:
        assert trained.trainer == f"trl {version('trl')} DPOTrainer"
        assert settings["beta"] == 0.1 and settings["precompute_ref_log_probs"] is False and settings["max_length"] == 16
        # a fresh LoRA (B = 0) is its own reference: the sigmoid loss starts at ln 2
        assert abs(trained.loss - math.log(2)) < 0.01
    # its row: the planner's options (stage dpo for DPO), the trainer and its own names, trl's version
    measured = {"peak_allocated": 2**30, "peak_reserved": 2**31, "outside_allocator": 2**29, "step_seconds": trained.seconds,
                "observed": {"loss": trained.loss, "global_step": 2, "trainer": trained.trainer, "settings": settings}}
    row = gpu_runs.calibration_row(run, measured, "NVIDIA H100 80GB HBM3", gpu_runs.versions(), "2026-12-06")
    assert row["trainer"] == trained.trainer and row["trainer_settings"] == settings and row["observed"]["loss"] == trained.loss
    assert row["options"].get("stage", "sft") == ("dpo" if kind == "dpo" else "sft")
    assert row["versions"]["trl"] == version("trl") and row["kind"] == kind
    assert calibrate.plan_inputs(row)["allocated"] > 0


def test_padded_batches_pad_on_the_right_to_their_longest_row_with_a_mask():
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(8):
        ids, mask, labels, lengths = gpu_runs.padded_batch(4, 32, 128, generator)
        assert ids.shape == mask.shape == labels.shape == (4, max(lengths))
        assert mask.sum(dim=1).tolist() == lengths and all(4 <= n <= 32 for n in lengths)
        assert bool((mask[:, :-1] >= mask[:, 1:]).all())  # ones, then zeros: right padding
        assert bool((ids[mask == 0] == 0).all()) and bool((labels[mask == 0] == -100).all())
        assert bool((labels[mask == 1] == ids[mask == 1]).all()) and bool((ids[mask == 1] >= 3).all())
        seen.add(max(lengths))
    assert len(seen) > 1
    again = gpu_runs.padded_batch(4, 32, 128, torch.Generator().manual_seed(0))
    assert again[3] == gpu_runs.padded_batch(4, 32, 128, torch.Generator().manual_seed(0))[3]


def test_the_padded_run_takes_steps_of_varying_lengths_and_its_control_full_ones():
    """The matrix's runs take 40 steps each (test above); here 12, on two shared CPU cores."""
    from dataclasses import replace

    from tests.conftest import TINY

    run = replace(_tiny(gpu_runs.run_by_name("l1b-lora16all-b4s1024-gc-trl-padded40"), batch_size=2, seq_len=32), steps=12)
    padded = gpu_runs.train_steps(run, "cpu", config=dict(TINY["llama"]))
    assert len(padded.lengths) == len(padded.losses) == 12
    assert len(set(padded.lengths)) > 3 and max(padded.lengths) <= 32 and min(padded.lengths) < 32
    assert all(math.isfinite(loss) for loss in padded.losses)
    control = replace(_tiny(gpu_runs.run_by_name("l1b-lora16all-b4s1024-gc-trl-fixed40"), batch_size=2, seq_len=32), steps=3)
    assert gpu_runs.train_steps(control, "cpu", config=dict(TINY["llama"])).lengths == [32] * 3
    # the padded row says so by the planner's names, and keeps its batches' lengths
    run = gpu_runs.run_by_name("l1b-lora16all-b4s1024-gc-trl-padded40")
    measured = {"peak_allocated": 2**30, "peak_reserved": 2**31, "outside_allocator": None, "observed": {"batch_lengths": padded.lengths}}
    row = gpu_runs.calibration_row(run, measured, "NVIDIA H100 80GB HBM3", {}, "2026-12-06")
    assert row["options"]["padding"] == "longest" and row["observed"]["batch_lengths"] == padded.lengths
    assert "over 40 steps" in row["metric"]
    from planner.options import TrainingOptions

    assert TrainingOptions(**{k: v for k, v in row["options"].items() if k in TrainingOptions.model_fields}).batch_layout == "padded"


# -- the memory history: recorded on the GPU, compared here -----------------------------------------


def test_events_from_a_snapshot_are_the_planners_form():
    snapshot = {"device_traces": [[
        {"action": "segment_alloc", "addr": 0, "size": 2 << 20},
        {"action": "alloc", "addr": 0, "size": 512},
        {"action": "alloc", "addr": 512, "size": 1024},
        {"action": "free_requested", "addr": 0, "size": 512},
        {"action": "free_completed", "addr": 0, "size": 512},
        {"action": "alloc", "addr": 0, "size": 512},  # the same address again: a new block, a new handle
        {"action": "free_requested", "addr": 4096, "size": 512},
        {"action": "free_completed", "addr": 4096, "size": 512},  # allocated before the recording
    ]]}
    events, earlier = gpu_runs.events_from_snapshot(snapshot)
    assert events == [("alloc", 1, 512), ("alloc", 2, 1024), ("free", 1), ("alloc", 3, 512)] and earlier == 1
    # a trace without completions frees at the request
    requested = {"device_traces": [[{"action": "alloc", "addr": 8, "size": 100}, {"action": "free_requested", "addr": 8, "size": 100}]]}
    assert gpu_runs.events_from_snapshot(requested) == ([("alloc", 1, 100), ("free", 1)], 0)
    assert gpu_runs.events_from_snapshot({"device_traces": []}) == ([], 0)


def test_compare_events_counts_bytes_peaks_and_the_first_divergence():
    a = [("alloc", 1, 1000), ("alloc", 2, 3000), ("free", 1), ("alloc", 3, 512), ("free", 2), ("free", 3)]
    # the same blocks numbered otherwise, sizes within the allocator's 512-byte rounding
    b = [["alloc", 7, 1024], ["alloc", 9, 2600], ["free", 7], ["alloc", 4, 100], ["free", 9], ["free", 4]]
    same = gpu_runs.compare_events(a, b)
    assert same["same"] and same["first_divergence"] is None and same["peak_live_ratio"] == 1.0
    assert same["expected"] == {"allocs": 3, "frees": 3, "unmatched_frees": 0, "bytes_allocated": 1024 + 3072 + 512,
                                "peak_live_bytes": 1024 + 3072, "live_at_end_bytes": 0}
    # a larger block at the second event, then a free the measured list never allocated
    c = [("alloc", 1, 1000), ("alloc", 2, 9000), ("free", 1), ("free", 99), ("alloc", 3, 512), ("free", 2)]
    differ = gpu_runs.compare_events(a, c)
    assert not differ["same"] and differ["first_divergence"] == {"index": 1, "expected": ["alloc", 2, 3072], "measured": ["alloc", 2, 9216]}
    assert differ["measured"]["unmatched_frees"] == 1 and differ["measured"]["peak_live_bytes"] == 1024 + 9216
    assert differ["measured"]["live_at_end_bytes"] == 512 and differ["peak_live_ratio"] == round((1024 + 9216) / (1024 + 3072), 4)
    # one list a prefix of the other: they part where the shorter ends
    assert gpu_runs.compare_events(a, a[:4])["first_divergence"] == {"index": 4, "expected": ["free", 2], "measured": None}
    assert gpu_runs.compare_events([], [])["same"]


def test_the_planners_trace_compared_with_itself_and_with_one_free_late():
    from dataclasses import replace

    from tests.conftest import TINY

    run = replace(_tiny(gpu_runs.run_by_name("l1b-lora16all-b2s1024-gc-trl-history"), batch_size=1, seq_len=16))
    events, built = gpu_runs.planner_trace_events(dict(TINY["llama"]), run.options)
    assert built > 0 and all(event[0] == "alloc" for event in events[:built])  # the built model's parameters and buffers
    steps = events[built:]
    same = gpu_runs.compare_events(steps, steps)
    assert same["same"] and same["expected"]["allocs"] > 100 and same["expected"]["peak_live_bytes"] > 0
    # the optimizer's state and the batch stay live past the last step: the model's teardown is not in the list
    assert same["expected"]["live_at_end_bytes"] > 0 and same["expected"]["unmatched_frees"] == 0
    # through JSON, as the GPU's events come back, and through history_comparison, as the parent runs it
    assert gpu_runs.history_comparison(run, json.loads(json.dumps(steps)), config=dict(TINY["llama"]))["same"]
    first_free = next(i for i, event in enumerate(steps) if event[0] == "free")
    late = steps[:first_free] + steps[first_free + 1:] + [steps[first_free]]
    differ = gpu_runs.compare_events(steps, late)
    assert differ["first_divergence"]["index"] == first_free and differ["expected"]["allocs"] == differ["measured"]["allocs"]
    assert differ["measured"]["peak_live_bytes"] >= differ["expected"]["peak_live_bytes"]


def test_the_history_run_takes_two_steps_and_records_nothing_off_the_gpu(tmp_path):
    from tests.conftest import TINY

    run = _tiny(gpu_runs.run_by_name("l1b-lora16all-b2s1024-gc-trl-history"), batch_size=1, seq_len=16)
    stepped = gpu_runs.train_steps(run, "cpu", config=dict(TINY["llama"]), around_steps=gpu_runs.memory_history(tmp_path / "files", "cpu"))
    assert len(stepped.losses) == 2
    assert not (tmp_path / "files").exists()


def test_the_history_row_holds_the_recorded_events_to_the_planners_trace(tmp_path):
    """The parent's side on the GPU machine, for the matrix's own history run (a 1B trace, seconds)."""
    run = gpu_runs.run_by_name("l1b-lora16all-b2s1024-gc-trl-history")
    events, built = gpu_runs.planner_trace_events(gpu_runs._config_of(run, None), run.options)
    (tmp_path / "events.json").write_text(json.dumps({"events": events[built:], "frees_of_earlier_blocks": 3}))
    row = gpu_runs.history_row(run, tmp_path)
    assert row["frees_of_earlier_blocks"] == 3 and row["snapshot"].endswith("snapshot.pickle")
    assert row["comparison"]["same"] and row["comparison"]["expected"]["peak_live_bytes"] > 2**20
    (tmp_path / "events.json").write_text(json.dumps({"events": [["alloc", 1, 512]], "frees_of_earlier_blocks": 0}))
    assert gpu_runs.history_row(run, tmp_path)["comparison"]["first_divergence"]["index"] == 0


# -- the CUDA context with bitsandbytes and Triton ------------------------------------------------


def test_loading_the_libraries_runs_their_kernels_on_cpu():
    """On the GPU, a Triton kernel; here no Triton: a torch.compile'd function (aot_eager, no C++ compile)."""
    loaded = gpu_runs.load_libraries("cpu", compile_backend="aot_eager")
    import bitsandbytes

    assert loaded["bitsandbytes"] == bitsandbytes.__version__ and 0 < loaded["nf4_roundtrip_error"] < 0.2
    assert loaded["right"] is True and loaded["ran"] == "torch.compile (backend aot_eager)"


def test_the_context_row_keeps_the_figures_before_and_after_the_libraries():
    run = gpu_runs.run_by_name("l1b-lora16all-b4s2048-gc-trl-ctx")
    observed = {"outside_allocator_before_libraries": 500 << 20, "outside_allocator_after_libraries": 700 << 20,
                "libraries": {"bitsandbytes": "0.50.2", "triton": "3.5.0", "ran": "a Triton kernel", "right": True}}
    measured = {"peak_allocated": 2**30, "peak_reserved": 2**31, "outside_allocator": 720 << 20, "observed": observed}
    row = gpu_runs.calibration_row(run, measured, "NVIDIA H100 80GB HBM3", {}, "2026-12-06")
    assert row["measured"]["outside_allocator"] == 720 << 20 and row["observed"] == observed and row["kind"] == "context"
    assert calibrate.plan_inputs(row)["outside_allocator"] == 720 << 20
