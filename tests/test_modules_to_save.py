"""PEFT's modules_to_save (TRL's lora_modules_to_save): what training a copy of the embedding and
the LM head saves for the backward and holds at the step's peak, measured on CPU with the real
stack; the CLI flag, the API field, the launched run's PEFT config and the exports' keys. Its
static memory (copies, gradients, optimizer state) is held to the byte in test_static_exact.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from planner.activations import activation_components, training_tokens
from planner.introspect import spec_from_config
from planner.logits import logits_components
from planner.options import TrainingOptions
from planner.plan import build_plan
from tests.conftest import TINY
from tests.realstack import (
    _autocast,
    build_model,
    peft_config,
    saved_activation_bytes,
    training_step_peak,
)

BATCH, SEQ = 2, 64
BOTH = ["embed_tokens", "lm_head"]


def _options(modules, **extra) -> TrainingOptions:
    return TrainingOptions(method="lora", weights_dtype="bf16", precision="bf16", trainer="hf", lora_r=8, lora_dropout=0.0,
                           batch_size=BATCH, seq_len=SEQ, gradient_checkpointing=False, modules_to_save=modules, gpu_memory_gib=80, **extra)


def _real(config: dict, modules):
    from peft import get_peft_model

    model = get_peft_model(build_model(config, "bf16"), peft_config("lora", 8, "all-linear", 5, modules))
    model.train()
    return model


def _planned_saved(spec, options) -> int:
    parts = activation_components(spec, options) + logits_components(spec, options, training_tokens(options))
    return sum(c.bytes for c in parts if c.family in ("activations", "logits") and c.name != "activations.recompute")


def test_a_trained_lm_head_and_embedding_save_what_the_plan_adds():
    """lm_head's copy trains, so its matmul keeps its input (tokens x hidden, bf16 under autocast);
    the embedding's copy keeps the int64 token ids. Measured with autograd's saved-tensor hooks, the
    plan's saved bytes are within 1% (without the copies the plan is about 3% high on this model: it
    counts the first layer's norm input, which a frozen embedding's output does not need; a trained
    embedding makes it real)."""
    config = dict(TINY["llama"], vocab_size=512)
    spec = spec_from_config(config, "llama")
    ids = torch.randint(3, config["vocab_size"], (BATCH, SEQ))
    measured = {}
    for modules in (None, BOTH):
        model = _real(config, modules)

        def forward(model=model):
            with _autocast(True):
                return model(input_ids=ids, labels=ids)

        measured[bool(modules)], _ = saved_activation_bytes(model, forward)
    planned = {bool(m): _planned_saved(spec, _options(m)) for m in (None, BOTH)}
    tokens = BATCH * SEQ
    assert planned[True] - planned[False] == tokens * (config["hidden_size"] * 2 + 8)
    assert measured[True] > measured[False]
    assert abs(planned[True] - measured[True]) <= 0.01 * measured[True], (measured, planned)


def test_whole_step_peak_on_cpu_within_the_step_tolerance():
    """One whole step (forward with labels under autocast, backward, AdamW, zero_grad) of LoRA with
    the embedding and lm_head trained through their copies: the plan's peak less its CUDA-only
    runtime against PyTorch's memory profiler, as the other whole-step checks hold it."""
    config = dict(TINY["llama"], vocab_size=2048)
    model = _real(config, BOTH)
    measured = training_step_peak(model, torch.randint(3, config["vocab_size"], (BATCH, 128)))
    plan = build_plan(spec_from_config(config, "llama"), _options(BOTH).model_copy(update={"seq_len": 128}))
    planned = sum(c.bytes for c in plan.components if c.family != "runtime")
    without = build_plan(spec_from_config(config, "llama"), _options(None).model_copy(update={"seq_len": 128}))
    assert planned > sum(c.bytes for c in without.components if c.family != "runtime")
    assert measured.holds(planned), (planned, measured)


def test_a_8b_plan_holds_two_vocabulary_copies_with_their_state():
    from planner.catalog import load_catalog_spec

    spec = load_catalog_spec("meta-llama/Llama-3.1-8B")
    plain = build_plan(spec, TrainingOptions(method="lora", gpu="H100", simulate_allocator=False))
    saved = build_plan(spec, TrainingOptions(method="lora", gpu="H100", modules_to_save=BOTH, simulate_allocator=False))
    copy = 128_256 * 4096 * 2
    component = next(c for c in saved.components if c.name == "weights.modules_to_save")
    assert component.bytes == 2 * copy and "model.embed_tokens, lm_head" in component.note
    # two copies, their gradients and AdamW's two bf16 moments: 8 bytes a parameter, at least
    assert saved.peak_bytes - plain.peak_bytes >= 4 * 2 * copy
    assert saved.params["trainable"] - plain.params["trainable"] == 2 * 128_256 * 4096


