"""The advisor's rules (planner/advisor.py), one test each, and time/cost arithmetic."""

import pytest

from planner.advisor import Task, advise, decide_approach
from planner.catalog import load_catalog_spec
from planner.cost import Workload, estimate_time_cost, matmul_params_per_token, training_flops_per_token
from planner.options import TrainingOptions
from planner.plan import build_plan

LLAMA8B = load_catalog_spec("meta-llama/Llama-3.1-8B")
LLAMA13B = load_catalog_spec("meta-llama/Llama-2-13b-hf")
QWEN_SMALL = load_catalog_spec("Qwen/Qwen2.5-0.5B")
H100 = TrainingOptions(gpu="H100")


def test_knowledge_goes_to_retrieval():
    advice = advise(LLAMA8B, Task(goal="knowledge", num_examples=50_000), H100)
    assert advice.approach == "rag" and "retrieval" in advice.reasons[0].lower()


def test_changing_knowledge_goes_to_retrieval_whatever_the_goal():
    assert decide_approach(Task(goal="domain", knowledge_changes_often=True))[0] == "rag"


def test_few_examples_mean_prompting_with_the_count_in_the_reason():
    approach, reasons = decide_approach(Task(num_examples=120))
    assert approach == "prompting" and "120" in reasons[0]


def test_no_evaluation_means_define_one_first():
    approach, reasons = decide_approach(Task(has_evaluation=False))
    assert approach == "prompting" and "evaluation" in reasons[0]


def test_enough_examples_mean_fine_tune():
    assert decide_approach(Task(num_examples=5_000))[0] == "fine-tune"


@pytest.mark.parametrize("data_kind,stage", [("instructions", "sft"), ("raw_text", "sft"), ("preference_pairs", "dpo"), ("thumbs", "kto"), ("verifiable_prompts", "grpo")])
def test_stage_follows_the_data(data_kind, stage):
    advice = advise(QWEN_SMALL, Task(data_kind=data_kind), H100)
    assert advice.stage == stage and advice.plan.options.stage == stage


def test_a_base_model_gets_sft_before_preference_training():
    base = advise(LLAMA8B, Task(data_kind="preference_pairs"), H100)
    assert any("SFT" in r and "base" in r for r in base.reasons)
    chat = advise(LLAMA8B, Task(data_kind="preference_pairs", base_model_is_chat=True), H100)
    assert not any("base (non-chat)" in r for r in chat.reasons)


def test_grpo_uses_a_group_of_completions():
    advice = advise(QWEN_SMALL, Task(data_kind="verifiable_prompts"), H100)
    assert advice.plan.options.num_generations == 8


def test_lora_by_default_when_it_fits():
    advice = advise(LLAMA8B, Task(), H100)
    assert advice.method == "lora" and advice.plan.fits
    assert advice.settings["lora_alpha"] == 2 * advice.settings["lora_r"] == 32
    assert advice.settings["learning_rate"] == 2e-4


def test_qlora_when_lora_does_not_fit_with_both_numbers_in_the_reason():
    gpu = TrainingOptions(gpu="RTX 4000 Ada")
    advice = advise(LLAMA13B, Task(num_examples=8_000), gpu)
    lora = build_plan(LLAMA13B, TrainingOptions(gpu="RTX 4000 Ada", method="lora"))
    assert not lora.fits
    assert advice.method == "qlora" and advice.plan.fits
    assert advice.settings["optimizer"] == "paged_adamw_8bit"
    reason = next(r for r in advice.reasons if r.startswith("LoRA needs"))
    assert f"{lora.peak_bytes / 2**30:.1f} GiB" in reason


def test_full_fine_tuning_for_large_data_when_it_fits():
    advice = advise(QWEN_SMALL, Task(goal="reasoning", num_examples=200_000), H100)
    assert advice.method == "full" and advice.settings["learning_rate"] <= 2e-5
    assert any("general data" in r for r in advice.reasons)


def test_full_fine_tuning_refused_with_the_number_when_it_does_not_fit():
    advice = advise(LLAMA8B, Task(goal="domain", num_examples=200_000), TrainingOptions(gpu="RTX 4090"))
    assert advice.method != "full"
    assert any(r.startswith("Full fine-tuning would suit") for r in advice.reasons)


def test_thousands_of_tenants_get_ia3():
    advice = advise(QWEN_SMALL, Task(tenants=5_000), H100)
    assert advice.method == "ia3"


def test_a_few_tenants_get_multi_lora_serving():
    advice = advise(QWEN_SMALL, Task(tenants=12), H100)
    assert advice.method == "lora" and advice.deployment.action == "serve adapters"
    assert advice.deployment.serving.options.enable_lora and any("--enable-lora" in r for r in advice.deployment.reasons)


def test_light_style_change_targets_q_and_v_with_a_small_rank():
    advice = advise(QWEN_SMALL, Task(goal="style"), H100)
    assert advice.settings["lora_targets"] == ["q_proj", "v_proj"] and advice.settings["lora_r"] == 8


