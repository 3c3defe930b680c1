"""The app as the runs tests serve it: a root the runs may use with a one-row dataset, the data
directory beside it, the token, the fake backend (tests/fake_backend.py), and a client running the
app with its lifespan. Imported by the test modules that use them (pytest finds the fixtures there)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests import fake_backend

TOKEN = "test-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "Qwen/Qwen2.5-0.5B"


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A root the runs may use, the data directory beside it, the token, the fake backend."""
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", str(root))
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    monkeypatch.delenv("VRAMPLAN_AUTH", raising=False)
    fake_backend.register(monkeypatch)
    (root / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return root


@pytest.fixture
def client(root):
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c
