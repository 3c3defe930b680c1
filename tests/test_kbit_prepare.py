"""PEFT's prepare_model_for_kbit_training as a plan option (issue 23: the runs users really launch).

QLoRA tutorials and older TRL trainers call it; TRL 1.16's SFT, DPO and GRPO trainers do not. It
casts every 16-bit parameter bitsandbytes left unquantized to fp32, so the embedding's output and
with it the residual stream are fp32, and bitsandbytes' Linear layers hand their outputs back in
that dtype. Each test holds the plan to the real stack on CPU (transformers, bitsandbytes' NF4,
PEFT's own prepare_model_for_kbit_training) and fails if the option stops moving the plan.
"""

from __future__ import annotations

import pytest
import torch

from planner.activations import activation_components, training_tokens
from planner.catalog import load_catalog_spec
from planner.errors import PlanInputError
from planner.introspect import spec_from_config
from planner.logits import logits_components
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.static_memory import static_components
from planner.step_trace import simulate_step
from tests.conftest import TINY
from tests.realstack import (
    _autocast,
    build_model,
    quant_state_tensors,
    saved_activation_bytes,
    training_step_peak,
    unique_bytes,
)

pytest.importorskip("bitsandbytes")
BATCH, SEQ = 2, 64


def _options(prepared: bool, checkpointing: bool, **changes) -> TrainingOptions:
    fields = dict(method="qlora", weights_dtype="bf16", precision="bf16", attention="sdpa", gradient_checkpointing=checkpointing,
                  batch_size=BATCH, seq_len=SEQ, trainer="hf", lora_r=8, lora_dropout=0.0, gpu_memory_gib=80,
                  prepare_model_for_kbit_training=prepared)
    return TrainingOptions(**{**fields, **changes})


