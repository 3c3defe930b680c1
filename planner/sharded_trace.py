"""One rank of a sharded (FSDP2 or FSDP1) run, traced in one process over a fake process group.

The way PyTorch's own FSDP memory tests and torchtitan's memory estimator do it: torch.distributed's
fake process group (`FakeStore`, backend "fake") stands in for the other ranks, so FSDP shards a
real model as rank 0 of `world_size` and every collective returns at once without data. The step
(forward with labels, backward, AdamW's step, `zero_grad(set_to_none=True)`) runs under
planner/step_trace.py's dispatch mode, which records every storage an op creates and when it dies;
each allocation is charged to FSDP when FSDP's own code made it (its all-gather outputs, the
reduce-scatter input and output, the new sharded gradients), to the optimizer when torch.optim
made it, and to the step otherwise.

- FSDP2 (`fully_shard` per decoder layer, then the root; trace_fsdp2) refuses parameters on the
  meta device (`_validate_no_meta_params`, torch 2.13), so the model is real and on the CPU.
- FSDP1 (`FullyShardedDataParallel` with a transformer auto-wrap policy per decoder layer, as
  accelerate's FSDP plugin and the HF Trainer set it up; trace_fsdp1) runs on the CPU too:
  `device_id` cpu, and the fake group's all_gather into the padded unsharded flat parameter's
  chunks (`FlatParamHandle._all_gather_flat_param`'s CPU path).

Both free an unsharded parameter by resizing its storage to 0 and gather it again into the same
storage, which no op records; the trace records those as allocations and frees. The traces are for
small models, and what they show fixes the formula's FSDP terms (planner/parallel.py), which plans
use for any size. Nothing here is imported by a plan.
"""

from __future__ import annotations

import functools
import sys
import weakref
from contextlib import contextmanager
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
    # FSDP1 only: the largest unit's unsharded flat gradient (autograd's, before its reduce-scatter)
    unsharded_grad_peak_bytes: int = 0
    # QLoRA: bitsandbytes' quantization constants on this rank (no parameters: FSDP leaves them whole)
    quant_constants_bytes: int = 0


def _category() -> str:
    frame = sys._getframe(3)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if FSDP_PATH in name:
            # FSDP1's FullyShardedDataParallel.forward runs the wrapped module inside it: what that
            # module computes is the step's, not FSDP's (FSDP2 runs as hooks, with no such frame)
            if frame.f_code.co_name == "forward" and name.endswith("fully_sharded_data_parallel.py"):
                return "step"
            return "fsdp"
        if OPTIM_PATH in name:
            return "optimizer"
        frame = frame.f_back
    return "step"


