"""A launch of a model directory is never told "N pasted configs are being built" (issue 25, item 12),
and an Idempotency-Key retry is answered from the stored run even while every build slot is taken.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.model_builder import BuildBusy, SpecBuilder

TOKEN = "busy-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 512})


def _full(builder: SpecBuilder) -> None:
    while builder._waiting.acquire(blocking=False):
        pass


def test_a_model_directory_waiting_is_not_called_pasted():
    builder = SpecBuilder()
    _full(builder)
    with pytest.raises(BuildBusy) as err:
        builder.build(CONFIG, "/models/tiny/config.json", name="/models/tiny")
    assert "pasted configs are being built" not in str(err.value) and "/models/tiny/config.json waits its turn" in str(err.value)
    with pytest.raises(BuildBusy, match="this pasted config waits its turn"):
        builder.build(CONFIG.replace("64", "96"), "the pasted config.json")


def test_an_idempotent_retry_is_answered_while_builds_are_busy(tiny_run, tmp_path, monkeypatch):
    from app.main import create_app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", str(Path(tiny_run["model"]).parent))
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    body = {"model": str(tiny_run["model"]), "dataset": str(tiny_run["sft"]), "backend": "local", "device": "cpu", "precision": "fp32",
            "max_steps": 1, "seq_len": 64, "batch_size": 2, "lora_r": 4, "gradient_accumulation_steps": 1}
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        first = client.post("/api/v1/runs", json=body, headers={**BEARER, "Idempotency-Key": "busy-1"})
        assert first.status_code == 201, first.text

        def busy(self, error, work, *args):
            raise error

        monkeypatch.setattr(SpecBuilder, "_in_line", busy)
        monkeypatch.setattr(SpecBuilder, "_cached", lambda self, key: None)  # as if the model's spec had to be built again
        again = client.post("/api/v1/runs", json=body, headers={**BEARER, "Idempotency-Key": "busy-1"})
        assert again.status_code in (200, 201), again.text
        assert again.json()["id"] == first.json()["id"]
        other = client.post("/api/v1/runs", json=body, headers={**BEARER, "Idempotency-Key": "busy-2"})
        assert other.status_code == 503 and "pasted configs are being built" not in other.text, other.text
        client.get(f"/api/v1/runs/{first.json()['id']}", headers=BEARER)
