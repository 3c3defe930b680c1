"""Alignment stages and multi-GPU layouts: which components appear, and their sizes."""

import pytest

from planner.activations import activation_terms
from planner.catalog import load_catalog_spec
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.stages import kv_cache_bytes

LLAMA = "meta-llama/Llama-3.1-8B"


def all_components(model, **options):
    """Every component of every phase, by name (a stage's extra models are in all of them)."""
    plan = build_plan(load_catalog_spec(model), TrainingOptions(gpu_memory_gib=80, **options))
    return plan, {c.name: c.bytes for c in plan.all_components}


def weights_bytes(components):
    return components["weights.base"] + components.get("weights.quant_constants", 0)


def test_dpo_full_keeps_a_frozen_reference_copy():
    plan, c = all_components(LLAMA, method="full", stage="dpo")
    assert c["reference_model"] == weights_bytes(c)


@pytest.mark.parametrize("options", [dict(method="lora"), dict(method="qlora"), dict(method="full", precompute_ref_log_probs=True)])
def test_dpo_without_reference_copy(options):
    plan, c = all_components(LLAMA, stage="dpo", **options)
    assert "reference_model" not in c
    assert any("reference" in a for a in plan.assumptions)


def test_preference_stages_double_the_sequences():
    _, sft = all_components(LLAMA, method="lora", stage="sft", gradient_checkpointing=False)
    _, orpo = all_components(LLAMA, method="lora", stage="orpo", gradient_checkpointing=False)
    # autocast's copies of the adapter matrices do not grow with tokens
    spec = load_catalog_spec(LLAMA)
    fixed = spec.num_layers * activation_terms(spec, TrainingOptions(method="lora")).per_layer_fixed
    assert fixed > 0
    assert orpo["activations.layers"] - fixed == 2 * (sft["activations.layers"] - fixed)


def test_experimental_trl_stages_materialize_full_logits():
    """ORPO and SimPO run trl.experimental's old code: full logits, unlike DPO's fused head."""
    spec = load_catalog_spec(LLAMA)
    _, dpo = all_components(LLAMA, method="lora", stage="dpo", batch_size=2, seq_len=1024)
    _, simpo = all_components(LLAMA, method="lora", stage="simpo", batch_size=2, seq_len=1024)
    _, orpo = all_components(LLAMA, method="lora", stage="orpo", batch_size=2, seq_len=1024)
    tokens = 2 * 2 * 1024
    assert dpo["logits"] < tokens * spec.vocab_size
    assert simpo["logits"] == tokens * (spec.vocab_size * 2 + 8)
    assert orpo["logits"] == simpo["logits"] + tokens // 2 * spec.vocab_size * 6


def test_grpo_reference_only_with_kl_and_kv_cache_for_the_group():
    spec = load_catalog_spec(LLAMA)
    _, no_kl = all_components(LLAMA, method="full", stage="grpo", batch_size=8, seq_len=256, max_new_tokens=512)
    assert "reference_model" not in no_kl
    assert no_kl["kv_cache"] == 2 * 32 * 1024 * 2 * 8 * (256 + 512 - 1) == kv_cache_bytes(spec, TrainingOptions(stage="grpo", batch_size=8, seq_len=256, max_new_tokens=512), 8)
    _, kl = all_components(LLAMA, method="full", stage="grpo", beta=0.04)
    assert kl["reference_model"] == weights_bytes(kl)


def test_grpo_generates_in_the_models_own_dtype():
    """TRL generates outside autocast: fp32 master weights fill an fp32 cache, twice a bf16 one,
    and the prefill above it grows with the dtype too."""
    grpo = dict(method="lora", stage="grpo", batch_size=8, seq_len=2048, max_new_tokens=64)
    _, bf16 = all_components(LLAMA, weights_dtype="bf16", **grpo)
    _, fp32 = all_components(LLAMA, weights_dtype="fp32", **grpo)
    assert fp32["kv_cache"] == 2 * bf16["kv_cache"] == 2 * 2 * 32 * 1024 * 2 * 8 * (2048 + 64 - 1)
    assert fp32["temporary.generation_prefill"] > bf16["temporary.generation_prefill"] > 0


