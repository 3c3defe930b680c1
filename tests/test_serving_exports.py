"""Exports and pages of the serving and merge plans: the `vllm serve` line parses with vLLM's
documented engine arguments and carries the plan's values; mergekit's YAML uses only mergekit's
documented config keys; the pages (no JS) show the numbers of the same object the API returns."""

import argparse
import json
import re
import shlex

import pytest
import yaml
from fastapi.testclient import TestClient

from app.cli import main
from planner.catalog import load_catalog_spec
from planner.merge import METHODS, MergeOptions, mergekit_config, plan_merge
from planner.serving import ServingOptions, plan_serving_request, vllm_serve_args

# vLLM's engine arguments, as its docs list them: the `vllm serve` usage of
# https://docs.vllm.ai/en/v0.8.1/serving/engine_args.html (--dtype, --kv-cache-dtype, --max-model-len,
# --pipeline-parallel-size, --tensor-parallel-size, --block-size, --gpu-memory-utilization,
# --max-num-batched-tokens, --max-num-seqs, --quantization, --enforce-eager, --enable-lora,
# --max-loras, --max-lora-rank) and https://unsloth.ai/docs/basics/inference-and-deployment/vllm-guide/vllm-engine-arguments
VLLM_ENGINE_ARGS = {
    "--tensor-parallel-size": int, "--pipeline-parallel-size": int, "--gpu-memory-utilization": float,
    "--max-model-len": int, "--max-num-seqs": int, "--max-num-batched-tokens": int, "--block-size": int,
    "--max-loras": int, "--max-lora-rank": int,
}
VLLM_CHOICES = {
    "--dtype": ("auto", "half", "float16", "bfloat16", "float", "float32"),
    "--kv-cache-dtype": ("auto", "fp8", "fp8_e5m2", "fp8_e4m3"),
    "--quantization": ("aqlm", "awq", "fp8", "gptq", "bitsandbytes", "compressed-tensors", "gptq_marlin", "marlin"),
}
VLLM_SWITCHES = ("--enforce-eager", "--enable-lora")


def _vllm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    p.add_argument("model")
    for flag, kind in VLLM_ENGINE_ARGS.items():
        p.add_argument(flag, type=kind)
    for flag, choices in VLLM_CHOICES.items():
        p.add_argument(flag, choices=choices)
    for flag in VLLM_SWITCHES:
        p.add_argument(flag, action="store_true")
    return p


@pytest.mark.parametrize("options", [
    {},
    {"tensor_parallel_size": 2, "quantization": "fp8", "kv_cache_dtype": "fp8", "enforce_eager": True},
    {"enable_lora": True, "max_loras": 4, "max_lora_rank": 64, "dtype": "float16", "max_model_len": 8192, "max_num_seqs": 32},
    {"quantization": "awq", "pipeline_parallel_size": 2, "block_size": 32},
    {"quantization": "w8a8", "gpu_memory_utilization": 0.95},
])
def test_vllm_serve_line_parses_with_vllms_documented_arguments(options):
    plan = plan_serving_request("meta-llama/Llama-3.1-8B", ServingOptions(gpu="H100", **options))
    argv = vllm_serve_args(plan)
    assert argv[:2] == ["vllm", "serve"]
    parsed = _vllm_parser().parse_args(argv[2:])  # an unknown flag or a bad value raises
    o = plan.options
    assert parsed.model == "meta-llama/Llama-3.1-8B"
    assert parsed.gpu_memory_utilization == o.gpu_memory_utilization
    assert parsed.max_model_len == plan.max_model_len and parsed.max_num_seqs == plan.max_num_seqs
    assert parsed.max_num_batched_tokens == plan.max_num_batched_tokens
    assert (parsed.tensor_parallel_size or 1) == o.tensor_parallel_size and (parsed.pipeline_parallel_size or 1) == o.pipeline_parallel_size
    assert parsed.enforce_eager == o.enforce_eager and parsed.enable_lora == o.enable_lora
    if o.enable_lora:
        assert (parsed.max_loras, parsed.max_lora_rank) == (o.max_loras, o.max_lora_rank)
    assert parsed.quantization == (o.quantization if o.quantization in ("fp8", "awq", "gptq", "bitsandbytes") else None)
    assert (parsed.kv_cache_dtype or "auto") == o.kv_cache_dtype and (parsed.dtype or "auto") == o.dtype
    assert (parsed.block_size or 16) == o.block_size
    assert plan.to_dict()["exports"]["vllm_serve"] == shlex.join(argv)


