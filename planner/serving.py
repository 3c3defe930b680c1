"""Serving plans: how vLLM will spend a GPU on a model, by vLLM's own accounting.

vLLM decides the KV cache's size at start-up, in its worker (vllm/v1/worker/gpu_worker.py,
`determine_available_memory`):

    requested   = total GPU memory x gpu_memory_utilization
    non_kv      = weights (what "Model loading took" logs; LoRA slots included)
                  + the torch peak of the profile run (a dummy forward of max_num_batched_tokens
                    tokens and a dummy sampler run over max_num_seqs requests)
                  + the non-torch memory that grew during it (cuBLAS workspaces, NCCL and the
                    custom all-reduce buffers when tensor-parallel)
    available   = requested - non_kv                   -> "Available KV cache memory: X GiB"

and then (vllm/v1/core/kv_cache_utils.py) cuts it into blocks of `block_size` tokens:

    page        = block_size x 2 (K and V) x KV heads on this rank x head_dim x KV dtype bytes
    num_blocks  = available // page // layers on this rank
    tokens      = num_blocks x block_size                -> "GPU KV cache size: N tokens"
    concurrency = num_blocks / ceil(max_model_len / block_size)
                                       -> "Maximum concurrency for L tokens per request: Yx"

V0 (vLLM before 0.8) sized blocks the same way and logged concurrency as tokens / max_model_len.
CUDA graphs are captured after the KV cache is allocated, so their memory is not taken from the
KV cache: it comes out of what gpu_memory_utilization leaves free, beside the CUDA context.

The weights, the KV arithmetic and the LoRA slots are exact from the model's shapes; the profile
run's activation peak and the non-torch memory are estimates (formulas below, checked against
published start-up logs in bench/serving_published.py). Pure functions: no torch, no vLLM.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.components import Component
from planner.errors import PlanInputError
from planner.spec import ModelSpec

GIB = 1 << 30
MIB = 1 << 20

# the newest vLLM whose accounting these rules were checked against (its source and its logs)
DEFAULT_ENGINE_VERSION = "0.19.0"
OLDEST_ENGINE_VERSION = (0, 6)
V1_FROM = (0, 8)  # the V1 engine is the default from 0.8

# vLLM's VocabParallelEmbedding pads the vocabulary to a multiple of 64 (DEFAULT_VOCAB_PADDING_SIZE)
VOCAB_PADDING = 64
# Non-torch memory that grows during the profile run, one GPU (cuBLAS/cuDNN workspaces, the
# attention backend's buffers): the V0 logs that print it show 0.25-0.35 GiB
NON_TORCH_BYTES = int(0.3 * GIB)
# with tensor parallelism: NCCL's buffers and vLLM's custom all-reduce buffers, which grow during the
# profile run's first collectives. Measured 1.82 GiB over one GPU's on a Llama-3.1-8B TP 2 start-up
# of vLLM 0.19.0 on H100 (llm-d-planner's logs; the other TP runs there held out: 1.81-1.96 GiB), and
# 1.79 GiB in the 0.6.5 H100 log of vLLM PR #10511; so in every version, although from 0.11 NCCL's
# communicators exist before the start-up snapshot
NON_TORCH_TP_BYTES = int(1.85 * GIB)
# V1's dummy sampler run: max_num_seqs rows of logits over the whole vocabulary, on every
# tensor-parallel rank (the logits are gathered before sampling), in the model dtype plus this many
# bytes of fp32 copies, probabilities and log-probabilities per logit. Measured 13.5 (bf16) and 14.1
# (fp32) on the Llama-3.1-8B start-ups of vLLM 0.19.0 on H100 (llm-d-planner's logs); held out there:
# Qwen2.5, Qwen3, Gemma-2 and Phi-4 at 13.0-13.9
SAMPLER_BYTES_PER_LOGIT = 14
# CUDA graphs of the decode batch sizes (up to 512 by default), captured after the KV cache:
# vLLM logs "Graph capturing finished in N secs, took 0.3-1 GiB" for dense 7-70B models
CUDA_GRAPH_BYTES = int(0.5 * GIB)
CUDA_GRAPH_TP_BYTES = int(0.25 * GIB)
# the CUDA context and the libraries loaded before vLLM's first snapshot: outside its accounting
CUDA_CONTEXT_BYTES = int(0.5 * GIB)

QUANTIZATIONS = ("fp8", "w8a8", "w4a16", "awq", "gptq", "bitsandbytes")
# bytes per weight of a quantized Linear, and the constants per weight (scales, zero points)
QUANT_WEIGHT_BYTES = {"fp8": 1.0, "w8a8": 1.0, "w4a16": 0.5, "awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5}
QUANT_GROUP = 128  # AWQ/GPTQ/compressed-tensors w4a16 group size (the common checkpoints)


def _quant_constants(quant: str, rows: int, cols: int) -> int:
    """Scales and zero points of one quantized [rows, cols] Linear weight, as vLLM holds them."""
    if quant == "fp8":  # one fp32 scale per tensor (and per input activation)
        return 8
    if quant == "w8a8":  # per-channel fp32 scale
        return rows * 4
    if quant in ("w4a16", "awq", "gptq"):  # per group of 128 inputs: a 16-bit scale and a packed 4-bit zero
        groups = math.ceil(cols / QUANT_GROUP)
        return groups * rows * 2 + groups * rows // 2
    if quant == "bitsandbytes":  # NF4: an fp32 absmax per 64 values
        return math.ceil(rows * cols / 64) * 4
    return 0


def _release(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a vLLM version ("0.6.4", "v0.8.5.post1"; a patch that is not a
    number, or none, is 0); PlanInputError for what is not a version this accounting follows."""
    parts = text.strip().lstrip("v").split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise PlanInputError("engine_version", f"{text!r} is not a vLLM version such as {DEFAULT_ENGINE_VERSION}") from None
    if (major, minor) < OLDEST_ENGINE_VERSION:
        raise PlanInputError("engine_version", f"{text}: the accounting is followed from vLLM 0.6 on")
    patch = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    return major, minor, patch


