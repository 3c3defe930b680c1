"""Every run's failure reason is the true one (issue 25, item 8), each reproduced with a real CPU run
of the tiny model: a trainer killed by kill -9 with no cancel asked is `killed` with the signal named
(not `killed_after_grace`, the supervisor's own kill after a cancel); a killed shim is
`shim_killed`, and its trainer goes with it; a run whose disk filled is `disk_full` (not
`server_restart`, which is kept for a machine that restarted under a live run); an error event
without the entry's explanation keeps its words over "the trainer exited with code 1".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from app.cli import main
from launcher.backends.local import _is_entry, run_processes
from launcher.supervisor import Supervisor, handle_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def launch_args(tiny_run, data_dir, *extra, steps=200):
    return ["launch", str(tiny_run["model"]), "--dataset", str(tiny_run["sft"]), "--device", "cpu", "--precision", "fp32",
            "--max-steps", str(steps), "--seq-len", "64", "--batch-size", "2", "--lora-r", "4", "--data-dir", str(data_dir), "--json",
            "--gradient-accumulation-steps", "1", *extra]


def trainer_of(run_id: str) -> psutil.Process:
    """The entry's process (the shim's command line names the entry too)."""
    found = [p for p in run_processes(run_id) if _is_entry(p) and "launcher.shim" not in p.cmdline()]
    assert len(found) == 1, found
    return found[0]


def start_slow_run(capsys, tiny_run, data_dir) -> tuple[Supervisor, str]:
    assert main(launch_args(tiny_run, data_dir, "--step-sleep-s", "0.5", "--save-steps", "1000")) == 0
    run_id = json.loads(capsys.readouterr().out)["id"]
    supervisor = Supervisor(data_dir)
    deadline = time.monotonic() + 120
    record = supervisor.refresh(run_id)
    while (record.last_step or 0) < 1 and not record.terminal and time.monotonic() < deadline:
        time.sleep(0.3)
        record = supervisor.refresh(run_id)
    assert record.state == "running" and record.last_step >= 1, record
    return supervisor, run_id


def test_kill_9_of_the_trainer_is_killed_with_the_signal_named(tiny_run, tmp_path, capsys):
    supervisor, run_id = start_slow_run(capsys, tiny_run, tmp_path / "data")
    trainer_of(run_id).kill()
    record = supervisor.wait(run_id, interval=0.3, timeout=60)
    assert record.state == "failed" and record.reason == "killed", (record.reason, record.message)
    assert "SIGKILL (signal 9)" in record.message and "without a cancel" in record.message
    assert not run_processes(run_id)


def test_a_killed_shim_is_shim_killed_and_its_trainer_goes_with_it(tiny_run, tmp_path, capsys):
    supervisor, run_id = start_slow_run(capsys, tiny_run, tmp_path / "data")
    shim = psutil.Process(int(handle_of(supervisor.get(run_id)).data["pid"]))
    trainer = trainer_of(run_id)
    shim.kill()
    trainer.wait(10)  # PR_SET_PDEATHSIG: the trainer ends with its shim, whoever supervises
    record = supervisor.wait(run_id, interval=0.3, timeout=60)
    assert record.state == "lost" and record.reason == "shim_killed", (record.reason, record.message)
    assert "was killed before it could record" in record.message
    assert not run_processes(run_id)
    # reaped: the finished shim is no zombie of this process
    zombies = [c for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
    assert not zombies


def test_a_finished_shim_is_reaped_at_once(tiny_run, tmp_path, capsys):
    assert main(launch_args(tiny_run, tmp_path / "data", steps=1)) == 0
    run_id = json.loads(capsys.readouterr().out)["id"]
    supervisor = Supervisor(tmp_path / "data")
    pid = int(handle_of(supervisor.get(run_id)).data["pid"])
    record = supervisor.wait(run_id, interval=0.3, timeout=120)
    assert record.state == "succeeded"
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


DISK_FULL_SCRIPT = """
import json, subprocess, sys
runs = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + sys.argv[2], "tmpfs", runs], check=True)
from app.cli import main
code = main(sys.argv[3:])
print("EXIT", code, flush=True)
"""


def _can_mount() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs a mount namespace (unshare -rm) to fill a small tmpfs")
def test_a_run_that_fills_its_disk_says_disk_full(tiny_run, tmp_path):
    # the run's directory (and its output/) on a 192 KiB tmpfs, the store on the real disk: the first
    # checkpoint fills it. The reason is disk_full, in the store, whoever reads it
    data_dir = tmp_path / "data"
    (data_dir / "runs").mkdir(parents=True)
    args = launch_args(tiny_run, data_dir, "--save-steps", "1", "--wait", steps=20)
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", DISK_FULL_SCRIPT, str(data_dir / "runs"), "192k", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = done.stdout
    assert "EXIT 4" in out, (done.stdout[-3000:], done.stderr[-3000:])
    record = json.loads(out[: out.index("EXIT")])
    assert record["state"] == "failed" and record["reason"] == "disk_full", record
    assert "No space left on device" in record["message"] or "disk filled" in record["message"]
    assert record["reason"] != "server_restart"


def test_an_unexplained_error_event_is_not_replaced_by_the_exit_code(tmp_path):
    supervisor = Supervisor(tmp_path / "data")
    run_id = "a" * 32
    run_dir = supervisor.runs_root / run_id
    run_dir.mkdir()
    from tests.test_launcher_store import _row

    supervisor.store.create(_row(run_id, run_dir, state="starting", handle_json=json.dumps(
        {"backend": "local", "data": {"pid": 999999999, "create_time": time.time(), "pgid": 999999999, "marker": run_id}})))
    # an error event with no summary or hint (an entry from before explain, or one whose explain failed)
    line = {"event": "error", "rank": 0, "kind": "exception", "type": "RuntimeError", "message": "the collate function broke"}
    (run_dir / "events.jsonl").write_text(json.dumps({"run_id": run_id, "t": 1.0, **line}) + "\n")
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": 1}))
    record = supervisor.refresh(run_id)
    assert record.state == "failed" and record.message == "RuntimeError: the collate function broke", record.message
    assert "exited with code" not in record.message


def test_a_signal_in_the_exit_record_is_killed_unless_the_supervisor_killed_it(tmp_path):
    from launcher.backends.local import LocalBackend
    from launcher.backend import Handle

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": None, "signal": 9}))
    obs = LocalBackend().poll(Handle("local", {"pid": 999999999, "create_time": time.time(), "marker": "x"}), run_dir)
    assert str(obs.reason) == "killed" and "SIGKILL" in obs.message
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": 4, "signal": None}))
    obs = LocalBackend().poll(Handle("local", {"pid": 999999999, "create_time": time.time(), "marker": "x"}), run_dir)
    assert str(obs.reason) == "disk_full"
    # no exit record, no shim: a shim started before this boot means the machine restarted
    (run_dir / "exit.json").unlink()
    obs = LocalBackend().poll(Handle("local", {"pid": 999999999, "create_time": psutil.boot_time() - 100, "marker": "x"}), run_dir)
    assert str(obs.reason) == "server_restart"
    obs = LocalBackend().poll(Handle("local", {"pid": 999999999, "create_time": time.time(), "marker": "x"}), run_dir)
    assert str(obs.reason) == "shim_killed"
