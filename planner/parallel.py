"""Per-GPU shares of static memory under DDP, ZeRO-1/2/3, FSDP and CPU offload.

- DDP replicates everything and, with PyTorch's default `gradient_as_bucket_view=False`, keeps
  its gradient buckets as a second copy of the gradients.
- ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3 and FSDP (FULL_SHARD) also
  parameters, gathering about two layers at a time (the one computing and the prefetched next).
- Offload moves optimizer state (and, with `params`, the parameter shards) to host memory.
"""

from __future__ import annotations

import math

from planner.components import Component
from planner.dtypes import dtype_bytes
from planner.options import TrainingOptions
from planner.spec import ModelSpec

SHARDS_OPTIMIZER = ("zero1", "zero2", "zero3", "fsdp")
SHARDS_GRADIENTS = ("zero2", "zero3", "fsdp")
SHARDS_PARAMS = ("zero3", "fsdp")
GATHERED_LAYERS = 2


def _shard(component: Component, n: int, why: str) -> Component:
    whole = component.replicated_bytes
    share = whole + math.ceil((component.bytes - whole) / n)
    return Component(component.name, share, f"{component.note}; 1/{n} per GPU ({why})", whole)


def largest_layer_params(spec: ModelSpec) -> int:
    per_layer: dict[int, int] = {}
    for t in spec.tensors:
        if t.layer is not None:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.numel
    return max(per_layer.values(), default=0)


def per_gpu_static(components: list[Component], spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    n = options.num_gpus
    strategy = options.parallelism
    out: list[Component] = []
    for c in components:
        family = c.family
        if family == "optimizer_state" and options.offload in ("optimizer", "params"):
            out.append(Component(c.name, 0, f"{c.note}; offloaded to host memory (costs host RAM, not GPU memory)"))
        elif family == "optimizer_state" and strategy in SHARDS_OPTIMIZER and n > 1:
            out.append(_shard(c, n, f"{strategy} shards optimizer state"))
        elif family == "gradients" and strategy in SHARDS_GRADIENTS and n > 1:
            out.append(_shard(c, n, f"{strategy} shards gradients"))
        elif family == "weights" and strategy in SHARDS_PARAMS and n > 1:
            if options.offload == "params":
                out.append(Component(c.name, 0, f"{c.note}; parameter shards offloaded to host memory"))
            else:
                out.append(_shard(c, n, f"{strategy} shards parameters"))
        else:
            out.append(c)
    if strategy in SHARDS_PARAMS and n > 1:
        gathered = GATHERED_LAYERS * largest_layer_params(spec) * dtype_bytes(options.effective_weights_dtype)
        out.append(
            Component(
                "temporary.gathered_params",
                gathered,
                f"{GATHERED_LAYERS} full layers gathered at a time ({strategy}: the layer computing and the one prefetched)",
            )
        )
    if strategy == "ddp" and n > 1:
        grads = sum(c.bytes for c in components if c.family == "gradients")
        out.append(Component("gradients.ddp_buckets", grads, "DDP's all-reduce buckets: a second copy of the gradients (gradient_as_bucket_view=False)"))
    return out