def test_cli_export_vllm(capsys):
    assert main(["inference", "meta-llama/Llama-3.1-8B", "--gpu", "L40S", "--max-model-len", "8192", "--export", "vllm"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert all(line.startswith("#") for line in out[:-1]) and out[-1].startswith("vllm serve meta-llama/Llama-3.1-8B ")
    assert re.search(r"GPU KV cache size: [\d,]+ tokens", "\n".join(out))
    assert main(["inference", "meta-llama/Llama-3.1-8B", "--gpu", "RTX 3060", "--max-model-len", "131072", "--export", "vllm"]) == 1


# mergekit's config keys, as its docs describe them: https://pypi.org/project/mergekit/0.0.2.1/
# ("merge_method", "slices" (sources: model, layer_range), "models", "base_model", "parameters",
# "dtype"; parameters such as weight and density, per model or for the whole merge), and the
# method parameters its README's examples use (t for slerp, normalize and int8_mask for ties)
MERGEKIT_TOP = {"merge_method", "slices", "models", "base_model", "parameters", "dtype", "tokenizer_source"}
MERGEKIT_MODEL = {"model", "parameters"}
MERGEKIT_SOURCE = {"model", "layer_range"}
MERGEKIT_PARAMETERS = {"weight", "density", "t", "normalize", "int8_mask", "epsilon", "lambda"}
MERGEKIT_METHODS = {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough"}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "peft"])
def test_mergekit_yaml_uses_mergekits_keys(method, capsys):
    n = 2 if method == "slerp" else 3
    code = main(["merge", "Qwen/Qwen2.5-0.5B", "--method", method, "--num-models", str(n), "--export", "mergekit"])
    assert code == 0
    text = capsys.readouterr().out
    config = yaml.safe_load(text)
    assert set(config) <= MERGEKIT_TOP and config["merge_method"] in MERGEKIT_METHODS and config["merge_method"] == method
    assert config["dtype"] == "bfloat16"
    assert set(config.get("parameters", {})) <= MERGEKIT_PARAMETERS
    if "slices" in config:
        sources = [s for sl in config["slices"] for s in sl["sources"]]
        assert len(sources) == n and all(set(s) <= MERGEKIT_SOURCE for s in sources)
        assert all(s["layer_range"] == [0, 24] for s in sources)  # Qwen2.5-0.5B's 24 layers
    else:
        models = config["models"]
        assert len(models) == n and all(set(m) <= MERGEKIT_MODEL for m in models)
        assert all(set(m.get("parameters", {})) <= MERGEKIT_PARAMETERS for m in models)
        if method in ("ties", "dare_ties", "dare_linear", "task_arithmetic", "slerp"):
            assert config["base_model"] == "Qwen/Qwen2.5-0.5B" and config["base_model"] in [m["model"] for m in models]
    assert "MODEL_2" in text and text.startswith("# vramplan:")


def test_mergekit_export_is_in_the_json_and_refused_for_peft(capsys):
    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    plan = plan_merge(spec, MergeOptions(method="ties", num_models=2))
    assert yaml.safe_load(plan.to_dict()["exports"]["mergekit_yaml"]) == mergekit_config(plan)
    assert plan_merge(spec, MergeOptions()).to_dict()["exports"] == {}
    assert main(["merge", "Qwen/Qwen2.5-0.5B", "--export", "mergekit"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# -- the pages -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    from app.api_serving import router
    from app.main import create_app

    app = create_app()
    if not any(getattr(r, "path", None) == "/serving" for r in app.routes):  # before app/main.py includes the router
        app.include_router(router)
    return TestClient(app, raise_server_exceptions=False)


def _data_bytes(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'data-bytes="(\d+)"', html)]


def test_serving_page_shows_the_apis_numbers(client):
    query = {"model": "meta-llama/Llama-3.1-8B", "gpu": "L40S", "max_model_len": "8192", "enable_lora": "true", "max_loras": "2", "concurrency": "8"}
    page = client.get("/serving", params=query)
    assert page.status_code == 200, page.text
    body = {k: (True if v == "true" else int(v) if v.isdigit() else v) for k, v in query.items()}
    api = client.post("/api/v1/inference", json=body).json()
    html = page.text
    assert _data_bytes(html) == [c["bytes"] for c in api["components"]]
    assert f'id="kv-tokens" data-value="{api["kv_cache_tokens"]}"' in html
    assert f'data-value="{api["max_concurrency"]}"' in html
    assert api["exports"]["vllm_serve"].replace("'", "&#39;") in html
    assert "<svg" in html and "<script" not in html.split("<main>")[1]
    assert 'id="search"' in html and str(api["search"]["longest_max_model_len"]) not in ("", None)


def test_merge_page_shows_the_apis_numbers_and_yaml(client):
    page = client.get("/merge", params={"model": "Qwen/Qwen2.5-0.5B", "method": "ties", "num_models": "3", "device": "cuda", "gpu": "L4"})
    assert page.status_code == 200, page.text
    api = client.post("/api/v1/merge", json={"model": "Qwen/Qwen2.5-0.5B", "method": "ties", "num_models": 3, "device": "cuda", "gpu": "L4"}).json()
    assert _data_bytes(page.text) == [c["bytes"] for c in api["gpu_components"] + api["host_components"]]
    assert f'data-value="{api["host_peak_bytes"]}"' in page.text and f'data-value="{api["gpu_peak_bytes"]}"' in page.text
    assert "merge_method: ties" in page.text and page.text.count("<svg") >= 2


def test_pages_without_a_model_show_the_form_and_bad_input_is_422(client):
    for path in ("/serving", "/merge"):
        r = client.get(path)
        assert r.status_code == 200 and "<form" in r.text and "result" not in r.text.split("</form>")[1]
    r = client.get("/serving", params={"model": "meta-llama/Llama-3.1-8B", "gpu": "L40S", "gpu_memory_utilization": "1.5"})
    assert r.status_code == 422 and "gpu_memory_utilization" in r.text
    r = client.get("/merge", params={"model": "Qwen/Qwen2.5-0.5B", "method": "slerp", "num_models": "3"})
    assert r.status_code == 422 and "slerp merges exactly two models" in r.text
    r = client.get("/serving", params={"model": "/etc", "gpu": "L40S"})
    assert r.status_code == 422  # a path is the CLI's


def test_find_gpu_gives_the_smallest_tensor_parallel_size_cheapest_first(capsys):
    from planner.serving import find_serving_gpus, needed_utilization

    options = ServingOptions(max_model_len=8192)
    rows = find_serving_gpus("meta-llama/Llama-3.1-70B", options, concurrency=16)
    assert rows and all(r["tensor_parallel_size"] in (1, 2, 4, 8) for r in rows)
    priced = [r["price_per_hour_usd"] for r in rows if r["price_per_hour_usd"] is not None]
    assert priced == sorted(priced)
    for row in rows[:5]:
        plan = plan_serving_request("meta-llama/Llama-3.1-70B", options.model_copy(update={"gpu": row["gpu"], "tensor_parallel_size": row["tensor_parallel_size"]}))
        assert plan.fits and needed_utilization(plan, 16, 8192) <= 0.9
        if row["tensor_parallel_size"] > 1:  # half the ranks does not serve the load
            smaller = plan_serving_request("meta-llama/Llama-3.1-70B", options.model_copy(update={"gpu": row["gpu"], "tensor_parallel_size": row["tensor_parallel_size"] // 2}))
            need = needed_utilization(smaller, 16, 8192)
            assert not smaller.fits or need is None or need > 0.9
    assert main(["inference", "meta-llama/Llama-3.1-70B", "--find", "gpu", "--max-model-len", "8192", "--concurrency", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == rows
    assert main(["inference", "meta-llama/Llama-3.1-70B", "--find", "gpu", "--max-model-len", "8192", "--concurrency", "100000"]) == 1
