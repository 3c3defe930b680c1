"""Gradient accumulation is planned: from the second micro-batch on, the gradients of the previous
ones stay allocated through the forward and backward, so a full fine-tune's peak rises with it, in
the formula and in the traced step alike; the advice, the fixes, the exports and the launched run
carry the accumulation their plan was made with."""

from __future__ import annotations

import json

import pytest

from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan

MODEL = "Qwen/Qwen2.5-0.5B"
GIB = 1 << 30


def _plan(simulate: bool, **changes):
    options = {"method": "full", "batch_size": 1, "seq_len": 512, "gpu": "H100", "simulate_allocator": simulate, **changes}
    return build_plan(load_catalog_spec(MODEL), TrainingOptions(**options))


@pytest.mark.parametrize("simulate", [False, True], ids=["formula", "traced"])
def test_accumulation_raises_a_full_fine_tunes_peak_by_the_gradients(simulate):
    alone, accumulating, more = (_plan(simulate, gradient_accumulation_steps=n) for n in (1, 2, 16))
    gradients = sum(c.bytes for c in alone.all_components if c.family == "gradients")
    assert accumulating.reserve_source == ("simulated" if simulate else "formula")
    # the second micro-batch's forward and backward run beside the first's gradients (bf16, 0.5 B
    # parameters: 0.9 GiB)
    assert accumulating.peak_bytes - alone.peak_bytes > 0.4 * gradients
    assert accumulating.peak_bytes <= alone.peak_bytes + gradients + (256 << 20)
    # more micro-batches hold no more than two
    assert more.peak_bytes == accumulating.peak_bytes
    assert any("gradient accumulation 2" in a for a in accumulating.assumptions)
    if not simulate:
        assert {c.name for c in accumulating.components} >= {"gradients.layers", "activations.checkpoints"}


def test_the_advice_plans_the_accumulation_it_recommends():
    from planner.advisor import Task, advise

    advice = advise(load_catalog_spec("meta-llama/Llama-3.1-8B"), Task(), TrainingOptions(method="qlora", gpu="RTX 4000 Ada", seq_len=2048))
    settings = advice.settings
    assert settings["gradient_accumulation_steps"] > 1
    assert advice.plan.options.gradient_accumulation_steps == settings["gradient_accumulation_steps"]
    assert advice.plan.options.batch_size == settings["batch_size"]


def test_the_smaller_batch_fix_plans_with_its_accumulation():
    from planner.fit import smallest_fixes

    report = smallest_fixes(load_catalog_spec("meta-llama/Llama-3.2-1B"), TrainingOptions(method="full", gpu="RTX 4090", batch_size=16, seq_len=2048))
    fix = next(f for f in report.fixes if f.lever == "smaller_micro_batch")
    options = fix.plan.options
    assert options.batch_size * options.gradient_accumulation_steps >= 16 and options.gradient_accumulation_steps > 1
    assert f"gradient accumulation {options.gradient_accumulation_steps}" in fix.description


def test_the_cli_plans_and_exports_the_accumulation(capsys):
    from app.cli import main

    assert main(["plan", MODEL, "--json", "--method", "full", "--gradient-accumulation-steps", "4", "--no-simulate-allocator"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["options"]["gradient_accumulation_steps"] == 4
    assert main(["export", MODEL, "--format", "trl", "--gradient-accumulation-steps", "4", "--no-simulate-allocator"]) == 0
    assert "gradient_accumulation_steps: 4" in capsys.readouterr().out


def test_a_run_stored_with_accumulation_as_a_setting_keeps_it():
    from launcher.spec import LaunchSpec, RunSettings, launch_spec

    plan = build_plan(load_catalog_spec(MODEL), TrainingOptions(simulate_allocator=False))
    stored = json.loads(launch_spec(plan, MODEL, RunSettings(dataset="org/data", output_dir="out"), device="cuda").model_dump_json())
    del stored["options"]["gradient_accumulation_steps"]
    stored["settings"]["gradient_accumulation_steps"] = 6  # as runs stored before it was a plan option
    assert LaunchSpec.model_validate(stored).options["gradient_accumulation_steps"] == 6
