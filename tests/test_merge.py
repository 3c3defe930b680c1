"""Merge plans: PEFT merge_and_unload's terms from the model's shapes, mergekit's working set
from its largest tensor, and `vramplan merge`'s exit codes."""

import json

import pytest
from pydantic import ValidationError

from app.cli import main
from planner.catalog import load_catalog_spec
from planner.merge import MergeOptions, plan_merge


def test_peft_merge_holds_model_adapter_and_the_largest_delta():
    spec = load_catalog_spec("meta-llama/Llama-3.1-8B")
    plan = plan_merge(spec, MergeOptions(lora_r=16, lora_targets=["q_proj", "v_proj"], device="cuda"), 80 << 30)
    terms = {t.name: t.bytes for t in plan.device_terms}
    assert terms["weights.base"] == spec.total_params * 2
    assert terms["weights.adapter"] == 32 * 16 * ((4096 + 4096) + (4096 + 1024)) * 4  # fp32 A and B
    assert terms["temporary.delta"] == 4096 * 4096 * 4  # q_proj's fp32 delta on the GPU
    assert plan.fits and plan.disk_bytes == spec.total_params * 2
    cpu = plan_merge(spec, MergeOptions(lora_targets=["q_proj"]))
    assert {t.name: t.bytes for t in cpu.host_terms}["temporary.delta"] == 4096 * 4096 * (4 + 2)  # and its bf16 cast


def test_dora_and_qlora():
    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    lora = plan_merge(spec, MergeOptions())
    dora = plan_merge(spec, MergeOptions(adapter="dora"))
    assert dora.host_peak_bytes > lora.host_peak_bytes
    qlora = plan_merge(spec, MergeOptions(adapter="qlora"))
    assert qlora.host_peak_bytes == lora.host_peak_bytes and any("16 bit" in n for n in qlora.notes)


def test_mergekit_methods_grow_with_models_and_method():
    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    linear = plan_merge(spec, MergeOptions(method="linear", num_models=2)).host_peak_bytes
    ties = plan_merge(spec, MergeOptions(method="ties", num_models=2)).host_peak_bytes
    ties4 = plan_merge(spec, MergeOptions(method="ties", num_models=4)).host_peak_bytes
    assert linear < ties < ties4
    gpu = plan_merge(spec, MergeOptions(method="ties", device="cuda", low_cpu_memory=True), 24 << 30)
    assert any(t.name == "output.shard" for t in gpu.device_terms)
    with pytest.raises(ValidationError):
        MergeOptions(method="slerp", num_models=3)


def test_cli(capsys):
    assert main(["merge", "meta-llama/Llama-3.1-8B", "--adapter", "qlora", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "fits" and data["disk_bytes"] > 16 * 10**9
    assert main(["merge", "meta-llama/Llama-3.1-8B", "--host-memory-gib", "8"]) == 1
    capsys.readouterr()
    assert main(["merge", "meta-llama/Llama-3.1-8B", "--method", "nope"]) == 2
