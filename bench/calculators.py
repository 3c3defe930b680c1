"""Other serving-memory calculators on the same published vLLM start-ups as bench/serving_published.py.

Each calculator's rule is written out below from its own source (read 2026-12-05; where each
lives is in RULES), then applied to the cases whose start-up log gives a KV cache figure, end to
end: the model, the GPU's memory, gpu_memory_utilization, max_model_len and tensor parallelism.
Every calculator is given the weights vramplan computes (which match the logged weights within
1.2%), so the table compares the KV budget each rule leaves, not how each one reads a checkpoint.
A calculator that does not answer KV tokens, or does not know tensor parallelism, says n/a.

    python bench/calculators.py    # prints the table, writes bench/results/calculators-DATE.json
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_published import CASES

from planner.catalog import load_catalog_spec
from planner.serving import (
    GIB,
    ServingOptions,
    catalog_config,
    plan_serving,
    serving_gpu,
)

MIB = 1 << 20
RULES = {
    "vramplan": "planner/serving.py: vLLM's start-up accounting (profile run, non-torch memory, CUDA graphs where subtracted, 16-token blocks)",
    "kv_only": "LMCache's KV cache calculator (docs/source/_static/kv_cache_calculator.html @ 375a749): tokens = memory / (2 x layers x KV heads x "
               "head_dim x dtype bytes), given the memory a user would enter: GPU memory x gpu_memory_utilization - weights",
    "llm_gpu_calc": "gjgjos/LLM-GPU-Calc (app.py @ 3cc604f, README's max users): GPU x utilization - weights - 1 GiB non-torch - "
                    "max_model_len x (18 x hidden + 4 x intermediate) bytes of activation; one GPU only",
    "vllm_vram_calc": "taylorelley/vllm-vram-calc (index.html @ 0d264bb): GPU x utilization - weights / TP - 2.5 GB CUDA graphs - 1.5 GB "
                      "overhead, with KV heads split over TP ranks",
    "gpu_poor": "RahulSChand/gpu_poor (src/App.js @ ad2fc0e): no KV token figure; one request of max_model_len needs 8 x context x hidden x "
                "layers bytes of KV (GQA ignored) + weights + 650 MiB + batch x (10 x ctx x hidden + 2 x ctx^2 x heads) bytes",
}


def logged_tokens(case: dict, per_token: int) -> int | None:
    logged = case["logged"]
    if "blocks" in logged:
        return logged["blocks"] * 16
    if "tokens_min_over_ranks" in logged:
        return logged["tokens_min_over_ranks"]
    if "kv_cache_gib" in logged:
        return int(logged["kv_cache_gib"] * GIB / per_token)
    return None


def compare(case: dict) -> dict | None:
    if "available_kv_gib" in case["logged"]:
        return None  # a KV-only case: every rule is the same arithmetic once the memory is given
    spec = load_catalog_spec(case["model"])
    options = ServingOptions(engine_version=case["engine_version"], **case["options"])
    if case["cuda_total_gib"] is None:
        _, total, _ = serving_gpu(options.model_copy(update={"gpu": case["gpu"]}))
    else:
        total = int(case["cuda_total_gib"] * GIB)
    plan = plan_serving(spec, options, case["gpu"], total, catalog_config(spec.name))
    tp = options.tensor_parallel_size
    util = options.gpu_memory_utilization
    weights = plan.weights_bytes  # per rank
    per_token = plan.kv_bytes_per_token  # per rank: KV heads split over TP, as vLLM does
    max_len = plan.max_model_len
    head_dim = spec.head_dim
    tokens = {
        "vramplan": plan.kv_cache_tokens,
        "kv_only": int((total * util - weights) / per_token),
        "llm_gpu_calc": None if tp > 1 else int((total * util - weights - GIB - max_len * (18 * spec.hidden_size + 4 * spec.intermediate_size)) / per_token),
        "vllm_vram_calc": int((total / GIB * util - weights / GIB - 2.5 - 1.5) * GIB / (2 * math.ceil(spec.num_key_value_heads / tp) * head_dim * 2 * spec.num_layers)),
    }
    # gpu_poor answers only whether one request of max_model_len fits
    poor_kv = 8 * max_len * spec.hidden_size * spec.num_layers
    poor_act = 10 * max_len * spec.hidden_size + 2 * max_len * max_len * spec.num_attention_heads
    poor_total = poor_kv / tp + weights + 650 * MIB + poor_act
    got = logged_tokens(case, per_token)
    serves_logged = case["logged"].get("serves", None if got is None else got >= max_len)
    out = {"id": case["id"], "fitted": case.get("fitted", False), "model": case["model"], "gpu": case["gpu"], "engine_version": case["engine_version"], "options": case["options"],
           "max_model_len": max_len, "logged_tokens": got, "serves_logged": serves_logged, "tokens": tokens,
           "errors_pct": {k: (None if v is None or not got else round(100 * (v / got - 1), 1)) for k, v in tokens.items()},
           "serves": {k: (None if v is None else v >= max_len) for k, v in tokens.items()},
           "gpu_poor": {"one_request_bytes": int(poor_total), "serves": poor_total <= total}}
    out["serves"]["gpu_poor"] = out["gpu_poor"]["serves"]
    return out


def _median(values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return "n/a"
    mid = len(values) // 2
    return f"{values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2:.1f}%"


def markdown(rows: list[dict]) -> str:
    names = ("vramplan", "kv_only", "llm_gpu_calc", "vllm_vram_calc")
    lines = ["| case | logged KV tokens | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        cells = ["n/a" if r["errors_pct"][n] is None else f"{r['tokens'][n]:,} ({r['errors_pct'][n]:+.1f}%)" for n in names]
        lines.append(f"| {r['id']}{' (fitted: vramplan in-sample)' if r['fitted'] else ''} | {r['logged_tokens']:,} | " + " | ".join(cells) + " |")
    for label, chosen in (("median abs error, all", rows), ("median abs error, held out", [r for r in rows if not r["fitted"]])):
        lines.append(f"| {label} | | " + " | ".join(_median([abs(r["errors_pct"][n]) for r in chosen if r["errors_pct"][n] is not None]) for n in names) + " |")
    right = {n: sum(1 for r in rows if r["serves"].get(n) is not None and r["serves"][n] == r["serves_logged"]) for n in (*names, "gpu_poor")}
    asked = {n: sum(1 for r in rows if r["serves"].get(n) is not None) for n in (*names, "gpu_poor")}
    lines.append("| serves one max_model_len request: verdicts right | | " + " | ".join(f"{right[n]} of {asked[n]}" for n in names) + " |")
    lines.append("")
    lines.append(f"gpu_poor gives no KV token figure; its verdict on one request of max_model_len is right on {right['gpu_poor']} of {asked['gpu_poor']}.")
    return "\n".join(lines)


def main() -> int:
    rows = [r for r in (compare(c) for c in CASES) if r is not None]
    print(markdown(rows))
    date = datetime.date.today().isoformat()
    path = ROOT / "bench" / "results" / f"calculators-{date}.json"
    path.write_text(json.dumps({"date": date, "rules": RULES, "cases": rows}, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
