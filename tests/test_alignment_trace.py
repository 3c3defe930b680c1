"""DPO and GRPO steps are traced as TRL 1.16's trainers run them (planner/stage_steps.py): DPO's
chosen and rejected rows in one batch and its reference forward (a frozen copy for a full
fine-tune, the adapter disabled for a PEFT one); GRPO's generation over batch_size x
steps_per_generation prompts into a growing KV cache before its training forward. Each test fails
if the trace goes back to running these stages as plain SFT steps."""

from __future__ import annotations

import pytest

from planner.catalog import load_catalog_spec
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.stages import kv_cache_bytes
from planner.step_trace import SimulationUnsupported, simulate_step, unsupported_reason

pytest.importorskip("trl")

# a small Llama, built from this config on the meta device (no weights, no hub)
TINY = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
PARAMETERS = 2048 * 256 * 2 + 2 * (4 * 256 * 256 + 3 * 256 * 704 + 2 * 256) + 256


def _step(**changes):
    options = {"method": "lora", "batch_size": 2, "seq_len": 256, "gradient_checkpointing": True, "precision": "bf16",
               "weights_dtype": "bf16", **changes}
    return simulate_step(TINY, TrainingOptions(**options), steps=2).peaks


def test_dpo_runs_chosen_and_rejected_rows_in_one_batch():
    # batch_size counts pairs: the forward sees twice as many rows as an SFT step of the same size
    dpo = _step(stage="dpo", precompute_ref_log_probs=True)
    sft_same, sft_double = _step(stage="sft"), _step(stage="sft", batch_size=4)
    dynamic = dpo.peak_allocated - sft_same.peak_allocated
    assert dynamic > 0.7 * (sft_double.peak_allocated - sft_same.peak_allocated)


def test_a_full_dpo_holds_a_frozen_reference_copy_unless_its_log_probs_are_precomputed():
    with_reference = _step(stage="dpo", method="full")
    precomputed = _step(stage="dpo", method="full", precompute_ref_log_probs=True)
    copy = PARAMETERS * 2  # bf16, like the policy
    assert with_reference.peak_allocated - precomputed.peak_allocated >= copy
    # ...and not much more: the reference's no_grad forward keeps nothing past itself
    assert with_reference.peak_allocated - precomputed.peak_allocated < copy + (16 << 20)


def test_a_peft_dpo_reference_is_the_base_with_the_adapter_disabled():
    with_reference = _step(stage="dpo")
    precomputed = _step(stage="dpo", precompute_ref_log_probs=True)
    # no copy: only the reference forward's passing temporaries
    assert with_reference.peak_allocated - precomputed.peak_allocated < PARAMETERS


def test_grpo_generates_for_steps_per_generation_micro_batches_at_once():
    options = {"stage": "grpo", "batch_size": 1, "seq_len": 64, "max_new_tokens": 1024}
    one = _step(**options)
    many = _step(**options, steps_per_generation=64)
    # keys and values of both layers, bf16, for the prompt and the new tokens but the last
    cache_of = lambda sequences: 2 * 2 * 256 * 2 * sequences * (64 + 1024 - 1)  # noqa: E731
    weights = PARAMETERS * 2
    # 64 sequences' cache (142 MB) outgrows the training step's peak, which one sequence's does not
    assert many.peak_allocated >= weights + cache_of(64)
    assert one.peak_allocated < weights + cache_of(64) < many.peak_allocated


def test_the_formula_plans_the_generation_batch_too():
    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    base = TrainingOptions(stage="grpo", method="lora", batch_size=2, seq_len=256, max_new_tokens=512, gpu="H100")
    one = build_plan(spec, base)
    accumulating = build_plan(spec, base.model_copy(update={"gradient_accumulation_steps": 4}))
    alone, together = (next(c for c in p.all_components if c.name == "kv_cache") for p in (one, accumulating))
    # TRL's default steps_per_generation is the accumulation: four micro-batches' completions at once
    assert together.bytes == 4 * alone.bytes == kv_cache_bytes(spec, accumulating.options, 8)
    assert "steps_per_generation 4" in together.note


def test_steps_per_generation_is_refused_outside_grpo_and_rloo():
    with pytest.raises(PlanInputError) as refused:
        build_plan(load_catalog_spec("Qwen/Qwen2.5-0.5B"), TrainingOptions(stage="dpo", steps_per_generation=2))
    assert refused.value.field == "steps_per_generation"


def test_a_traced_alignment_plan_is_simulated_and_says_what_was_not():
    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    dpo = build_plan(spec, TrainingOptions(stage="dpo", method="lora", batch_size=1, seq_len=256, gpu="H100", simulate_allocator=True))
    assert dpo.reserve_source == "simulated"
    orpo = build_plan(spec, TrainingOptions(stage="orpo", method="lora", batch_size=1, seq_len=256, gpu="H100", simulate_allocator=True))
    assert orpo.reserve_source == "formula"
    assert any("no simulation: stage orpo: the traced stages are sft, dpo, kto, grpo, rloo" in a for a in orpo.assumptions)
    assert unsupported_reason(TrainingOptions(stage="dpo", trainer="hf")) == "stage dpo runs in TRL's trainer: traced with trainer trl"
    with pytest.raises(SimulationUnsupported):
        simulate_step(TINY, TrainingOptions(stage="ppo"))


def test_kto_trains_on_batch_size_rows_its_kl_batch_under_no_grad():
    # the KL batch's forward keeps nothing: a KTO step holds about what an SFT step of the same
    # rows does, not what one of twice the rows does (the formula once planned it so)
    kto = _step(stage="kto", precompute_ref_log_probs=True)
    sft_same, sft_double = _step(stage="sft"), _step(stage="sft", batch_size=4)
    assert kto.peak_allocated < sft_same.peak_allocated + 0.5 * (sft_double.peak_allocated - sft_same.peak_allocated)
    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    kto_plan, sft_plan = (build_plan(spec, TrainingOptions(stage=stage, method="lora", batch_size=2, seq_len=512, gpu="H100"))
                          for stage in ("kto", "sft"))
    activations = lambda plan: sum(c.bytes for c in plan.all_components if c.family == "activations")  # noqa: E731
    assert activations(kto_plan) == activations(sft_plan)


def test_rloo_generates_like_grpo():
    options = {"batch_size": 1, "seq_len": 64, "max_new_tokens": 1024, "steps_per_generation": 64, "beta": 0.0}
    assert _step(stage="rloo", **options) == _step(stage="grpo", **options)
