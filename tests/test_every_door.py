"""One plan behind every door: the same model and options give the same plan, byte for byte,
through the page (its JSON twin, signed in with the cookie), the JSON API (Bearer), the CLI's
`plan`, `vramplan launch --dry-run` and the runs API's dry run; for a catalog model and for a local
model directory (built and traced in the server's worker, in-process from the CLI)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

TOKEN = "test-token-every-door-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
# allocator given, so the launch doors' default (expandable segments) changes nothing; device cpu
# for them, so no GPU is detected either: every door must then plan exactly these options
# The launch doors also take the advice's accumulation, LoRA alpha and dropout where none is given
# (launcher.spec.with_advice): given here, the plan's options are the same everywhere.
OPTIONS = {"method": "lora", "gpu": "L4", "batch_size": 2, "seq_len": 128, "allocator": "expandable_segments",
           "gradient_accumulation_steps": 8, "lora_alpha": 32, "lora_dropout": 0.1}


@pytest.fixture
def server(tiny_run, tmp_path, monkeypatch):
    root = tiny_run["model"].parent
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", str(root))
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    monkeypatch.delenv("VRAMPLAN_AUTH", raising=False)
    monkeypatch.delenv("VRAMPLAN_SIMULATE_ALLOCATOR", raising=False)
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def _cli_json(capsys, *argv: str) -> dict:
    from app.cli import main

    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def _flags(options: dict) -> list[str]:
    return [w for k, v in options.items() for w in ("--" + k.replace("_", "-"), str(v))]


def _plans_by_door(client, capsys, model: str, dataset: str, data_dir: str) -> dict[str, dict]:
    plans = {}
    signed = client.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)  # the browser's sign-in: the cookie
    assert signed.status_code == 303, signed.text
    twin = client.get("/plan.json", params={"model": model, **OPTIONS})
    assert twin.status_code == 200, twin.text
    plans["page (cookie)"] = twin.json()["plan"]
    client.cookies.clear()
    api = client.post("/api/v1/plan", json={"model": model, **OPTIONS}, headers=BEARER)
    assert api.status_code == 200, api.text
    plans["API (Bearer)"] = api.json()
    twin = client.get("/plan.json", params={"model": model, **OPTIONS}, headers=BEARER)
    assert twin.status_code == 200, twin.text
    plans["page's JSON twin (Bearer)"] = twin.json()["plan"]
    dry = client.post("/api/v1/runs/dry-run", json={"model": model, "dataset": dataset, "device": "cpu", "max_steps": 2, **OPTIONS},
                      headers=BEARER)
    assert dry.status_code == 200, dry.text
    plans["runs API dry run"] = dry.json()["plan"]
    plans["vramplan plan"] = _cli_json(capsys, "plan", model, "--json", *_flags(OPTIONS))
    plans["vramplan launch --dry-run"] = _cli_json(capsys, "launch", model, "--dry-run", "--json", "--device", "cpu", "--dataset", dataset,
                                                   "--max-steps", "2", "--data-dir", data_dir, *_flags(OPTIONS))["plan"]
    return plans


@pytest.mark.parametrize("which", ["catalog", "local directory"])
def test_every_door_gives_the_same_plan(server, tiny_run, tmp_path, capsys, which):
    model = "Qwen/Qwen2.5-0.5B" if which == "catalog" else str(tiny_run["model"])
    plans = _plans_by_door(server, capsys, model, str(tiny_run["sft"]), str(tmp_path / "cli-data"))
    reference = plans["vramplan plan"]
    # the single plan of a model this small is traced, through every door
    assert reference["reserve_source"] == "simulated", reference["assumptions"]
    expected_name = model if which == "catalog" else str(tiny_run["model"].resolve())
    assert reference["model"]["name"] == expected_name
    for door, plan in plans.items():
        # how long this door's trace took, and whether it came from the trace cache, is not the plan
        assert plan.pop("trace")["seconds"] >= 0
    reference = plans["vramplan plan"]
    for door, plan in plans.items():
        differing = {k: (plan.get(k), reference.get(k)) for k in plan.keys() | reference.keys() if plan.get(k) != reference.get(k)}
        assert not differing, f"{door} differs from vramplan plan: {differing}"
        assert json.dumps(plan, sort_keys=True) == json.dumps(reference, sort_keys=True)


def test_a_model_directory_needs_signing_in(server, tiny_run):
    """Not signed in, the server's files are not the user's to name: the same 422 on the page's
    twin and the API, naming the field."""
    for response in (server.post("/api/v1/plan", json={"model": str(tiny_run["model"]), **OPTIONS}),
                     server.get("/plan.json", params={"model": str(tiny_run["model"]), **OPTIONS})):
        assert response.status_code == 422
        detail = response.json()["detail"][0]
        assert detail["loc"][-1] == "model" and "unknown model" in detail["msg"]