def _real_qlora(config: dict, prepared: bool, checkpointing: bool, trl_cast: bool = False):
    """The QLoRA model as a script builds it: 4-bit load, prepare_model_for_kbit_training or not, LoRA;
    `trl_cast`: then TRL's own peft_module_casting_to_bf16, as TRL 0.13's SFTTrainer ran it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = build_model(config, "bf16", quantization="nf4")
    if prepared:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    if trl_cast:
        from trl.experimental.utils import peft_module_casting_to_bf16

        peft_module_casting_to_bf16(model)
    if checkpointing and not prepared:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("trl_cast", [False, True])
def test_weights_to_the_byte_and_saved_activations_within_5_percent(arch, checkpointing, trl_cast):
    config = TINY[arch]
    model = _real_qlora(config, True, checkpointing, trl_cast)
    ids = torch.randint(3, config["vocab_size"], (BATCH, SEQ))

    def forward():
        with _autocast(True):
            return model(input_ids=ids, labels=ids)

    saved, _ = saved_activation_bytes(model, forward)
    params = list(model.parameters())
    # measured after a forward: Linear4bit's first forward casts its bias back to the compute dtype
    weights = unique_bytes(params + [t for p in params for t in quant_state_tensors(p)])
    embedding = next(p for n, p in model.named_parameters() if "embed_tokens" in n)
    assert embedding.dtype == (torch.bfloat16 if trl_cast else torch.float32)

    spec, options = spec_from_config(config, arch), _options(True, checkpointing, peft_module_casting_to_bf16=trl_cast)
    planned_weights = sum(c.bytes for c in static_components(spec, options) if c.name.startswith("weights"))
    assert planned_weights == weights
    parts = activation_components(spec, options) + logits_components(spec, options, training_tokens(options))
    planned = sum(c.bytes for c in parts if c.name != "activations.recompute" and not c.name.startswith("temporary"))
    assert abs(planned - saved) / saved <= 0.05, (planned, saved)
    # and the option is what moved it: the same model without it saves much less
    prepared_activations = sum(c.bytes for c in activation_components(spec, options))
    unprepared_activations = sum(c.bytes for c in activation_components(spec, _options(False, checkpointing)))
    assert prepared_activations > 1.2 * unprepared_activations
    if checkpointing and trl_cast:
        # the embedding's output, the first layer's input, is bf16 again; the later layers' are fp32
        first = next(c.bytes for c in activation_components(spec, options) if c.name == "activations.first_layer_input")
        assert first == BATCH * SEQ * config["hidden_size"] * 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_whole_step_peak_on_cpu_within_the_step_tolerance(checkpointing):
    config = dict(TINY["llama"])
    model = _real_qlora(config, True, checkpointing)
    measured = training_step_peak(model, torch.randint(3, config["vocab_size"], (BATCH, 128)))
    plan = build_plan(spec_from_config(config, "llama"), _options(True, checkpointing, seq_len=128))
    planned = sum(c.bytes for c in plan.components if c.family != "runtime")
    assert measured.holds(planned), (planned, measured)


@pytest.mark.parametrize("trl_cast", [False, True])
def test_the_trace_runs_the_upcast_model(trl_cast):
    """The traced step casts what prepare_model_for_kbit_training casts and runs bitsandbytes'
    dtype round trip: its peak grows with the formula's (a 256-wide Llama, where the allocator's
    rounding does not hide the difference)."""
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    spec = spec_from_config(config, "llama")
    traced, formula = {}, {}
    for prepared in (False, True):
        options = _options(prepared, True, seq_len=512, trainer="trl", loss_implementation="auto", peft_module_casting_to_bf16=prepared and trl_cast)
        traced[prepared] = simulate_step(config, options, steps=2).peaks.peak_allocated
        formula[prepared] = sum(c.bytes for c in build_plan(spec, options).components if c.family != "runtime")
    grown_traced, grown_formula = traced[True] - traced[False], formula[True] - formula[False]
    assert grown_traced > 0 and abs(grown_traced - grown_formula) / grown_formula <= 0.25, (grown_traced, grown_formula)


def test_a_7b_qlora_plan_doubles_its_checkpoints_and_says_which_it_assumed():
    spec = load_catalog_spec("mistralai/Mistral-7B-v0.3")
    common = dict(method="qlora", batch_size=4, seq_len=4096, gpu="A100 80GB", trainer="hf")
    plain = build_plan(spec, TrainingOptions(**common))
    prepared = build_plan(spec, TrainingOptions(**common, prepare_model_for_kbit_training=True))
    bytes_of = lambda plan, name: next(c.bytes for c in plan.components if c.name == name)
    assert bytes_of(prepared, "activations.checkpoints") == 2 * bytes_of(plain, "activations.checkpoints")
    assert bytes_of(prepared, "weights.base") > bytes_of(plain, "weights.base")
    assert prepared.peak_bytes > plain.peak_bytes + 4 * (1 << 30)
    assert any("set prepare_model_for_kbit_training" in line for line in plain.assumptions)
    assert any("casts the unquantized weights" in line for line in prepared.assumptions)


def test_on_an_unquantized_base_it_changes_nothing_and_says_so_and_it_needs_autocast():
    spec = spec_from_config(TINY["llama"], "llama")
    asked = build_plan(spec, TrainingOptions(method="lora", prepare_model_for_kbit_training=True, gpu="H100"))
    plain = build_plan(spec, TrainingOptions(method="lora", gpu="H100"))
    assert asked.peak_bytes == plain.peak_bytes
    assert any("changes nothing planned here" in a and "weights_dtype fp32" in a for a in asked.assumptions)
    with pytest.raises(PlanInputError) as refused:
        build_plan(spec, TrainingOptions(method="qlora", prepare_model_for_kbit_training=True, peft_module_casting_to_bf16=True,
                                         weights_dtype="fp16", precision="fp16"))
    assert refused.value.field == "peft_module_casting_to_bf16"
    with pytest.raises(PlanInputError) as refused:
        build_plan(spec, TrainingOptions(method="qlora", autocast=False, prepare_model_for_kbit_training=True))
    assert refused.value.field == "autocast"


def test_the_api_and_the_page_plan_it_and_the_page_shows_the_choice():
    import re

    from fastapi.testclient import TestClient

    from app.main import app

    client = TestClient(app, raise_server_exceptions=False)
    body = {"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "gpu": "RTX 4090", "simulate_allocator": False}
    plain = client.post("/api/v1/plan", json=body).json()
    prepared = client.post("/api/v1/plan", json={**body, "prepare_model_for_kbit_training": True}).json()
    assert prepared["peak_bytes"] > plain["peak_bytes"]
    # fp16 weights with TRL's bf16 cast is refused with the field
    refused = client.post("/api/v1/plan", json={**body, "prepare_model_for_kbit_training": True, "peft_module_casting_to_bf16": True,
                                                "precision": "fp16"})
    assert refused.status_code == 422 and "peft_module_casting_to_bf16" in refused.text
    page = client.get("/", params={"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "gpu": "RTX 4090",
                                   "prepare_model_for_kbit_training": "true", "simulate_allocator": "false"})
    assert page.status_code == 200
    chosen = re.search(r'<select id="f-prepare_model_for_kbit_training".*?</select>', page.text, re.S).group(0)
    assert 'value="true" selected' in chosen and "casts the unquantized weights" in page.text


def test_a_launched_run_calls_it_before_the_trainer(tiny_run):
    """TRL 1.16's trainers do not call it: the launcher loads the model as TRL would and prepares it."""
    from bitsandbytes.nn import Params4bit
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    from launcher.entry import _kbit_prepared_model

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    args = SFTConfig(output_dir="unused", use_cpu=True, gradient_checkpointing=True, report_to=[],
                     model_init_kwargs={"dtype": "bfloat16", "quantization_config": quantization, "device_map": None})
    model = _kbit_prepared_model(str(tiny_run["model"]), args)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.float32 and dtypes["lm_head.weight"] == torch.float32
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, Params4bit)
    assert model.is_gradient_checkpointing


