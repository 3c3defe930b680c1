"""One test per static-memory pitfall that has cost someone an OOM (GQA's k/v sizes, tied embeddings, what QLoRA leaves unquantized...), on real architectures' shapes."""

import pytest

from planner.dtypes import quant_constants_4bit_bytes
from planner.introspect import spec_from_config
from planner.options import TrainingOptions
from planner.static_memory import static_components
from planner.trainable import parameter_counts, trainable_tensors

GIB = 1 << 30

# Llama-3.1-8B's published architecture: GQA (8 kv heads of 32), 128k vocabulary, untied.
LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama8b():
    return spec_from_config(LLAMA_8B, "llama-8b-shape")


def component(components, name):
    return next(c.bytes for c in components if c.name == name)


def test_gqa_kv_projections_are_not_square(llama8b):
    k_proj = next(t for t in llama8b.tensors if t.name.endswith("layers.0.self_attn.k_proj.weight"))
    assert k_proj.shape == (8 * 128, 4096)
    options = TrainingOptions(method="lora", lora_r=16, lora_targets=["k_proj"])
    assert parameter_counts(llama8b, options)["trainable"] == 32 * 16 * (4096 + 1024)


def test_tied_embeddings_counted_once():
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=1000, pad_token_id=0)
    tied = spec_from_config({**cfg, "tie_word_embeddings": True}, "tied")
    untied = spec_from_config({**cfg, "tie_word_embeddings": False}, "untied")
    assert untied.total_params - tied.total_params == 1000 * 64
    assert tied.tie_word_embeddings and not any(t.role == "lm_head" for t in tied.tensors)
    full = TrainingOptions(method="full")
    assert parameter_counts(tied, full)["trainable"] == tied.total_params


def test_qlora_keeps_embeddings_and_lm_head_in_16_bit(llama8b):
    components = static_components(llama8b, TrainingOptions(method="qlora"))
    kept = sum(t.numel for t in llama8b.tensors if not t.quantizable)
    quantized = sum(t.numel for t in llama8b.tensors if t.quantizable)
    assert {t.role for t in llama8b.tensors if not t.quantizable} == {"embedding", "lm_head", "norm"}
    assert component(components, "weights.base") == quantized // 2 + kept * 2
    # embeddings + lm_head alone: 2.10 GB (1.96 GiB) in bf16, kept whatever the quantization
    assert kept * 2 > 2_000_000_000


def test_nf4_quantization_constants_per_block():
    numel = 4096 * 4096
    blocks = numel // 64
    assert quant_constants_4bit_bytes(numel, double_quant=False) == blocks * 4 + 64
    # double quantization: uint8 absmax, fp32 absmax per 256 blocks, an offset, two code tables
    assert quant_constants_4bit_bytes(numel, double_quant=True) == blocks + (blocks // 256) * 4 + 4 + 64 + 1024


def test_adapters_are_fp32_even_on_a_bf16_base(llama8b):
    options = TrainingOptions(method="lora", weights_dtype="bf16")
    adapters = trainable_tensors(llama8b, options)
    assert {t.dtype for t in adapters} == {"fp32"}
    components = static_components(llama8b, options)
    assert component(components, "weights.adapter") == 4 * sum(t.numel for t in adapters)
    # ...except under ZeRO-3 on an unquantized base, where TRL keeps them in the base dtype
    zero3 = TrainingOptions(method="lora", weights_dtype="bf16", num_gpus=2, parallelism="zero3")
    assert {t.dtype for t in trainable_tensors(llama8b, zero3)} == {"bf16"}


@pytest.mark.parametrize(
    "weights_dtype,parallelism,bytes_per_param",
    [("bf16", "ddp", 2 + 2 + 4), ("fp32", "ddp", 4 + 4 + 8), ("bf16", "zero2", 2 + 2 + 12)],
)
def test_precision_modes_bytes_per_parameter(llama8b, weights_dtype, parallelism, bytes_per_param):
    options = TrainingOptions(method="full", weights_dtype=weights_dtype, optimizer="adamw", num_gpus=2, parallelism=parallelism)
    components = static_components(llama8b, options)
    n = llama8b.total_params
    step_counters = 4 * len(llama8b.tensors) if parallelism == "ddp" else 0
    assert sum(c.bytes for c in components) == n * bytes_per_param + step_counters


def test_moe_experts_stay_unquantized_and_count_all_experts():
    cfg = dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    spec = spec_from_config(cfg, "moe")
    experts = [t for t in spec.tensors if t.role == "expert"]
    assert sum(t.numel for t in experts) == 8 * 3 * 64 * 96
    assert not any(t.quantizable for t in experts)
    assert [t.role for t in spec.tensors if t.name.endswith("mlp.gate.weight")] == ["router"]


def test_a_quantized_moe_plan_says_its_experts_stay_unquantized():
    # QLoRA on Mixtral under transformers 5 barely shrinks it: the user must be told why
    from planner.catalog import load_catalog_spec
    from planner.plan import build_plan

    spec = load_catalog_spec("mistralai/Mixtral-8x7B-v0.1")
    plan = build_plan(spec, TrainingOptions(method="qlora", gpu="H100"))
    note = next(a for a in plan.assumptions if a.startswith("the experts"))
    assert "45.1 B parameters" in note and "leaves in bf16" in note
    assert not any(a.startswith("the experts") for a in build_plan(spec, TrainingOptions(method="lora", gpu="H100")).assumptions)
