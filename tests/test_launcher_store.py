"""The launcher's bookkeeping without a training run: the state machine, the registry's handling of a
broken plugin, the queue, and how a GPU run's events become the measured peak and a calibration row.

A GPU run cannot happen on this machine, so one test writes the events file a GPU run writes (the
format launcher/events.py emits) and checks what the supervisor makes of it; the real path runs
wherever a GPU is lent.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import pytest

from app.cli import main
from launcher.backend import RunState
from launcher.registry import describe_backends
from launcher.store import RunStore, TransitionError
from launcher.supervisor import Supervisor

GIB = 1 << 30


def _row(run_id: str, run_dir: Path, **extra) -> dict:
    plan = {"model": {"name": "tiny"}, "calibration": "test", "components": [{"name": "runtime.cuda_context", "bytes": 500 << 20}]}
    spec = {"run_id": run_id, "model": {"kind": "directory", "location": "/models/tiny"}, "options": {"method": "lora", "stage": "sft"}, "plan": plan}
    return {"id": run_id, "backend": "local", "backend_options_json": json.dumps({"grace_period_s": 5}), "state": "queued", "model": "tiny",
            "stage": "sft", "method": "lora", "spec_json": json.dumps(spec), "plan_hash": "x", "predicted_peak_bytes": 10 * GIB,
            "predicted_high_bytes": 11 * GIB, "num_gpus": 1, "run_dir": str(run_dir), "output_dir": str(run_dir / "output"), **extra}


def test_terminal_states_never_change_and_every_move_is_recorded(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    store.create(_row("a" * 32, tmp_path))
    store.transition("a" * 32, RunState.STARTING)
    store.transition("a" * 32, RunState.RUNNING)
    store.transition("a" * 32, RunState.FAILED, "oom", "CUDA out of memory")
    with pytest.raises(TransitionError, match="cannot become running"):
        store.transition("a" * 32, RunState.RUNNING)
    store.create(_row("b" * 32, tmp_path))
    with pytest.raises(TransitionError, match="cannot become succeeded"):  # a run that never started cannot succeed
        store.transition("b" * 32, RunState.SUCCEEDED)
    store.transition("b" * 32, RunState.CANCELLED)
    with pytest.raises(TransitionError, match="cannot become starting"):
        store.transition("b" * 32, RunState.STARTING)
    moves = [(t["from_state"], t["to_state"], t["reason"]) for t in store.transitions("a" * 32)]
    assert moves == [(None, "queued", None), ("queued", "starting", None), ("starting", "running", None), ("running", "failed", "oom")]
    assert store.get("a" * 32).finished_at is not None
    assert oct(tmp_path.joinpath("runs.sqlite").stat().st_mode & 0o777) == "0o600"


def test_a_gpu_runs_events_give_the_measured_peak_and_a_calibration_row(tmp_path, capsys):
    supervisor = Supervisor(tmp_path / "data")
    run_id = "c" * 32
    run_dir = supervisor.runs_root / run_id
    run_dir.mkdir()
    supervisor.store.create(_row(run_id, run_dir, state="starting", handle_json=json.dumps({"backend": "local", "data": {"pid": 999999999, "create_time": 1.0, "pgid": 999999999, "marker": run_id}})))
    base = {"run_id": run_id, "t": time.time()}
    lines = [
        {"event": "start", "rank": 0, "versions": {"torch": "2.13.0+cu130", "transformers": "5.24.0"}},
        {"event": "train_begin", "rank": 0, "max_steps": 2, "gpu_name": "NVIDIA H200", "driver": "580.1", "cuda_context": 600 << 20, "load_peak_reserved": 9 * GIB},
        {"event": "train_begin", "rank": 1, "max_steps": 2, "gpu_name": "NVIDIA H200", "driver": "580.1", "cuda_context": 700 << 20},
        {"event": "log", "rank": 0, "step": 1, "loss": 2.5, "max_memory_reserved": 9 * GIB, "max_memory_allocated": 8 * GIB, "alloc_retries": 0},
        {"event": "log", "rank": 1, "step": 1, "loss": 2.6, "max_memory_reserved": 10 * GIB, "max_memory_allocated": 8 * GIB, "alloc_retries": 2},
        {"event": "log", "rank": 0, "step": 2, "loss": 2.0, "max_memory_reserved": 9 * GIB, "max_memory_allocated": 8 * GIB},
        {"event": "end", "rank": 0, "status": "completed", "step": 2},
    ]
    text = "".join(json.dumps({**base, **line}) + "\n" for line in lines) + '{"event": "log", "rank": 0, "step": 3'  # a line still being written
    (run_dir / "events.jsonl").write_text(text)
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": 0}))
    record = supervisor.refresh(run_id)
    assert record.state == "succeeded" and record.last_step == 2 and record.final_loss == 2.0
    # the worst rank: 10 GiB reserved plus the largest context NVML reported (700 MiB)
    assert record.measured_peak_bytes == 10 * GIB + (700 << 20)
    assert record.error_pct == pytest.approx(100 * (10 * GIB - record.measured_peak_bytes) / record.measured_peak_bytes, abs=0.01)
    assert record.alloc_retries == 2 and record.gpu_name == "NVIDIA H200" and record.measured_load_peak_bytes == 9 * GIB
    assert [m["step"] for m in supervisor.store.metrics(run_id)] == [1, 1, 2]  # the half-written line waits for its end

    assert main(["runs", "export", "--data-dir", str(tmp_path / "data")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["measured"] == {"peak_allocated": 8 * GIB, "peak_reserved": 10 * GIB, "outside_allocator": 700 << 20}
    assert row["gpu"] == "NVIDIA H200" and row["model"] == "/models/tiny" and row["predicted"]["peak_bytes"] == 10 * GIB
    assert row["versions"]["transformers"] == "5.24.0"


def test_an_oom_is_named_and_keeps_the_peak_so_far(tmp_path):
    supervisor = Supervisor(tmp_path / "data")
    run_id = "d" * 32
    run_dir = supervisor.runs_root / run_id
    run_dir.mkdir()
    supervisor.store.create(_row(run_id, run_dir, state="starting", handle_json=json.dumps({"backend": "local", "data": {"pid": 999999999, "create_time": 1.0, "pgid": 999999999, "marker": run_id}})))
    lines = [{"event": "train_begin", "rank": 0, "max_steps": 5},
             {"event": "error", "rank": 0, "kind": "oom", "type": "OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 2.00 GiB", "max_memory_reserved": 11 * GIB}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps({"run_id": run_id, "t": 1.0, **line}) + "\n" for line in lines))
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": 3}))
    record = supervisor.refresh(run_id)
    assert record.state == "failed" and record.reason == "oom" and "Tried to allocate 2.00 GiB" in record.message
    assert record.measured_peak_bytes == 11 * GIB + (500 << 20)  # no NVML context: the plan's constant stands in


def test_a_broken_plugin_shows_as_unavailable_with_its_error(monkeypatch, capsys):
    from launcher import registry

    real = registry._entry_points()
    broken = metadata.EntryPoint(name="broken", value="no_such_vramplan_plugin:Backend", group=registry.GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {**real, "broken": broken})
    infos = {i.name: i for i in describe_backends()}
    assert infos["local"].available
    assert not infos["broken"].available and "failed to import" in infos["broken"].detail and "no_such_vramplan_plugin" in infos["broken"].detail
    assert main(["backends", "--json"]) == 0
    listed = {b["name"]: b for b in json.loads(capsys.readouterr().out)}
    assert listed["broken"]["available"] is False


def test_a_queued_run_waits_for_memory_and_can_be_cancelled_before_it_starts(tmp_path, capsys, monkeypatch):
    from gpu_catalog import detect as detect_module
    from tests.tinyrun import write_datasets

    data = write_datasets(tmp_path)
    busy = detect_module.Detection(gpus=(detect_module.DetectedGPU(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 2 * GIB, 78 * GIB, "9.0", None, "GPU-1"),), driver_version="580")
    monkeypatch.setattr(detect_module, "detect", lambda backend=None: busy)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    (model_dir / "model.safetensors").write_bytes(b"0")
    argv = ["launch", str(model_dir), "--dataset", str(data["sft"]), "--queue", "--json", "--data-dir", str(tmp_path / "d"), "--seq-len", "4096", "--batch-size", "64"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["state"] == "queued" and "2.00 GiB free" in record["message"]
    assert main(["runs", "cancel", record["id"], "--json", "--data-dir", str(tmp_path / "d")]) == 5
    assert json.loads(capsys.readouterr().out)["message"] == "cancelled before it started"
