"""Per-GPU static memory under FSDP, held to a real run: two CPU processes (gloo) shard a tiny
model with PyTorch's FSDP2 (`fully_shard` per decoder layer and at the root, as accelerate and
TRL set it up), take one AdamW step, and each rank's parameter, gradient and optimizer-state
bytes must equal the planner's per-GPU `weights`, `gradients` and `optimizer_state`.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from planner.introspect import spec_from_config
from planner.options import TrainingOptions
from planner.plan import build_plan
from tests.conftest import TINY

WORLD = 2


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensor) -> int:
    tensor = _local(tensor)
    return tensor.numel() * tensor.element_size()


def _rank(rank: int, port: int, arch: str, weights_dtype: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard

        from tests.realstack import build_model

        model = build_model(TINY[arch], weights_dtype, attention="sdpa")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, TINY[arch]["vocab_size"], (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        measured = {
            "weights": sum(_bytes(p) for p in model.parameters()),
            "gradients": sum(_bytes(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer_state": sum(_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)),
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(measured, fh)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("arch,weights_dtype", [("llama", "bf16"), ("qwen2", "fp32")])
def test_fsdp_per_gpu_static_memory_equals_each_rank(tmp_path, arch, weights_dtype):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_rank, args=(_free_port(), arch, weights_dtype, str(tmp_path)), nprocs=WORLD)
    spec = spec_from_config(dict(TINY[arch]), arch)
    options = TrainingOptions(method="full", weights_dtype=weights_dtype, precision=weights_dtype if weights_dtype != "fp32" else "bf16",
                              num_gpus=WORLD, parallelism="fsdp", gpu_memory_gib=80)
    plan = build_plan(spec, options)
    planned = {family: sum(c.bytes for c in plan.all_components if c.family == family) for family in ("weights", "gradients", "optimizer_state")}
    for rank in range(WORLD):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured == planned, (rank, measured, planned)


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from tests.realstack import build_model, profiled_peak

        model = DistributedDataParallel(build_model(TINY["llama"], "bf16", attention="sdpa"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, TINY["llama"]["vocab_size"], (2, 64))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"peak": profiled_peak(step)}, fh)
    finally:
        dist.destroy_process_group()


def test_ddp_whole_step_peak_includes_the_gradient_buckets(tmp_path):
    """DDP (gradient_as_bucket_view=False, PyTorch's default) keeps its all-reduce buckets as a
    second copy of the gradients: each rank's measured peak must match the plan that counts them."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_ddp_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    spec = spec_from_config(dict(TINY["llama"]), "llama")
    options = TrainingOptions(method="full", weights_dtype="bf16", precision="bf16", batch_size=2, seq_len=64, gradient_checkpointing=False,
                              trainer="hf", num_gpus=WORLD, parallelism="ddp", gpu_memory_gib=80)
    plan = build_plan(spec, options)
    # NCCL's buffers live outside PyTorch's allocator, and a gloo run on CPUs has none
    planned = sum(c.bytes for c in plan.components if c.family != "runtime" and c.name != "sharding.nccl")
    assert any(c.name == "gradients.ddp_buckets" for c in plan.components)
    for rank in range(WORLD):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())["peak"]
        assert abs(planned - measured) / measured <= 0.02, (rank, planned, measured)
