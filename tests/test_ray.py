"""The ray backend against a real local Ray head on 127.0.0.1 (started here, ~2 GB of memory, a few
seconds): a tiny SFT run submitted as a Ray Job succeeds, and a stopped one checkpoints and ends
cancelled. Without Ray installed the backend reports itself unavailable with the install line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from app.cli import main
from launcher.backends.ray import RayBackend, RayOptions
from launcher.supervisor import Supervisor
from tests.test_launcher import launch_args, wait_for

# every test of this file in one xdist worker: the head's ports are fixed
pytestmark = pytest.mark.xdist_group("ray")
# not Ray's default ports; note that `ray stop --force` at the end stops every Ray process of this user
DASHBOARD_PORT = 8275
ray_missing = shutil.which("ray", path=str(Path(sys.executable).parent)) is None


@pytest.fixture
def tiny(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray's sockets live under its temp dir and AF_UNIX paths stop at 107 bytes: pytest's own temp
    # path (longer under xdist: .../popen-gw1/ray0) made the dashboard's socket paths too long
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    started = subprocess.run([ray, "start", "--head", "--port=6391", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                              "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp}", "--ray-client-server-port=10101",
                              "--node-manager-port=6392", "--object-manager-port=6393", "--min-worker-port=11000", "--max-worker-port=11100"],
                             capture_output=True, text=True, env=env, timeout=120)
    if started.returncode != 0:
        pytest.skip(f"a local Ray head did not start: {(started.stderr or started.stdout).strip()[-300:]}")
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        wait_for(lambda: RayBackend().check(RayOptions(address=address)).ok, timeout=60, interval=1)
        yield address
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def ray_args(tiny, data_dir, address, *extra, steps=6):
    return launch_args(tiny, data_dir, "--backend", "ray", "--backend-option", f"address={address}",
                       "--backend-option", f"python={sys.executable}", *extra, steps=steps)


@pytest.mark.skipif(ray_missing, reason="Ray is not installed (pip install 'vramplan[ray]')")
def test_a_ray_job_runs_to_success_and_a_stopped_one_checkpoints(tiny, tmp_path, capsys, ray_head, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_dir = tmp_path / "d"
    assert main(ray_args(tiny, data_dir, ray_head, "--wait", "--json")) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["state"] == "succeeded" and record["backend"] == "ray" and record["last_step"] == 6
    assert (Path(record["output_dir"]) / "checkpoint-6").is_dir()
    # the events came through the job's log (no shared filesystem assumed) into the run directory
    kinds = [json.loads(line)["event"] for line in (Path(record["run_dir"]) / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "start" and "train_begin" in kinds and kinds[-1] == "end"
    assert "VRAMPLAN_EVENT" not in (Path(record["run_dir"]) / "train.log").read_text()

    assert main(ray_args(tiny, data_dir, ray_head, "--json", "--step-sleep-s", "0.3", "--grace-period", "60", steps=60)) == 0
    run_id = json.loads(capsys.readouterr().out)["id"]
    supervisor = Supervisor(data_dir)
    wait_for(lambda: (supervisor.refresh(run_id).last_step or 0) >= 2)
    assert main(["runs", "cancel", run_id, "--wait", "--json", "--data-dir", str(data_dir)]) == 5
    record = json.loads(capsys.readouterr().out)
    assert record["state"] == "cancelled" and record["reason"] == "cancelled_by_user"
    assert (Path(record["output_dir"]) / f"checkpoint-{record['last_step']}").is_dir()  # SIGTERM from Ray's stop: a checkpoint first


def test_without_a_cluster_the_backend_says_where_it_looked():
    health = RayBackend().check(RayOptions(address="http://127.0.0.1:9"))
    assert not health.ok
    assert ("no Ray cluster answers at http://127.0.0.1:9" in health.detail) or ("pip install 'vramplan[ray]'" in health.detail)


def test_without_ray_installed_the_backend_gives_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    health = RayBackend().check()
    assert not health.ok and "pip install 'vramplan[ray]'" in health.detail


@pytest.mark.skipif(ray_missing, reason="Ray is not installed (pip install 'vramplan[ray]')")
def test_a_merge_runs_as_a_ray_job_with_its_measured_peak(tmp_path, capsys, ray_head, monkeypatch):
    """A merge is a run like any other: mergekit's linear merge of two tiny Llamas as a Ray Job; its
    merge_end event comes back through the job's log."""
    pytest.importorskip("mergekit")
    from tests.test_mergekit_run import _llama

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = _llama(tmp_path / "a", 0, hidden=128, vocab=4000), _llama(tmp_path / "b", 1, hidden=128, vocab=4000)
    code = main(["merge", str(a), "--method", "linear", "--merge-with", str(b), "--launch", "--backend", "ray",
                 "--backend-option", f"address={ray_head}", "--backend-option", f"python={sys.executable}",
                 "--output", str(tmp_path / "merged"), "--wait", "--json", "--data-dir", str(tmp_path / "d")])
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert code == 0, (record, captured.err)
    assert (record["state"], record["backend"], record["stage"]) == ("succeeded", "ray", "merge")
    assert record["measured_peak_bytes"] and record["error_pct"] is not None
    assert (tmp_path / "merged" / "model.safetensors").is_file()
