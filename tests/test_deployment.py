"""The advisor goes past training (issue 26): merge the adapter or serve it beside others, which
weights to deploy, and what the serving GPU holds, from the same vLLM accounting `vramplan
inference` uses. Each test fails if the advice stops saying what a user must do next."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.main import app
from planner.advisor import Task, advise
from planner.catalog import load_catalog_spec
from planner.deployment import MAX_LORA_SLOTS, deployment_advice
from planner.options import TrainingOptions
from planner.serving import ServingOptions, catalog_config, plan_serving, serving_gpu
from tests.test_cli import vramplan

LLAMA_8B = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def llama():
    return load_catalog_spec(LLAMA_8B)


def test_one_lora_adapter_is_merged_and_its_serving_numbers_are_vllm_s_accounting(llama):
    advice = deployment_advice(llama, "lora", 16, tenants=1, latency_target_ms=None, request_tokens=4096, gpu_name="RTX 4090")
    assert advice.action == "merge" and advice.quantization is None
    options = ServingOptions(gpu="RTX 4090", max_model_len=4096)
    name, total, _ = serving_gpu(options)
    expected = plan_serving(llama, options, name, total, catalog_config(LLAMA_8B))
    assert advice.serving.kv_cache_tokens == expected.kv_cache_tokens > 0
    assert f"{expected.kv_cache_tokens:,} KV cache tokens" in " ".join(advice.reasons)
    # the held-out start-ups found fewer tokens than planned: the plan says its figure is an upper bound
    assert any("upper bound" in note for note in expected.notes)


def test_many_tenants_are_served_side_by_side_with_lora_slots(llama):
    advice = deployment_advice(llama, "lora", 32, tenants=50, latency_target_ms=None, request_tokens=2048, gpu_name="L40S")
    assert advice.action == "serve adapters"
    serving = advice.serving.options
    assert serving.enable_lora and serving.max_loras == MAX_LORA_SLOTS and serving.max_lora_rank == 32
    assert advice.serving.lora_bytes > 0 and any("50 tenants" in r for r in advice.reasons)
    # a latency target merges whatever the tenants
    assert deployment_advice(llama, "lora", 32, 50, 200.0, 2048, "L40S").action == "merge"


@pytest.mark.parametrize("method,action,words", [("dora", "merge", "vllm-project/vllm#6983"), ("ia3", "merge", "IA3"),
                                                  ("prompt_tuning", "serve with PEFT", "cannot be merged"),
                                                  ("full", "serve checkpoint", "nothing to merge")])
def test_what_vllm_cannot_serve_is_merged_or_named(llama, method, action, words):
    advice = deployment_advice(llama, method, 16, 1, None, 2048, "A10G")
    assert advice.action == action and words in " ".join(advice.reasons)
    assert (advice.serving is None) == (action == "serve with PEFT")


def test_a_model_too_big_for_16_bit_serving_gets_quantized_weights_with_the_16_bit_figure(llama):
    seventy = load_catalog_spec("meta-llama/Llama-3.1-70B")
    advice = deployment_advice(seventy, "qlora", 16, 1, None, 4096, "L40S", has_fp8=True)
    assert advice.quantization in ("fp8", "awq") and advice.serving.verdict == "serves"
    assert any(r.startswith("16-bit weights would leave") for r in advice.reasons)
    # without FP8 on the card, the 4-bit weights
    assert deployment_advice(seventy, "qlora", 16, 1, None, 4096, "A100 80GB", has_fp8=False).quantization in (None, "awq")


def test_the_api_the_cli_and_the_page_give_the_same_deployment():
    body = {"model": LLAMA_8B, "gpu": "RTX 4090", "tenants": 12}
    api = TestClient(app).post("/api/v1/advise", json=body)
    assert api.status_code == 200
    deployment = api.json()["deployment"]
    assert deployment["action"] == "serve adapters" and deployment["serving"]["enable_lora"]
    spec = load_catalog_spec(LLAMA_8B)
    assert deployment == advise(spec, Task(tenants=12), TrainingOptions(gpu="RTX 4090")).deployment.to_dict()

    cli = vramplan("advise", LLAMA_8B, "--gpu", "RTX 4090", "--tenants", "12")
    assert cli.returncode == 0, cli.stderr
    assert "after training: serve adapters" in cli.stdout and f"{deployment['serving']['kv_cache_tokens']:,} KV cache tokens" in cli.stdout

    page = TestClient(app).get("/", params={"model": LLAMA_8B, "gpu": "RTX 4090", "tenants": "12"})
    assert page.status_code == 200 and 'id="after-training"' in page.text
    link = re.search(r'id="deployment-serving-link" href="([^"]+)"', page.text).group(1).replace("&amp;", "&")
    serving = TestClient(app).get(link)
    assert serving.status_code == 200 and f"{deployment['serving']['kv_cache_tokens']:,}" in serving.text