@pytest.mark.parametrize("changes,field", [({"stage": "reward"}, "prepare_model_for_kbit_training"),
                                           ({"num_gpus": 2, "parallelism": "fsdp"}, "prepare_model_for_kbit_training")])
def test_launches_it_cannot_run_faithfully_are_refused(changes, field):
    from launcher.spec import RunSettings, launch_spec

    spec = load_catalog_spec("meta-llama/Llama-3.1-8B")
    plan = build_plan(spec, TrainingOptions(method="qlora", prepare_model_for_kbit_training=True, gpu="H100", **changes))
    with pytest.raises(PlanInputError) as refused:
        launch_spec(plan, "meta-llama/Llama-3.1-8B", RunSettings(dataset="org/data", output_dir="out"), for_export=True)
    assert refused.value.field == field


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapters_in_the_base_dtype_when_autocast_adapter_dtype_is_off(autocast, checkpointing):
    """get_peft_model(autocast_adapter_dtype=False), as PEFT before 0.12 behaved: bf16 adapters, whose
    lora_A saves the input itself (shared by q, k and v), no fp32 copies; to the byte and within the
    step tolerance, and below the default fp32 adapters' plan."""
    from peft import LoraConfig, get_peft_model

    config = TINY["llama"]
    model = get_peft_model(build_model(config, "bf16"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                                   task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    measured = training_step_peak(model, torch.randint(3, config["vocab_size"], (BATCH, SEQ)), autocast)
    spec = spec_from_config(config, "llama")
    options = TrainingOptions(method="lora", weights_dtype="bf16", precision="bf16", gradient_checkpointing=checkpointing, batch_size=BATCH,
                              seq_len=SEQ, trainer="hf", lora_r=8, lora_dropout=0.0, gpu_memory_gib=80, autocast=autocast, autocast_adapter_dtype=False)
    plan = build_plan(spec, options)
    adapter = next(c.bytes for c in plan.components if c.name == "weights.adapter")
    assert adapter == sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    planned = sum(c.bytes for c in plan.components if c.family != "runtime")
    assert measured.holds(planned), (planned, measured)
    default = build_plan(spec, options.model_copy(update={"autocast_adapter_dtype": True}))
    assert sum(c.bytes for c in default.components if c.family != "runtime") > planned


def test_an_export_says_what_it_assumed_and_a_launch_refuses_what_trl_does_not_run():
    from launcher.exports import export_notes
    from launcher.spec import RunSettings, launch_spec

    spec = load_catalog_spec("meta-llama/Llama-3.1-8B")
    settings = RunSettings(dataset="org/data", output_dir="out")
    prepared = launch_spec(build_plan(spec, TrainingOptions(method="qlora", prepare_model_for_kbit_training=True, gpu="H100")),
                           "meta-llama/Llama-3.1-8B", settings, for_export=True)
    assert any("prepare_model_for_kbit_training" in note for note in export_notes(prepared, "trl"))
    for field, options in (("peft_module_casting_to_bf16", dict(prepare_model_for_kbit_training=True, peft_module_casting_to_bf16=True)),
                           ("autocast_adapter_dtype", dict(autocast_adapter_dtype=False))):
        plan = build_plan(spec, TrainingOptions(method="qlora", gpu="H100", **options))
        with pytest.raises(PlanInputError) as refused:
            launch_spec(plan, "meta-llama/Llama-3.1-8B", settings, runs_root=None, for_export=False)
        assert refused.value.field == field


@pytest.mark.parametrize("prepared", [True, False])
def test_the_launched_trainer_gets_the_prepared_model_only_when_the_plan_says_so(tiny_run, tmp_path, prepared):
    """build_trainer, the entry's own path from spec.json and trl.yaml to the TRL trainer: with the
    option the trainer's model has fp32 embeddings (PEFT's function ran), without it bf16 (TRL's loader)."""
    from launcher.entry import build_trainer
    from launcher.run_files import run_files, write_files
    from launcher.spec import RunSettings, launch_spec
    from planner.request import resolve_source

    model = str(tiny_run["model"])
    plan = build_plan(resolve_source(model).spec, _options(prepared, True, gpu_memory_gib=24, trainer="trl", batch_size=1))
    spec = launch_spec(plan, model, RunSettings(dataset=str(tiny_run["sft"]), output_dir=str(tmp_path / "out"), max_steps=1),
                       device="cpu")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_files(run_dir, run_files(spec))
    trainer, _ = build_trainer(spec.model_dump(mode="json"), run_dir, callbacks=[])
    embedding = trainer.model.get_input_embeddings().weight
    assert embedding.dtype == (torch.float32 if prepared else torch.bfloat16)
