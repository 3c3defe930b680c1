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
    unknown = dict(_cases()["FMS-1"], model="acme/unreleased-7b")
    assert "not in the catalog" in published.skip_reason(unknown)


def test_cases_of_models_the_catalog_gained_are_planned_with_their_own_shapes():
    """SantaCoder (GPT-BigCode, multi-query), Yi-34B and Mistral-7B v0.1/v0.2 (32,000-token
    vocabulary, not v0.3's 32,768) were skipped or planned as look-alikes before they joined."""
    rows, skipped = published.evaluate([_cases()[i] for i in ("FMS-1", "AAI-3", "FMS-2", "AAI-5")])
    assert not skipped
    planned_as = {row["case"]: row["planned_as"] for row in rows}
    assert planned_as == {"FMS-1": "bigcode/gpt_bigcode-santacoder", "AAI-3": "01-ai/Yi-34B",
                          "FMS-2": "mistralai/Mistral-7B-v0.1", "AAI-5": "mistral-community/Mistral-7B-v0.2"}
    assert not any("v0.3" in note for row in rows for note in row["notes"])


def test_each_source_is_planned_with_the_loss_and_accumulation_it_ran():
    """fms-acceleration's runs ran transformers 4.48.1: ForCausalLMLoss's shifted fp32 copy for
    Llama and Mistral, GPT-BigCode's own cross-entropy on the bf16 logits; litgpt's chunked loss
    has no upcast and its LoRA weights are bf16; accumulation is planned as published."""
    cases = _cases()
    losses = {i: published.options_for(cases[i]).loss_implementation for i in ("FMS-1", "FMS-2", "FMS-4", "FMS-8", "LIT-3", "AAI-1", "PMC-1")}
    assert losses == {"FMS-1": "no_upcast", "FMS-2": "fp32_upcast_shifted", "FMS-4": "fp32_upcast_shifted", "FMS-8": "fp32_upcast_shifted",
                      "LIT-3": "no_upcast", "AAI-1": "auto", "PMC-1": "auto"}
    lit = published.options_for(cases["LIT-3"])
    assert (lit.gradient_accumulation_steps, lit.autocast_adapter_dtype) == (8, False)
    assert published.options_for(cases["TT-1"]).gradient_accumulation_steps == 64


def test_litgpt_runs_plan_lm_head_apart_from_the_embedding():
    """litgpt's GPT keeps its own lm_head: Llama 3.2 1B's tied checkpoint becomes two matrices there."""
    case = _cases()["LIT-3"]
    spec = published.spec_for(case, "meta-llama/Llama-3.2-1B")
    tied = published._spec("meta-llama/Llama-3.2-1B")
    assert tied.tie_word_embeddings and not spec.tie_word_embeddings
    assert spec.total_params - tied.total_params == 128_256 * 2048
    # a source that builds the checkpoint as it is keeps it tied
    assert published.spec_for(_cases()["PMC-1"], "meta-llama/Llama-3.2-1B") is tied


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


def test_cases_are_grouped_by_the_stack_and_method_they_state():
    cases = _cases()
    assert published.stack_of(cases["PMC-1"]) == "single GPU"
    assert published.stack_of(cases["QW-3"]) == "ZeRO-2" and published.stack_of(cases["PD-2"]) == "ZeRO-3"
    assert published.stack_of(cases["TT-4"]) == "FSDP1" and published.stack_of(cases["TT-7"]) == "FSDP2"
    assert published.stack_of(cases["AAI-1"]) == "FSDP (version not stated)"
    assert published.offloads(cases["AAI-4"]) and published.offloads(cases["TT-7"]) and not published.offloads(cases["AAI-1"])
    assert [published.method_of(cases[i]) for i in ("PMC-3", "PMC-1", "PMC-2", "AAI-1", "PMC-5")] == ["full", "LoRA", "DoRA", "QLoRA", "other PEFT"]
    groups = published.groupings(list(cases.values()))
    # the stacks (but the two gathering groups) and the methods each partition the cases
    stacks = [ids for name, ids in groups["stack"].items() if name not in ("CPU offload", "all multi-GPU")]
    assert sum(map(len, stacks)) == len(cases) == len(set().union(*stacks))
    assert sum(map(len, groups["method"].values())) == len(cases)
    assert groups["stage"] == {"SFT": set(cases)}


def test_a_group_counts_verdicts_and_band_misses_from_its_rows():
    rows = [{"id": "A", "case": "A", "error": -0.05, "in_band": False, "above_high": 0.04, "measured_bytes": 105, "low_bytes": 90, "high_bytes": 101},
            {"id": "A/allocated", "case": "A", "error": 0.02, "in_band": None, "above_high": None, "measured_bytes": 100, "low_bytes": None, "high_bytes": None},
            {"id": "B", "case": "B", "error": 0.20, "in_band": False, "above_high": 0.0, "measured_bytes": 80, "low_bytes": 90, "high_bytes": 110}]
    verdicts = {"A": {"verdict": "fits"}, "B": {"verdict": "does not fit"}}
    g = published.group_figures(rows, verdicts, {"A", "B", "C"})
    assert (g["cases"], g["planned"], g["skipped"], g["rows"]) == (3, 2, 1, 3)
    assert (g["median_abs_error"], g["worst_under"]["id"], g["worst_over"]["id"], g["within_10pct"]) == (0.05, "A", "B", 2)
    assert (g["band_rows"], g["in_band"], g["above_high_over_3pct"], g["below_low"]) == (2, 0, 1, 1)
    assert g["wrong_verdicts"] == ["B"] and g["tight_verdicts"] == []
    assert published.goals_met(g) == dict.fromkeys(published.GOALS, False)


def test_the_committed_by_stack_report_is_current_and_starts_before_the_fixes():
    """The planner now ('after') and the option what-ifs are recomputed; the earlier commits'
    figures are the committed ones (python bench/published.py --history re-takes them)."""
    res = published.by_stack()
    committed = json.loads(published.BY_STACK_JSON.read_text())
    assert committed == json.loads(json.dumps(res))
    assert published.BY_STACK_MD.read_text() == published.by_stack_markdown(res)
    assert [step["commit"] for step in committed["history"]] == [commit for commit, _ in published.HISTORY]
    assert committed["history"][0]["commit"] == "2efa107"


def test_the_checkpoint_is_mapped_as_each_source_ran_it():
    """fms-acceleration's transformers 4.48.1 checkpointed reentrant around each FSDP1 unit (FMS-8's
    held layer inputs: -19.9% allocated without them); Answer.AI's fsdp_qlora checkpoints reentrant
    inside each unit; a single-GPU fms run is reentrant with no FSDP unit around it."""
    cases = _cases()
    fms8, aai1, fms2 = (published.options_for(cases[name]) for name in ("FMS-8", "AAI-1", "FMS-2"))
    assert fms8.reentrant_checkpoint_around_fsdp_unit and fms8.effective_use_reentrant
    assert aai1.use_reentrant and not aai1.reentrant_checkpoint_around_fsdp_unit
    assert fms2.use_reentrant and not fms2.reentrant_checkpoint_around_fsdp_unit
    rows, _ = published.evaluate([cases["FMS-8"]])
    allocated = next(r for r in rows if r["id"] == "FMS-8")
    assert abs(allocated["error"]) < 0.05, allocated
