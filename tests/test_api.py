"""The JSON API and the pages over HTTP (FastAPI's TestClient): every endpoint, every error path."""

import json

import pytest
from fastapi.testclient import TestClient

from app.main import app
from app.service import MAX_BODY_BYTES
from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.request import single_plan_options

MODEL = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def client():
    # raise_server_exceptions=False: a bug must surface as the response a user would get
    return TestClient(app, raise_server_exceptions=False)


def test_healthz(client):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["store"]["ok"] and health.json()["disk"]["ok"]


def test_plan_is_the_planners_plan(client):
    body = {"model": MODEL, "method": "qlora", "gpu": "RTX 4000 Ada", "seq_len": 1024}
    response = client.post("/api/v1/plan", json=body)
    assert response.status_code == 200
    spec = load_catalog_spec(MODEL)
    # a single plan's defaults (the allocator simulated unless VRAMPLAN_SIMULATE_ALLOCATOR=off, as here)
    expected = build_plan(spec, single_plan_options(spec, TrainingOptions(method="qlora", gpu="RTX 4000 Ada", seq_len=1024))).to_dict()
    assert response.json() == json.loads(json.dumps(expected))
    assert response.json()["peak_bytes"] == sum(c["bytes"] for c in response.json()["components"])


@pytest.mark.parametrize("method,fits", [("qlora", True), ("full", False)])
def test_check_is_200_either_way_with_fits(client, method, fits):
    response = client.post("/api/v1/check", json={"model": MODEL, "method": method, "gpu": "RTX 4000 Ada"})
    assert response.status_code == 200
    data = response.json()
    assert data["fits"] is fits and data["peak_bytes"] > 0 and data["gpu"]["name"] == "NVIDIA RTX 4000 Ada Generation"


def test_advise(client):
    response = client.post("/api/v1/advise", json={"model": "meta-llama/Llama-2-13b-hf", "gpu": "RTX 4000 Ada", "num_examples": 8000})
    assert response.status_code == 200
    assert response.json()["method"] == "qlora" and response.json()["fits"]


def test_fit(client):
    data = client.post("/api/v1/fit", json={"model": MODEL, "method": "lora", "gpu": "RTX 4090"}).json()
    found = data["largest_batch"]
    assert found["fits"] and found["peak_high_bytes"] <= found["usable_bytes"] < found["beyond_peak_high_bytes"]
    assert found["beyond_verdict"] in ("tight", "does not fit")


def test_gpus_and_models(client):
    gpus = client.get("/api/v1/gpus").json()
    assert gpus["catalog"] and ("reason" in gpus)
    models = client.get("/api/v1/models").json()["models"]
    assert {"id": MODEL, "model_type": "llama", "params": 8_030_261_248, "layers": 32, "experts": 0} in models


@pytest.mark.parametrize(
    "body,field",
    [
        ({"model": "nope/nope"}, "model"),
        ({"model": MODEL, "batch_size": 0}, "batch_size"),
        ({"model": MODEL, "method": "magic"}, "method"),
        ({"model": MODEL, "method": "qlora", "quantization": "int8"}, "quantization"),
        ({"model": MODEL, "gpu": "toaster 9000"}, "gpu"),
        ({"model": MODEL, "lora_targets": "nonexistent_proj"}, "lora_targets"),
        ({"model": MODEL, "unknown_option": 1}, "unknown_option"),
        # fp32 weights with bf16 compute is autocast: it cannot be off
        ({"model": MODEL, "weights_dtype": "fp32", "precision": "bf16", "autocast": False}, "autocast"),
        ({"model": MODEL, "autocast": "no"}, "autocast"),
        ({"config_json": "{not json"}, "config_json"),
        ({"config_json": json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Y"}, "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 10})}, "config_json"),
        ({"config_json": json.dumps({"model_type": "llama", "hidden_size": 10**9, "num_hidden_layers": 1, "vocab_size": 10})}, "config_json"),
    ],
)
def test_bad_input_is_422_with_the_field(client, body, field):
    for endpoint in ("/api/v1/plan", "/api/v1/check"):
        response = client.post(endpoint, json=body)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert any(field in [str(p) for p in d["loc"]] for d in detail), detail
        assert all(d["msg"] for d in detail)


def test_a_path_is_not_a_model_on_the_web(client):
    response = client.post("/api/v1/plan", json={"model": "/etc/passwd"})
    assert response.status_code == 422 and "catalog id" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("payload", [b"not json at all", b"[1, 2, 3]", b'{"model": 5}', b"\xff\xfe"])
