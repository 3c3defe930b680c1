"""The verdict asks whether the step runs: before PyTorch's allocator raises out of memory it
releases its cached segments and retries, so a step runs on less than the reserved peak a larger
card shows. The replay follows that path under a capacity: it survives a capacity below the
reserved peak and fails below the allocated one; a simulated plan gives both figures and its
verdict uses the least memory the step runs in."""

from __future__ import annotations

import pytest

from planner.allocator import OutOfMemory, replay, runs_within, smallest_capacity

MIB = 1 << 20
GIB = 1 << 30


def fragmenting_step() -> list[tuple]:
    """Ten 30 MiB blocks freed, then ten of 50 MiB: a larger card keeps the first segments cached."""
    events = [("alloc", ("a", i), 30 * MIB) for i in range(10)]
    events += [("free", ("a", i)) for i in range(10)]
    events += [("alloc", ("b", i), 50 * MIB) for i in range(10)]
    return events


def test_the_replay_survives_below_the_reserved_peak_and_fails_below_the_allocated_one():
    events = fragmenting_step()
    peaks = replay(events)
    assert peaks.peak_reserved > peaks.peak_allocated + 200 * MIB  # the cached 30 MiB segments
    # 600 MiB: below the 800 MiB reserved, above the 500 MiB allocated: the cache is released
    assert runs_within(events, "default", 600 * MIB)
    with pytest.raises(OutOfMemory):
        replay(events, "default", peaks.peak_allocated - MIB)
    least = smallest_capacity(events, "default", peaks)
    assert peaks.peak_allocated <= least <= peaks.peak_allocated + 2 * MIB
    assert not runs_within(events, "default", least - 2 * MIB - 1)


def test_without_a_capacity_nothing_changes():
    events = fragmenting_step()
    assert replay(events) == replay(events, "default", None)
    assert replay(events).peak_reserved == replay(events, "default", 10 * GIB).peak_reserved


def test_expandable_segments_unmap_their_free_end():
    events = [("alloc", "x", 300 * MIB), ("alloc", "y", 100 * MIB), ("free", "y"), ("alloc", "z", 60 * MIB), ("free", "z"), ("alloc", "w", 150 * MIB)]
    peaks = replay(events, "expandable_segments")
    assert runs_within(events, "expandable_segments", peaks.peak_allocated + 40 * MIB)
    with pytest.raises(OutOfMemory):
        replay(events, "expandable_segments", peaks.peak_allocated - MIB)


@pytest.fixture(scope="module")
def lora_plans():
    """A traced LoRA step with full fp32 logits (trainer hf): its loss buffers leave cached segments."""
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    options = {"method": "lora", "trainer": "hf", "batch_size": 4, "seq_len": 1024, "simulate_allocator": True}
    plan = build_plan(spec, TrainingOptions(gpu="H100", **options))
    return spec, options, plan


def test_a_simulated_plan_gives_the_least_memory_its_step_runs_in(lora_plans):
    _, _, plan = lora_plans
    assert plan.reserve_source == "simulated"
    assert plan.allocator_release_bytes > 256 * MIB
    assert plan.runs_within_bytes == plan.peak_bytes - plan.allocator_release_bytes
    assert plan.runs_within_high_bytes == plan.peak_high_bytes - plan.allocator_release_bytes
    data = plan.to_dict()
    assert data["runs_within_bytes"] == plan.runs_within_bytes and data["allocator_release_bytes"] == plan.allocator_release_bytes
    assert plan.check_dict()["runs_within_high_bytes"] == plan.runs_within_high_bytes
    assert any("releases its cached segments" in a for a in plan.assumptions)


def test_the_verdict_uses_the_least_memory_the_step_runs_in(lora_plans):
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    spec, options, plan = lora_plans
    # a card whose usable memory lies between the two high ends: it runs, with its cache released
    between = (plan.runs_within_high_bytes + plan.peak_high_bytes) / 2
    smaller = build_plan(spec, TrainingOptions(gpu_memory_gib=between / 0.95 / GIB, **options))
    assert smaller.peak_high_bytes > smaller.usable_bytes >= smaller.runs_within_high_bytes
    assert smaller.verdict == "fits" and smaller.fits
    too_small = build_plan(spec, TrainingOptions(gpu_memory_gib=smaller.runs_within_low_bytes * 0.9 / 0.95 / GIB, **options))
    assert too_small.verdict == "does not fit"


def test_the_chart_shows_both(lora_plans):
    from app.charts import memory_bar_svg

    _, _, plan = lora_plans
    svg = memory_bar_svg(plan)
    assert 'class="runs-within"' in svg and f"runs within {plan.runs_within_bytes / GIB:.2f} GiB" in svg
