"""Serving plans against vLLM 0.19.0's own start-up accounting on H100, from llm-d-planner's logs.

bench/data/vllm-0.19-h100-llmd.json holds the start-ups (model, tensor and pipeline parallelism,
dtype, quantization, KV dtype, and what vLLM logged: weights, the profile run's torch peak, the
non-torch memory, the KV cache and its tokens). Every run whose model has the shapes of a catalog
model is planned from the model, the GPU's memory and the flags alone. Two figures in
planner/serving.py were measured on some of these runs (the sampler's bytes per logit:
Llama-3.1-8B at TP 1 in bf16 and fp32; the tensor-parallel buffers: Llama-3.1-8B at TP 2): those
rows are marked "fit", the others are held out.

    python bench/serving_llmd.py        # prints the table, writes bench/results/serving-llmd-DATE.json
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.catalog import load_catalog_spec  # noqa: E402
from planner.serving import GIB, ServingOptions, catalog_config, plan_serving  # noqa: E402

# the logged model -> (the catalog model with its shapes, the quantization it was saved with)
SHAPES_OF = {
    "meta-llama/Llama-3.1-8B-Instruct": ("meta-llama/Llama-3.1-8B", None),
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16": ("meta-llama/Llama-3.1-8B", "w4a16"),
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w8a8": ("meta-llama/Llama-3.1-8B", "w8a8"),
    "Qwen/Qwen2.5-7B-Instruct": ("Qwen/Qwen2.5-7B", None),
    "RedHatAI/Qwen2.5-7B-Instruct-fp8-dynamic": ("Qwen/Qwen2.5-7B", "fp8"),
    "RedHatAI/Qwen2.5-7B-Instruct-quantized.w8a8": ("Qwen/Qwen2.5-7B", "w8a8"),
    "Qwen/Qwen2.5-72B-Instruct": ("Qwen/Qwen2.5-72B", None),
    "moonshotai/Kimi-Dev-72B": ("Qwen/Qwen2.5-72B", None),  # a Qwen2.5-72B fine-tune
    "Qwen/Qwen3-30B-A3B": ("Qwen/Qwen3-30B-A3B", None),
    "Qwen/Qwen3-8B": ("Qwen/Qwen3-8B", None),
    "google/gemma-2-27b-it": ("google/gemma-2-27b", None),
    "google/gemma-2-9b-it": ("google/gemma-2-9b", None),
    "google/gemma-2-2b-it": ("google/gemma-2-2b", None),
    "microsoft/phi-4": ("microsoft/phi-4", None),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": ("mistralai/Mixtral-8x7B-v0.1", None),
    "RedHatAI/Llama-3.3-70B-Instruct-fp8-dynamic": ("meta-llama/Llama-3.1-70B", "fp8"),
    "redhatai/Llama-3.3-70B-Instruct-quantized.w8a8": ("meta-llama/Llama-3.1-70B", "w8a8"),
}


def is_fit(row: dict) -> bool:
    return (row["model"] == "meta-llama/Llama-3.1-8B-Instruct" and row["tp"] in ("1", "2") and row["pp"] == "1"
            and row["max_model_len"] == "8192" and row["quantization"] == "None" and row["kv_cache_dtype"] == "auto")


def plan_row(row: dict) -> dict | None:
    if row["model"] not in SHAPES_OF or row["dp"] != "1":
        return None
    model, quantization = SHAPES_OF[row["model"]]
    quantization = {"fp8": "fp8", "gptq_marlin": "w4a16"}.get(row["quantization"], quantization)
    dtype = row["dtype"].removeprefix("torch.")
    spec = load_catalog_spec(model)
    options = ServingOptions(engine_version="0.19.0", gpu_memory_utilization=float(row["gpu_memory_utilization"]),
                             max_model_len=int(row["max_model_len"]), tensor_parallel_size=int(row["tp"]),
                             pipeline_parallel_size=int(row["pp"]), quantization=quantization, kv_cache_dtype=row["kv_cache_dtype"],
                             dtype="auto" if dtype == "bfloat16" else dtype)
    plan = plan_serving(spec, options, "H100 80GB", int(float(row["init_total_memory_gib"]) * GIB), catalog_config(spec.name))

    def pair(planned: float, logged: str) -> dict:
        value = float(logged)
        return {"planned": round(planned, 4), "logged": value, "error_pct": round(100 * (planned / value - 1), 2) if value else None}

    return {"log": row["log_file"], "model": row["model"], "shapes_of": model, "tp": int(row["tp"]), "pp": int(row["pp"]),
            "max_model_len": int(row["max_model_len"]), "dtype": dtype, "quantization": quantization, "kv_cache_dtype": row["kv_cache_dtype"],
            "fit": is_fit(row),
            "weights_gib": pair(plan.weights_bytes / GIB, row["weights_memory_gib"]),
            "activation_gib": pair(plan.activation_peak_bytes / GIB, row["activation_memory_gib"]),
            "non_torch_gib": pair(plan.non_torch_bytes / GIB, row["non_torch_forward_gib"]),
            "kv_cache_gib": pair(plan.kv_cache_bytes / GIB, row["kv_cache_memory_gib"]),
            "kv_cache_tokens": pair(plan.kv_cache_tokens, row["kv_cache_tokens"]),
            "max_concurrency": pair(plan.max_concurrency, row["max_concurrency"])}


def main() -> int:
    data = json.loads((ROOT / "bench" / "data" / "vllm-0.19-h100-llmd.json").read_text())
    rows = [r for r in (plan_row(row) for row in data["rows"]) if r]
    for r in rows:
        print(f"{'fit ' if r['fit'] else '    '}{r['model'][:44]:44s} tp{r['tp']} pp{r['pp']} {r['dtype'][:5]:5s} {str(r['quantization']):5s} kv {r['kv_cache_dtype']:4s}"
              f"  tokens {r['kv_cache_tokens']['planned']:>9,} / {int(r['kv_cache_tokens']['logged']):>9,} ({r['kv_cache_tokens']['error_pct']:+.1f}%)")
    held = [r for r in rows if not r["fit"]]
    summary = {}
    for figure in ("kv_cache_tokens", "max_concurrency", "weights_gib", "activation_gib", "non_torch_gib"):
        errors = [r[figure]["error_pct"] for r in held if r[figure]["error_pct"] is not None]
        summary[figure] = {"held_out": len(errors), "median_abs_pct": round(statistics.median(abs(e) for e in errors), 2),
                           "max_over_pct": max(errors), "max_under_pct": min(errors), "within_3pct": sum(abs(e) <= 3 for e in errors)}
    print(json.dumps(summary, indent=1))
    out = ROOT / "bench" / "results" / f"serving-llmd-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"source": data["source"], "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
