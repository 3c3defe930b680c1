"""The slurm backend: real runs on a one-node Slurm where one is up (CI starts it with
.ci/slurm-up.sh), and the same backend against small fake sbatch/squeue/scontrol/scancel/srun
programs (tests/fake_slurm) for every job state, including those a one-node cluster cannot produce.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from app.cli import main
from launcher.backend import Handle, Reason, RunState
from launcher.backends.slurm import STATES, SlurmBackend, SlurmOptions
from launcher.supervisor import Supervisor
from tests.test_launcher import launch_args, wait_for

# the real-cluster tests share one Slurm: one xdist worker runs them all
pytestmark = pytest.mark.xdist_group("slurm")

FAKE = Path(__file__).with_name("fake_slurm")


def _real_slurm_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm here: sbatch/sinfo not on PATH (.ci/slurm-up.sh installs and starts a one-node Slurm)"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo did not answer: {exc}"
    if "up idle" not in result.stdout and "up mixed" not in result.stdout:
        return f"the one-node Slurm is not idle: {(result.stdout or result.stderr).strip()[:200]}"
    return None


@pytest.fixture
def tiny(tiny_run):
    return tiny_run


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "fake-slurm-bin"
    shutil.copytree(FAKE, bin_dir)
    state = tmp_path / "fake-slurm-state"
    (bin_dir / "state_dir").write_text(str(state))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state


def _cli(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _start_then_cancel(tiny, data_dir, capsys):
    """A slow sbatch run, cancelled after its second step with `vramplan runs cancel --wait` (exit 5)."""
    code, out, _ = _cli(capsys, launch_args(tiny, data_dir, "--backend", "slurm", "--json", "--step-sleep-s", "0.3", steps=60))
    run_id = json.loads(out)["id"]
    supervisor = Supervisor(data_dir)
    wait_for(lambda: (supervisor.refresh(run_id).last_step or 0) >= 2)
    code, out, _ = _cli(capsys, ["runs", "cancel", run_id, "--wait", "--json", "--data-dir", str(data_dir)])
    assert code == 5
    return supervisor, json.loads(out)


# -- real Slurm ---------------------------------------------------------------------------------

real = pytest.mark.skipif(_real_slurm_problem() is not None, reason=str(_real_slurm_problem()))


@real
def test_real_slurm_runs_a_tiny_sft_to_success(tiny, tmp_path, capsys, offline):
    code, out, err = _cli(capsys, launch_args(tiny, tmp_path / "d", "--backend", "slurm", "--wait", "--json"))
    record = json.loads(out)
    assert code == 0, (record, err)
    assert record["state"] == "succeeded" and record["backend"] == "slurm" and record["last_step"] == 6
    assert (Path(record["output_dir"]) / "checkpoint-6").is_dir()
    log = (Path(record["run_dir"]) / "train.log").read_text()
    assert "train_runtime" in log  # sbatch's --output is the run's log


@real
def test_real_slurm_cancel_leaves_a_checkpoint(tiny, tmp_path, capsys, offline):
    supervisor, record = _start_then_cancel(tiny, tmp_path / "d", capsys)
    assert record["state"] == "cancelled" and record["reason"] == "cancelled_by_user"
    assert (Path(record["output_dir"]) / f"checkpoint-{record['last_step']}" / "optimizer.pt").exists()
    job = json.loads(supervisor.store.get(record["id"]).handle_json)["data"]["job_id"]
    assert subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip() == ""


# -- fake Slurm: the same backend code, every state ------------------------------------------------

@pytest.mark.skipif(_real_slurm_problem() is None, reason="a real Slurm is up here: the real-cluster tests above run the same flow")
def test_fake_slurm_runs_and_cancels_through_the_same_backend(tiny, tmp_path, capsys, offline, fake_slurm):
    data_dir = tmp_path / "d"
    code, out, err = _cli(capsys, launch_args(tiny, data_dir, "--backend", "slurm", "--wait", "--json", steps=3))
    assert code == 0, err
    assert json.loads(out)["state"] == "succeeded"
    _, record = _start_then_cancel(tiny, data_dir, capsys)
    assert record["reason"] == "cancelled_by_user"
    assert (Path(record["output_dir"]) / f"checkpoint-{record['last_step']}").is_dir()


@pytest.mark.parametrize("slurm_state", sorted(STATES))
def test_every_slurm_state_maps_to_a_run_state(fake_slurm, tmp_path, slurm_state):
    fake_slurm.mkdir(parents=True)
    (fake_slurm / "7.pid").write_text("999999999")
    (fake_slurm / "7.state").write_text(slurm_state)
    observation = SlurmBackend().poll(Handle("slurm", {"job_id": "7"}), tmp_path)
    expected_state, expected_reason = STATES[slurm_state]
    assert observation.state == expected_state
    if expected_state in (RunState.FAILED, RunState.CANCELLED):
        assert observation.reason == expected_reason and slurm_state in observation.message


@pytest.mark.parametrize(("slurm_state", "reason"), [("PREEMPTED", Reason.PREEMPTED), ("NODE_FAIL", Reason.NODE_FAIL), ("TIMEOUT", Reason.TIMEOUT), ("OUT_OF_MEMORY", Reason.HOST_OOM)])
def test_states_a_one_node_cluster_cannot_produce_end_the_run_with_their_reason(fake_slurm, tmp_path, slurm_state, reason):
    from tests.test_launcher_store import _row

    supervisor = Supervisor(tmp_path / "data")
    run_id = "e" * 32
    run_dir = supervisor.runs_root / run_id
    run_dir.mkdir()
    fake_slurm.mkdir(parents=True)
    (fake_slurm / "9.pid").write_text("999999999")
    (fake_slurm / "9.state").write_text(slurm_state)
    supervisor.store.create(_row(run_id, run_dir, backend="slurm", state="running",
                                 handle_json=json.dumps({"backend": "slurm", "data": {"job_id": "9", "marker": run_id}})))
    record = supervisor.refresh(run_id)
    assert record.state == "failed" and record.reason == reason and slurm_state in record.message


def test_a_job_slurm_forgot_is_judged_by_the_runs_exit_record(fake_slurm, tmp_path):
    backend = SlurmBackend()
    fake_slurm.mkdir(parents=True)
    handle = Handle("slurm", {"job_id": "42"})  # unknown to squeue and scontrol (past MinJobAge)
    assert backend.poll(handle, tmp_path).state == RunState.LOST
    (tmp_path / "exit.json").write_text(json.dumps({"exit_code": 0}))
    assert backend.poll(handle, tmp_path).state == RunState.SUCCEEDED
    (tmp_path / "exit.json").write_text(json.dumps({"exit_code": 3}))
    observation = backend.poll(handle, tmp_path)
    assert observation.state == RunState.FAILED and observation.reason == Reason.OOM


def test_slurm_is_unavailable_without_its_commands(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    health = SlurmBackend().check()
    assert not health.ok and "sbatch" in health.detail and "not on PATH" in health.detail


# -- the job script -----------------------------------------------------------------------------------

def test_a_two_node_plan_renders_a_two_node_script(tmp_path):
    from launcher.spec import RunSettings, launch_spec
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    plan = build_plan(load_catalog_spec("meta-llama/Llama-3.1-70B"), TrainingOptions(method="full", num_gpus=16, parallelism="zero3", gpu="H100"))
    data = tmp_path / "chat.jsonl"
    data.write_text("{}\n")
    spec = launch_spec(plan, "meta-llama/Llama-3.1-70B", RunSettings(dataset=str(data)), runs_root=tmp_path)
    options = SlurmOptions(partition="gpu", account="lab-1", time_limit="2-00:00:00", gpus_per_node=8)
    rendered = SlurmBackend().render(spec, tmp_path / spec.run_id, options)
    script = rendered.files["job.sbatch"]
    lines = script.splitlines()
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:8", "#SBATCH --time=2-00:00:00",
                     "#SBATCH --partition=gpu", "#SBATCH --account=lab-1", "#SBATCH --signal=TERM@300"):
        assert expected in lines
    assert 'export head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    srun = next(line for line in lines if line.startswith("srun "))
    for piece in ("--num_machines 2", "--num_processes 16", '--machine_rank "$SLURM_NODEID"', '--main_process_ip "$head_node"', "--main_process_port 29500"):
        assert piece in srun
    accel = json.loads(json.dumps(__import__("yaml").safe_load(rendered.files["accelerate.yaml"])))
    assert accel["num_machines"] == 2 and accel["num_processes"] == 16 and accel["deepspeed_config"]["zero_stage"] == 3
    assert "HF_TOKEN" not in script  # secrets reach sbatch's environment, never a file
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert rendered.argv == ("sbatch", "--parsable", str(tmp_path / spec.run_id / "job.sbatch"))


def test_backend_options_are_bounded(tiny, tmp_path, capsys, offline):
    code, _, err = _cli(capsys, launch_args(tiny, tmp_path / "d", "--backend", "slurm", "--backend-option", "partition=gpu; rm -rf /", "--dry-run"))
    assert code == 2 and "backend option partition" in err


@real
def test_real_slurm_runs_a_merge_and_keeps_its_measured_peak(tmp_path, capsys, offline):
    """A merge is a run like any other: mergekit's linear merge of two tiny Llamas through sbatch."""
    pytest.importorskip("mergekit")
    from tests.test_mergekit_run import _llama

    a, b = _llama(tmp_path / "a", 0, hidden=128, vocab=4000), _llama(tmp_path / "b", 1, hidden=128, vocab=4000)
    code, out, err = _cli(capsys, ["merge", str(a), "--method", "linear", "--merge-with", str(b), "--launch", "--backend", "slurm",
                                   "--output", str(tmp_path / "merged"), "--wait", "--json", "--data-dir", str(tmp_path / "d")])
    record = json.loads(out)
    assert code == 0, (record, err)
    assert (record["state"], record["backend"], record["stage"]) == ("succeeded", "slurm", "merge")
    assert record["measured_peak_bytes"] and record["error_pct"] is not None
    assert (tmp_path / "merged" / "model.safetensors").is_file()
