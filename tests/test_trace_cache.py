"""planner/trace_cache.py: a traced step kept on disk is read back whole, keyed by everything it depends on."""

import json
import os
import subprocess
import sys

import pytest

from planner import step_trace, trace_cache
from planner.introspect import spec_from_config
from planner.options import TrainingOptions
from planner.plan import build_plan
from tests.conftest import TINY

OPTIONS = TrainingOptions(method="lora", trainer="hf", batch_size=2, seq_len=128, optimizer="paged_adamw_8bit", allocator="expandable_segments")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_TRACE_CACHE", "on")
    monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path))
    return tmp_path / "traces"


def _config():
    return dict(TINY["llama"])


def test_a_trace_is_read_back_whole_and_marked_as_kept(cache):
    first = step_trace._traced_or_cached(_config(), OPTIONS)
    assert not first.cached and len(list(cache.glob("*.json"))) == 1
    again = step_trace._traced_or_cached(_config(), OPTIONS)
    assert again.cached
    # every figure a plan uses, the expandable-segments and paged replays included
    assert (again.peaks, again.default_peaks, again.in_pool_peaks, again.outside_allocator_bytes, again.steps) == (
        first.peaks, first.default_peaks, first.in_pool_peaks, first.outside_allocator_bytes, first.steps)
    assert again.default_peaks is not None


def test_other_options_or_another_config_trace_again(cache):
    step_trace._traced_or_cached(_config(), OPTIONS)
    assert not step_trace._traced_or_cached(_config(), OPTIONS.model_copy(update={"batch_size": 3})).cached
    assert not step_trace._traced_or_cached({**_config(), "intermediate_size": 192}, OPTIONS).cached
    # the GPU does not change the step: a cheapest-GPU search reads the one trace
    assert step_trace._traced_or_cached(_config(), OPTIONS.model_copy(update={"gpu": "L4"})).cached


def test_another_library_release_or_planner_code_is_another_key(cache, monkeypatch):
    before = trace_cache.trace_key(_config(), "options")
    monkeypatch.setattr(trace_cache, "_fingerprint", lambda: "transformers=9.0")
    assert trace_cache.trace_key(_config(), "options") != before


def test_an_unreadable_or_foreign_entry_is_traced_again_and_replaced(cache):
    first = step_trace._traced_or_cached(_config(), OPTIONS)
    (entry,) = cache.glob("*.json")
    for text in ("not json", json.dumps({"key": "another", "step": {}}), json.dumps({"key": entry.stem, "step": {"peaks": 1}})):
        entry.write_text(text)
        again = step_trace._traced_or_cached(_config(), OPTIONS)
        assert not again.cached and again.peaks == first.peaks
    assert step_trace._traced_or_cached(_config(), OPTIONS).cached


def test_past_its_size_the_cache_drops_the_oldest_traces(cache, monkeypatch):
    monkeypatch.setattr(trace_cache, "MAX_ENTRIES", 3)
    for index in range(5):
        trace_cache.store(f"{index:064x}", {"n": index})
        os.utime(cache / f"{index:064x}.json", (1_000_000 + index, 1_000_000 + index))
    assert sorted(path.stem for path in cache.glob("*.json")) == [f"{index:064x}" for index in (2, 3, 4)]
    assert trace_cache.load(f"{4:064x}") == {"n": 4} and trace_cache.load(f"{0:064x}") is None


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_TRACE_CACHE", "off")
    monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path))
    step_trace._traced_or_cached(_config(), OPTIONS)
    assert not step_trace._traced_or_cached(_config(), OPTIONS).cached and not list(tmp_path.rglob("*.json"))


def test_a_plan_from_a_kept_trace_is_the_same_and_says_so(cache):
    options = OPTIONS.model_copy(update={"simulate_allocator": True, "gpu_memory_gib": 24})
    traced = build_plan(spec_from_config(_config(), "tiny"), options, config=_config())
    kept = build_plan(spec_from_config(_config(), "tiny"), options, config=_config())  # a new spec: nothing memoized in memory
    assert (kept.peak_bytes, kept.peak_low_bytes, kept.peak_high_bytes) == (traced.peak_bytes, traced.peak_low_bytes, traced.peak_high_bytes)
    assert kept.trace["kept_in_trace_cache"] and not traced.trace["kept_in_trace_cache"]
    assert kept.assumptions == traced.assumptions  # how the trace was had is not the plan's content


def test_the_cli_run_twice_traces_once(tmp_path):
    """The case the cache is for: a capacity check run again in a new process."""
    env = {"VRAMPLAN_CACHE_DIR": str(tmp_path), "VRAMPLAN_TRACE_CACHE": "on", "VRAMPLAN_SIMULATE_ALLOCATOR": "on", "HF_HUB_OFFLINE": "1"}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config()))
    args = [sys.executable, "-m", "app.cli", "plan", str(config), "--method", "lora", "--batch-size", "2", "--seq-len", "128", "--trainer", "hf",
            "--gpu-memory-gib", "24", "--json"]
    runs = [subprocess.run(args, capture_output=True, text=True, check=False, env={**os.environ, **env}) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-500:]
    first, second = (json.loads(r.stdout) for r in runs)
    assert first["peak_bytes"] == second["peak_bytes"] and first["reserve_source"] == "simulated"
    assert second["trace"]["kept_in_trace_cache"] and not first["trace"]["kept_in_trace_cache"]


def test_the_cli_says_it_is_tracing_only_when_a_trace_will_run(cache, tmp_path, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("VRAMPLAN_SIMULATE_ALLOCATOR", "on")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config()))
    args = ["check", str(config), "--method", "lora", "--batch-size", "2", "--seq-len", "64", "--trainer", "hf", "--gpu-memory-gib", "24"]
    main(args)
    assert "tracing two training steps for the exact one" in capsys.readouterr().err
    main(args)
    assert "tracing" not in capsys.readouterr().err
    # a new process (a fresh spec, nothing memoized) finds the trace on disk: nothing pending
    options = TrainingOptions(method="lora", batch_size=2, seq_len=64, trainer="hf", simulate_allocator=True)
    assert not step_trace.trace_pending(spec_from_config(_config(), "tiny"), options, _config())
    monkeypatch.setenv("VRAMPLAN_TRACE_CACHE", "off")
    assert step_trace.trace_pending(spec_from_config(_config(), "tiny"), options, _config())
