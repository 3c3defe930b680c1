"""A served run's output_dir is kept apart from what the server and other runs need (issue 25,
item 11): not the data directory (the run store, the token, every run's files), not the model's
directory, not another run's output; nor inside them, nor holding them."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from launcher.paths import check_output_dir
from planner.errors import PlanInputError
from tests import fake_backend

TOKEN = "test-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize("where,says", [
    ("data", "is the server's data directory"),
    ("data/runs/0123", "is inside the server's data directory"),
    ("", "holds the server's data directory"),
    ("model", "is the model's directory"),
    ("model/out", "is inside the model's directory"),
    ("other-out", "overlaps the output directory of run abcdef01"),
    ("other-out/sub", "overlaps the output directory of run abcdef01"),
])
def test_what_output_dir_may_not_be(tmp_path, where, says):
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(PlanInputError) as refused:
        check_output_dir(tmp_path / where, tmp_path / "data", str(tmp_path / "model"), taken=[("abcdef0123", str(tmp_path / "other-out"))])
    assert refused.value.field == "output_dir" and says in refused.value.reason


def test_a_directory_of_its_own_is_taken(tmp_path):
    (tmp_path / "data").mkdir()
    assert check_output_dir(tmp_path / "out", tmp_path / "data", "Qwen/Qwen2.5-0.5B", [("ab", str(tmp_path / "out2"))]) == tmp_path / "out"


@pytest.fixture
def client(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", str(root))
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    monkeypatch.delenv("VRAMPLAN_AUTH", raising=False)
    fake_backend.register(monkeypatch)
    (root / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as c:
        c.root = root
        yield c


def _launch(client, **changes):
    body = {"model": MODEL, "dataset": str(client.root / "train.jsonl"), "device": "cpu", "backend": "fake", "max_steps": 1, **changes}
    return client.post("/api/v1/runs", json=body, headers=BEARER)


def test_a_served_launch_into_the_data_directory_or_another_runs_output_is_a_422(client):
    first = _launch(client, output_dir=str(client.root / "out"))
    assert first.status_code == 201, first.text
    for output_dir in (client.root / "data", client.root / "data" / "runs", client.root, client.root / "out", client.root / "out" / "x"):
        refused = _launch(client, output_dir=str(output_dir))
        assert refused.status_code == 422, (output_dir, refused.text)
        assert refused.json()["detail"][0]["loc"] == ["body", "output_dir"], refused.text
    assert _launch(client).status_code == 201  # the run's own output/ inside its directory
    assert _launch(client, output_dir=str(client.root / "out2")).status_code == 201


def test_the_dry_run_refuses_what_the_launch_would(client):
    for output_dir in (client.root / "data", client.root / "data" / "runs"):
        dry = client.post("/api/v1/runs/dry-run", json={"model": MODEL, "dataset": str(client.root / "train.jsonl"), "device": "cpu",
                                                          "backend": "fake", "output_dir": str(output_dir)}, headers=BEARER)
        assert dry.status_code == 422, dry.text
        assert dry.json()["detail"][0]["loc"] == ["body", "output_dir"] and "data directory" in dry.json()["detail"][0]["msg"]
    # a user that does not exist is the user's input, not a server error
    dry = client.post("/api/v1/runs/dry-run", json={"model": MODEL, "dataset": str(client.root / "train.jsonl"), "device": "cpu",
                                                      "backend": "fake", "output_dir": "~nosuchuser/out"}, headers=BEARER)
    assert dry.status_code == 422 and dry.json()["detail"][0]["loc"] == ["body", "output_dir"], dry.text