def test_small_data_gets_more_dropout_and_more_epochs():
    small = advise(QWEN_SMALL, Task(num_examples=800), H100)
    large = advise(QWEN_SMALL, Task(num_examples=80_000), H100)
    assert small.settings["lora_dropout"] == 0.1 and large.settings["lora_dropout"] == 0.05
    assert small.settings["epochs"] > large.settings["epochs"]


def test_lora_on_a_moe_model_s_fused_experts_is_advised_without_dropout():
    """PEFT's LoRA on fused expert parameters refuses dropout: advice with it would not run."""
    moe = load_catalog_spec("Qwen/Qwen3-30B-A3B")
    advice = advise(moe, Task(goal="domain", num_examples=800), H100)
    assert advice.method in ("lora", "qlora") and advice.settings["lora_targets"] == "all-linear"
    assert advice.settings["lora_dropout"] == 0
    assert any("dropout 0 (PEFT's LoRA on fused experts takes none)" in r for r in advice.reasons)
    # both adapters stay among the ways to run it (a dropout PEFT refuses would drop one)
    assert {"lora sft", "qlora sft"} <= {c.label for c in advice.alternatives} | {f"{advice.method} sft"}


def test_latency_target_means_merging_the_adapter():
    advice = advise(QWEN_SMALL, Task(latency_target_ms=50, tenants=12), H100)
    assert advice.deployment.action == "merge" and any("merge the adapter" in r for r in advice.deployment.reasons)


def test_micro_batch_and_accumulation_give_the_effective_batch():
    advice = advise(LLAMA8B, Task(), H100)
    settings = advice.settings
    assert settings["batch_size"] * settings["gradient_accumulation_steps"] == 16
    assert advice.plan.options.batch_size == settings["batch_size"] and advice.plan.fits


def test_a_micro_batch_tight_by_the_formula_points_to_the_simulated_plan():
    """Searches use the formula's band; a single plan of the next micro-batch simulates the
    allocator and may fit, so the advice says so where the trace covers the run (paged 8-bit AdamW
    included), and not where it cannot."""
    options = TrainingOptions(gpu="RTX 4000 Ada", seq_len=4096)
    advice = advise(LLAMA13B, Task(goal="domain", num_examples=20_000), options)
    assert advice.settings["optimizer"] == "paged_adamw_8bit" and advice.settings["batch_size"] == 1
    assert any("Micro-batch 2 would need" in r and ": tight by the formula's band, which searches use; a plan of micro-batch 2 alone "
               "simulates the allocator" in r for r in advice.reasons)
    two_gpus = advise(LLAMA13B, Task(goal="domain", num_examples=20_000), options.model_copy(update={"num_gpus": 2, "parallelism": "ddp"}))
    assert not any("simulates the allocator" in r for r in two_gpus.reasons)


def test_flagship_micro_batch_fits_at_the_high_end():
    """Llama-2-13B QLoRA on an RTX 4000 Ada: the advice once said micro-batch 4 at a
    central 15.4 GiB "and up to 6 would fit", where a measured run of the same tokens held
    18.4 GiB. Neither the micro-batch chosen nor the largest it says would fit may have a high
    end above the usable memory."""
    advice = advise(LLAMA13B, Task(num_examples=8000, tokens_per_example=700), TrainingOptions(gpu="RTX 4000 Ada"))
    assert advice.method == "qlora" and advice.plan.fits
    assert advice.plan.peak_high_bytes <= advice.plan.usable_bytes
    micro = advice.settings["batch_size"]
    assert advice.plan.options.batch_size == micro
    said = next(r for r in advice.reasons if r.startswith(f"Micro-batch {micro} "))
    largest = int(said.split("up to ")[1].split()[0]) if "would fit;" in said else micro
    for batch in range(micro, largest + 1):
        plan = build_plan(LLAMA13B, advice.plan.options.model_copy(update={"batch_size": batch}))
        assert plan.peak_high_bytes <= plan.usable_bytes, batch
    beyond = build_plan(LLAMA13B, advice.plan.options.model_copy(update={"batch_size": largest + 1}))
    assert beyond.peak_high_bytes > beyond.usable_bytes
    assert advice.to_dict()["verdict"] == "fits" and advice.to_dict()["peak_high_bytes"] == advice.plan.peak_high_bytes


def test_alternatives_carry_their_own_plans_fitting_first():
    advice = advise(LLAMA13B, Task(), TrainingOptions(gpu="RTX 4000 Ada"))
    fits = [a.plan.fits for a in advice.alternatives]
    assert fits == sorted(fits, reverse=True)
    full = next(a for a in advice.alternatives if a.plan.options.method == "full")
    assert not full.plan.fits and full.gpus_needed > 1
    assert advice.method not in [a.plan.options.method for a in advice.alternatives if a.plan.options.stage == advice.stage]


