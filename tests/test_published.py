"""bench/published.py: published measured runs mapped to plan options, and its committed results current."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import published


def _cases() -> dict:
    return {c["id"]: c for c in published.load_cases()}


def test_a_peft_benchmark_lora_case_maps_to_its_published_config():
    case = _cases()["PMC-1"]
    assert published.skip_reason(case) is None and published.metric_of(case) == "reserved"
    opts = published.options_for(case)
    assert (opts.method, opts.batch_size, opts.seq_len, opts.gradient_checkpointing) == ("lora", 4, 768, False)
    assert (opts.lora_r, opts.lora_targets, opts.lora_dropout) == (32, ["q_proj", "v_proj"], 0.0)
    assert (opts.weights_dtype, opts.precision, opts.gpu, opts.num_gpus) == ("bf16", "bf16", "NVIDIA L40S", 1)


def test_a_fsdp_qlora_case_maps_to_two_sharded_gpus():
    case = _cases()["AAI-1"]
    opts = published.options_for(case)
    assert (opts.method, opts.batch_size, opts.seq_len, opts.gradient_checkpointing) == ("qlora", 1, 512, True)
    assert (opts.num_gpus, opts.parallelism, opts.offload) == (2, "fsdp", "none")
    assert (opts.lora_r, opts.lora_dropout) == (64, 0.1)
    assert opts.lora_targets == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_full_fine_tune_case_is_compared_as_allocated_and_as_nvml():
    case = _cases()["FMS-2"]
    opts = published.options_for(case)
    assert (opts.method, opts.batch_size, opts.seq_len, opts.gradient_checkpointing, opts.attention) == ("full", 4, 4096, True, "flash")
    rows, _ = published.evaluate([case])
    assert [(r["id"], r["metric"]) for r in rows] == [("FMS-2", "allocated"), ("FMS-2/nvml", "nvml")]
    assert rows[0]["in_band"] is None and rows[1]["in_band"] is not None


def test_cases_without_a_stated_metric_are_skipped_with_a_reason():
    assert published.skip_reason(_cases()["QW-1"]).startswith("metric not stated")
    assert "not in the catalog" in published.skip_reason(_cases()["FMS-1"])


def test_the_committed_results_are_what_the_script_gives_now():
    text_json, text_md = published.render(published.results())
    assert json.loads(published.RESULTS_JSON.read_text()) == json.loads(text_json)
    assert published.RESULTS_MD.read_text() == text_md


def test_the_accuracy_page_and_the_readmes_summary_are_what_validate_writes():
    """docs/accuracy.md holds every row; README.md a summary of them and a link.
    Both must be what bench/validate.py makes from the committed results now: the GPU rows from the
    calibration's leave-one-out file, the CPU rows from the committed CPU measurement."""
    import validate

    cpu = sorted(ROOT.glob("bench/results/cpu-20*.json"))[-1]
    committed = json.loads(cpu.read_text())
    rows = validate.process_peak_rows() + validate.calibration_rows() + committed["cpu_step_peak"] + committed["cpu"]
    assert validate.ACCURACY_DOC.read_text() == validate.accuracy_doc(rows)
    readme = (ROOT / "README.md").read_text()
    summary = validate.readme_table(rows)
    assert summary in readme and "docs/accuracy.md" in summary
    # the summary is short: the whole table lives in the docs
    assert summary.count("\n| ") < 10 and validate.accuracy_doc(rows).count("\n| ") > 100