def test_generate_prefill_is_planned_above_the_cache_only_where_it_exceeds_it():
    # a long prompt batch: the prefill's layer forward tops the cache the decode steps fill
    _, long_prompts = all_components(LLAMA, method="lora", stage="grpo", batch_size=8, seq_len=2048, max_new_tokens=64)
    assert long_prompts["temporary.generation_prefill"] > 0
    # short prompts and long completions: the finished cache is larger than the prefill ever held
    _, long_completions = all_components(LLAMA, method="lora", stage="grpo", batch_size=1, seq_len=16, max_new_tokens=8192)
    assert "temporary.generation_prefill" not in long_completions


def test_grpo_with_colocated_vllm_reserves_its_fraction():
    _, c = all_components(LLAMA, method="lora", stage="grpo", use_vllm=True, vllm_gpu_memory_utilization=0.4)
    assert c["kv_cache.vllm"] == int(0.4 * 80 * (1 << 30))


def test_ppo_holds_four_models():
    plan, c = all_components(LLAMA, method="full", stage="ppo")
    assert {"reference_model", "reward_model", "value_model", "kv_cache"} <= set(c)
    lm_head = 128256 * 4096 * 2
    assert c["reward_model"] == weights_bytes(c) - lm_head
    assert any("no PPO trainer" in a for a in plan.assumptions)


def test_reward_model_has_no_vocabulary_logits():
    _, c = all_components(LLAMA, method="lora", stage="reward")
    assert c["logits"] < 1 << 20


def test_hf_trainer_materializes_logits_trl_does_not():
    _, hf = all_components(LLAMA, method="lora", trainer="hf", batch_size=4, seq_len=2048)
    _, trl = all_components(LLAMA, method="lora", trainer="trl", batch_size=4, seq_len=2048)
    tokens = 4 * 2048
    assert hf["logits"] >= tokens * 128256 * 4
    assert trl["logits"] < tokens * 64


def test_zero_stages_shard_what_they_promise():
    base = dict(method="full", num_gpus=8, optimizer="adamw")
    _, z1 = all_components(LLAMA, parallelism="zero1", **base)
    _, z3 = all_components(LLAMA, parallelism="zero3", **base)
    _, ddp = all_components(LLAMA, parallelism="ddp", **base)
    assert z1["weights.base"] == ddp["weights.base"]
    assert z3["weights.base"] == -(-ddp["weights.base"] // 8)
    assert "temporary.gathered_params" in z3 and "gradients.ddp_buckets" in ddp


def test_offload_moves_optimizer_state_to_host():
    _, c = all_components(LLAMA, method="full", num_gpus=2, parallelism="zero2", offload="optimizer")
    assert c["optimizer_state"] == 0 == c["optimizer_state.master_weights"]


def test_sharding_needs_several_gpus():
    with pytest.raises(PlanInputError, match="num_gpus"):
        all_components(LLAMA, parallelism="zero3")


def test_kv_cache_equals_what_generate_keeps():
    """A real HF generate on a tiny Llama: the cache it returns holds what kv_cache_bytes plans."""
    import torch

    from planner.introspect import spec_from_config
    from tests.conftest import TINY
    from tests.realstack import build_model

    model = build_model(TINY["llama"], "bf16", attention="sdpa").eval()
    prompts = torch.randint(3, TINY["llama"]["vocab_size"], (3, 10))
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=7, min_new_tokens=7,
        do_sample=False, return_dict_in_generate=True, pad_token_id=0,
    )
    kept = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    spec = spec_from_config(dict(TINY["llama"]), "tiny")
    options = TrainingOptions(stage="grpo", method="full", seq_len=10, max_new_tokens=7, weights_dtype="bf16", gpu_memory_gib=8)
    assert kv_cache_bytes(spec, options, 3) == kept
