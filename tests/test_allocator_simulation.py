"""The allocator's reserve simulated from a traced step (planner/allocator.py, planner/step_trace.py).

The allocator model is held to the rules of PyTorch's CUDA caching allocator; the whole chain
(meta-device trace of the real transformers/PEFT code, replayed through that model) is held to
max_memory_reserved measured on an H100 for runs it never saw, and a plan that asks for it says so.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import calibrate

from planner.allocator import CachingAllocator, replay
from planner.catalog import CONFIGS_DIR, file_stem, load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.runtime import calibration
from planner.step_trace import simulate_step

MIB = 1 << 20
GIB = 1 << 30


def test_small_requests_share_a_2_mib_segment_and_are_rounded_to_512_bytes():
    peaks = replay([("alloc", 1, 100), ("alloc", 2, 1000), ("alloc", 3, MIB)])
    assert peaks.peak_allocated == 512 + 1024 + MIB
    assert peaks.peak_reserved == 2 * MIB


def test_mid_size_requests_reserve_20_mib_and_large_ones_their_size_rounded_to_2_mib():
    assert replay([("alloc", 1, 3 * MIB)]).peak_reserved == 20 * MIB
    assert replay([("alloc", 1, 11 * MIB + 1)]).peak_reserved == 12 * MIB


def test_a_freed_block_is_reused_best_fit_and_split():
    # 100 MiB freed, then 60 MiB reuses it; the 40 MiB left serves the next 30 MiB: nothing new reserved
    peaks = replay([("alloc", 1, 100 * MIB), ("free", 1), ("alloc", 2, 60 * MIB), ("alloc", 3, 30 * MIB)])
    assert peaks.peak_reserved == 100 * MIB and peaks.peak_allocated == 100 * MIB


def test_blocks_never_merge_across_segments_so_a_larger_request_reserves_anew():
    # two 50 MiB segments freed side by side cannot serve 80 MiB: the reserve is their 100 MiB
    events = [("alloc", 1, 50 * MIB), ("alloc", 2, 50 * MIB), ("free", 1), ("free", 2), ("alloc", 3, 80 * MIB)]
    peaks = replay(events)
    assert peaks.peak_reserved == 180 * MIB and peaks.peak_allocated == 100 * MIB


def test_neighbours_in_one_segment_merge_when_freed():
    allocator = CachingAllocator()
    allocator.malloc("big", 100 * MIB)
    allocator.free("big")
    allocator.malloc("a", 40 * MIB)
    allocator.malloc("b", 40 * MIB)
    allocator.free("a")
    allocator.free("b")
    allocator.malloc("c", 90 * MIB)  # fits only if a, b and the 20 MiB tail merged back into 100
    assert allocator.reserved == 100 * MIB


def _measured_run(name: str) -> dict:
    return next(run for run in calibrate.load_runs([calibrate.DEFAULT_RUNS]) if run["name"] == name)


@pytest.mark.parametrize("name", [
    "l1b-full-bf16-b4s1024-gc",  # full fine-tune, checkpointing: 3.4 GiB reserved above allocated
    "q05-lora8qv-drop-b16s1024",  # LoRA with dropout, no checkpointing
    "l1b-qlora16all-b8s2048-gc",  # a 4-bit base
    "l1b-full-fp32amp-b4s1024-gc",  # fp32 weights under bf16 autocast
])
def test_the_simulated_step_reproduces_h100_peaks(name):
    """No constant of the simulation was fitted to these runs (bench/calibrate.py prints all 22)."""
    run = _measured_run(name)
    config = json.loads((CONFIGS_DIR / f"{file_stem(run['model'])}.json").read_text())
    simulated = simulate_step(config, TrainingOptions(**run["options"]))
    measured = run["measured"]
    assert simulated.peaks.peak_allocated == pytest.approx(measured["peak_allocated"], rel=0.01)
    assert simulated.peaks.peak_reserved == pytest.approx(measured["peak_reserved"], rel=0.015)
    # the reserve itself, not just the total: the formula's error on these is up to 1 GiB
    assert abs(simulated.peaks.reserve - (measured["peak_reserved"] - measured["peak_allocated"])) < 0.35 * GIB


def test_a_plan_that_asks_for_the_simulation_uses_it_and_its_band():
    run = _measured_run("l1b-full-bf16-b4s1024-gc")
    spec = load_catalog_spec(run["model"])
    formula = build_plan(spec, TrainingOptions(gpu_memory_gib=80, **run["options"]))
    simulated = build_plan(spec, TrainingOptions(gpu_memory_gib=80, simulate_allocator=True, **run["options"]))
    assert simulated.reserve_source == "simulated" and formula.reserve_source == "formula"
    measured_process = run["measured"]["peak_reserved"] + run["measured"]["outside_allocator"]
    assert abs(simulated.peak_bytes - measured_process) < abs(formula.peak_bytes - measured_process)
    assert simulated.peak_low_bytes <= measured_process <= simulated.peak_high_bytes
    simulated_width = simulated.peak_high_bytes - simulated.peak_low_bytes
    assert simulated_width < 0.75 * (formula.peak_high_bytes - formula.peak_low_bytes)
    assert any("simulated over this run's allocations" in a for a in simulated.assumptions)
    assert simulated.to_dict()["reserve_source"] == "simulated"


def test_trl_s_fused_head_gets_the_simulated_band_plus_its_whole_buffers_until_measured():
    spec = load_catalog_spec("meta-llama/Llama-3.2-1B")
    options = {"gpu_memory_gib": 80, "trainer": "trl", "batch_size": 2, "seq_len": 512}
    formula = build_plan(spec, TrainingOptions(**options))
    plan = build_plan(spec, TrainingOptions(simulate_allocator=True, **options))
    assert (plan.reserve_source, plan.band_source, plan.unmeasured_parts) == ("simulated", "simulated", ["TRL's fused LM head"])
    # the simulated runs' constants, and on top the fused head's backward buffers as if the trace had missed them all
    fused_head = sum(c.bytes for c in plan.all_components if c.name == "temporary.loss_backward")
    assert plan.unmeasured_allowance_bytes == fused_head > 0
    cal = calibration()
    exact = sum(c.bytes for c in plan.components if c.family in ("weights", "gradients", "optimizer_state") or c.name == "runtime.cuda_context")
    assert plan.peak_high_bytes == plan.peak_bytes + math.ceil((plan.peak_bytes - exact) * cal.simulated_band_high) + fused_head
    assert any(f"plus {fused_head / GIB:.2f} GiB for TRL's fused LM head, simulated from the code and not yet checked" in a for a in plan.assumptions)
    assert plan.peak_high_bytes - plan.peak_low_bytes < formula.peak_high_bytes - formula.peak_low_bytes
    assert formula.reserve_source == "formula" and formula.unmeasured_allowance_bytes == 0


def test_the_trace_runs_trl_s_own_fused_head_with_only_its_in_place_kernels_stubbed(monkeypatch):
    """TRL's ChunkedLogProbFunction itself runs in the trace (a TRL release that allocates more is
    traced as it is); only what CUDA does in place is stubbed, and everything is put back."""
    import torch
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from planner.logits import TRL_TOKEN_TILE, TRL_VOCAB_TILE
    from planner.step_trace import _simulate

    # the formula's tile is TRL's
    assert (TRL_TOKEN_TILE, TRL_VOCAB_TILE) == (chunked.TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)
    # and the outputs the trace asks of it are the SFT trainer's
    import inspect

    from trl.trainer import sft_trainer

    from planner.stage_steps import SFT_FUSED_OUTPUTS

    assert f"outputs={SFT_FUSED_OUTPUTS!r}" in inspect.getsource(sft_trainer).replace('"', "'")
    calls = []
    real_forward = chunked.ChunkedLogProbFunction.forward

    def forward(ctx, hidden, weight, *args):
        calls.append((hidden.device.type, chunked._forward_tile.__name__, chunked.torch.is_autocast_enabled("meta")))
        return real_forward(ctx, hidden, weight, *args)

    monkeypatch.setattr(chunked.ChunkedLogProbFunction, "forward", staticmethod(forward))
    before = (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton, chunked.torch, chunked._forward_tile, chunked._addmm_fp32)
    config = dict(json.loads((CONFIGS_DIR / f"{file_stem('HuggingFaceTB/SmolLM2-135M')}.json").read_text()))
    step = _simulate(config, TrainingOptions(method="lora", trainer="trl", batch_size=2, seq_len=256), 1)
    assert calls == [("meta", "_in_place", True)]  # under the run's autocast, as on CUDA
    assert (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton, chunked.torch, chunked._forward_tile, chunked._addmm_fp32) == before
    assert chunked.torch is torch and trl_utils._ChunkedLogProbFunction is chunked.ChunkedLogProbFunction
    assert step.peaks.peak_reserved > 0


def test_expandable_segments_band_allows_for_the_default_allocator_until_measured():
    from planner.step_trace import simulated_for

    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    options = TrainingOptions(gpu_memory_gib=80, trainer="hf", method="lora", batch_size=4, seq_len=1024, allocator="expandable_segments",
                              simulate_allocator=True)
    plan = build_plan(spec, options)
    step = simulated_for(spec, options)
    assert step.default_peaks is not None and step.default_peaks.peak_reserved > step.peaks.peak_reserved
    assert plan.unmeasured_parts == ["expandable segments"]
    assert plan.unmeasured_allowance_bytes == step.default_peaks.peak_reserved - step.peaks.peak_reserved


def test_a_paged_optimizer_s_large_states_live_outside_the_pool_and_the_band_allows_for_them_in_it():
    """bitsandbytes puts a paged optimizer's states of 100,000 values or more in CUDA managed
    memory, outside PyTorch's caching allocator; until a GPU run measures that, the high end allows
    for what the step would hold were they in the pool (the non-paged optimizer's trace)."""
    import inspect

    from bitsandbytes.optim.optimizer import Optimizer8bit

    from planner.step_trace import PAGED_MIN_NUMEL

    assert "p.numel() < 1e5" in inspect.getsource(Optimizer8bit.get_state_buffer) and PAGED_MIN_NUMEL == 100_000
    spec = load_catalog_spec("HuggingFaceTB/SmolLM2-135M")
    config = json.loads((CONFIGS_DIR / f"{file_stem('HuggingFaceTB/SmolLM2-135M')}.json").read_text())
    options = {"method": "full", "trainer": "hf", "batch_size": 2, "seq_len": 512, "gpu_memory_gib": 80}
    paged = simulate_step(config, TrainingOptions(optimizer="paged_adamw_8bit", **options))
    in_pool = simulate_step(config, TrainingOptions(optimizer="adamw_8bit", **options))
    large = sum(t.numel for t in spec.tensors if t.numel >= PAGED_MIN_NUMEL)
    assert paged.outside_allocator_bytes == 2 * large > 0  # two uint8 states a value
    # (the least pool is searched for the plan's own replay only)
    assert paged.in_pool_peaks == dataclasses.replace(in_pool.peaks, smallest_capacity=None) and paged.peaks.peak_reserved < in_pool.peaks.peak_reserved

    plan = build_plan(spec, TrainingOptions(optimizer="paged_adamw_8bit", simulate_allocator=True, **options))
    assert plan.unmeasured_parts == ["paged optimizer state"]
    assert plan.unmeasured_allowance_bytes == max(0, in_pool.peaks.peak_reserved - paged.peaks.peak_reserved - paged.outside_allocator_bytes)
    context = calibration().cuda_context_bytes
    # the central figure: the pool's peak plus the paged states, counted as resident
    assert plan.peak_bytes == paged.peaks.peak_reserved + paged.outside_allocator_bytes + context
    assert plan.peak_high_bytes >= in_pool.peaks.peak_reserved + context
    assert any("lies outside the traced pool (a paged optimizer's state in CUDA managed memory" in c.note for c in plan.components)


def test_a_run_the_trace_cannot_stand_in_for_keeps_the_formula_and_says_why():
    spec = load_catalog_spec("meta-llama/Llama-3.2-1B")
    plan = build_plan(spec, TrainingOptions(gpu_memory_gib=80, num_gpus=2, parallelism="zero3", simulate_allocator=True, trainer="hf"))
    assert any("no simulation: one GPU without offload only" in a for a in plan.assumptions)


def test_the_committed_simulated_band_is_what_the_committed_runs_give():
    from published import calibration_rows, skipped_traced_cases

    committed = json.loads((ROOT / "planner" / "calibration.json").read_text())["simulated_band"]
    # the 22 shared runs and the published PEFT-benchmark runs bench/published.py maps (TRACED_STACKS):
    # a calibration made before a case was left out (or mapped) would count it differently
    published_runs = calibration_rows()
    assert committed["runs"] == 22 + len(published_runs) and committed["central"]["within_10_percent"] == committed["runs"]
    assert "published PMC-5" not in {row["name"] for row in published_runs}
    assert "TinyLoRA" in dict(skipped_traced_cases())["PMC-5"]
    assert -0.10 < committed["peak_low"] < 0 < committed["dynamic_high"] < 0.15


def test_simulations_in_two_threads_take_turns_and_leave_torch_as_it_was():
    """A server plans in threads; the trace patches torch.nn.functional while it runs."""
    import threading

    import torch.nn.functional as F

    run = _measured_run("l1b-full-bf16-b4s1024-gc")
    config = json.loads((CONFIGS_DIR / f"{file_stem(run['model'])}.json").read_text())
    original = (F.linear, F.scaled_dot_product_attention, F.dropout)
    results = []

    def simulate():
        results.append(simulate_step(config, TrainingOptions(**run["options"])).peaks)

    threads = [threading.Thread(target=simulate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert (F.linear, F.scaled_dot_product_attention, F.dropout) == original
