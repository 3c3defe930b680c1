"""Admission on the host (issue 25, item 4): a served local run starts only while the host has room
(live local runs under the cap, memory free, load under the limit), else it is queued when asked or
refused with 429 naming the limit; a dataset over the size limit, or a JSONL line over the line
limit, is a 422 on `dataset` naming the limit, before anything reads it whole.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from launcher.admission import GIB, HostLimits, check_dataset_size, host_room
from planner.errors import PlanInputError

TOKEN = "admission-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = HostLimits(max_local_runs=2, min_free_ram_bytes=2 * GIB, max_load_per_cpu=1.5, max_dataset_bytes=1000, max_dataset_line_bytes=100)


def test_host_room_names_each_limit():
    assert host_room(1, LIMITS, available=8 * GIB, load=0.1) is None
    assert "VRAMPLAN_MAX_LOCAL_RUNS=2" in host_room(2, LIMITS, available=8 * GIB, load=0.1)
    assert "VRAMPLAN_MIN_FREE_RAM_GIB" in host_room(0, LIMITS, available=GIB, load=0.1)
    assert "VRAMPLAN_MAX_LOAD_PER_CPU" in host_room(0, LIMITS, available=8 * GIB, load=1000.0)


def test_dataset_size_and_line_limits(tmp_path):
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "a"}\n' * 10)
    check_dataset_size(ok, LIMITS)
    long_line = tmp_path / "long.jsonl"
    long_line.write_text('{"text": "a"}\n' + '{"text": "' + "x" * 200 + '"}\n')
    with pytest.raises(PlanInputError, match=r"long.jsonl line 2 is longer than .*VRAMPLAN_MAX_DATASET_LINE_BYTES") as err:
        check_dataset_size(long_line, LIMITS)
    assert err.value.field == "dataset"
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "a"}\n' * 100)
    with pytest.raises(PlanInputError, match="VRAMPLAN_MAX_DATASET_BYTES"):
        check_dataset_size(big, LIMITS)


@pytest.fixture
def served(tiny_run, tmp_path, monkeypatch):
    from app.main import create_app

    root = Path(tiny_run["model"]).parent
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", f"{root}:{tmp_path}")
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    monkeypatch.setenv("VRAMPLAN_MAX_LOCAL_RUNS", "1")
    monkeypatch.setenv("VRAMPLAN_MAX_LOAD_PER_CPU", "0")
    body = {"model": str(tiny_run["model"]), "dataset": str(tiny_run["sft"]), "backend": "local", "device": "cpu", "precision": "fp32",
            "max_steps": 3, "seq_len": 64, "batch_size": 2, "lora_r": 4, "step_sleep_s": 0.5,
            "gradient_accumulation_steps": 1}
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client, body


def test_a_second_local_run_past_the_cap_is_429_or_queued_then_started(served, tmp_path):
    client, body = served
    first = client.post("/api/v1/runs", json=body, headers=BEARER)
    assert first.status_code == 201, first.text
    refused = client.post("/api/v1/runs", json=body, headers=BEARER)
    assert refused.status_code == 429, refused.text
    detail = refused.json()["detail"][0]
    assert detail["type"] == "host_busy" and "VRAMPLAN_MAX_LOCAL_RUNS=1" in detail["msg"]
    queued = client.post("/api/v1/runs", json={**body, "queue": True}, headers=BEARER)
    assert queued.status_code == 201 and queued.json()["state"] == "queued", queued.text
    deadline = time.monotonic() + 240
    states = set()
    while time.monotonic() < deadline:
        run = client.get(f"/api/v1/runs/{queued.json()['id']}", headers=BEARER).json()
        states.add(run["state"])
        if run["terminal"]:
            break
        time.sleep(0.5)
    assert run["state"] == "succeeded", run
    assert client.get(f"/api/v1/runs/{first.json()['id']}", headers=BEARER).json()["state"] == "succeeded"


def test_a_one_line_dataset_over_the_line_limit_is_422_on_dataset(served, tmp_path, monkeypatch):
    client, body = served
    monkeypatch.setenv("VRAMPLAN_MAX_DATASET_LINE_BYTES", "1000")
    data = tmp_path / "one-line.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]}) + "\n")
    answer = client.post("/api/v1/runs", json={**body, "dataset": str(data)}, headers=BEARER)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"][0]
    assert detail["loc"][-1] == "dataset" and "VRAMPLAN_MAX_DATASET_LINE_BYTES" in detail["msg"]
