"""Whole-step peak on CPU: PyTorch's memory profiler follows every allocation of one training
step (forward under bf16 autocast, backward, AdamW step), and its peak must be within 10% of the
plan's peak (runtime components aside: they are CUDA's), never more than 5% below it.

This holds the phase model to a measurement: which components are alive together at the peak,
the loss buffers, the checkpoint recomputation. CPU kernels are not CUDA kernels (SDPA's CPU
flash path, no cuBLAS workspaces), which is why the GPU harness in bench/validate.py exists.
"""

import pytest

from planner.introspect import spec_from_config
from tests.conftest import TINY
from tests.realstack import measure_step_peak, predicted_step_peak

CASES = [
    (arch, method, attention, ckpt, "hf")
    for arch, attention in (("llama", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager"), ("phi3", "sdpa"), ("llama", "eager"))
    for method in ("full", "lora", "dora")
    for ckpt in (False, True)
] + [(arch, "qlora", "sdpa", ckpt, "hf") for arch in ("llama", "qwen2") for ckpt in (False, True)] + [
    # TRL's fused LM head (the default trainer): its logits tile buffer instead of full logits
    (arch, method, attention, ckpt, "trl")
    for arch, attention in (("llama", "sdpa"), ("gemma2", "eager"))
    for method in ("full", "lora")
    for ckpt in (False, True)
]


@pytest.mark.parametrize("arch,method,attention,ckpt,trainer", CASES)
def test_step_peak_within_10_percent(arch, method, attention, ckpt, trainer):
    measured = measure_step_peak(TINY[arch], method, attention, ckpt, sequences=2, seq_len=64, trainer=trainer)
    planned, phase = predicted_step_peak(spec_from_config(dict(TINY[arch]), arch), method, attention, ckpt, 2, 64, trainer=trainer)
    assert measured.holds(planned), (planned, measured, [f"{error:+.1%}" for error in measured.errors(planned)], phase)


@pytest.mark.parametrize("arch,method", [("llama", "full"), ("qwen2", "lora")])
def test_multi_tensor_adamw_step_holds_a_second_moment_sized_buffer(arch, method):
    """torch's foreach AdamW (its CUDA default without fused=True; transformers' adamw_torch) takes
    sqrt(exp_avg_sq) of every tensor at once. With few tokens the step is the peak, and the plan's
    `adamw_foreach` must hold it (measured here: within 0.01%)."""
    measured = measure_step_peak(TINY[arch], method, "sdpa", True, sequences=1, seq_len=4, optimizer="adamw_foreach")
    planned, phase = predicted_step_peak(spec_from_config(dict(TINY[arch]), arch), method, "sdpa", True, 1, 4, optimizer="adamw_foreach")
    assert phase == "optimizer_step"
    assert measured.holds(planned, -0.02, 0.05), (planned, measured)


# Wide layers and a small vocabulary: the loss is cheap, so the peak is inside a decoder layer's
# backward (its gradients on top of what it saved), where the plan's temporary.layer_backward lives.
WIDE = dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


WIDE_CASES = [("lora", True, True), ("lora", False, True), ("lora", True, False), ("full", False, True), ("full", True, True)]


@pytest.mark.parametrize("method,ckpt,autocast", WIDE_CASES)
def test_step_peak_inside_a_layers_backward(method, ckpt, autocast):
    measured = measure_step_peak(WIDE, method, "sdpa", ckpt, sequences=2, seq_len=256, autocast=autocast)
    planned, phase = predicted_step_peak(spec_from_config(dict(WIDE), "wide"), method, "sdpa", ckpt, 2, 256, autocast=autocast)
    assert phase in ("backward_layers", "backward_end")
    assert measured.holds(planned), (planned, measured, [f"{error:+.1%}" for error in measured.errors(planned)], phase)


def _checkpointed_step_peak(method: str, reentrant: bool) -> int:
    """One step of a 3-layer Llama (LoRA on q and v, bf16 adapters, or full) under the transformers
    checkpoint, reentrant or not, with oneDNN off (no CPU-only copies)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tests.realstack import build_model, training_step_peak

    model = build_model(REENTRANT_CONFIG, "bf16", attention="sdpa")
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), autocast_adapter_dtype=False)
        model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, REENTRANT_CONFIG["vocab_size"], (2, 256))
    return training_step_peak(model, ids, autocast=False).without_onednn


REENTRANT_CONFIG = dict(WIDE, hidden_size=256, intermediate_size=512, num_hidden_layers=3)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_reentrant_checkpoint_holds_one_layer_input_more(method):
    """use_reentrant (LLaMA-Factory's default, and what TRL forces for PEFT under ZeRO-3): measured,
    one layer input more than the non-reentrant checkpoint; the plan adds that (within 10%)."""
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    measured = _checkpointed_step_peak(method, True) - _checkpointed_step_peak(method, False)
    spec = spec_from_config(dict(REENTRANT_CONFIG), "llama")
    options = TrainingOptions(method=method, lora_targets=["q_proj", "v_proj"], lora_r=8, lora_dropout=0.0, weights_dtype="bf16", precision="bf16",
                              autocast=False, autocast_adapter_dtype=False, attention="sdpa", gradient_checkpointing=True, batch_size=2,
                              seq_len=256, trainer="hf", gpu_memory_gib=80, simulate_allocator=False)
    plans = [build_plan(spec, options.model_copy(update={"use_reentrant": flag})) for flag in (False, True)]
    planned = sum(sum(c.bytes for c in plan.components if c.family != "runtime") * sign for plan, sign in zip(plans, (-1, 1)))
    assert planned == 2 * 256 * REENTRANT_CONFIG["hidden_size"] * 2
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


def test_trl_forces_the_reentrant_checkpoint_for_peft_under_zero3():
    """TRL 1.16's trainers set use_reentrant for a PEFT model under ZeRO-3 with checkpointing (its
    sft_trainer.py, trl#2514): planned so whatever the option says."""
    from planner.options import TrainingOptions

    zero3 = dict(num_gpus=4, parallelism="zero3", gradient_checkpointing=True)
    assert TrainingOptions(method="lora", trainer="trl", **zero3).effective_use_reentrant
    assert TrainingOptions(method="lora", trainer="hf", stage="dpo", **zero3).effective_use_reentrant
    assert not TrainingOptions(method="lora", trainer="hf", **zero3).effective_use_reentrant
    assert not TrainingOptions(method="full", trainer="trl", **zero3).effective_use_reentrant
    assert not TrainingOptions(method="lora", trainer="trl", num_gpus=4, parallelism="zero2", gradient_checkpointing=True).effective_use_reentrant


def test_the_page_takes_the_reentrant_checkpoint_and_its_command_says_so():
    from fastapi.testclient import TestClient

    from app.main import app
    from tests.test_pages import Page

    client = TestClient(app, raise_server_exceptions=False)
    params = {"model": "meta-llama/Llama-3.1-8B", "method": "lora", "seq_len": "4096", "use_reentrant": "true", "simulate_allocator": "false"}
    response = client.get("/", params=params)
    assert response.status_code == 200
    assert "--use-reentrant" in Page(response.text).text["cli-command"]
    assert 'value="true" selected' in response.text.split('id="f-use_reentrant"', 1)[1].split("</select>", 1)[0]
    api = client.post("/api/v1/plan", json={"model": "meta-llama/Llama-3.1-8B", "method": "lora", "seq_len": 4096, "use_reentrant": True,
                                            "simulate_allocator": False})
    assert any(c["name"] == "temporary.reentrant_input_grad" for c in api.json()["all_components"])
    assert f"{api.json()['peak_bytes'] / (1 << 30):,.2f} GiB" in response.text
    plain = client.get("/", params=dict(params, use_reentrant="false"))
    assert "--use-reentrant" not in Page(plain.text).text["cli-command"]