@pytest.mark.parametrize("modules", [BOTH, ["lm_head"], ["embed_tokens"]])
def test_the_trace_builds_the_copies_the_formula_counts(modules):
    """The traced step builds PEFT's copies (planner/step_trace.py): what they add to its peak is
    what they add to the formula's (a 256-wide Llama with an 8,192-entry vocabulary under TRL's
    fused head, whose trained lm_head gradient is fp32 and then cast)."""
    from planner.step_trace import simulate_step

    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    spec = spec_from_config(config, "llama")
    traced, planned = {}, {}
    for saved in (None, modules):
        options = TrainingOptions(method="lora", batch_size=2, seq_len=512, modules_to_save=saved)
        traced[bool(saved)] = simulate_step(config, options, steps=2).peaks.peak_allocated
        planned[bool(saved)] = sum(c.bytes for c in build_plan(spec, options).components if c.family != "runtime")
    added_traced, added_planned = traced[True] - traced[False], planned[True] - planned[False]
    assert added_planned > 0 and abs(added_planned - added_traced) <= 0.01 * added_traced, (added_traced, added_planned)


def vramplan(*args):
    env = dict(os.environ, VRAMPLAN_SIMULATE_ALLOCATOR="off")
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300, env=env, check=False)


def test_cli_flag_and_api_field_plan_the_copies_and_refuse_a_typo():
    out = vramplan("plan", "meta-llama/Llama-3.2-1B", "--method", "lora", "--modules-to-save", "embed_tokens,lm_head", "--ensure-weight-tying", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["options"]["modules_to_save"] == BOTH and plan["options"]["ensure_weight_tying"] is True
    copies = next(c for c in plan["all_components"] if c["name"] == "weights.modules_to_save")
    assert copies["bytes"] == 128_256 * 2048 * 2  # tied and kept tied: one copy
    bad = vramplan("check", "meta-llama/Llama-3.2-1B", "--method", "lora", "--modules-to-save", "lm_heads")
    assert bad.returncode == 2 and "modules_to_save" in bad.stderr.replace("-", "_") and "Traceback" not in bad.stderr, bad.stderr

    from fastapi.testclient import TestClient

    from app.main import app

    client = TestClient(app, raise_server_exceptions=False)
    response = client.post("/api/v1/plan", json={"model": "meta-llama/Llama-3.2-1B", "method": "lora", "modules_to_save": ["lm_head"],
                                                 "simulate_allocator": False})
    assert response.status_code == 200, response.text
    assert any(c["name"] == "weights.modules_to_save" for c in response.json()["all_components"])
    refused = client.post("/api/v1/plan", json={"model": "meta-llama/Llama-3.2-1B", "method": "full", "modules_to_save": ["lm_head"]})
    assert refused.status_code == 422 and "modules_to_save" in refused.text


def _launched_trainer(tiny_run, tmp_path, **options):
    """(plan, trainer): a LoRA plan of the tiny run's model with these options, and the TRL trainer
    the entry builds from its spec.json and trl.yaml, as a launched run does."""
    from launcher.entry import build_trainer
    from launcher.run_files import run_files, write_files
    from launcher.spec import RunSettings, launch_spec
    from planner.request import resolve_source

    model = str(tiny_run["model"])
    plan = build_plan(resolve_source(model).spec, TrainingOptions(method="lora", weights_dtype="bf16", precision="bf16", trainer="trl",
                                                                  batch_size=1, gpu_memory_gib=24, **options))
    spec = launch_spec(plan, model, RunSettings(dataset=str(tiny_run["sft"]), output_dir=str(tmp_path / "out"), max_steps=1), device="cpu")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_files(run_dir, run_files(spec))
    trainer, _ = build_trainer(spec.model_dump(mode="json"), run_dir, callbacks=[])
    return plan, trainer


@pytest.mark.parametrize("ensure_weight_tying", [False, True])
def test_the_launched_trainer_trains_the_copies_the_plan_counts(tiny_run, tmp_path, ensure_weight_tying):
    """build_trainer, the entry's path from spec.json and trl.yaml (lora_modules_to_save) to TRL's
    trainer: its PEFT model trains the copies, and counts what the plan counts (ensure_weight_tying,
    which TRL's file has no key for, passed to PEFT by the entry)."""
    plan, trainer = _launched_trainer(tiny_run, tmp_path, modules_to_save=BOTH, ensure_weight_tying=ensure_weight_tying)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert any("embed_tokens" in n for n in names)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    assert (trainable, total) == (plan.params["trainable"], plan.params["total"])


def test_exports_write_each_tools_key():
    import yaml

    from launcher.exports import render
    from tests.test_exports import make_spec

    spec = make_spec(stage="sft", method="lora", modules_to_save=BOTH, for_export=True)
    assert yaml.safe_load(render(spec, "trl").split("\n", 1)[1])["lora_modules_to_save"] == BOTH
    assert yaml.safe_load(render(spec, "axolotl").split("\n", 1)[1])["lora_modules_to_save"] == BOTH
    assert yaml.safe_load(render(spec, "llamafactory").split("\n", 1)[1])["additional_target"] == "embed_tokens,lm_head"
    tied = make_spec(stage="sft", method="lora", modules_to_save=BOTH, ensure_weight_tying=True, for_export=True)
    assert yaml.safe_load(render(tied, "axolotl").split("\n", 1)[1])["peft_ensure_weight_tying"] is True
    for fmt in ("trl", "llamafactory"):
        with pytest.raises(ValueError, match="ensure_weight_tying"):
            render(tied, fmt)


def test_the_page_plans_the_copies_and_its_command_says_so():
    from fastapi.testclient import TestClient

    from app.main import app
    from tests.test_pages import Page

    client = TestClient(app, raise_server_exceptions=False)
    params = {"model": "meta-llama/Llama-3.1-8B", "method": "lora", "modules_to_save": "embed_tokens, lm_head", "simulate_allocator": "false"}
    response = client.get("/", params=params)
    assert response.status_code == 200
    page = Page(response.text)
    assert "weights.modules_to_save" in response.text and "PEFT&#39;s trainable copies of model.embed_tokens, lm_head" in response.text
    assert "--modules-to-save embed_tokens,lm_head" in page.text["cli-command"]
    api = client.post("/api/v1/plan", json={"model": "meta-llama/Llama-3.1-8B", "method": "lora", "modules_to_save": BOTH, "simulate_allocator": False})
    assert f"{api.json()['peak_bytes'] / (1 << 30):,.2f} GiB" in response.text
    typo = client.get("/", params=dict(params, modules_to_save="lm_heads"))
    assert typo.status_code == 422 and "lm_heads matches no module" in typo.text
    tokens = client.get("/", params=dict(params, modules_to_save="lm_head", trainable_token_indices="128000, 128001"))
    assert tokens.status_code == 200
    assert "--trainable-token-indices 128000,128001" in Page(tokens.text).text["cli-command"]
    api = client.post("/api/v1/plan", json={"model": "meta-llama/Llama-3.1-8B", "method": "lora", "modules_to_save": ["lm_head"],
                                            "trainable_token_indices": [128000, 128001], "simulate_allocator": False})
    assert any(c["name"] == "temporary.trainable_tokens" for c in api.json()["all_components"])
    assert f"{api.json()['peak_bytes'] / (1 << 30):,.2f} GiB" in tokens.text
    outside = client.get("/", params=dict(params, modules_to_save="lm_head", trainable_token_indices="999999"))
    assert outside.status_code == 422 and "past the vocabulary" in outside.text


def test_trainable_tokens_whole_step_on_cpu_within_the_step_tolerance():
    """LoRA with trainable_token_indices on a model whose embedding matrix outweighs a short step's
    activations and logits: PEFT writes the trained rows into a copy of the whole matrix at the
    embedding's forward, and its backward makes the matrix's dense gradient before picking the
    rows out, which peaks at the end of backward (5 MB above the same step without the tokens,
    measured). The plan's peak, less its CUDA-only runtime, against PyTorch's memory profiler:
    without that copy it would peak at the start of backward, 17% low."""
    from peft import get_peft_model

    config = dict(TINY["llama"], vocab_size=16384, hidden_size=256, intermediate_size=512)
    tokens = [16000, 16001, 16002]
    model = get_peft_model(build_model(config, "bf16"), peft_config("lora", 8, "all-linear", 5, trainable_token_indices=tokens))
    model.train()
    measured = training_step_peak(model, torch.randint(3, config["vocab_size"], (1, 16)))
    spec = spec_from_config(config, "llama")
    plan = build_plan(spec, _options(None, trainable_token_indices=tokens).model_copy(update={"seq_len": 16, "batch_size": 1}))
    planned = sum(c.bytes for c in plan.components if c.family != "runtime")
    copy = next(c.bytes for c in plan.all_components if c.name == "temporary.trainable_tokens")
    assert copy == 16384 * config["hidden_size"] * 2 and plan.peak_phase == "backward_end"
    assert measured.holds(planned), (planned, measured, plan.peak_phase)


def test_the_launched_trainer_trains_the_tokens_the_plan_counts(tiny_run, tmp_path):
    """trainable_token_indices, which TRL's config file has no key for, passed to PEFT by the
    entry: the launched trainer's PEFT model counts what the plan counts; the exports write
    axolotl's key and refuse the others."""
    import yaml

    from launcher.exports import render
    from launcher.spec import RunSettings, launch_spec
    from planner.request import resolve_source

    model = str(tiny_run["model"])
    if resolve_source(model).spec.tie_word_embeddings:
        pytest.skip("the tiny run's model is tied")
    plan, trainer = _launched_trainer(tiny_run, tmp_path, trainable_token_indices=[5, 6])
    assert any("trainable_tokens_delta" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trainer.model.get_nb_trainable_parameters() == (plan.params["trainable"], plan.params["total"])
    exported = launch_spec(plan, model, RunSettings(dataset=str(tiny_run["sft"]), output_dir=str(tmp_path / "out")), device="cpu", for_export=True)
    assert yaml.safe_load(render(exported, "axolotl").split("\n", 1)[1])["peft_trainable_token_indices"] == [5, 6]
    for fmt in ("trl", "llamafactory"):
        with pytest.raises(ValueError, match="trainable_token_indices"):
            render(exported, fmt)