@contextmanager
def _fake_group(world_size: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    elif dist.get_world_size() != world_size:
        raise RuntimeError(f"a process group of {dist.get_world_size()} ranks is already set up")
    try:
        yield
    finally:
        if started_here:
            dist.destroy_process_group()


METHODS = ("full", "qlora")
QLORA_RANK = 8


def _model(config: dict, weights_dtype: str, method: str = "full"):
    """The model the trace shards. QLoRA as PEFT's FSDP recipe loads it: bitsandbytes NF4 with
    double quantization and bnb_4bit_quant_storage in the weights' dtype (so the packed weights are
    parameters FSDP can flatten beside the norms), LoRA on every Linear, adapters cast to the
    weights' dtype (FSDP1 flattens one dtype per unit)."""
    import torch

    from planner.introspect import _load_transformers, build_config
    from planner.step_trace import torch_dtype

    if method not in METHODS:
        raise ValueError(f"method {method!r}: the traces shard {', '.join(METHODS)}")
    _load_transformers()
    from transformers import AutoModelForCausalLM

    hf_config = build_config(dict(config))
    hf_config.use_cache = False
    dtype = torch_dtype(weights_dtype)
    torch.manual_seed(0)
    if method == "full":
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa"), hf_config
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    with tempfile.TemporaryDirectory(prefix="vramplan-sharded-") as path:
        AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).save_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantized, dtype=dtype, device_map="cpu",
                                                     attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=QLORA_RANK, target_modules="all-linear"))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    return model, hf_config


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def quant_state_bytes(model) -> int:
    """The bytes of bitsandbytes' quantization constants this rank holds: each 4-bit layer's
    QuantState (absmax, code, and the nested state's), found on the module, where it stays when
    FSDP replaces the weight parameter, deduplicated by storage."""
    seen: dict[int, int] = {}
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        if state is None or not hasattr(state, "absmax"):
            continue
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _Recorder:
    """planner/step_trace.py's tracer, recording real CPU storages, with what made each."""

    def __init__(self):
        from planner.step_trace import _Tracer

        self.tracer = tracer = _Tracer()
        self.kinds: dict[int, str] = {}
        tracer.record = self.record

    def record(self, tensor, kind: str | None = None) -> None:
        # real CPU tensors here, not meta: every storage counts
        tracer = self.tracer
        storage = tensor.untyped_storage()
        cdata = storage._cdata
        if cdata in tracer._handles or storage.nbytes() == 0:
            return
        tracer._next += 1
        tracer._handles[cdata] = tracer._next
        tracer.events.append(("alloc", tracer._next, storage.nbytes()))
        self.kinds[tracer._next] = kind or _category()
        weakref.finalize(storage, tracer._died, cdata, tracer._next)

    def resized(self, tensor) -> None:
        """An unsharded parameter gathered again into its storage (resized from 0): an allocation."""
        tracer = self.tracer
        storage = tensor.untyped_storage()
        if storage._cdata not in tracer._handles and storage.nbytes():
            tracer._next += 1
            tracer._handles[storage._cdata] = tracer._next
            tracer.events.append(("alloc", tracer._next, storage.nbytes()))
            self.kinds[tracer._next] = "fsdp"

    def freed(self, tensor) -> None:
        """An unsharded parameter's storage resized to 0: a free."""
        handle = self.tracer._handles.pop(tensor.untyped_storage()._cdata, None)
        if handle is not None:
            self.tracer.events.append(("free", handle))

    def tag(self, tensor, kind: str) -> None:
        handle = self.tracer._handles.get(tensor.untyped_storage()._cdata)
        if handle is not None:
            self.kinds[handle] = kind

    def replay(self) -> tuple[int, int, dict[str, int]]:
        """(peak of everything, peak of FSDP's buffers, live bytes by kind at that peak)."""
        sizes: dict[int, int] = {}
        live: dict[str, int] = {}
        total = peak = fsdp_peak = 0
        at_fsdp_peak: dict[str, int] = {}
        for event in list(self.tracer.events):
            if event[0] == "alloc":
                _, handle, nbytes = event
                sizes[handle] = nbytes
                sign = 1
            else:
                handle, sign = event[1], -1
                nbytes = sizes.pop(handle, 0)
            kind = self.kinds.get(handle, "step")
            live[kind] = live.get(kind, 0) + sign * nbytes
            total += sign * nbytes
            peak = max(peak, total)
            # FSDP's buffers beyond the sharded gradients it keeps (those are the plan's gradients)
            held = live.get("fsdp", 0)
            if held > fsdp_peak:
                fsdp_peak, at_fsdp_peak = held, dict(live)
        return peak, fsdp_peak, at_fsdp_peak


def _local_bytes(tensor) -> int:
    tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return tensor.numel() * tensor.element_size()


