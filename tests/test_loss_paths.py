"""The loss path (`loss_implementation`): what each path plans, that auto keeps every plan as it
was, the no-upcast figure against what autograd saves for a real model, the CLI flag and API
field, the refusal of the trace for Triton kernels, and the exports' keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from planner.catalog import load_catalog_spec
from planner.errors import PlanInputError
from planner.logits import liger_chunk_tokens, logits_components
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.step_trace import unsupported_reason

os.environ.setdefault("VRAMPLAN_SIMULATE_ALLOCATOR", "off")

GEMMA = "google/gemma-2-9b"
LLAMA = "meta-llama/Llama-3.1-8B"
PATHS = ("fp32_upcast", "fp32_upcast_shifted", "no_upcast", "liger", "cut_cross_entropy", "trl_fused")
GIB = 1 << 30


def loss_bytes(plan) -> int:
    return sum(c.bytes for c in plan.all_components if c.family == "logits" or c.name == "temporary.loss_backward")


def gemma_plan(loss: str, trainer: str = "trl", **extra):
    options = TrainingOptions(method="lora", batch_size=2, seq_len=8192, trainer=trainer, loss_implementation=loss, **extra)
    return build_plan(load_catalog_spec(GEMMA), options)


@pytest.mark.parametrize("trainer", ["trl", "hf"])
def test_each_path_plans_its_own_buffers_in_order_for_gemma_2_9b_at_2_x_8192(trainer):
    sizes = {path: loss_bytes(gemma_plan(path, trainer)) for path in PATHS}
    assert len(set(sizes.values())) == len(PATHS), sizes
    chunked = ("liger", "cut_cross_entropy", "trl_fused")
    assert sizes["fp32_upcast_shifted"] > sizes["fp32_upcast"] > sizes["no_upcast"] > max(sizes[p] for p in chunked)
    # full logits: 16,384 tokens x 256,000 entries; fp32 log-softmax + bf16 tanh + labels, 8 bytes in backward
    tokens, vocab, hidden = 2 * 8192, 256_000, 3584
    assert sizes["fp32_upcast"] == tokens * (vocab * (4 + 2 + 8) + 8)
    # transformers 4.46-4.48: the bf16 logits, their fp32 upcast and its shifted fp32 copy as the loss runs
    assert sizes["fp32_upcast_shifted"] == tokens * (vocab * (4 + 2 + 2 + 4 + 4) + 8)
    # bf16 log-softmax + bf16 tanh + labels, 4 bytes in backward
    assert sizes["no_upcast"] == tokens * (vocab * (2 + 2 + 4) + 8)
    # no chunked path holds a twentieth of the logits
    assert all(sizes[p] < sizes["no_upcast"] / 20 for p in chunked)
    # Liger: 256-token chunks (ceil(16384 / ceil(256000 / 3584)) = 228 -> 256), grad_input in bf16
    assert liger_chunk_tokens(tokens, vocab, hidden) == 256
    assert sizes["liger"] == tokens * (hidden * 2 + 8) + 256 * vocab * 2 + tokens * 5
    auto = loss_bytes(gemma_plan("auto", trainer))
    assert auto == sizes["trl_fused" if trainer == "trl" else "fp32_upcast"]


def test_liger_chunk_rule_follows_liger():
    # Liger's own example in fused_linear_cross_entropy.py: BT = 4096*4, V = 32000, H = 4096 -> 2048
    assert liger_chunk_tokens(4096 * 4, 32000, 4096) == 2048
    assert liger_chunk_tokens(10, 32000, 4096) == 2  # ceil(10 / 8) = 2
    assert liger_chunk_tokens(3, 100, 4096) == 3  # one chunk never exceeds the tokens


def test_full_fine_tuning_adds_the_lm_head_gradient_to_the_fused_kernels():
    spec = load_catalog_spec(LLAMA)
    head = spec.vocab_size * spec.hidden_size * 2
    for path in ("liger", "cut_cross_entropy"):
        lora = sum(c.bytes for c in logits_components(spec, TrainingOptions(method="lora", trainer="hf", loss_implementation=path), 2048))
        full = sum(c.bytes for c in logits_components(spec, TrainingOptions(method="full", trainer="hf", loss_implementation=path), 2048))
        assert full - lora >= head - 2048 * spec.hidden_size * 2, path


@pytest.mark.parametrize("model", [GEMMA, LLAMA])
@pytest.mark.parametrize("trainer", ["trl", "hf"])
@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_auto_leaves_every_plan_as_it_was(model, trainer, method):
    spec = load_catalog_spec(model)
    base = dict(method=method, trainer=trainer, batch_size=2, seq_len=4096)
    unset = build_plan(spec, TrainingOptions(**base)).to_dict()
    auto = build_plan(spec, TrainingOptions(**base, loss_implementation="auto")).to_dict()
    assert unset == auto
    assert unset["options"]["loss_implementation"] == "auto"
    own = build_plan(spec, TrainingOptions(**base, loss_implementation="trl_fused" if trainer == "trl" else "fp32_upcast")).to_dict()
    assert own["components"] == unset["components"] and own["peak_bytes"] == unset["peak_bytes"]


def test_the_other_stages_keep_their_own_loss():
    for stage in ("dpo", "orpo", "reward", "grpo"):
        with pytest.raises(PlanInputError) as caught:
            build_plan(load_catalog_spec(LLAMA), TrainingOptions(stage=stage, loss_implementation="liger"))
        assert caught.value.field == "loss_implementation"
        # auto still plans them
        build_plan(load_catalog_spec(LLAMA), TrainingOptions(stage=stage))


def test_cut_cross_entropy_needs_16_bit_weights():
    with pytest.raises(PlanInputError) as caught:
        build_plan(load_catalog_spec(LLAMA), TrainingOptions(method="full", weights_dtype="fp32", loss_implementation="cut_cross_entropy"))
    assert caught.value.field == "loss_implementation"


def test_triton_kernels_are_not_traced_and_say_why():
    for path in ("liger", "cut_cross_entropy"):
        reason = unsupported_reason(TrainingOptions(loss_implementation=path))
        assert reason and "Triton" in reason and "meta device" in reason
    for path in ("fp32_upcast", "no_upcast", "trl_fused"):
        reason = unsupported_reason(TrainingOptions(loss_implementation=path))
        assert reason is None or "not installed" in reason, reason
    reason = unsupported_reason(TrainingOptions(loss_implementation="fp32_upcast_shifted"))
    assert reason is None or "not installed" in reason, reason
    plan = gemma_plan("liger", simulate_allocator=True)
    assert plan.reserve_source == "formula"
    assert any("Triton" in a for a in plan.to_dict()["assumptions"] + plan.to_dict().get("notes", []))


def test_no_upcast_is_what_autograd_saves_for_cross_entropy_on_bf16_logits():
    """A real tiny Gemma-2 in bf16 without autocast: the loss's saved tensors (the bf16
    log-softmax, int64 labels) and the soft-cap's tanh are what the no_upcast path plans; the
    transformers loss saves the fp32 log-softmax the fp32_upcast path plans."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from planner.introspect import spec_from_config
    from tests.conftest import TINY
    from tests.realstack import build_model, saved_activation_bytes

    batch, seq = 2, 32
    tokens = batch * seq
    config = dict(TINY["gemma2"], vocab_size=4096)
    spec = spec_from_config(config, "gemma2")
    assert spec.final_logit_softcap
    model = build_model(config, "bf16", attention="eager")
    uncapped = build_model(dict(config, final_logit_softcapping=None), "bf16", attention="eager")
    ids = torch.randint(3, config["vocab_size"], (batch, seq))

    def no_upcast_loss():
        logits = model(input_ids=ids).logits
        labels = F.pad(ids, (0, 1), value=-100)[..., 1:].contiguous()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)

    forward, _ = saved_activation_bytes(model, lambda: model(input_ids=ids).logits)
    forward_uncapped, _ = saved_activation_bytes(uncapped, lambda: uncapped(input_ids=ids).logits)
    with_no_upcast, loss = saved_activation_bytes(model, no_upcast_loss)
    with_upcast, _ = saved_activation_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert loss.dtype == torch.bfloat16

    def planned(path):
        options = TrainingOptions(method="full", trainer="hf", loss_implementation=path, batch_size=batch, seq_len=seq)
        return next(c.bytes for c in logits_components(spec, options, tokens) if c.name == "logits")

    tanh = forward - forward_uncapped  # the soft-cap's tanh, kept in bf16
    assert tanh == tokens * spec.vocab_size * 2
    # what the loss adds beyond the forward, less a few scalars (nll_loss's total weight)
    assert 0 <= (with_no_upcast - forward) + tanh - planned("no_upcast") <= 64
    assert 0 <= (with_upcast - forward) + tanh - planned("fp32_upcast") <= 64


