"""The runs API against its own OpenAPI schema (schemathesis), signed in, with the fake backend
standing in for every backend (tests/fake_backend.py: no process starts): generated requests,
valid and invalid, to every /api/v1/runs and /api/v1/backends operation; every response
documented, matching its schema, never a server error. The schema's examples launch real (fake)
runs, so the 201, the 409 and the runs' own ids are reached too.
"""

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from tests import fake_backend

TOKEN = "contract-token-0123456789abcdef"
EXAMPLES = int(os.environ.get("VRAMPLAN_CONTRACT_EXAMPLES_RUNS", "30"))


@pytest.fixture(autouse=True)
def signed_in_server(tmp_path, monkeypatch):
    """The app reads these per request: each operation gets a data directory, roots and a token of its own."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    monkeypatch.setenv("VRAMPLAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VRAMPLAN_ROOTS", str(root))
    monkeypatch.setenv("VRAMPLAN_TOKEN", TOKEN)
    monkeypatch.delenv("VRAMPLAN_AUTH", raising=False)
    fake_backend.register(monkeypatch, also_as_local=True)  # a generated request must never start a real process


schema = schemathesis.openapi.from_asgi("/openapi.json", create_app()).include(path_regex=r"^/api/v1/(runs|backends)")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_runs_api_keeps_its_contract(case):
    # as tests/test_contract.py: a request the schema allows may still be refused by design (a
    # model outside the catalog, a dataset outside the roots), with a 422 held to the error schema
    case.call_and_validate(headers={"host": "localhost", "Authorization": f"Bearer {TOKEN}"}, excluded_checks=[positive_data_acceptance])
