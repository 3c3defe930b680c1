"""Static memory equals, to the byte, what the real stack holds on CPU after one optimizer step."""

import pytest
import torch

from planner.options import TrainingOptions
from planner.static_memory import static_components
from planner.trainable import parameter_counts
from tests.conftest import TINY
from tests.realstack import run_one_step

CASES = [
    # (arch, method, weights_dtype, optimizer, quantization, double_quant)
    *[(arch, "full", "bf16", "adamw", "none", True) for arch in TINY],
    *[(arch, "lora", "bf16", "adamw", "none", True) for arch in TINY],
    *[(arch, "qlora", "bf16", "adamw", "nf4", True) for arch in TINY],
    ("llama", "full", "fp32", "adamw", "none", True),
    ("llama", "freeze", "bf16", "adamw", "none", True),
    ("gemma2", "freeze", "fp32", "sgd", "none", True),
    ("llama", "dora", "bf16", "adamw", "none", True),
    ("qwen2", "dora", "fp32", "adamw", "none", True),
    ("llama", "ia3", "bf16", "adamw", "none", True),
    ("mixtral", "ia3", "bf16", "adamw", "none", True),
    ("llama", "prompt_tuning", "bf16", "adamw", "none", True),
    ("llama", "prefix_tuning", "bf16", "adamw", "none", True),
    ("qwen2", "prefix_tuning", "fp32", "adamw", "none", True),
    ("llama", "qlora", "bf16", "adamw", "nf4", False),
    ("llama", "qlora", "bf16", "paged_adamw_8bit", "fp4", True),
    ("qwen2", "dora", "bf16", "adamw", "nf4", True),
    ("llama", "lora", "bf16", "adamw", "int8", True),
    *[("llama", "full", dt, opt, "none", True) for dt in ("bf16", "fp32")
      for opt in ("adamw_foreach", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd", "galore")],
    *[("qwen3_moe", "lora", "bf16", opt, "none", True) for opt in ("adamw_8bit", "adafactor", "sgd")],
    ("gemma2", "full", "bf16", "galore", "none", True),
]


def _options(method, weights_dtype, optimizer, quantization, double_quant, **extra):
    return TrainingOptions(
        method=method,
        weights_dtype=weights_dtype,
        precision="bf16",
        optimizer=optimizer,
        quantization=None if quantization == "none" else quantization,
        double_quant=double_quant,
        lora_r=8,
        num_virtual_tokens=5,
        freeze_trainable_layers=1,
        galore_rank=4,
        **extra,
    )


def _family(components, family):
    return sum(c.bytes for c in components if c.name == family or c.name.startswith(family + "."))


@pytest.mark.parametrize("arch,method,weights_dtype,optimizer,quantization,double_quant", CASES)
def test_static_memory_equals_real_step(tiny_specs, arch, method, weights_dtype, optimizer, quantization, double_quant):
    options = _options(method, weights_dtype, optimizer, quantization, double_quant)
    planned = static_components(tiny_specs[arch], options)
    counts = parameter_counts(tiny_specs[arch], options)
    measured = run_one_step(
        TINY[arch], method=method, weights_dtype=weights_dtype, optimizer=optimizer, quantization=quantization,
        double_quant=double_quant, lora_r=8, num_virtual_tokens=5, freeze_trainable_layers=1, galore_rank=4,
    )
    assert counts["trainable"] == measured.trainable_params
    assert counts["total"] == measured.total_params
    assert _family(planned, "weights") == measured.weights
    assert _family(planned, "weights.adapter") == measured.adapter
    assert _family(planned, "gradients") == measured.gradients
    assert _family(planned, "optimizer_state") == measured.optimizer_state


def test_sgd_momentum_buffer_is_counted(tiny_specs):
    options = _options("full", "bf16", "sgd", "none", True, sgd_momentum=0.9)
    planned = static_components(tiny_specs["llama"], options)
    measured = run_one_step(TINY["llama"], method="full", optimizer="sgd", sgd_momentum=0.9)
    assert _family(planned, "optimizer_state") == measured.optimizer_state > 0


@pytest.mark.parametrize(
    "arch,targets",
    [
        ("llama", ["q_proj", "v_proj"]),
        ("qwen2", ["k_proj", "down_proj"]),
        ("gemma2", ["o_proj", "gate_proj", "up_proj"]),
        ("qwen3_moe", ["q_proj", "gate_proj", "up_proj", "down_proj"]),
        ("qwen3_moe", ["gate"]),
        ("mixtral", ["w1", "w3", "w2", "v_proj"]),
    ],
)
def test_lora_target_lists_match_peft(tiny_specs, arch, targets):
    options = _options("lora", "bf16", "adamw", "none", True, lora_targets=targets)
    measured = run_one_step(TINY[arch], method="lora", lora_r=8, lora_targets=targets)
    planned = static_components(tiny_specs[arch], options)
    assert parameter_counts(tiny_specs[arch], options)["trainable"] == measured.trainable_params
    assert _family(planned, "weights.adapter") == measured.adapter
    assert _family(planned, "optimizer_state") == measured.optimizer_state


def test_fused_expert_pair_must_be_targeted_together(tiny_specs):
    from planner.errors import PlanInputError

    with pytest.raises(PlanInputError, match="fused"):
        parameter_counts(tiny_specs["qwen3_moe"], _options("lora", "bf16", "adamw", "none", True, lora_targets=["gate_proj"]))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bitsandbytes_leaves_fused_3d_experts_in_16_bit(arch):
    """Issue 12 asked whether 4-bit loading now quantizes transformers 5's fused expert tensors
    (a published Mixtral QLoRA run under transformers 4, with one nn.Linear per expert, held 40 GiB
    against the plan's 101). It does not: only nn.Linear weights become Params4bit, and the plan
    keeps the experts in 16 bit, as the load really does."""
    from bitsandbytes.nn import Params4bit

    from planner.introspect import spec_from_config
    from tests.realstack import build_model

    model = build_model(TINY[arch], "bf16", quantization="nf4")
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert experts and all(not isinstance(p, Params4bit) and p.dtype == torch.bfloat16 and p.dim() == 3 for p in experts.values())
    assert any(isinstance(p, Params4bit) for n, p in model.named_parameters() if "q_proj" in n)
    expert_bytes = sum(p.numel() * 2 for p in experts.values())
    plan_base = next(c for c in static_components(spec_from_config(dict(TINY[arch]), arch), TrainingOptions(method="qlora")) if c.name == "weights.base")
    assert plan_base.bytes > expert_bytes  # the 16-bit experts are inside the planned base weights


def test_lora_on_fused_experts_plans_without_dropout_as_peft_requires(tiny_specs):
    """PEFT's LoRA on transformers 5's fused expert parameters refuses any dropout, so a run with
    the default 0.05 would fail before its first step: the plan drops it (and says so), which PEFT
    then accepts, and a dropout the user asked for is refused with the way out."""
    from peft import LoraConfig, get_peft_model

    from planner.errors import PlanInputError
    from planner.plan import build_plan
    from tests.realstack import build_model

    spec = tiny_specs["mixtral"]
    with pytest.raises(ValueError, match="does not work with lora_dropout != 0"):
        get_peft_model(build_model(TINY["mixtral"], "bf16"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.05))

    plan = build_plan(spec, TrainingOptions(method="lora", gpu_memory_gib=80))
    assert plan.options.lora_dropout == 0
    assert any("lora_dropout 0, not the default 0.05: PEFT's LoRA on the fused MoE expert parameters (experts.down_proj" in a for a in plan.assumptions)
    peft_model = get_peft_model(build_model(TINY["mixtral"], "bf16"), LoraConfig(r=plan.options.lora_r, target_modules="all-linear",
                                                                              lora_dropout=plan.options.lora_dropout))
    assert parameter_counts(spec, plan.options)["trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    with pytest.raises(PlanInputError, match="takes no dropout .* set lora_dropout 0, or leave the experts out of lora_targets") as refused:
        build_plan(spec, TrainingOptions(method="lora", gpu_memory_gib=80, lora_dropout=0.1))
    assert refused.value.field == "lora_dropout"
    # attention-only targets are plain Linears: their dropout stays
    attention_only = build_plan(spec, TrainingOptions(method="lora", gpu_memory_gib=80, lora_dropout=0.1, lora_targets=["q_proj", "v_proj"]))
    assert attention_only.options.lora_dropout == 0.1


@pytest.mark.parametrize("method,quantization,tied,ensure_weight_tying,modules", [
    ("lora", "none", False, False, ["embed_tokens", "lm_head"]),
    ("lora", "none", True, False, ["embed_tokens", "lm_head"]),
    ("lora", "none", True, True, ["embed_tokens", "lm_head"]),
    ("lora", "none", True, False, ["lm_head"]),
    ("qlora", "nf4", False, False, ["lm_head"]),
    ("dora", "none", False, False, ["embed_tokens"]),
    ("ia3", "none", False, False, ["lm_head"]),
])
def test_modules_to_save_copies_equal_peft(method, quantization, tied, ensure_weight_tying, modules):
    """PEFT's modules_to_save: a trainable copy of each named module beside the frozen original,
    with its gradient and optimizer state; a tied lm_head is copied apart from the embedding unless
    ensure_weight_tying keeps the two copies one. Counts and bytes as PEFT makes them on CPU."""
    from planner.introspect import spec_from_config

    config = dict(TINY["llama"], tie_word_embeddings=tied)
    spec = spec_from_config(config, "llama")
    options = _options(method, "bf16", "adamw", quantization, True, modules_to_save=modules, ensure_weight_tying=ensure_weight_tying)
    planned = static_components(spec, options)
    counts = parameter_counts(spec, options)
    measured = run_one_step(config, method=method, quantization=quantization, lora_r=8, num_virtual_tokens=5,
                            modules_to_save=list(modules), ensure_weight_tying=ensure_weight_tying)
    assert counts["trainable"] == measured.trainable_params
    assert counts["total"] == measured.total_params
    assert _family(planned, "weights") == measured.weights
    assert _family(planned, "weights.adapter") + _family(planned, "weights.modules_to_save") == measured.adapter
    assert _family(planned, "gradients") == measured.gradients
    assert _family(planned, "optimizer_state") == measured.optimizer_state
    copies = len(modules) - (1 if tied and ensure_weight_tying and len(modules) == 2 else 0)
    assert _family(planned, "weights.modules_to_save") == copies * config["vocab_size"] * config["hidden_size"] * 2


def test_modules_to_save_refuses_what_it_does_not_plan(tiny_specs):
    from planner.errors import PlanInputError

    spec = tiny_specs["llama"]
    for modules, says in ((["embed_token"], "matches no module"), (["q_proj"], "lora_targets"), (["norm"], "planned for the embedding")):
        with pytest.raises(PlanInputError) as refused:
            parameter_counts(spec, _options("lora", "bf16", "adamw", "none", True, modules_to_save=modules))
        assert refused.value.field == "modules_to_save" and says in refused.value.reason, refused.value.reason
    with pytest.raises(PlanInputError) as refused:
        parameter_counts(spec, _options("full", "bf16", "adamw", "none", True, modules_to_save=["lm_head"]))
    assert refused.value.field == "modules_to_save"
    with pytest.raises(PlanInputError) as refused:
        parameter_counts(spec, _options("ia3", "bf16", "adamw", "none", True, ensure_weight_tying=True))
    assert refused.value.field == "ensure_weight_tying"
    # PEFT embeds a prompt method's inputs with the original embedding: its copy would get no gradient
    with pytest.raises(PlanInputError) as refused:
        parameter_counts(spec, _options("prompt_tuning", "bf16", "adamw", "none", True, modules_to_save=["embed_tokens"]))
    assert refused.value.field == "modules_to_save" and "original embedding" in refused.value.reason


@pytest.mark.parametrize("method,quantization", [("lora", "none"), ("qlora", "nf4"), ("dora", "none")])
def test_trainable_tokens_equal_peft(method, quantization):
    """LoraConfig's trainable_token_indices on the embedding: a delta of the listed rows trains
    (fp32, as PEFT keeps adapters), beside a buffer of their original values; counts and bytes as
    PEFT makes them on CPU."""
    import torch as _torch

    from planner.introspect import spec_from_config

    config = dict(TINY["llama"])
    spec = spec_from_config(config, "llama")
    tokens = [5, 6, 7, 6]  # a repeated id trains once
    options = _options(method, "bf16", "adamw", quantization, True, trainable_token_indices=tokens)
    planned = static_components(spec, options)
    counts = parameter_counts(spec, options)
    measured = run_one_step(config, method=method, quantization=quantization, lora_r=8, trainable_token_indices=sorted(set(tokens)))
    assert counts["trainable"] == measured.trainable_params
    assert counts["total"] == measured.total_params
    # the original rows are a buffer, which the measured weights (parameters) leave out
    assert _family(planned, "weights") - _family(planned, "weights.trainable_tokens_original") == measured.weights
    assert _family(planned, "weights.trainable_tokens_original") == 3 * config["hidden_size"] * _torch.finfo(_torch.float32).bits // 8
    assert _family(planned, "gradients") == measured.gradients
    assert _family(planned, "optimizer_state") == measured.optimizer_state


def test_trainable_tokens_refuse_what_is_not_planned(tiny_specs):
    from planner.errors import PlanInputError
    from planner.introspect import spec_from_config

    tied = spec_from_config(dict(TINY["llama"], tie_word_embeddings=True), "llama")
    cases = ((tied, {"method": "lora"}, "ties its LM head"),
             (tiny_specs["llama"], {"method": "lora", "modules_to_save": ["embed_tokens"]}, "whole embedding"),
             (tiny_specs["llama"], {"method": "ia3"}, "LoraConfig's"),
             (tiny_specs["llama"], {"method": "lora", "trainable_token_indices": [128]}, "past the vocabulary"))
    # refused even after a plan with as many tokens inside the vocabulary (the counts are memoized per spec)
    parameter_counts(tiny_specs["llama"], _options("lora", "bf16", "adamw", "none", True, trainable_token_indices=[5]))
    for spec, extra, says in cases:
        extra.setdefault("trainable_token_indices", [5])
        with pytest.raises(PlanInputError) as refused:
            parameter_counts(spec, _options(extra.pop("method"), "bf16", "adamw", "none", True, **extra))
        assert refused.value.field == "trainable_token_indices" and says in refused.value.reason, refused.value.reason