def test_shifted_upcast_is_what_transformers_4_48s_loss_holds():
    """transformers 4.46-4.48's ForCausalLMLoss (an fp32 upcast, then a shifted contiguous copy of
    it) against 4.49 on's (the labels padded instead), each as the HF Trainer runs it: the model's
    output, which holds the bf16 logits, dropped after the loss. Measured on CPU, whole steps: the
    shifted copy's step peaks 2 bytes per logit above the other (the bf16 logits outlive the loss's
    forward there), and each peak over the forward's is what its path plans."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from planner.introspect import spec_from_config
    from tests.conftest import TINY
    from tests.realstack import build_model, profiled_peak

    vocab, batch, seq = 32000, 2, 256
    config = dict(TINY["llama"], vocab_size=vocab)
    spec = spec_from_config(config, "llama")
    model = build_model(config, "bf16")
    for param in model.parameters():
        param.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # so the backward runs through the logits, and little else
    ids = torch.randint(3, vocab, (batch, seq))
    tokens = batch * seq

    def loss_4_48(logits, labels):
        logits = logits.float()
        shifted = logits[..., :-1, :].contiguous()
        return F.cross_entropy(shifted.view(-1, vocab), labels[..., 1:].contiguous().view(-1), ignore_index=-100)

    def loss_4_49(logits, labels):
        logits = logits.float()
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        return F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=-100)

    def step(loss_fn):
        def run():
            outputs = model(input_ids=ids)
            loss = loss_fn(outputs.logits, ids)
            del outputs
            loss.backward()
            del loss
            model.model.norm.weight.grad = None
        return run

    forward = profiled_peak(lambda: model(input_ids=ids).logits.sum().item())  # ends holding the bf16 logits
    measured = {}
    for path, loss_fn in (("fp32_upcast_shifted", loss_4_48), ("fp32_upcast", loss_4_49)):
        step(loss_fn)()
        measured[path] = profiled_peak(step(loss_fn)) - forward

    def planned(path):
        options = TrainingOptions(method="full", trainer="hf", loss_implementation=path, batch_size=batch, seq_len=seq)
        return sum(c.bytes for c in logits_components(spec, options, tokens)) - tokens * vocab * 2  # less the bf16 logits

    assert planned("fp32_upcast_shifted") - planned("fp32_upcast") == tokens * vocab * 2
    assert abs((measured["fp32_upcast_shifted"] - measured["fp32_upcast"]) / (tokens * vocab * 2) - 1) < 0.02, measured
    for path, peak in measured.items():
        assert abs(peak / planned(path) - 1) < 0.01, (path, peak, planned(path))


def test_the_trace_runs_transformers_4_48s_loss_as_planned():
    """The traced step with the shifted upcast copy (planner/stage_steps.py) peaks 2 bytes per
    logit above the traced step with today's loss, as the formula plans (a 256-wide Llama with an
    8,192-entry vocabulary, where the logits dominate the difference)."""
    pytest.importorskip("torch")
    from planner.introspect import spec_from_config
    from planner.step_trace import simulate_step

    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    spec = spec_from_config(config, "llama")
    traced, planned = {}, {}
    for path in ("fp32_upcast", "fp32_upcast_shifted"):
        options = TrainingOptions(method="lora", trainer="hf", loss_implementation=path, batch_size=2, seq_len=512)
        traced[path] = simulate_step(config, options, steps=2).peaks.peak_allocated
        planned[path] = sum(c.bytes for c in build_plan(spec, options).components if c.family != "runtime")
    logits = 2 * 512 * 8192
    assert planned["fp32_upcast_shifted"] - planned["fp32_upcast"] == 2 * logits
    assert abs((traced["fp32_upcast_shifted"] - traced["fp32_upcast"]) / (2 * logits) - 1) < 0.05, traced


def vramplan(*args):
    env = dict(os.environ, VRAMPLAN_SIMULATE_ALLOCATOR="off")
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_flag_plans_the_path():
    out = vramplan("plan", GEMMA, "--batch-size", "2", "--seq-len", "8192", "--loss-implementation", "no_upcast", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["options"]["loss_implementation"] == "no_upcast"
    logits = next(c for c in plan["all_components"] if c["name"] == "logits")
    assert logits["bytes"] == 2 * 8192 * (256_000 * 4 + 8) and "no fp32 upcast" in logits["note"]
    bad = vramplan("check", LLAMA, "--loss-implementation", "fused")
    assert bad.returncode == 2 and ("loss-implementation" in bad.stderr or "loss_implementation" in bad.stderr), bad.stderr


def test_api_field_plans_the_path():
    from fastapi.testclient import TestClient

    from app.main import app

    client = TestClient(app, raise_server_exceptions=False)
    body = {"model": GEMMA, "batch_size": 2, "seq_len": 8192, "loss_implementation": "liger", "simulate_allocator": False}
    response = client.post("/api/v1/plan", json=body)
    assert response.status_code == 200, response.text
    expected = build_plan(load_catalog_spec(GEMMA), TrainingOptions(batch_size=2, seq_len=8192, loss_implementation="liger", simulate_allocator=False))
    assert response.json()["all_components"] == json.loads(json.dumps(expected.to_dict()["all_components"]))
    refused = client.post("/api/v1/plan", json={"model": LLAMA, "stage": "dpo", "loss_implementation": "liger"})
    assert refused.status_code == 422 and "loss_implementation" in refused.text


def export_spec(**options):
    from tests.test_exports import make_spec

    return make_spec(for_export=True, **options)


def test_exports_write_each_tools_key_or_refuse():
    import yaml

    from launcher.exports import render

    liger = export_spec(stage="sft", method="lora", loss_implementation="liger")
    axolotl = yaml.safe_load(render(liger, "axolotl"))
    assert axolotl["plugins"] == ["axolotl.integrations.liger.LigerPlugin"] and axolotl["liger_fused_linear_cross_entropy"] is True
    assert yaml.safe_load(render(liger, "llamafactory"))["enable_liger_kernel"] is True
    with pytest.raises(ValueError, match="fused LM head"):
        render(liger, "trl")

    cce = export_spec(stage="sft", method="lora", loss_implementation="cut_cross_entropy")
    axolotl = yaml.safe_load(render(cce, "axolotl"))
    assert axolotl["plugins"] == ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"] and axolotl["cut_cross_entropy"] is True
    with pytest.raises(ValueError, match="LLaMA-Factory has no key"):
        render(cce, "llamafactory")
    with pytest.raises(ValueError, match="trl file"):
        render(cce, "trl")

    no_upcast = export_spec(stage="sft", method="lora", loss_implementation="no_upcast")
    for fmt in ("trl", "axolotl", "llamafactory"):
        with pytest.raises(ValueError, match="no_upcast"):
            render(no_upcast, fmt)

    fused = export_spec(stage="sft", method="lora", loss_implementation="trl_fused")
    trl = yaml.safe_load(render(fused, "trl").split("\n", 1)[1])
    assert "use_liger_kernel" not in trl
    with pytest.raises(ValueError, match="export trl"):
        render(fused, "axolotl")

    # auto writes none of these keys, as before
    plain = export_spec(stage="sft", method="lora")
    for fmt, keys in (("axolotl", ("plugins", "cut_cross_entropy", "liger_fused_linear_cross_entropy")), ("llamafactory", ("enable_liger_kernel",)),
                      ("trl", ("use_liger_kernel",))):
        data = yaml.safe_load(render(plain, fmt).split("\n", 1)[1])
        assert not any(k in data for k in keys), fmt


def test_documented_keys_the_exports_use():
    from pathlib import Path

    data = Path(__file__).parent / "data"
    axolotl = json.loads((data / "axolotl_keys.json").read_text())["models"]["AxolotlInputConfig"]
    llamafactory = json.loads((data / "llamafactory_keys.json").read_text())["classes"]
    assert "plugins" in axolotl  # the plugins' own keys (LigerArgs, CutCrossEntropyArgs) join the schema when the plugin loads
    assert "enable_liger_kernel" in llamafactory["ModelArguments"]


def test_a_loss_path_trls_trainers_do_not_run_is_exported_but_not_launched():
    from planner.errors import PlanInputError
    from tests.test_exports import make_spec

    with pytest.raises(PlanInputError) as refused:
        make_spec(stage="sft", method="lora", loss_implementation="liger")
    assert refused.value.field == "loss_implementation" and "export the plan" in refused.value.reason
    assert make_spec(stage="sft", method="lora", loss_implementation="liger", for_export=True).options["loss_implementation"] == "liger"
