"""One rank of a sharded (FSDP2) run, traced in one process over a fake process group.

The way PyTorch's own FSDP2 memory tests and torchtitan's memory estimator do it: torch.distributed's
fake process group (`FakeStore`, backend "fake") stands in for the other ranks, so `fully_shard`
shards a real model as rank 0 of `world_size` and every collective returns at once without data.
The step (forward with labels, backward, AdamW's step, `zero_grad(set_to_none=True)`) runs under
planner/step_trace.py's dispatch mode, which records every storage an op creates and when it dies;
each allocation is charged to FSDP when FSDP's own code made it (its all-gather outputs, the
reduce-scatter input and output, the new sharded gradients), to the optimizer when torch.optim
made it, and to the step otherwise.

FSDP2 refuses parameters on the meta device (`_validate_no_meta_params`, torch 2.13), so the model
is real and on the CPU: the trace is for small models, and what it shows fixes the formula's FSDP
terms (planner/parallel.py), which plans use for any size. Nothing here is imported by a plan.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

FSDP_PATH = "torch/distributed/fsdp"
OPTIM_PATH = "torch/optim"


@dataclass(frozen=True)
class ShardedTrace:
    world_size: int
    # per-rank peak of every live tensor this rank holds (parameters, gradients, state, activations)
    peak_bytes: int
    # per-rank peak of what FSDP's own code holds beyond the sharded parameters and gradients:
    # all-gather outputs (the unsharded units) and the reduce-scatter buffers
    fsdp_buffer_peak_bytes: int
    # the sharded parameters, gradients and optimizer state, as the rank holds them after the step
    sharded_param_bytes: int
    sharded_grad_bytes: int
    optimizer_state_bytes: int
    # live bytes by what made them, at the FSDP buffers' peak
    at_fsdp_peak: dict[str, int] = field(default_factory=dict)


def _category() -> str:
    frame = sys._getframe(3)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if FSDP_PATH in name:
            return "fsdp"
        if OPTIM_PATH in name:
            return "optimizer"
        frame = frame.f_back
    return "step"


def trace_fsdp2(config: dict, world_size: int, weights_dtype: str = "bf16", batch_size: int = 1, seq_len: int = 16,
                steps: int = 2) -> ShardedTrace:
    """Rank 0 of `world_size` under FSDP2 as accelerate sets it up for the plan's export
    (`fully_shard` per decoder layer, then the root; reshard_after_forward), with AdamW."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param as fsdp_param
    from torch.distributed.fsdp._fully_shard import (
        _fsdp_param_group as fsdp_param_group,
    )
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from planner.introspect import _load_transformers, build_config
    from planner.step_trace import _Tracer, torch_dtype

    _load_transformers()
    from transformers import AutoModelForCausalLM

    saved = (fsdp_param.alloc_storage, fsdp_param.free_storage)
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    elif dist.get_world_size() != world_size:
        raise RuntimeError(f"a process group of {dist.get_world_size()} ranks is already set up")
    try:
        hf_config = build_config(dict(config))
        hf_config.use_cache = False
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(weights_dtype), attn_implementation="sdpa")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.train()

        tracer = _Tracer()
        kinds: dict[int, str] = {}

        def record(tensor, self=tracer):
            # real CPU tensors here, not meta: every storage counts
            storage = tensor.untyped_storage()
            cdata = storage._cdata
            if cdata in self._handles or storage.nbytes() == 0:
                return
            self._next += 1
            self._handles[cdata] = self._next
            self.events.append(("alloc", self._next, storage.nbytes()))
            kinds[self._next] = _category()
            weakref.finalize(storage, self._died, cdata, self._next)

        tracer.record = record

        # FSDP2 frees an unsharded parameter by resizing its storage to 0 and gathers it again into
        # the same storage (_fsdp_param.free_storage / alloc_storage): on CUDA each is a free and
        # an allocation of the caching allocator, but no op runs, so they are recorded here
        def alloc_storage(tensor, _alloc=saved[0]):
            _alloc(tensor)
            storage = tensor.untyped_storage()
            if storage._cdata not in tracer._handles and storage.nbytes():
                tracer._next += 1
                tracer._handles[storage._cdata] = tracer._next
                tracer.events.append(("alloc", tracer._next, storage.nbytes()))
                kinds[tracer._next] = "fsdp"

        def free_storage(tensor, _free=saved[1]):
            handle = tracer._handles.pop(tensor.untyped_storage()._cdata, None)
            if handle is not None:
                tracer.events.append(("free", handle))
            _free(tensor)

        fsdp_param.alloc_storage = fsdp_param_group.alloc_storage = alloc_storage
        fsdp_param.free_storage = free_storage
        for param in model.parameters():
            record(param.to_local())
        kinds.update({handle: "sharded_params" for handle in kinds})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        ids = torch.randint(3, hf_config.vocab_size, (batch_size, seq_len))
        with tracer.mode:
            for _ in range(steps):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                del loss
                for param in model.parameters():
                    if param.grad is not None:
                        handle = tracer._handles.get(param.grad.to_local().untyped_storage()._cdata)
                        if handle is not None:
                            kinds[handle] = "sharded_grads"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        def local_bytes(tensor) -> int:
            tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            return tensor.numel() * tensor.element_size()

        param_bytes = sum(local_bytes(p) for p in model.parameters())
        state_bytes = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        # a gradient per parameter, sharded like it (in the parameter dtype: no mixed-precision policy)
        grad_bytes = param_bytes
        events = list(tracer.events)
    finally:
        fsdp_param.alloc_storage = fsdp_param_group.alloc_storage = saved[0]
        fsdp_param.free_storage = saved[1]
        if started_here:
            dist.destroy_process_group()

    sizes: dict[int, int] = {}
    live: dict[str, int] = {}
    total = peak = fsdp_peak = 0
    at_fsdp_peak: dict[str, int] = {}
    for event in events:
        if event[0] == "alloc":
            _, handle, nbytes = event
            sizes[handle] = nbytes
            kind = kinds.get(handle, "step")
            live[kind] = live.get(kind, 0) + nbytes
            total += nbytes
        else:
            handle = event[1]
            nbytes = sizes.pop(handle, 0)
            kind = kinds.get(handle, "step")
            live[kind] = live.get(kind, 0) - nbytes
            total -= nbytes
        peak = max(peak, total)
        # FSDP's buffers beyond the sharded gradients it keeps (those are the plan's gradients)
        held = live.get("fsdp", 0)
        if held > fsdp_peak:
            fsdp_peak, at_fsdp_peak = held, dict(live)
    return ShardedTrace(world_size, peak, fsdp_peak, param_bytes, grad_bytes, state_bytes, at_fsdp_peak)
