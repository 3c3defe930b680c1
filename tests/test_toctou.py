"""Paths are confined when the trainer opens them, not only when the request arrives (issue 25,
item 5). A real CPU run launched over HTTP; between the 201 and the trainer's start (while it
imports torch and TRL) the dataset is replaced by a symlink to a file outside the roots, or the
output directory by one to a directory outside: the run fails with `path_outside_roots` naming the
path, and nothing outside is read or written.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

TOKEN = "toctou-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def served(tiny_run, tmp_path, monkeypatch):
    from app.main import create_app

    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(tiny_run["sft"], root / "data.jsonl")
    shutil.copy(tiny_run["sft"], outside / "secret.jsonl")
    (outside / "dir").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", os.pathsep.join([str(Path(tiny_run["model"]).parent), str(root)]))
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    body = {"model": str(tiny_run["model"]), "dataset": str(root / "data.jsonl"), "backend": "local", "device": "cpu", "precision": "fp32",
            "max_steps": 2, "seq_len": 64, "batch_size": 2, "lora_r": 4, "gradient_accumulation_steps": 1}
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client, body, root, outside


def _swap_for_symlink(path: Path, target: Path) -> None:
    link = path.with_name(path.name + ".link")
    link.symlink_to(target)
    if path.is_dir():
        path.rename(path.with_name(path.name + ".old"))
    os.replace(link, path)


def _finish(client, run_id: str) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        run = client.get(f"/api/v1/runs/{run_id}", headers=BEARER).json()
        if run["terminal"]:
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not end")


def test_a_dataset_swapped_for_a_symlink_out_after_the_201_is_refused_by_the_trainer(served):
    client, body, root, outside = served
    created = client.post("/api/v1/runs", json=body, headers=BEARER)
    assert created.status_code == 201, created.text
    _swap_for_symlink(root / "data.jsonl", outside / "secret.jsonl")
    run = _finish(client, created.json()["id"])
    assert run["state"] == "failed" and run["reason"] == "path_outside_roots", (run["reason"], run["message"])
    assert "dataset" in run["message"] and "outside the server's roots" in run["message"] and str(outside / "secret.jsonl") in run["message"]
    assert run["last_step"] in (None, 0)


def test_an_output_dir_swapped_for_a_symlink_out_after_the_201_writes_nothing_outside(served):
    client, body, root, outside = served
    (root / "out").mkdir()
    created = client.post("/api/v1/runs", json={**body, "output_dir": str(root / "out")}, headers=BEARER)
    assert created.status_code == 201, created.text
    _swap_for_symlink(root / "out", outside / "dir")
    run = _finish(client, created.json()["id"])
    assert run["state"] == "failed" and run["reason"] == "path_outside_roots", (run["reason"], run["message"])
    assert "output_dir" in run["message"]
    assert list((outside / "dir").iterdir()) == []


def test_confine_at_use_unit(tmp_path):
    from launcher.entry import PathOutsideRoots, confine_at_use

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "d.jsonl").write_text("{}\n")
    spec = {"confine_to": [str(root)], "model": {"kind": "hub", "location": "x/y"}, "dataset": {"kind": "file", "location": str(root / "d.jsonl")},
            "settings": {}, "output_dir": str(root / "o")}
    assert confine_at_use(spec) == {"dataset": str(root / "d.jsonl"), "output_dir": str(root / "o")}
    (root / "o").symlink_to(outside)
    with pytest.raises(PathOutsideRoots, match="output_dir"):
        confine_at_use(spec)
    assert confine_at_use({**spec, "confine_to": []}) == {}  # the CLI's own runs are the user's
