"""Real runs through `vramplan launch` on CPU: a tiny random Llama, a tokenizer trained here, TRL.

Each test drives the launcher the way a user does (the CLI, the supervisor) and checks what the
user relies on: the run's end state and exit code, its checkpoints, its per-step events, that a
cancel stops it with a checkpoint, that a resume continues from it, and that nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import main
from launcher.backends.local import run_processes
from launcher.supervisor import Supervisor

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny(tiny_run):
    return tiny_run


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "vramplan-data"


def launch_args(tiny, data_dir, *extra, dataset="sft", steps=6, advised=False):
    # one micro-batch a step unless the test is of the advice: its accumulation (8 here) multiplies
    # every step's compute, and a step's work is not what these tests are about
    accumulation = [] if advised else ["--gradient-accumulation-steps", "1"]
    return ["launch", str(tiny["model"]), "--dataset", str(tiny[dataset]), "--device", "cpu", "--precision", "fp32",
            "--max-steps", str(steps), "--save-steps", "3", "--seq-len", "64", "--batch-size", "2", "--lora-r", "4",
            "--data-dir", str(data_dir), *accumulation, *extra]


def run_cli(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def events(record) -> list[dict]:
    return [json.loads(line) for line in (Path(record["run_dir"]) / "events.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout=120, interval=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def assert_nothing_left(run_id: str) -> None:
    left = wait_for(lambda: not run_processes(run_id) or None, timeout=15) if run_processes(run_id) else True
    assert left and not run_processes(run_id), "processes of the run are still alive"


def test_sft_lora_run_succeeds_with_events_checkpoints_and_json(tiny, data_dir, capsys):
    code, out, err = run_cli(capsys, launch_args(tiny, data_dir, "--wait", "--json", advised=True))
    assert code == 0, err
    record = json.loads(out)
    assert record["state"] == "succeeded" and record["reason"] is None
    assert record["last_step"] == 6 and record["final_loss"] > 0
    assert record["predicted_peak_bytes"] > 0 and "measured_peak_bytes" in record  # None on CPU: no GPU to measure
    output = Path(record["output_dir"])
    assert (output / "checkpoint-3").is_dir() and (output / "checkpoint-6").is_dir()
    assert (output / "adapter_model.safetensors").exists()  # the final LoRA adapter
    kinds = [e["event"] for e in events(record)]
    assert kinds[0] == "start" and "train_begin" in kinds and kinds.count("checkpoint") == 2 and kinds[-1] == "end"
    assert sum(k == "log" for k in kinds) >= 6
    metrics = Supervisor(data_dir).store.metrics(record["id"])
    assert [m["step"] for m in metrics if m["loss"] is not None][:6] == [1, 2, 3, 4, 5, 6]
    # the YAML the run executed is TRL's, with the plan's settings
    trl_yaml = (Path(record["run_dir"]) / "trl.yaml").read_text()
    assert "per_device_train_batch_size: 2" in trl_yaml and "lora_r: 4" in trl_yaml and "max_length: 64" in trl_yaml
    # and the advice's hyperparameters for LoRA SFT where none were given (issue 24): not TRL's 2e-5
    assert "learning_rate: 0.0002" in trl_yaml and "lr_scheduler_type: cosine" in trl_yaml and "gradient_accumulation_steps: 8" in trl_yaml


@pytest.mark.parametrize(("stage", "dataset", "extra"), [
    ("dpo", "pref", []),
    ("grpo", "prompts", ["--reward-funcs", "completion_length", "--num-generations", "2", "--max-new-tokens", "8"]),
])
def test_alignment_stages_run_to_success(tiny, data_dir, capsys, stage, dataset, extra):
    code, out, err = run_cli(capsys, launch_args(tiny, data_dir, "--stage", stage, "--wait", "--json", *extra, dataset=dataset, steps=3))
    record = json.loads(out)
    assert code == 0, (record, err)
    assert record["state"] == "succeeded" and record["stage"] == stage and record["last_step"] == 3
    assert any(e["event"] == "log" and e.get("loss") is not None for e in events(record))


def test_cancel_leaves_a_checkpoint_and_resume_continues_from_it(tiny, data_dir, capsys):
    code, out, _ = run_cli(capsys, launch_args(tiny, data_dir, "--json", "--step-sleep-s", "0.3", steps=12))
    assert code == 0
    run_id = json.loads(out)["id"]
    supervisor = Supervisor(data_dir)
    wait_for(lambda: (supervisor.refresh(run_id).last_step or 0) >= 3)
    code, out, _ = run_cli(capsys, ["runs", "cancel", run_id[:8], "--wait", "--json", "--data-dir", str(data_dir)])
    cancelled = json.loads(out)
    assert code == 5 and cancelled["state"] == "cancelled" and cancelled["reason"] == "cancelled_by_user"
    stopped_at = cancelled["last_step"]
    assert 3 <= stopped_at < 12
    assert (Path(cancelled["output_dir"]) / f"checkpoint-{stopped_at}" / "optimizer.pt").exists()
    assert_nothing_left(run_id)

    code, out, err = run_cli(capsys, ["runs", "resume", run_id, "--wait", "--json", "--data-dir", str(data_dir)])
    resumed = json.loads(out)
    assert code == 0, err
    assert resumed["state"] == "succeeded" and resumed["attempt"] == 2 and resumed["resumed_from_run_id"] == run_id
    assert resumed["last_step"] == 12
    begin = next(e for e in events(resumed) if e["event"] == "train_begin")
    assert begin["resumed_from_step"] == stopped_at


def test_supervisor_killed_then_a_new_one_reattaches_and_records_the_end(tiny, data_dir):
    # the CLI is killed while the trainer still imports: 8 steps of 0.4 s keep the run alive well past that
    args = launch_args(tiny, data_dir, "--wait", "--step-sleep-s", "0.4", steps=8)
    cli = subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    supervisor = Supervisor(data_dir)
    record = wait_for(lambda: next((r for r in supervisor.store.list() if r.state == "running"), None))
    os.kill(cli.pid, signal.SIGKILL)  # the supervising CLI dies; the run lives in its own session
    cli.wait()
    assert run_processes(record.id), "the run died with its supervisor"
    fresh = Supervisor(data_dir)
    assert fresh.refresh(record.id).state == "running"  # re-attached: same pid, same start time
    final = fresh.wait(record.id)
    assert final.state == "succeeded" and final.last_step == 8


def test_a_run_whose_processes_vanish_without_an_exit_record_is_lost(tiny, data_dir, capsys):
    code, out, _ = run_cli(capsys, launch_args(tiny, data_dir, "--json", "--step-sleep-s", "0.5", steps=40))
    run_id = json.loads(out)["id"]
    supervisor = Supervisor(data_dir)
    wait_for(lambda: supervisor.refresh(run_id).state == "running")
    for proc in run_processes(run_id):  # the machine's OOM killer: nobody writes exit.json
        proc.kill()
    record = wait_for(lambda: (r := supervisor.refresh(run_id)).terminal and r)
    # the shim itself was killed (server_restart is for a shim started before this boot)
    assert record.state == "lost" and record.reason == "shim_killed"
    code, out, _ = run_cli(capsys, ["runs", "show", run_id, "--data-dir", str(data_dir)])
    assert code == 6 and "lost" in out
    assert "run marked lost" in (Path(record.run_dir) / "train.log").read_text()


def test_two_processes_through_accelerate_succeed_and_cancel_without_a_hang(tiny, data_dir, capsys):
    code, out, err = run_cli(capsys, launch_args(tiny, data_dir, "--num-gpus", "2", "--wait", "--json", steps=4))
    record = json.loads(out)
    assert code == 0, err
    assert (Path(record["run_dir"]) / "accelerate.yaml").exists()
    ranks = {e["rank"] for e in events(record) if e["event"] == "train_begin"}
    assert ranks == {0, 1} and record["state"] == "succeeded"

    code, out, _ = run_cli(capsys, launch_args(tiny, data_dir, "--num-gpus", "2", "--json", "--step-sleep-s", "0.3", steps=60))
    run_id = json.loads(out)["id"]
    supervisor = Supervisor(data_dir)
    wait_for(lambda: (supervisor.refresh(run_id).last_step or 0) >= 2)
    started = time.monotonic()
    code, out, _ = run_cli(capsys, ["runs", "cancel", run_id, "--wait", "--json", "--data-dir", str(data_dir)])
    cancelled = json.loads(out)
    assert code == 5 and cancelled["reason"] == "cancelled_by_user", cancelled
    assert time.monotonic() - started < 30  # both ranks agreed to stop at one step: no rank waits forever
    assert (Path(cancelled["output_dir"]) / f"checkpoint-{cancelled['last_step']}").is_dir()
    assert_nothing_left(run_id)


def test_a_run_that_does_not_stop_in_the_grace_period_is_killed_whole(tiny, data_dir, capsys):
    # a step that takes 60 s never reaches the stop check within a 2 s grace period
    code, out, _ = run_cli(capsys, launch_args(tiny, data_dir, "--num-gpus", "2", "--json", "--step-sleep-s", "60", "--grace-period", "2", steps=5))
    run_id = json.loads(out)["id"]
    supervisor = Supervisor(data_dir)
    wait_for(lambda: supervisor.refresh(run_id).state == "running")
    assert len(run_processes(run_id)) >= 3  # shim, torchrun, two ranks (in sessions of their own)
    code, out, _ = run_cli(capsys, ["runs", "cancel", run_id, "--wait", "--json", "--data-dir", str(data_dir)])
    record = json.loads(out)
    assert code == 5 and record["reason"] == "killed_after_grace"
    assert_nothing_left(run_id)


def test_dry_run_shows_the_files_writes_nothing_and_starts_nothing(tiny, data_dir, capsys):
    code, out, _ = run_cli(capsys, launch_args(tiny, data_dir, "--num-gpus", "2", "--dry-run", "--json"))
    assert code == 0
    dry = json.loads(out)
    run_dir = Path(dry["run_dir"])
    assert sorted(dry["files"]) == ["accelerate.yaml", "spec.json", "trl.yaml"]
    assert not run_dir.exists()  # a dry run leaves no run directory behind (issue 24)
    assert dry["argv"][1:4] == ["-m", "launcher.shim", str(run_dir)] and "accelerate.commands.launch" in dry["argv"]
    assert not run_processes(dry["run_id"]) and Supervisor(data_dir).store.list() == []


def test_admission_refuses_when_the_gpus_free_memory_is_short(tiny, data_dir, capsys, monkeypatch):
    # NVML is absent here: a detection result stands in for a busy 8 GiB card (hardware-absent fake)
    from gpu_catalog import detect as detect_module

    busy = detect_module.Detection(gpus=(detect_module.DetectedGPU(0, "NVIDIA GeForce RTX 4060", 8 << 30, 1 << 30, 7 << 30, "8.9", None, "GPU-busy"),), driver_version="580")
    monkeypatch.setattr(detect_module, "detect", lambda backend=None: busy)
    args = [a for a in launch_args(tiny, data_dir) if a not in ("--device", "cpu")]
    code, _, err = run_cli(capsys, args)
    assert code == 1
    assert "refused" in err and "1.00 GiB free" in err and "--force" in err
    assert Supervisor(data_dir).store.list() == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--stage", "ppo"], "TRL 1.16 has no PPO trainer"),
    (["--method", "freeze"], "freeze is planned but not launched"),
    (["--method", "prefix_tuning"], "prefix tuning fails with gradient checkpointing"),
    (["--stage", "grpo"], "grpo needs a reward"),
    (["--epochs", "1"], "max_steps or epochs"),  # launch_args gives --max-steps too
])
def test_what_cannot_be_launched_is_refused_as_bad_input(tiny, data_dir, capsys, flags, message):
    code, out, err = run_cli(capsys, launch_args(tiny, data_dir, *flags))
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert Supervisor(data_dir).store.list() == []  # nothing was started


def test_a_config_file_cannot_be_launched(tmp_path, data_dir, capsys, tiny):
    code, _, err = run_cli(capsys, ["launch", str(tiny["model"] / "config.json"), "--dataset", str(tiny["sft"]), "--device", "cpu", "--data-dir", str(data_dir)])
    assert code == 2 and "a run needs the model's weights" in err