def test_dpo_alternatives_include_reference_free_stages():
    advice = advise(QWEN_SMALL, Task(data_kind="preference_pairs"), H100)
    assert {"orpo", "simpo"} <= {a.plan.options.stage for a in advice.alternatives}


# -- time and cost -------------------------------------------------------------------------


def test_flops_per_token_follow_six_n_for_full_training():
    options = TrainingOptions(method="full", gradient_checkpointing=False)
    n = matmul_params_per_token(LLAMA8B)
    attention = 2 * 32 * 32 * 128 * 2048
    assert training_flops_per_token(LLAMA8B, options, 2048) == 6 * n + 3 * attention
    # a frozen base skips weight gradients; checkpointing adds a forward
    lora = TrainingOptions(method="lora", gradient_checkpointing=True)
    assert training_flops_per_token(LLAMA8B, lora, 2048) == (2 * n + attention) + (2 * n + 2 * attention) + (2 * n + attention)


def test_moe_counts_only_routed_experts():
    moe = load_catalog_spec("mistralai/Mixtral-8x7B-v0.1")
    assert matmul_params_per_token(moe) < 0.4 * moe.total_params


def test_hours_and_dollars_from_throughput_and_price():
    plan = build_plan(LLAMA8B, TrainingOptions(method="lora", gpu="H100"))
    workload = Workload(num_examples=10_000, tokens_per_example=1_000, epochs=2, utilization=0.5)
    estimate = estimate_time_cost(LLAMA8B, plan, workload)
    per_token = training_flops_per_token(LLAMA8B, plan.options, 1_000)
    assert estimate.flops == pytest.approx(20_000 * 1_000 * per_token)
    assert estimate.hours == pytest.approx(estimate.flops / (estimate.tflops_per_gpu * 1e12 * 0.5) / 3600)
    assert estimate.dollars == pytest.approx(estimate.hours * 1 * _price("H100"))


def test_generation_time_for_grpo_is_reported():
    plan = build_plan(QWEN_SMALL, TrainingOptions(method="lora", stage="grpo", gpu="H100", batch_size=8))
    estimate = estimate_time_cost(QWEN_SMALL, plan, Workload(num_examples=1_000, tokens_per_example=200))
    assert estimate.generation_seconds > 0 and estimate.hours * 3600 == pytest.approx(estimate.training_seconds + estimate.generation_seconds)


def _price(name):
    from gpu_catalog.catalog import find_gpu

    return find_gpu(name).price_per_hour_usd


def test_several_gpus_are_sharded_before_quality_costing_levers():
    llama70b = load_catalog_spec("meta-llama/Llama-3.1-70B")
    advice = advise(llama70b, Task(goal="reasoning", num_examples=250_000), TrainingOptions(gpu="H100", num_gpus=8))
    assert advice.plan.options.parallelism == "zero3" and advice.method == "lora" and advice.plan.fits
    # the micro-batch on each of the 8 GPUs adds up to the effective batch
    assert advice.settings["batch_size"] * advice.settings["gradient_accumulation_steps"] * 8 == 16
    single = advise(llama70b, Task(goal="reasoning", num_examples=250_000), TrainingOptions(gpu="H100"))
    assert single.method == "qlora"


def test_data_that_must_stay_on_premises_is_planned_for_the_local_gpu():
    advice = advise(QWEN_SMALL, Task(data_must_stay_on_premises=True), TrainingOptions(gpu="RTX 4090"))
    assert any("on premises" in r and "gpu auto" in r for r in advice.reasons)


def test_a_chosen_stage_is_kept_and_a_mismatch_with_the_data_is_said():
    spec = load_catalog_spec("Qwen/Qwen2.5-7B")
    chosen = advise(spec, Task(), TrainingOptions(stage="dpo", gpu="H100"))
    assert chosen.stage == "dpo" and chosen.plan.options.stage == "dpo"
    assert "Stage DPO, as chosen." in chosen.reasons
    mismatch = advise(spec, Task(data_kind="instructions"), TrainingOptions(stage="dpo", gpu="H100"))
    assert any("would call for SFT" in r and "chosen/rejected pairs" in r for r in mismatch.reasons)
    unchosen = advise(spec, Task(data_kind="thumbs"), TrainingOptions(gpu="H100"))
    assert unchosen.stage == "kto"


def test_the_advice_says_how_its_run_differs_from_the_users_settings():
    spec = load_catalog_spec("meta-llama/Llama-2-13b-hf")
    advice = advise(spec, Task(num_examples=8000), TrainingOptions(gpu="RTX 4000 Ada", method="lora", batch_size=1))
    said = next(r for r in advice.reasons if r.startswith("Compared with the plan for the settings as given"))
    assert f"method {advice.plan.options.method} instead of lora" in said
    if advice.plan.options.batch_size != 1:
        assert f"micro-batch {advice.plan.options.batch_size} instead of 1" in said
