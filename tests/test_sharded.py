"""Sharded multi-GPU plans (issue 23, item 3): FSDP2's buffers held to a fake-process-group trace of
one rank, DeepSpeed's buffers sized from its options and the HF integration's "auto" values."""

from __future__ import annotations

import pytest

from launcher.exports import deepspeed_json
from planner.introspect import spec_from_config
from planner.options import TrainingOptions
from planner.parallel import DEEPSPEED_DEFAULTS, NCCL_BYTES, auto_values
from planner.plan import build_plan
from tests.conftest import TINY

# four layers, so that "two layers gathered at a time" differs from "every layer"
FOUR_LAYERS = dict(TINY["llama"], num_hidden_layers=4)
# FSDP2's buffers equal the plan's to the byte on this model; the tolerance allows for padding
# of the shards on other shapes
TOLERANCE = 0.05


def _bytes(plan, name: str) -> int:
    return sum(c.bytes for c in plan.all_components if c.name == name)


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_fake_process_group_trace_of_fsdp2_agrees_with_the_plan(world_size):
    pytest.importorskip("torch.distributed.fsdp")
    from planner.sharded_trace import trace_fsdp2

    traced = trace_fsdp2(FOUR_LAYERS, world_size, weights_dtype="bf16")
    spec = spec_from_config(dict(FOUR_LAYERS), "llama")
    plan = build_plan(spec, TrainingOptions(method="full", precision="bf16", weights_dtype="bf16", num_gpus=world_size,
                                            parallelism="fsdp", gpu_memory_gib=80, simulate_allocator=False))
    planned = sum(_bytes(plan, name) for name in ("temporary.gathered_params", "temporary.gather_copy", "temporary.gathered_root"))
    assert abs(planned - traced.fsdp_buffer_peak_bytes) <= TOLERANCE * traced.fsdp_buffer_peak_bytes, (planned, traced)
    # the per-rank shares the trace holds are the plan's
    assert traced.sharded_param_bytes == sum(c.bytes for c in plan.all_components if c.family == "weights")
    # without the root term (the old two layers only) the plan is well under the trace
    assert _bytes(plan, "temporary.gathered_params") < 0.75 * traced.fsdp_buffer_peak_bytes


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_plans_carry_deepspeed_buffers_from_the_options(tiny_specs, stage):
    spec = tiny_specs["llama"]
    base = {"method": "full", "num_gpus": 4, "parallelism": stage, "gpu_memory_gib": 80, "simulate_allocator": False}
    default = build_plan(spec, TrainingOptions(**base))
    buckets = 2 if stage == "zero3" else 1  # overlap_comm: DeepSpeed's default is on for ZeRO-3 only
    if stage == "zero2":
        assert _bytes(default, "temporary.grad_reduce") == buckets * DEEPSPEED_DEFAULTS["reduce_bucket_size"] * 2
        assert _bytes(default, "temporary.zero_step") > 0
    else:
        assert _bytes(default, "sharding.ipg_bucket") == DEEPSPEED_DEFAULTS["reduce_bucket_size"] * 2
        # the reduce-scatter's buffers hold at most the trainable gradients (the tiny model's 102,720)
        trainable = sum(t.numel for t in spec.tensors)
        assert _bytes(default, "temporary.grad_reduce") == buckets * min(DEEPSPEED_DEFAULTS["reduce_bucket_size"], trainable) * 2
        assert _bytes(default, "sharding.fp32_grad_partition") == -(-trainable // 4) * 4
    given = build_plan(spec, TrainingOptions(**base, reduce_bucket_size=1000))
    assert _bytes(given, "temporary.grad_reduce") == buckets * 1000 * 2
    auto = build_plan(spec, TrainingOptions(**base, reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto",
                                            stage3_param_persistence_threshold="auto"))
    hidden = spec.hidden_size
    assert auto_values(hidden) == {"reduce_bucket_size": hidden**2, "stage3_prefetch_bucket_size": int(0.9 * hidden**2),
                                   "stage3_param_persistence_threshold": 10 * hidden}
    assert _bytes(auto, "temporary.grad_reduce") == buckets * hidden**2 * 2
    assert f"reduce_bucket_size {hidden**2:,} (auto: hidden_size^2)" in next(c.note for c in auto.all_components if "ipg" in c.note)
    assert _bytes(default, "sharding.nccl") == NCCL_BYTES


def test_zero3_prefetch_and_persistence_size_the_gathered_parameters(tiny_specs):
    spec = tiny_specs["llama"]
    base = {"method": "full", "num_gpus": 4, "parallelism": "zero3", "gpu_memory_gib": 80, "simulate_allocator": False}
    small = build_plan(spec, TrainingOptions(**base, stage3_prefetch_bucket_size=0, stage3_param_persistence_threshold=0))
    largest = max(t.numel for t in spec.tensors)
    assert _bytes(small, "temporary.gathered_params") == largest * 2
    assert _bytes(small, "sharding.persistent_params") == 0
    kept = build_plan(spec, TrainingOptions(**base, stage3_param_persistence_threshold=64))
    assert _bytes(kept, "sharding.persistent_params") > 0


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_overlap_comm_changes_the_plan(tiny_specs, stage):
    spec = tiny_specs["llama"]
    base = {"method": "full", "num_gpus": 4, "parallelism": stage, "gpu_memory_gib": 80, "simulate_allocator": False}
    off = build_plan(spec, TrainingOptions(**base, overlap_comm=False))
    on = build_plan(spec, TrainingOptions(**base, overlap_comm=True))
    assert _bytes(on, "temporary.grad_reduce") == 2 * _bytes(off, "temporary.grad_reduce")
    assert on.phase_totals["backward_end"] > off.phase_totals["backward_end"]


def test_auto_only_where_the_hf_integration_fills_it_in():
    with pytest.raises(ValueError):
        TrainingOptions(allgather_bucket_size="auto")
    assert TrainingOptions(reduce_bucket_size="5e8").reduce_bucket_size == 500_000_000


def test_exports_write_the_bucket_options_into_the_deepspeed_config():
    options = {"reduce_bucket_size": "auto", "allgather_bucket_size": 200_000_000, "overlap_comm": True,
               "stage3_prefetch_bucket_size": 1000, "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": None}
    zero3 = deepspeed_json(3, "none", options)["zero_optimization"]
    assert zero3["reduce_bucket_size"] == "auto" and zero3["allgather_bucket_size"] == 200_000_000 and zero3["overlap_comm"] is True
    assert zero3["stage3_prefetch_bucket_size"] == 1000 and zero3["stage3_param_persistence_threshold"] == "auto"
    assert "stage3_max_live_parameters" not in zero3  # not given: DeepSpeed's default, as planned
    zero2 = deepspeed_json(2, "none", options)["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in zero2 and zero2["overlap_comm"] is True
    assert deepspeed_json(2, "none")["zero_optimization"] == {"stage": 2}