def _version(text: str) -> tuple[int, int]:
    return _release(text)[:2]


class ServingOptions(BaseModel):
    """`vramplan inference`'s options: vLLM's own flag names (underscored in JSON) and defaults."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["vllm"] = "vllm"
    engine_version: str = DEFAULT_ENGINE_VERSION
    gpu: str | None = None
    gpu_memory_gib: float | None = Field(default=None, gt=0, le=4096)
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1, le=10_000_000)
    max_num_seqs: int | None = Field(default=None, ge=1, le=65536)
    max_num_batched_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half"] = "auto"
    quantization: Literal["fp8", "w8a8", "w4a16", "awq", "gptq", "bitsandbytes"] | None = None
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    block_size: int = Field(default=16, ge=1, le=1024)
    enforce_eager: bool = False
    enable_lora: bool = False
    max_loras: int = Field(default=1, ge=1, le=1024)
    max_lora_rank: int = Field(default=16, ge=1, le=1024)
    request_tokens: int | None = Field(default=None, ge=1, le=10_000_000, description="a request length to give the concurrency at, besides max_model_len")

    @model_validator(mode="after")
    def _check(self):
        _version(self.engine_version)
        return self

    @property
    def v1(self) -> bool:
        return _version(self.engine_version) >= V1_FROM


@dataclass
class ServingPlan:
    model_name: str
    total_params: int
    options: ServingOptions
    gpu_name: str
    gpu_memory_bytes: int
    gpu_count: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    requested_bytes: int
    weights_bytes: int
    lora_bytes: int
    activation_peak_bytes: int
    non_torch_bytes: int
    cuda_graph_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_cache_blocks: int
    kv_cache_tokens: int
    max_concurrency: float
    concurrency_at_request_tokens: float | None
    outside_bytes: int  # CUDA context + CUDA graphs: beside the requested memory
    verdict: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.verdict == "serves"

    def components(self) -> list[Component]:
        o = self.options
        return [
            Component("weights", self.weights_bytes, "per GPU: the model's tensors on this rank as vLLM loads them" + (f", {o.quantization} Linear layers" if o.quantization else "")),
            Component("weights.lora", self.lora_bytes, f"{o.max_loras} LoRA slot(s) of rank {o.max_lora_rank} pre-allocated on every adapted layer" if o.enable_lora else "LoRA not enabled"),
            Component("activations", self.activation_peak_bytes, f"torch peak of the profile run: {self.max_num_batched_tokens:,} tokens forward, {self.max_num_seqs} requests sampled (estimate)"),
            Component("runtime.non_torch", self.non_torch_bytes, "non-torch memory grown in the profile run: workspaces" + (", NCCL and custom all-reduce buffers" if self.gpu_count > 1 else "") + " (estimate)"),
            Component("kv_cache", self.kv_cache_bytes, f"what is left of the requested {self.requested_bytes / GIB:.2f} GiB: {self.kv_cache_blocks:,} blocks of {o.block_size} tokens, {self.kv_bytes_per_token:,} bytes a token"),
            Component("runtime.cuda_graphs", self.cuda_graph_bytes, "captured after the KV cache is allocated, outside the requested memory (estimate)" if not o.enforce_eager else "--enforce-eager: none captured"),
            Component("runtime.cuda_context", CUDA_CONTEXT_BYTES, "the CUDA context, outside vLLM's accounting (estimate)"),
        ]

    def to_dict(self) -> dict:
        o = self.options
        return {
            "engine": o.engine,
            "engine_version": o.engine_version,
            "rules": "vLLM V1 (vllm/v1/worker/gpu_worker.py, vllm/v1/core/kv_cache_utils.py)" if o.v1 else "vLLM V0 (vllm/worker/worker.py)",
            "model": {"name": self.model_name, "params": {"total": self.total_params}},
            "gpu": {"name": self.gpu_name, "memory_bytes": self.gpu_memory_bytes, "count": self.gpu_count},
            "options": o.model_dump(),
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "requested_bytes": self.requested_bytes,
            "weights_bytes": self.weights_bytes,
            "lora_bytes": self.lora_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "non_torch_bytes": self.non_torch_bytes,
            "cuda_graph_bytes": self.cuda_graph_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_blocks": self.kv_cache_blocks,
            "kv_cache_tokens": self.kv_cache_tokens,
            "max_concurrency": round(self.max_concurrency, 4),
            "concurrency_at_request_tokens": None if self.concurrency_at_request_tokens is None else round(self.concurrency_at_request_tokens, 4),
            "outside_requested_bytes": self.outside_bytes,
            "peak_bytes": self.requested_bytes + self.outside_bytes if self.kv_cache_bytes > 0 else self.weights_bytes + self.lora_bytes + self.activation_peak_bytes + self.non_torch_bytes + self.outside_bytes,
            "fits": self.fits,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "components": [c.to_dict() for c in self.components()],
            "notes": self.notes,
            "exports": {"vllm_serve": shlex.join(vllm_serve_args(self))},
        }


# -- the model's shapes, per rank ------------------------------------------------------------------


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def _dtype(spec_dtype: str | None, options: ServingOptions) -> tuple[str, int]:
    """vLLM's --dtype auto: the checkpoint's torch_dtype, float32 checkpoints served in 16 bit."""
    if options.dtype in ("float16", "half"):
        return "float16", 2
    if options.dtype == "bfloat16":
        return "bfloat16", 2
    if options.dtype == "float32":
        return "float32", 4
    return ("float16" if spec_dtype in ("float16", "fp16") else "bfloat16"), 2


def _stage_layers(num_layers: int, pp: int) -> int:
    """The most decoder layers one pipeline stage holds (vLLM's get_pp_indices spreads the rest)."""
    return -(-num_layers // pp)


def weights_per_rank(spec: ModelSpec, options: ServingOptions, dtype_bytes: int, max_position: int | None) -> tuple[int, list[str]]:
    """Bytes of the model on the busiest rank: Linear layers split by tensor parallelism (K/V
    projections replicated when there are fewer KV heads than ranks), the vocabulary padded to
    64 and split, norms replicated; one pipeline stage's layers (the first stage also holds the
    embedding, the last the head: the larger of the two is taken); the rotary cos/sin cache."""
    tp, pp = options.tensor_parallel_size, options.pipeline_parallel_size
    quant = options.quantization
    notes: list[str] = []
    replicated_kv = spec.num_key_value_heads < tp
    layer_bytes: dict[int, int] = {}
    embed = head = other = 0
    for t in spec.tensors:
        n = t.numel
        if t.role in ("embedding", "lm_head"):
            vocab = _pad(t.shape[0], VOCAB_PADDING)
            b = -(-vocab // tp) * (n // t.shape[0]) * dtype_bytes
            if t.role == "embedding":
                embed += b
            else:
                head += b
            continue
        sharded = t.role.startswith(("attention", "mlp", "expert")) and not (len(t.shape) == 1 and t.role.endswith("other"))
        quantized = quant is not None and sharded and t.is_weight and len(t.shape) >= 2
        if quantized:
            rows = math.prod(t.shape[:-1])
            full = math.ceil(n * QUANT_WEIGHT_BYTES[quant]) + _quant_constants(quant, rows, t.shape[-1])
        else:
            full = n * dtype_bytes
        if not sharded:
            b = full
        elif t.role in ("attention.k", "attention.v") and replicated_kv:
            b = -(-full // spec.num_key_value_heads)  # one KV head on every rank
        else:
            b = -(-full // tp)
        if t.layer is None:
            other += b
        else:
            layer_bytes[t.layer] = layer_bytes.get(t.layer, 0) + b
    if spec.tie_word_embeddings and head == 0:
        head = embed if pp > 1 else 0  # tied: one tensor, unless the last stage holds its own copy
    per_layer = max(layer_bytes.values()) if layer_bytes else 0
    layers = _stage_layers(spec.num_layers, pp)
    if pp == 1:
        total = sum(layer_bytes.values()) + embed + head + other
    else:
        total = layers * per_layer + max(embed, head + other)
        notes.append(f"pipeline parallel {pp}: the busiest stage holds {layers} of {spec.num_layers} layers and the larger of the embedding and the head")
    rotary = 0
    if max_position:
        rotary = max_position * spec.head_dim * dtype_bytes  # RotaryEmbedding.cos_sin_cache, one per model
        total += rotary
    if quant:
        notes.append(f"{quant}: attention and MLP Linear weights at {QUANT_WEIGHT_BYTES[quant]} byte each plus their scales; embeddings, head and norms in 16 bit")
    if tp > 1 and spec.num_key_value_heads < tp:
        notes.append(f"{spec.num_key_value_heads} KV heads on {tp} ranks: vLLM replicates them, one KV head per rank")
    return total, notes


def kv_bytes_per_token(spec: ModelSpec, options: ServingOptions, dtype_bytes: int) -> int:
    """K and V of one token on one rank, all of its layers."""
    tp = options.tensor_parallel_size
    kv_heads = max(1, spec.num_key_value_heads // tp)
    kv_dtype = 1 if options.kv_cache_dtype.startswith("fp8") else dtype_bytes
    return 2 * kv_heads * spec.head_dim * kv_dtype * _stage_layers(spec.num_layers, options.pipeline_parallel_size)


def lora_slot_bytes(spec: ModelSpec, options: ServingOptions, dtype_bytes: int) -> int:
    """vLLM's LoRA layers pre-allocate stacked A and B for max_loras adapters of max_lora_rank on
    every Linear of the decoder (qkv, o, gate_up, down; experts not counted), in the model dtype:
    a column-parallel layer keeps A whole and B split, a row-parallel layer the reverse."""
    if not options.enable_lora:
        return 0
    tp = options.tensor_parallel_size
    r, k = options.max_lora_rank, options.max_loras
    total = 0
    for lin in spec.linears():
        if lin.layer is None or lin.role in ("expert", "router", "lm_head") or not lin.role.startswith(("attention", "mlp")):
            continue
        row_parallel = lin.role in ("attention.o", "mlp.down")
        a_in = -(-lin.in_features // tp) if row_parallel else lin.in_features
        b_out = lin.out_features if row_parallel else -(-lin.out_features // tp)
        total += k * r * (a_in + b_out) * dtype_bytes
    layers = _stage_layers(spec.num_layers, options.pipeline_parallel_size)
    return total * layers // max(1, spec.num_layers)


def activation_peak(spec: ModelSpec, options: ServingOptions, dtype_bytes: int, tokens: int, seqs: int) -> int:
    """The torch peak of the profile run above the weights (an estimate). The forward's peak is
    in the MLP of one layer: the residual, the layer's input and its normed copy (3 x hidden)
    beside gate_up's output and the activation's (3 x intermediate per rank); an MoE layer holds
    fused_moe's caches (top-k x (2 x intermediate + intermediate + hidden)). The V1 sampler run
    holds max_num_seqs rows of logits in the model dtype, an fp32 copy and fp32 probabilities, beside
    the MoE workspaces V1 keeps from the forward."""
    tp = options.tensor_parallel_size
    h = spec.hidden_size
    inter = max(spec.intermediate_size, 0)
    dense = tokens * (3 * h + 3 * -(-inter // tp)) * dtype_bytes
    moe = moe_workspace = 0
    if spec.num_experts and spec.moe_intermediate_size:
        i = -(-spec.moe_intermediate_size // tp)
        moe = tokens * (2 * h + spec.experts_per_token * (3 * i + h)) * dtype_bytes
        # V1's fused_moe takes its caches from the worker's workspace manager, which keeps them after
        # the dummy forward: the shared cache1/cache3/output buffer (top-k x max(2 x intermediate,
        # hidden)) and cache2 (top-k x intermediate) are still held while the sampler runs
        moe_workspace = tokens * spec.experts_per_token * (max(2 * i, h) + i) * dtype_bytes
    forward = max(dense, moe)
    vocab = _pad(spec.vocab_size, VOCAB_PADDING)
    if options.v1:  # every rank samples from the gathered logits
        sampler = seqs * vocab * (dtype_bytes + SAMPLER_BYTES_PER_LOGIT) + moe_workspace
    else:  # V0: the driver samples; the profile's peak is the rank's own share of the logits
        sampler = seqs * -(-vocab // tp) * (dtype_bytes + 4)
    return max(forward, sampler)


def _defaults(options: ServingOptions, gpu_bytes: int, gpu_name: str, max_position: int | None) -> tuple[int, int, int, list[str]]:
    """max_model_len, max_num_seqs and max_num_batched_tokens as `vllm serve` defaults them."""
    notes = []
    max_len = options.max_model_len or max_position
    if max_len is None:
        raise PlanInputError("max_model_len", "the model's config gives no max_position_embeddings: give --max-model-len")
    if options.max_model_len is None:
        notes.append(f"max_model_len not given: the model's max_position_embeddings, {max_len:,}, as vLLM defaults it")
    version = _version(options.engine_version)
    if version >= (0, 10):  # EngineArgs._set_default_args: 70 GiB or more and not an A100
        big = gpu_bytes >= 70 * GIB and "a100" not in gpu_name.lower()
    else:  # 0.8-0.9 (_set_default_args_v1): by the device's name
        big = any(name in gpu_name.lower() for name in ("h100", "h200"))
    if options.v1:
        seqs = options.max_num_seqs or (1024 if big else 256)
        batched = options.max_num_batched_tokens or (8192 if big else 2048)
    else:
        seqs = options.max_num_seqs or 256
        # V0 turns chunked prefill on by default past 32k tokens, with a budget of 512 tokens up to
        # 0.6.4 and 2048 from 0.6.5; without it the budget is max_model_len
        chunk = 512 if _release(options.engine_version) <= (0, 6, 4) else 2048
        batched = options.max_num_batched_tokens or (chunk if max_len > 32768 else max(max_len, 2048))
    if options.max_num_batched_tokens is None:
        notes.append(f"max_num_batched_tokens not given: {batched:,}, vllm serve's default for {gpu_name}" if options.v1
                     else f"max_num_batched_tokens not given: {batched:,}, V0's default (max_model_len, or 2048 with chunked prefill past 32k)")
    if options.max_num_seqs is None:
        notes.append(f"max_num_seqs not given: {seqs}, vllm serve's default here")
    return max_len, seqs, batched, notes


def config_facts(config: dict | None) -> tuple[int | None, str | None, int | None]:
    """max_position_embeddings, torch_dtype and sliding_window from a config.json (text configs of
    multimodal models nest them)."""
    if not config:
        return None, None, None
    inner = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    def get(key):
        value = config.get(key, inner.get(key))
        return value
    pos = get("max_position_embeddings")
    dtype = get("torch_dtype") or get("dtype")
    window = get("sliding_window") if get("use_sliding_window") is not False else None
    return (int(pos) if isinstance(pos, int) and pos > 0 else None, dtype if isinstance(dtype, str) else None,
            int(window) if isinstance(window, int) and window > 0 else None)


def plan_serving(spec: ModelSpec, options: ServingOptions, gpu_name: str, gpu_memory_bytes: int,
                 config: dict | None = None) -> ServingPlan:
    """vLLM's start-up accounting for `spec` on one GPU of `gpu_memory_bytes` (every rank alike);
    `config` is the model's config.json (max_position_embeddings, torch_dtype, sliding_window)."""
    max_position, torch_dtype, sliding_window = config_facts(config)
    tp, pp = options.tensor_parallel_size, options.pipeline_parallel_size
    if spec.num_attention_heads % tp:
        raise PlanInputError("tensor_parallel_size", f"{spec.num_attention_heads} attention heads do not split over {tp} ranks")
    if pp > spec.num_layers:
        raise PlanInputError("pipeline_parallel_size", f"{pp} stages for {spec.num_layers} layers")
    dtype_name, dtype_bytes = _dtype(torch_dtype, options)
    notes: list[str] = [f"vLLM {options.engine_version}'s rules: " + ("V1 engine" if options.v1 else "V0 engine")]
    max_len, seqs, batched, default_notes = _defaults(options, gpu_memory_bytes, gpu_name, max_position)
    notes += default_notes
    if options.dtype == "auto":
        notes.append(f"--dtype auto: {dtype_name}")
    weights, weight_notes = weights_per_rank(spec, options, dtype_bytes, max_position)
    notes += weight_notes
    lora = lora_slot_bytes(spec, options, dtype_bytes)
    act = activation_peak(spec, options, dtype_bytes, batched, seqs)
    # tensor parallelism's buffers grow during the profile run (NON_TORCH_TP_BYTES); pipeline stages
    # pass activations point to point and measured no more than one GPU's
    non_torch = NON_TORCH_BYTES + (NON_TORCH_TP_BYTES if tp > 1 else 0)
    graphs = 0 if options.enforce_eager else CUDA_GRAPH_BYTES + (CUDA_GRAPH_TP_BYTES if tp > 1 else 0)
    requested = int(gpu_memory_bytes * options.gpu_memory_utilization)
    available = requested - (weights + lora + act + non_torch)
    per_token = kv_bytes_per_token(spec, options, dtype_bytes)
    page = per_token * options.block_size  # all layers of this rank: vLLM's page x layers
    blocks = max(0, available) // page if available > 0 else 0
    tokens = blocks * options.block_size
    per_request = -(-max_len // options.block_size)
    concurrency = blocks / per_request if options.v1 else tokens / max_len
    at_request = None
    if options.request_tokens:
        at_request = blocks / -(-options.request_tokens // options.block_size) if options.v1 else tokens / options.request_tokens
    # how far the profile-run terms were checked (bench/serving_llmd.py, bench/serving_published.py, docs/serving.md)
    notes.append(f"the profile run's activation peak ({act / GIB:.2f} GiB) and the non-torch memory ({non_torch / GIB:.2f} GiB) are "
                 "estimates: on 35 held-out vLLM 0.19.0 start-ups on H100 the plan's KV tokens were within -1.4% to +2.1% of vLLM's; "
                 "on older versions and other GPUs vLLM found up to 36% fewer than planned (an L40S with 0.8, a 70B on V1 0.7.1): "
                 "there read the KV tokens and concurrency as an upper bound")
    if sliding_window and sliding_window < max_len:
        notes.append("the config has sliding-window attention: planned as full attention on every layer (vLLM's hybrid allocator can give such models more tokens)")
    outside = graphs + CUDA_CONTEXT_BYTES
    reasons: list[str] = []
    if available <= 0:
        reasons.append(f"nothing is left for the KV cache: weights, LoRA slots, the profile run and non-torch memory take "
                       f"{(weights + lora + act + non_torch) / GIB:.2f} GiB of the {requested / GIB:.2f} GiB requested")
    elif blocks < per_request:
        reasons.append(f"one request of max_model_len {max_len:,} tokens needs {per_request * page / GIB:.2f} GiB of KV cache; "
                       f"{available / GIB:.2f} GiB are available (vLLM refuses to start)")
    if requested + outside > gpu_memory_bytes:
        reasons.append(f"gpu_memory_utilization {options.gpu_memory_utilization} leaves {(gpu_memory_bytes - requested) / GIB:.2f} GiB for "
                       f"the CUDA context and CUDA graphs, which need about {outside / GIB:.2f} GiB"
                       + ("" if options.enforce_eager else " (--enforce-eager captures none)"))
    verdict = "serves" if not reasons else "does not serve"
    return ServingPlan(
        model_name=spec.name, total_params=spec.total_params, options=options, gpu_name=gpu_name,
        gpu_memory_bytes=gpu_memory_bytes, gpu_count=tp * pp, max_model_len=max_len, max_num_seqs=seqs,
        max_num_batched_tokens=batched, requested_bytes=requested, weights_bytes=weights, lora_bytes=lora,
        activation_peak_bytes=act, non_torch_bytes=non_torch, cuda_graph_bytes=graphs,
        kv_cache_bytes=max(0, available), kv_bytes_per_token=per_token, kv_cache_blocks=blocks, kv_cache_tokens=tokens,
        max_concurrency=concurrency, concurrency_at_request_tokens=at_request, outside_bytes=outside,
        verdict=verdict, reasons=reasons, notes=notes,
    )


def kv_from_available(spec: ModelSpec, options: ServingOptions, available_bytes: int, max_model_len: int,
                      dtype_bytes: int = 2) -> tuple[int, float]:
    """KV cache tokens and maximum concurrency from a given available KV memory (what vLLM logs
    as "Available KV cache memory"): the block arithmetic alone."""
    page = kv_bytes_per_token(spec, options, dtype_bytes) * options.block_size
    blocks = available_bytes // page
    tokens = blocks * options.block_size
    if options.v1:
        return tokens, blocks / -(-max_model_len // options.block_size)
    return tokens, tokens / max_model_len


# -- the inverse searches ----------------------------------------------------------------------------


def needed_utilization(plan: ServingPlan, concurrency: int, request_tokens: int) -> float | None:
    """The least gpu_memory_utilization that holds `concurrency` requests of `request_tokens`."""
    o = plan.options
    blocks = concurrency * -(-request_tokens // o.block_size)
    need = plan.weights_bytes + plan.lora_bytes + plan.activation_peak_bytes + plan.non_torch_bytes + blocks * plan.kv_bytes_per_token * o.block_size
    util = math.ceil(need / plan.gpu_memory_bytes * 1000) / 1000
    return util if util <= 1 else None


def longest_model_len(plan: ServingPlan, concurrency: int = 1) -> int:
    """The longest max_model_len whose `concurrency` requests fit in this plan's KV cache."""
    per = plan.kv_cache_blocks // max(1, concurrency)
    return per * plan.options.block_size


def catalog_config(model_name: str) -> dict | None:
    """The config.json the catalog ships for a model (or for the base of an instruct variant)."""
    import json

    from planner.catalog import CONFIGS_DIR, base_catalog_id, catalog_ids, file_stem

    for name in (catalog_ids().get(model_name.lower()), base_catalog_id(model_name)):
        if name and (CONFIGS_DIR / f"{file_stem(name)}.json").is_file():
            return json.loads((CONFIGS_DIR / f"{file_stem(name)}.json").read_text())
    return None


# the memory CUDA reports as total (cudaMemGetInfo, what vLLM multiplies) sits below NVML's total:
# 23.58 GiB on a 24 GiB RTX 3090, 79.19 GiB on an 80 GB H100 (79.65 GiB by NVML)
CUDA_RESERVED_BYTES = int(0.44 * GIB)


def serving_gpu(options: ServingOptions) -> tuple[str, int, list[str]]:
    """The GPU's name and the total memory CUDA reports on it: --gpu-memory-gib as given (read it
    from vLLM's log or torch.cuda.mem_get_info), or a catalog GPU's NVML memory less what the
    driver keeps."""
    if options.gpu_memory_gib is not None:
        return f"custom {options.gpu_memory_gib:g} GiB GPU", int(options.gpu_memory_gib * GIB), []
    if not options.gpu:
        raise PlanInputError("gpu", "give a GPU (--gpu NAME) or its memory (--gpu-memory-gib N)")
    from gpu_catalog.catalog import lookup_gpu

    match = lookup_gpu(options.gpu)
    notes = [match.note] if match.note else []
    total = match.gpu.memory_bytes - CUDA_RESERVED_BYTES
    notes.append(f"{match.gpu.name}: {match.gpu.memory_bytes / GIB:.2f} GiB by NVML, {total / GIB:.2f} GiB as CUDA reports its total "
                 f"({CUDA_RESERVED_BYTES / GIB:.2f} GiB kept by the driver, an estimate)")
    return match.gpu.name, total, notes


def plan_serving_request(model: str, options: ServingOptions, roots=None) -> ServingPlan:
    """The one recipe every door uses: resolve the model as `plan` does, find its config.json
    facts and the GPU, plan. `roots` as planner/request.resolve_source takes it (None: the CLI's
    any readable path)."""
    from planner.request import ANY_PATH, resolve_source

    source = resolve_source(model, roots=ANY_PATH if roots is None else roots)
    config = source.config or catalog_config(source.spec.name)
    name, total, gpu_notes = serving_gpu(options)
    plan = plan_serving(source.spec, options, name, total, config)
    from planner.catalog import spec_note

    plan.notes[1:1] = gpu_notes + ([spec_note(source.spec)] if spec_note(source.spec) else [])
    return plan


def serving_searches(plan: ServingPlan, spec: ModelSpec | None = None, concurrency: int = 1,
                     request_tokens: int | None = None) -> dict:
    """What users ask next: the utilization that serves `concurrency` requests of `request_tokens`
    (default max_model_len), and the longest max_model_len at that concurrency."""
    tokens = request_tokens or plan.max_model_len
    return {
        "concurrency": concurrency,
        "request_tokens": tokens,
        "gpu_memory_utilization_needed": needed_utilization(plan, concurrency, tokens),
        "longest_max_model_len": longest_model_len(plan, concurrency),
    }


# -- export: the `vllm serve` command line -------------------------------------------------------------

# vLLM's --quantization names for the planned formats; w8a8 and w4a16 are compressed-tensors
# checkpoints, whose format vLLM reads from the checkpoint's config (no flag)
VLLM_QUANTIZATION_FLAG = {"fp8": "fp8", "awq": "awq", "gptq": "gptq", "bitsandbytes": "bitsandbytes"}


def vllm_serve_args(plan: ServingPlan) -> list[str]:
    """`vllm serve` with the flags the plan was made for, by vLLM's own names: the memory and
    batch settings the plan assumed (its defaults included, pinned, so the engine sizes its KV
    cache as planned), parallelism, dtype, quantization, KV cache dtype, eager mode, LoRA slots."""
    o = plan.options
    args = ["vllm", "serve", plan.model_name]
    if o.tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(o.tensor_parallel_size)]
    if o.pipeline_parallel_size > 1:
        args += ["--pipeline-parallel-size", str(o.pipeline_parallel_size)]
    args += ["--gpu-memory-utilization", f"{o.gpu_memory_utilization:g}",
             "--max-model-len", str(plan.max_model_len),
             "--max-num-seqs", str(plan.max_num_seqs),
             "--max-num-batched-tokens", str(plan.max_num_batched_tokens)]
    if o.dtype != "auto":
        args += ["--dtype", o.dtype]
    if o.quantization in VLLM_QUANTIZATION_FLAG:
        args += ["--quantization", VLLM_QUANTIZATION_FLAG[o.quantization]]
    if o.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", o.kv_cache_dtype]
    if o.block_size != 16:
        args += ["--block-size", str(o.block_size)]
    if o.enforce_eager:
        args.append("--enforce-eager")
    if o.enable_lora:
        args += ["--enable-lora", "--max-loras", str(o.max_loras), "--max-lora-rank", str(o.max_lora_rank)]
    return args


def vllm_serve_text(plan: ServingPlan) -> str:
    """The command line with comment lines: what the plan expects vLLM to log, and what to check."""
    o = plan.options
    lines = [f"# vramplan: {plan.verdict} on {plan.gpu_count} x {plan.gpu_name}, vLLM {o.engine_version}'s accounting",
             f"# expect: GPU KV cache size: {plan.kv_cache_tokens:,} tokens; maximum concurrency for {plan.max_model_len:,} tokens per request: {plan.max_concurrency:.2f}x"]
    if o.quantization in ("w8a8", "w4a16"):
        lines.append(f"# {o.quantization}: a compressed-tensors checkpoint; vLLM reads its format from the checkpoint's config (no --quantization)")
    if o.enable_lora:
        lines.append("# add --lora-modules NAME=PATH for each adapter to serve")
    return "\n".join(lines) + "\n" + shlex.join(vllm_serve_args(plan)) + "\n"


def find_serving_gpus(model: str, options: ServingOptions, concurrency: int = 1, request_tokens: int | None = None,
                      sizes: tuple[int, ...] = (1, 2, 4, 8), roots=None) -> list[dict]:
    """Every catalog GPU with the smallest tensor-parallel size (of `sizes`) at which vLLM serves
    `concurrency` requests of `request_tokens` (default max_model_len) at the options'
    gpu_memory_utilization, cheapest first (price per hour x GPUs; GPUs without a price last, by
    memory). Each row is that plan's verdict and figures."""
    from gpu_catalog.catalog import all_gpus

    rows = []
    for gpu in all_gpus():
        for tp in sizes:
            try:
                plan = plan_serving_request(model, options.model_copy(update={"gpu": gpu.name, "gpu_memory_gib": None, "tensor_parallel_size": tp}), roots=roots)
            except PlanInputError:
                continue  # heads that do not split over tp ranks
            tokens = request_tokens or plan.max_model_len
            need = needed_utilization(plan, concurrency, tokens)
            if plan.fits and need is not None and need <= options.gpu_memory_utilization:
                rows.append({"gpu": gpu.name, "tensor_parallel_size": tp, "memory_bytes": gpu.memory_bytes,
                             "price_per_hour_usd": None if gpu.price_per_hour_usd is None else round(gpu.price_per_hour_usd * tp, 2),
                             "kv_cache_tokens": plan.kv_cache_tokens, "max_concurrency": round(plan.max_concurrency, 4),
                             "gpu_memory_utilization_needed": need})
                break
    rows.sort(key=lambda r: (r["price_per_hour_usd"] is None, r["price_per_hour_usd"] or 0, r["memory_bytes"] * r["tensor_parallel_size"]))
    return rows
