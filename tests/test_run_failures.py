"""A failed run says why (issue 24, item 2): real TRL runs on CPU that end on a data error, a missing
package and a NaN loss, and an out-of-memory error as the entry and the supervisor word it. What is
checked is what the user reads: the run's reason, its one-line message and its hint, in
`vramplan launch --wait`, `vramplan runs show`, the API's run object and the run page, and never
"the trainer exited with code 1" over the trainer's own words.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from app.cli import main
from launcher.supervisor import Supervisor

pytestmark = pytest.mark.usefixtures("offline")
GIB = 1 << 30


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def launch(capsys, model, dataset, data_dir, *extra):
    code = main(["launch", str(model), "--dataset", str(dataset), "--device", "cpu", "--precision", "fp32", "--max-steps", "3", "--seq-len", "64",
                 "--batch-size", "2", "--lora-r", "4", "--gradient-accumulation-steps", "1", "--data-dir", str(data_dir), "--wait", "--json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def show(capsys, data_dir, run_id) -> tuple[int, str]:
    code = main(["runs", "show", run_id[:8], "--data-dir", str(data_dir)])
    return code, capsys.readouterr().out


def test_a_data_error_in_the_trainer_names_the_line_on_every_door(tiny_run, tmp_path, capsys, monkeypatch):
    # the doors check the dataset first (tests/test_preflight.py); here one gets past them, as a file
    # changed after the launch would, and the trainer meets the bad line
    import app.cli.runs as cli_runs

    monkeypatch.setattr(cli_runs, "_preflight", lambda *args, **kwargs: None)
    rows = tiny_run["sft"].read_text().splitlines()
    rows[6] = '{"messages": [{"role": "user", "content": "Is 6 even?"} {"role": "assistant", "content": "yes"}]}'
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(rows) + "\n")
    data_dir = tmp_path / "d"
    code, record, err = launch(capsys, tiny_run["model"], data, data_dir)
    assert code == 4 and record["state"] == "failed" and record["reason"] == "data_error", (record, err)
    assert record["message"] == "dataset data.jsonl line 7: not JSON (Expecting ',' delimiter, column 57); each line must be one JSON object"
    assert record["hint"].startswith("fix the dataset, then launch again")
    code, text = show(capsys, data_dir, record["id"])
    assert code == 4 and "failed (data_error)" in text and "data.jsonl line 7: not JSON" in text and "hint: fix the dataset" in text
    assert "exited with code" not in text

    # the API's run object and the run page say the same
    from fastapi.testclient import TestClient

    from app.main import create_app

    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(data_dir))
    monkeypatch.setenv("VRAMPLAN_TOKEN", "test-token-0123456789abcdef")
    monkeypatch.delenv("VRAMPLAN_AUTH", raising=False)
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        bearer = {"Authorization": "Bearer test-token-0123456789abcdef"}
        run = client.get(f"/api/v1/runs/{record['id']}", headers=bearer).json()
        assert (run["reason"], run["message"], run["hint"]) == (record["reason"], record["message"], record["hint"])
        page = client.get(f"/runs/{record['id']}", headers=bearer).text
        assert "data.jsonl line 7: not JSON" in page and 'id="run-hint"' in page and "fix the dataset" in page


def test_a_missing_package_says_which_and_the_pip_line(tiny_run, tmp_path, capsys, monkeypatch):
    # PEFT absent from the run's environment: a package of that name that cannot be imported stands
    # first on the run's PYTHONPATH (an allowed variable), so TRL's import of it fails as on a machine without it
    shadow = tmp_path / "shadow" / "peft"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'peft\'", name="peft")\n')
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    code, record, err = launch(capsys, tiny_run["model"], tiny_run["sft"], tmp_path / "d")
    assert code == 4 and record["reason"] == "missing_package", (record, err)
    assert record["message"] == "a package is missing: peft (No module named 'peft')"
    assert record["hint"] == "pip install peft in the run's environment, then launch again"


def test_a_nan_loss_ends_the_run_and_says_so(tiny_run, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_run["model"], model)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code, record, err = launch(capsys, model, tiny_run["sft"], tmp_path / "d")
    assert code == 4 and record["reason"] == "nan_loss", (record, err)
    # the Trainer logs a NaN loss as the mean of those before it: the gradient norm says it
    assert record["message"] == "the gradient norm became nan at step 1: the loss is no longer a number" and record["last_step"] == 1
    # the rate is named when the step logged one above zero (the advised warmup starts at 0)
    assert record["hint"].startswith("lower the learning rate")


def test_an_oom_says_measured_against_predicted_and_is_kept_as_calibration(tmp_path, capsys):
    import torch

    from launcher.entry import explain

    spec = {"stage": "sft", "predicted_peak_bytes": 10 * GIB, "dataset": {"kind": "hub", "location": "org/d"}, "settings": {}}
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB")
    said = explain(error, "train", spec, {"max_memory_reserved": 11 * GIB})
    assert said["reason"] == "oom" and said["summary"].startswith("CUDA out of memory (tried to allocate 2.00 GiB)")
    assert "--gradient-checkpointing" in said["hint"]

    supervisor = Supervisor(tmp_path / "data")
    run_id = "e" * 32
    run_dir = supervisor.runs_root / run_id
    run_dir.mkdir()
    from tests.test_launcher_store import _row

    supervisor.store.create(_row(run_id, run_dir, state="starting", handle_json=json.dumps(
        {"backend": "local", "data": {"pid": 999999999, "create_time": 1.0, "pgid": 999999999, "marker": run_id}})))
    lines = [{"event": "train_begin", "rank": 0, "max_steps": 5, "cuda_context": 500 << 20},
             {"event": "error", "rank": 0, "kind": "oom", "type": "OutOfMemoryError", "message": str(error), "max_memory_reserved": 11 * GIB, **said},
             # the other rank dies of the first one's failure: its words do not replace the cause
             {"event": "error", "rank": 1, "kind": "exception", "type": "DistBackendError", "message": "broken pipe", "reason": None,
              "summary": "DistBackendError: broken pipe", "hint": "the run's log has the traceback"}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps({"run_id": run_id, "t": time.time(), **line}) + "\n" for line in lines))
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": 3}))
    record = supervisor.refresh(run_id)
    assert record.state == "failed" and record.reason == "oom"
    assert record.message == ("CUDA out of memory (tried to allocate 2.00 GiB): measured peak 11.49 GiB per GPU when it failed, "
                              "against the plan's 10.00 GiB (up to 11.00)")
    assert record.hint == said["hint"]
    assert main(["runs", "export", "--data-dir", str(tmp_path / "data")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["oom"] is True and row["failure"]["reason"] == "oom" and row["predicted"]["peak_bytes"] == 10 * GIB
    assert row["measured"]["peak_reserved"] == 11 * GIB


def test_the_trainers_words_are_not_replaced_by_the_exit_code(tmp_path):
    supervisor = Supervisor(tmp_path / "data")
    run_id = "f" * 32
    run_dir = supervisor.runs_root / run_id
    run_dir.mkdir()
    from tests.test_launcher_store import _row

    supervisor.store.create(_row(run_id, run_dir, state="starting", handle_json=json.dumps(
        {"backend": "local", "data": {"pid": 999999999, "create_time": 1.0, "pgid": 999999999, "marker": run_id}})))
    line = {"event": "error", "rank": 0, "kind": "exception", "type": "RuntimeError", "message": "expected scalar type Float but found Half\nmore",
            "reason": None, "summary": "RuntimeError: expected scalar type Float but found Half", "hint": "the run's log has the traceback"}
    (run_dir / "events.jsonl").write_text(json.dumps({"run_id": run_id, "t": 1.0, **line}) + "\n")
    (run_dir / "exit.json").write_text(json.dumps({"exit_code": 1}))
    record = supervisor.refresh(run_id)
    assert record.state == "failed" and record.reason == "exit_nonzero" and record.exit_code == 1
    assert record.message == "RuntimeError: expected scalar type Float but found Half" and record.hint.startswith("the run's log")


def test_a_store_from_before_the_hint_column_opens_and_gains_it(tmp_path):
    import sqlite3

    from launcher.store import SCHEMA, RunStore

    path = tmp_path / "runs.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace(", hint TEXT\n", "\n"))
    db.close()
    assert "hint" not in {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(runs)")}
    RunStore(path).close()
    assert "hint" in {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(runs)")}