def trace_fsdp2(config: dict, world_size: int, weights_dtype: str = "bf16", batch_size: int = 1, seq_len: int = 16,
                steps: int = 2, method: str = "full") -> ShardedTrace:
    """Rank 0 of `world_size` under FSDP2 as accelerate sets it up for the plan's export
    (`fully_shard` per decoder layer, then the root; reshard_after_forward), with AdamW; `method`
    full or qlora (_model)."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param as fsdp_param
    from torch.distributed.fsdp._fully_shard import (
        _fsdp_param_group as fsdp_param_group,
    )

    saved = (fsdp_param.alloc_storage, fsdp_param.free_storage)
    with _fake_group(world_size):
        try:
            model, hf_config = _model(config, weights_dtype, method)
            for layer in _decoder_layers(model):
                fully_shard(layer)
            fully_shard(model)
            model.train()
            recorder = _Recorder()

            # FSDP2 frees an unsharded parameter by resizing its storage to 0 and gathers it again
            # into the same storage (_fsdp_param.free_storage / alloc_storage): on CUDA each is a
            # free and an allocation of the caching allocator, but no op runs
            def alloc_storage(tensor, _alloc=saved[0]):
                _alloc(tensor)
                recorder.resized(tensor)

            def free_storage(tensor, _free=saved[1]):
                recorder.freed(tensor)
                _free(tensor)

            fsdp_param.alloc_storage = fsdp_param_group.alloc_storage = alloc_storage
            fsdp_param.free_storage = free_storage
            for param in model.parameters():
                recorder.record(param.to_local(), "sharded_params")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
            ids = torch.randint(3, hf_config.vocab_size, (batch_size, seq_len))
            with recorder.tracer.mode:
                for _ in range(steps):
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    del loss
                    for param in model.parameters():
                        if param.grad is not None:
                            recorder.tag(param.grad.to_local(), "sharded_grads")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            param_bytes = sum(_local_bytes(p) for p in model.parameters())
            grad_bytes = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)
            state_bytes = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        finally:
            fsdp_param.alloc_storage = fsdp_param_group.alloc_storage = saved[0]
            fsdp_param.free_storage = saved[1]
    # a gradient per trainable parameter, sharded like it (in the parameter dtype: no mixed-precision policy)
    peak, fsdp_peak, at_fsdp_peak = recorder.replay()
    return ShardedTrace(world_size, peak, fsdp_peak, param_bytes, grad_bytes, state_bytes, at_fsdp_peak,
                        quant_constants_bytes=quant_state_bytes(model))


def trace_fsdp1(config: dict, world_size: int, weights_dtype: str = "bf16", batch_size: int = 1, seq_len: int = 16,
                steps: int = 2, use_orig_params: bool = True, method: str = "full") -> ShardedTrace:
    """Rank 0 of `world_size` under FSDP1 as accelerate's FSDP plugin (fsdp_version 1) and the HF
    Trainer set it up: FullyShardedDataParallel with TRANSFORMER_BASED_WRAP (a unit per decoder
    layer, the rest in the root unit), FULL_SHARD, BACKWARD_PRE prefetch, no forward prefetch,
    limit_all_gathers, use_orig_params (accelerate's default; Answer.AI's fsdp_qlora turns it off),
    with AdamW; `method` full or qlora (_model; PEFT's frozen and trainable parameters in one unit
    need use_orig_params)."""
    import torch
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import _flat_param as flat_param_module
    from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    saved = (flat_param_module._alloc_storage, flat_param_module._free_storage)
    with _fake_group(world_size):
        try:
            model, hf_config = _model(config, weights_dtype, method)
            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(_decoder_layers(model)[0])})
            model = FSDP(model, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"),
                         backward_prefetch=BackwardPrefetch.BACKWARD_PRE, forward_prefetch=False, limit_all_gathers=True,
                         use_orig_params=use_orig_params)
            model.train()
            recorder = _Recorder()

            # FSDP1 allocates the padded unsharded flat parameter by resizing its storage
            # (_flat_param.py _alloc_padded_unsharded_flat_param -> _alloc_storage) and frees it
            # by resizing to 0 (_free_unsharded_flat_param -> _free_storage)
            def alloc_storage(tensor, size, _alloc=saved[0]):
                _alloc(tensor, size)
                recorder.resized(tensor)

            def free_storage(tensor, _free=saved[1]):
                recorder.freed(tensor)
                _free(tensor)

            flat_param_module._alloc_storage = alloc_storage
            flat_param_module._free_storage = free_storage
            handles = _get_fsdp_handles(model)
            for handle in handles:
                recorder.record(handle.flat_param, "sharded_params")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
            ids = torch.randint(3, hf_config.vocab_size, (batch_size, seq_len))
            unsharded_grads = []
            original_reduce = _wrap_reduce_grad(unsharded_grads)
            with recorder.tracer.mode:
                for _ in range(steps):
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    del loss
                    for handle in handles:
                        if handle.flat_param.grad is not None:
                            recorder.tag(handle.flat_param.grad, "sharded_grads")
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            _unwrap_reduce_grad(original_reduce)

            param_bytes = sum(_local_bytes(handle.flat_param) for handle in handles)
            state_bytes = sum(_local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        finally:
            flat_param_module._alloc_storage, flat_param_module._free_storage = saved
    peak, fsdp_peak, at_fsdp_peak = recorder.replay()
    return ShardedTrace(world_size, peak, fsdp_peak, param_bytes, param_bytes, state_bytes, at_fsdp_peak, max(unsharded_grads, default=0),
                        quant_state_bytes(model))


def _wrap_reduce_grad(sizes: list[int]):
    """Note each unit's unsharded flat gradient as FSDP1's post-backward hook reduce-scatters it
    (_runtime_utils._reduce_grad: flat_param.grad, the gradient autograd computed for the unit)."""
    from torch.distributed.fsdp import _runtime_utils

    original = _runtime_utils._reduce_grad

    def reduce_grad(state, handle, _original=original):
        grad = handle.flat_param.grad
        sizes.append(grad.numel() * grad.element_size())
        return _original(state, handle)

    _runtime_utils._reduce_grad = reduce_grad
    return original


def _unwrap_reduce_grad(original) -> None:
    from torch.distributed.fsdp import _runtime_utils

    _runtime_utils._reduce_grad = original
