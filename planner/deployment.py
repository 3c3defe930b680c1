"""After training: merge the adapter or serve it beside others, which weights to deploy, and what
the serving GPU holds (issue 26's advisor). Pure: the serving numbers are planner/serving.py's
vLLM accounting on the serving GPU, the merge's planner/merge.py's.

Rules, each with its reason in the advice:
- Full and freeze runs leave a whole checkpoint: nothing to merge.
- vLLM serves plain LoRA adapters side by side (--enable-lora); it has not served DoRA's
  magnitude vectors (vllm-project/vllm#6983), IA3 or prompt/prefix tuning. DoRA and IA3 are
  merged into the base (PEFT merge_and_unload); prompt and prefix tuning cannot be merged and are
  served with PEFT on transformers.
- One LoRA adapter: merged, so requests run at the base's speed with no LoRA slots; several
  tenants: served side by side, one slot per adapter up to MAX_LORA_SLOTS; a latency target:
  merged whatever the tenants (per-request adapters cost latency).
- A QLoRA adapter is merged into the base dequantized to 16 bits (the 4-bit base is not what
  the adapter should be served on).
- Weights: 16-bit where the model serves at least WANTED_CONCURRENCY requests of the task's length;
  otherwise FP8 on GPUs with FP8 (vLLM's --quantization fp8, dynamic, no calibration), else 4-bit
  weights (AWQ/GPTQ, w4a16), the first that serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.errors import PlanInputError
from planner.serving import (
    GIB,
    ServingOptions,
    catalog_config,
    plan_serving,
    serving_gpu,
)
from planner.spec import ModelSpec

MAX_LORA_SLOTS = 8
WANTED_CONCURRENCY = 4
LORA_SERVED = ("lora", "qlora")


@dataclass(frozen=True)
class Deployment:
    action: str  # "merge", "serve adapters", "serve checkpoint", "serve with PEFT"
    quantization: str | None  # vLLM's --quantization for the deployed weights, None for 16-bit
    serving: object | None  # planner.serving.ServingPlan on the serving GPU
    reasons: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        plan = self.serving
        return {
            "action": self.action,
            "quantization": self.quantization,
            "reasons": list(self.reasons),
            "serving": None if plan is None else {
                "gpu": plan.gpu_name, "verdict": plan.verdict, "max_model_len": plan.max_model_len,
                "weights_bytes": plan.weights_bytes, "lora_bytes": plan.lora_bytes, "kv_cache_bytes": plan.kv_cache_bytes,
                "kv_cache_tokens": plan.kv_cache_tokens, "max_concurrency": round(plan.max_concurrency, 2),
                "enable_lora": plan.options.enable_lora, "max_loras": plan.options.max_loras if plan.options.enable_lora else None,
                "max_lora_rank": plan.options.max_lora_rank if plan.options.enable_lora else None,
                # the serving plan's own options as set (vLLM's names): what /serving and `vramplan inference` take
                "options": plan.options.model_dump(exclude_defaults=True, mode="json"),
            },
        }


def _action(method: str, tenants: int, latency_target_ms: float | None) -> tuple[str, list[str]]:
    if method in ("full", "freeze"):
        return "serve checkpoint", [f"{method} training leaves a whole checkpoint: serve it as is, nothing to merge."]
    if method in ("prompt_tuning", "prefix_tuning"):
        return "serve with PEFT", [f"{method.replace('_', ' ')} cannot be merged into the weights and vLLM does not load it: "
                                   "serve it with PEFT on transformers (no vLLM plan)."]
    if method not in LORA_SERVED:
        name = "DoRA's magnitude vectors" if method == "dora" else "IA3 vectors"
        return "merge", [f"vLLM has not served {name} (only plain LoRA; vllm-project/vllm#6983 for DoRA): merge the adapter into the "
                         "base with PEFT's merge_and_unload and serve the merged model."]
    if latency_target_ms is not None:
        return "merge", [f"A {latency_target_ms:g} ms latency target: merge the adapter (per-request LoRA adds work to every token)."]
    if tenants > 1:
        return "serve adapters", [f"{tenants:,} tenants: one adapter each, served side by side on one base with vLLM's --enable-lora "
                                  f"({min(tenants, MAX_LORA_SLOTS)} resident at once; the rest are swapped in as requests need them)."]
    base = " dequantized to 16 bits (the 4-bit base is a training convenience)" if method == "qlora" else ""
    return "merge", [f"One adapter: merge it into the base{base}, so requests run at the base's speed and vLLM reserves no LoRA slots."]


def deployment_advice(spec: ModelSpec, method: str, lora_r: int, tenants: int, latency_target_ms: float | None, request_tokens: int,
                      gpu_name: str, gpu_memory_gib: float | None = None, has_fp8: bool = False) -> Deployment:
    """What to do with the trained model and what it takes to serve it on `gpu_name` (or a GPU of
    `gpu_memory_gib`), for requests of `request_tokens`."""
    action, reasons = _action(method, tenants, latency_target_ms)
    if action == "serve with PEFT":
        return Deployment(action, None, None, tuple(reasons))
    adapters = action == "serve adapters"
    lora = {"enable_lora": True, "max_loras": min(tenants, MAX_LORA_SLOTS), "max_lora_rank": max(8, lora_r)} if adapters else {}
    gpu = {"gpu_memory_gib": gpu_memory_gib} if gpu_memory_gib is not None else {"gpu": gpu_name}
    config = catalog_config(spec.name)
    tried: list[tuple[str | None, object]] = []
    ladder = [None] + (["fp8"] if has_fp8 else []) + ["awq"]
    for quantization in ladder:
        try:
            options = ServingOptions(max_model_len=request_tokens, quantization=quantization, **gpu, **lora)
            name, total, _ = serving_gpu(options)
            plan = plan_serving(spec, options, name, total, config)
        except PlanInputError:
            continue
        tried.append((quantization, plan))
        if plan.verdict == "serves" and plan.max_concurrency >= WANTED_CONCURRENCY:
            break
    if not tried:
        return Deployment(action, None, None, tuple(reasons + ["No serving plan could be made for this model on this GPU."]))
    # the first weights that serve the wanted concurrency, else the first that serve at all, else the last tried
    quantization, plan = (next(((q, p) for q, p in tried if p.verdict == "serves" and p.max_concurrency >= WANTED_CONCURRENCY), None)
                          or next(((q, p) for q, p in tried if p.verdict == "serves"), None) or tried[-1])
    label = {None: "16-bit weights", "fp8": "FP8 weights (vLLM's --quantization fp8)", "awq": "4-bit AWQ weights (w4a16)"}
    head = (f"On {plan.gpu_name} with {label[quantization]}: {plan.kv_cache_tokens:,} KV cache tokens, "
            f"{plan.max_concurrency:.1f} concurrent requests of {plan.max_model_len:,} tokens at gpu_memory_utilization "
            f"{plan.options.gpu_memory_utilization}")
    if plan.verdict != "serves":
        reasons.append(head + f": does not serve ({'; '.join(plan.reasons)}); serve on a larger GPU or more of them (tensor parallelism).")
    else:
        reasons.append(head + ".")
    if quantization is not None:
        before = tried[0][1]
        reasons.append(f"16-bit weights would leave {before.max_concurrency:.1f} concurrent requests"
                       + ("" if before.verdict == "serves" else " (does not serve)") + f": {label[quantization]} take "
                       f"{plan.weights_bytes / GIB:.1f} GiB instead of {before.weights_bytes / GIB:.1f}; check quality on your evaluation set.")
    if adapters:
        reasons.append(f"LoRA slots: {plan.options.max_loras} x rank {plan.options.max_lora_rank} take {plan.lora_bytes / GIB:.2f} GiB of the GPU.")
    return Deployment(action, quantization, plan, tuple(reasons))
