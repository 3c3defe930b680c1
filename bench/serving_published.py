"""Serving plans against published vLLM start-up logs.

Each case is a start-up someone posted, with its source: the model, the GPU memory CUDA reported
(or the GPU, where the log does not print it), gpu_memory_utilization, max_model_len, tensor
parallelism, and what vLLM logged. Two checks per case, as far as the log allows:

- end to end: the plan from the model, GPU and flags alone (weights, profile run, non-torch memory
  estimated), against the logged weights, KV blocks/tokens and concurrency;
- KV arithmetic: tokens and concurrency from the logged "Available KV cache memory" (exact rules,
  the only error the log's rounding to 0.01 GiB).

    python bench/serving_published.py            # prints the table, writes bench/results/serving-DATE.json
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.catalog import load_catalog_spec  # noqa: E402
from planner.serving import GIB, ServingOptions, catalog_config, kv_from_available, plan_serving, serving_gpu  # noqa: E402

CASES = [
    {
        "id": "llama31-8b-3090-20k",
        "source": "https://github.com/vllm-project/vllm/issues/10517",
        "model": "meta-llama/Llama-3.1-8B", "logged_model": "meta-llama/Llama-3.1-8B-Instruct",
        "gpu": "RTX 3090", "cuda_total_gib": 23.58, "engine_version": "0.6.4",
        "options": {"gpu_memory_utilization": 0.9, "max_model_len": 20000},
        "logged": {"weights_gib": 14.9888, "kv_cache_gib": 3.81, "blocks": 1952, "max_concurrency": 1.56},
        "fitted": True,  # the activation coefficient was set from this log's profile peak
    },
    {
        "id": "llama31-8b-3090-29k",
        "source": "https://github.com/vllm-project/vllm/issues/10517",
        "model": "meta-llama/Llama-3.1-8B", "logged_model": "meta-llama/Llama-3.1-8B-Instruct",
        "gpu": "RTX 3090", "cuda_total_gib": 23.58, "engine_version": "0.6.4",
        "options": {"gpu_memory_utilization": 0.9, "max_model_len": 29000},
        "logged": {"weights_gib": 14.9888, "kv_cache_gib": 2.89, "blocks": 1478, "max_concurrency": 0.82, "serves": False},
        "fitted": True,
    },
    {
        "id": "llama31-70b-w8a8-2k",
        "source": "https://github.com/vllm-project/vllm/pull/12569",
        "model": "meta-llama/Llama-3.1-70B", "logged_model": "neuralmagic/Meta-Llama-3.1-70B-Instruct-quantized.w8a8",
        "gpu": "H100 (not stated in the log: assumed)", "cuda_total_gib": 79.19, "engine_version": "0.7.1",
        "options": {"gpu_memory_utilization": 0.98, "max_model_len": 2048, "quantization": "w8a8"},
        "logged": {"weights_gib": 67.7229, "blocks": 1381, "max_concurrency": 10.79},
        "fitted": False,
    },
    {
        "id": "r1-distill-qwen-14b-tp2-4090",
        "source": "https://github.com/vllm-project/vllm/issues/13061",
        "model": "Qwen/Qwen2.5-14B", "logged_model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B (Qwen2.5-14B's architecture)",
        "gpu": "RTX 4090 x2", "cuda_total_gib": 23.65, "engine_version": "0.7.2",
        "options": {"gpu_memory_utilization": 0.98, "tensor_parallel_size": 2},
        "logged": {"weights_gib": 13.9476, "tokens_min_over_ranks": 81536, "serves": False},
        "fitted": False,
    },
    {
        # added 2026-12-05, held out: no coefficient was set from it
        "id": "llama31-8b-l40s-32k",
        "source": "https://github.com/vllm-project/vllm/pull/17122",
        "model": "meta-llama/Llama-3.1-8B", "logged_model": "meta-llama/Llama-3.1-8B-Instruct",
        "gpu": "L40S", "cuda_total_gib": None,  # not logged: the catalog's NVML memory less the driver's, as a user's plan has it
        "engine_version": "0.8.4",  # not logged: the V1 engine of a log dated 2025-04-24 (0.8.4 was current)
        # gpu_memory_utilization and max_num_batched_tokens are not in the posted lines: vLLM's defaults assumed
        "options": {"max_model_len": 32768},
        "logged": {"weights_gib": 14.9889, "tokens_min_over_ranks": 158656, "max_concurrency": 4.84},
        "fitted": False,
    },
    {
        "id": "llama3-8b-h100-v0-8k",
        "source": "https://github.com/vllm-project/vllm/pull/10511",
        "model": "meta-llama/Llama-3.1-8B", "logged_model": "meta-llama/Meta-Llama-3-8B (Llama-3.1-8B's shapes; its 8,192 positions are the default max_model_len)",
        "gpu": "H100 80GB", "cuda_total_gib": 79.22,
        "engine_version": "0.6.4",  # not logged: the V0 main branch of December 2024
        "options": {"max_model_len": 8192},
        "logged": {"weights_gib": 14.96, "kv_cache_gib": 53.29},
        "fitted": False,
    },
    # LoRA start-ups (held out: no coefficient was set from them). Mistral-7B-Instruct-v0.2 through a
    # RunPod vLLM worker image of 0.14.0 with enable_lora, max_loras 1, max_lora_rank 16, max_num_seqs 256,
    # read in a user's support write-ups (2026-01-22) that the stored search index holds without their
    # repository's name; the log's own lines are quoted in one, summarised with their figures in the other.
    {
        "id": "mistral-7b-v02-lora-l40s",
        "source": "a public GitHub write-up 'RunPod Serverless + LoRA: Support Ticket v4' (2026-01-22; search index file 54236229155)",
        "model": "mistral-community/Mistral-7B-v0.2", "logged_model": "mistralai/Mistral-7B-Instruct-v0.2",
        "gpu": "L40S", "cuda_total_gib": None,  # not logged: the catalog's memory, as a user's plan has it
        "engine_version": "0.14.0",
        "options": {"gpu_memory_utilization": 0.95, "max_model_len": 4096, "max_num_seqs": 256,
                    "enable_lora": True, "max_loras": 1, "max_lora_rank": 16},
        # the write-up's summary of its worker log: "13.58 GiB", "28.13 GiB available, 230,416 tokens"
        "logged": {"weights_gib": 13.58, "kv_cache_gib": 28.13, "tokens_min_over_ranks": 230416},
        "fitted": False,
    },
    {
        "id": "mistral-7b-v02-lora-rtx-pro-6000",
        "source": "a public GitHub write-up 'RunPod Serverless: CUDA Toolchain Incompatibility with madiatorlabs/worker-v1-vllm:v0.14.0' "
                  "(2026-01-22; search index file 54377340947)",
        "model": "mistral-community/Mistral-7B-v0.2", "logged_model": "mistralai/Mistral-7B-Instruct-v0.2",
        # the author's reading of the worker's GPU ("RTX 6000 Blackwell"), not a logged name; 76 GiB of KV cache
        # at 0.95 needs a 96 GB card
        "gpu": "RTX PRO 6000 Blackwell", "cuda_total_gib": None,
        "engine_version": "0.14.0",
        "options": {"gpu_memory_utilization": 0.95, "max_model_len": 4096, "max_num_seqs": 256,
                    "enable_lora": True, "max_loras": 1, "max_lora_rank": 16},
        # verbatim: "Model loading took 13.58 GiB", "Available KV cache memory: 75.99 GiB",
        # "GPU KV cache size: 622,464 tokens", "Maximum concurrency for 4,096 tokens per request: 151.97x"
        "logged": {"weights_gib": 13.58, "kv_cache_gib": 75.99, "tokens_min_over_ranks": 622464, "max_concurrency": 151.97},
        "fitted": False,
    },
    {
        "id": "mistral-7b-gptq-kv-only",
        "source": "https://github.com/ArmDeveloperEcosystem/arm-learning-paths/blob/main/content/learning-paths/laptops-and-desktops/dgx_spark_voicechatbot/4_vllm.md",
        "model": "mistralai/Mistral-7B-v0.3", "logged_model": "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ (the same KV shapes)",
        "engine_version": "0.11.0",
        "options": {"max_model_len": 32768},
        "logged": {"available_kv_gib": 102.56, "tokens": 840160, "max_concurrency": 25.64},
    },
    {
        "id": "qwen3-14b-kv-only",
        "source": "https://github.com/LMCache/LMCache/issues/1739",
        "model": "Qwen/Qwen3-14B", "engine_version": "0.11.0",
        "options": {"max_model_len": 32768},
        "logged": {"available_kv_gib": 6.51, "tokens": 42656, "max_concurrency": 1.30},
    },
]


def _err(pred, logged):
    return None if logged in (None, 0) else round(100 * (pred / logged - 1), 2)


def run_case(case: dict) -> dict:
    spec = load_catalog_spec(case["model"])
    options = ServingOptions(engine_version=case["engine_version"], **case["options"])
    logged = case["logged"]
    out = {k: case[k] for k in ("id", "source", "model", "logged_model", "gpu", "engine_version", "options", "logged") if k in case}
    out["fitted"] = case.get("fitted", False)
    if "available_kv_gib" in logged:
        tokens, conc = kv_from_available(spec, options, int(logged["available_kv_gib"] * GIB), options.max_model_len)
        out["kv_only"] = {"tokens": tokens, "max_concurrency": round(conc, 2), "tokens_error_pct": _err(tokens, logged["tokens"]),
                          "concurrency_error_pct": _err(conc, logged["max_concurrency"])}
        return out
    if case["cuda_total_gib"] is None:
        _, total, _ = serving_gpu(options.model_copy(update={"gpu": case["gpu"]}))
    else:
        total = int(case["cuda_total_gib"] * GIB)
    plan = plan_serving(spec, options, case["gpu"], total, catalog_config(spec.name))
    # vLLM wraps the model in its LoRA slots inside the load it measures: "Model loading took" holds both
    loaded = plan.weights_bytes + (plan.lora_bytes if options.enable_lora else 0)
    pred = {"weights_gib": round(loaded / GIB, 4), "kv_cache_gib": round(plan.kv_cache_bytes / GIB, 3),
            "blocks": plan.kv_cache_blocks, "tokens": plan.kv_cache_tokens, "max_concurrency": round(plan.max_concurrency, 2),
            "serves": plan.fits}
    out["predicted"] = pred
    out["errors_pct"] = {
        "weights": _err(pred["weights_gib"], logged.get("weights_gib")),
        "kv_cache": _err(pred["kv_cache_gib"], logged.get("kv_cache_gib")),
        "blocks": _err(pred["blocks"], logged.get("blocks")),
        "tokens": _err(pred["tokens"], logged.get("tokens_min_over_ranks")),
        "max_concurrency": _err(pred["max_concurrency"], logged.get("max_concurrency")),
    }
    if "serves" in logged:
        out["verdict_agrees"] = pred["serves"] == logged["serves"]
    return out


def main() -> int:
    rows = [run_case(c) for c in CASES]
    for r in rows:
        if "kv_only" in r:
            print(f"{r['id']:<32} KV only: tokens {r['kv_only']['tokens']:,} ({r['kv_only']['tokens_error_pct']:+.2f}%), "
                  f"concurrency {r['kv_only']['max_concurrency']} ({r['kv_only']['concurrency_error_pct']:+.2f}%)")
        else:
            e = {k: v for k, v in r["errors_pct"].items() if v is not None}
            print(f"{r['id']:<32} " + ", ".join(f"{k} {v:+.2f}%" for k, v in e.items())
                  + (f", verdict {'agrees' if r['verdict_agrees'] else 'DISAGREES'}" if "verdict_agrees" in r else "")
                  + (" (fitted)" if r["fitted"] else ""))
    date = datetime.date.today().isoformat()
    path = ROOT / "bench" / "results" / f"serving-{date}.json"
    path.write_text(json.dumps({"date": date, "engine_rules": "planner/serving.py", "cases": rows}, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
