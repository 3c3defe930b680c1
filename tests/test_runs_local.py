"""The real `local` backend driven over HTTP, end to end on the CPU: a tiny random Llama with a
tokenizer trained here (tests/tinyrun.py, built once a session), planned from its directory, launched with POST
/api/v1/runs, followed by the app's own loop to `succeeded`, its steps in /metrics, its log in
/logs, its events in the SSE feed, and its page. No fake anywhere: TRL trains in a subprocess.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

TOKEN = "local-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def tiny(tiny_run):
    """The session's tiny model and datasets (tests/conftest.py), in one directory: the server's root."""
    return {**tiny_run, "root": Path(tiny_run["model"]).parent}


def test_a_real_local_run_launched_over_http_succeeds(tiny, tmp_path, monkeypatch):
    from app.main import create_app
    from launcher.backends.local import run_processes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", str(tiny["root"]))
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    body = {"model": str(tiny["model"]), "dataset": str(tiny["sft"]), "backend": "local", "device": "cpu", "precision": "fp32",
            "max_steps": 4, "save_steps": 2, "seq_len": 64, "batch_size": 2, "lora_r": 4,
            "gradient_accumulation_steps": 1}
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        created = client.post("/api/v1/runs", json=body, headers={**BEARER, "Idempotency-Key": "real-1"})
        assert created.status_code == 201, created.text
        run = created.json()
        assert run["backend"] == "local" and run["device"] == "cpu" and run["state"] in ("starting", "running")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            run = client.get(f"/api/v1/runs/{run['id']}", headers=BEARER).json()
            if run["terminal"]:
                break
            time.sleep(0.5)
        logs = client.get(f"/api/v1/runs/{run['id']}/logs", params={"limit": 1 << 20}, headers=BEARER).json()
        assert run["state"] == "succeeded", (run, logs["text"][-3000:])
        assert run["last_step"] == 4 and run["final_loss"] > 0 and run["measured_peak_bytes"] is None  # no GPU to measure
        assert (Path(run["output_dir"]) / "adapter_model.safetensors").exists()
        assert not run_processes(run["id"])
        metrics = client.get(f"/api/v1/runs/{run['id']}/metrics", headers=BEARER).json()["metrics"]
        assert [m["step"] for m in metrics if m["loss"] is not None][:4] == [1, 2, 3, 4]
        assert logs["eof"] and logs["text"]
        feed = client.get(f"/api/v1/runs/{run['id']}/events", headers=BEARER).text
        kinds = [line.removeprefix("event: ") for line in feed.splitlines() if line.startswith("event: ")]
        assert kinds.count("metric") >= 4 and "log" in kinds and kinds[-1] == "end"
        last = json.loads(feed.strip().rsplit("data: ", 1)[1])
        assert last["state"] == "succeeded" and last["last_step"] == 4
        page = client.get(f"/runs/{run['id']}", headers=BEARER).text
        assert 'data-state="succeeded"' in page and "<circle" in page and "the run is on the CPU" in page