def test_malformed_bodies_are_422(client, payload):
    response = client.post("/api/v1/plan", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_oversized_body_is_refused(client):
    response = client.post("/api/v1/plan", content=b"x" * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["detail"][0]["loc"] == ["body"]


def test_pasted_config_is_introspected(client, tmp_path):
    from tests.conftest import TINY

    response = client.post("/api/v1/plan", json={"config_json": json.dumps(TINY["llama"]), "method": "lora", "gpu_memory_gib": 8})
    assert response.status_code == 200
    assert response.json()["model"]["params"]["total"] > 0


def test_openapi_lists_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/plan", "/api/v1/check", "/api/v1/advise", "/api/v1/fit", "/api/v1/gpus", "/api/v1/models"} <= set(paths)


# -- pages -------------------------------------------------------------------------------------


def test_page_renders_the_verdict_from_the_query_string(client):
    page = client.get("/", params={"model": MODEL, "method": "full", "gpu": "NVIDIA GeForce RTX 4090"})
    assert page.status_code == 200
    assert "Does not fit" in page.text and "<svg" in page.text and "What would make it fit" in page.text
    fits = client.get("/", params={"model": MODEL, "method": "qlora", "gpu": "NVIDIA H100 80GB HBM3"})
    assert "✔ Fits" in fits.text


def test_page_numbers_are_the_plans_numbers(client):
    plan = build_plan(load_catalog_spec(MODEL), TrainingOptions(method="qlora", gpu="RTX 4090"))
    page = client.get("/result", params={"model": MODEL, "method": "qlora", "gpu": "RTX 4090"})
    assert f"{plan.peak_bytes / 2**30:,.2f} GiB" in page.text


def test_page_shows_field_errors_without_a_traceback(client):
    page = client.get("/", params={"model": MODEL, "batch_size": "lots"})
    assert page.status_code == 422 and "batch_size" in page.text and "Traceback" not in page.text
    fragment = client.get("/result", params={"model": "nope/nope"})
    assert fragment.status_code == 200 and "unknown model" in fragment.text


def test_upload_a_config_json(client):
    from tests.conftest import TINY

    files = {"config_file": ("config.json", json.dumps(TINY["qwen2"]).encode(), "application/json")}
    page = client.post("/", data={"gpu_memory_gib": "4", "method": "lora"}, files=files)
    assert page.status_code == 200 and "Fits" in page.text


def test_compare_and_matrix(client):
    compare = client.get("/compare", params={"model": MODEL, "gpu": "RTX 4090"})
    assert compare.status_code == 200 and compare.text.count("<svg") == 4
    matrix = client.get("/matrix", params={"method": "qlora"})
    assert matrix.status_code == 200 and "✔" in matrix.text and "✘" in matrix.text


# -- no input produces a 500 ------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from planner.options import TrainingOptions as _Options  # noqa: E402

_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3),
    st.sampled_from(["all-linear", "qlora", "full", "zero3", "fsdp", "grpo", "dpo", "auto", "H100", "T4", "MI300X", "eager", "int8", "nf4"]),
)
_bodies = st.dictionaries(st.sampled_from([*_Options.model_fields, "model", "config_json", "goal", "num_examples", "bogus"]), _values, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies, endpoint=st.sampled_from(["/api/v1/plan", "/api/v1/check", "/api/v1/advise"]))
def test_any_body_is_answered_200_or_422(client, body, endpoint):
    body.setdefault("model", "Qwen/Qwen2.5-0.5B")
    # json.dumps writes NaN and Infinity as a hostile client could; httpx's json= refuses them
    response = client.post(endpoint, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code in (200, 422), (body, response.text)
    if response.status_code == 422:
        assert all(d["msg"] for d in response.json()["detail"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(["model", "gpu", "method", "stage", "batch_size", "seq_len", "gradient_checkpointing", "lora_r",
                                                "num_gpus", "parallelism", "goal", "num_examples", "config_json"]), st.text(max_size=20), max_size=6))
def test_any_form_input_renders_a_page(client, params):
    for path in ("/", "/result", "/compare"):
        response = client.get(path, params=params)
        assert response.status_code in (200, 422), (path, params, response.text[:300])
        assert "Traceback" not in response.text


def test_check_says_tight_when_the_usable_memory_is_inside_the_band(client):
    """Llama-2-13B QLoRA at micro-batch 4 on a card whose usable memory lies between the central
    figure and the band's high end: the central figure fits, the high end does not."""
    body = {"model": "meta-llama/Llama-2-13b-hf", "method": "qlora", "batch_size": 4}
    plan = build_plan(load_catalog_spec(body["model"]), TrainingOptions(method="qlora", batch_size=4, gpu_memory_gib=80))
    usable = (plan.peak_bytes + plan.peak_high_bytes) / 2
    response = client.post("/api/v1/check", json=body | {"gpu_memory_gib": usable / 0.95 / 2**30})
    assert response.status_code == 200
    data = response.json()
    assert data["verdict"] == "tight" and data["fits"] is False
    assert data["peak_low_bytes"] <= data["peak_bytes"] <= data["usable_bytes"] < data["peak_high_bytes"]
    whole = client.post("/api/v1/plan", json=body | {"gpu_memory_gib": usable / 0.95 / 2**30}).json()
    assert (whole["verdict"], whole["peak_high_bytes"]) == ("tight", data["peak_high_bytes"])
