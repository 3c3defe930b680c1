"""Input that must be refused, or planned with a word about what was assumed, and requests that
must not hold the server: one test per cause found by an attacker's and a new user's tries."""

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import app
from app.model_builder import BuildLimits, SpecBuilder
from planner.errors import PlanInputError
from tests.live_server import serving

MODEL = "meta-llama/Llama-3.1-8B"
SMALL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}


@pytest.fixture(scope="module")
def client():
    return TestClient(app, raise_server_exceptions=False)


def _check(client, config: dict, **options):
    return client.post("/api/v1/check", json={"config_json": json.dumps(config), "gpu": "H100", **options})


def _error(response) -> dict:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]


# -- caps hold on the sizes transformers resolves, before anything is built --------------------

@pytest.mark.parametrize("config,says", [
    ({"model_type": "gpt2", "n_layer": 1_000_000, "n_embd": 64, "n_head": 4, "vocab_size": 1000}, "num_hidden_layers resolves to 1,000,000"),
    ({"model_type": "mpt", "n_layers": 1_000_000, "d_model": 64, "n_heads": 4, "vocab_size": 1000}, "num_hidden_layers resolves to 1,000,000"),
    ({"model_type": "llava", "text_config": SMALL, "vision_config": {"model_type": "clip_vision_model", "num_hidden_layers": 100_000}}, "vision_config.num_hidden_layers"),
    ({**SMALL, "model_type": "mixtral", "num_hidden_layers": 1000, "num_local_experts": 4000, "num_experts_per_tok": 2}, "modules to build"),
    ({**SMALL, "hidden_size": 131_072, "intermediate_size": 1_048_576, "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024}, "parameters"),
])
def test_size_caps_hold_on_resolved_sizes(client, config, says):
    started = time.monotonic()
    error = _error(_check(client, config))
    assert error["loc"] == ["body", "config_json"] and says in error["msg"]
    # refused from the sizes, not after building a million layers (the build worker may be
    # starting: torch's import is most of this bound)
    assert time.monotonic() - started < 30


# -- nonsense is refused; what is missing is said ----------------------------------------------

@pytest.mark.parametrize("config,says", [
    ({**SMALL, "num_key_value_heads": 8}, "num_key_value_heads=8 must divide num_attention_heads=4"),
    ({**SMALL, "num_key_value_heads": 3}, "must divide"),
    ({**SMALL, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 8}, "8 experts per token with 4 experts"),
    ({**SMALL, "rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "factor=-2.0 must be positive"),
    ({**SMALL, "model_type": "bert"}, "encoder (masked-LM) model"),
    ({**SMALL, "model_type": "bart", "d_model": 64}, "encoder-decoder"),
])
def test_configs_no_model_can_have_are_refused(client, config, says):
    assert says in _error(_check(client, config))["msg"]


def test_dbrx_experts_under_ffn_config_are_planned_as_experts(client):
    config = {"model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128, "vocab_size": 128,
              "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
              "attn_config": {"kv_n_heads": 2, "rope_theta": 10000}}
    plan = client.post("/api/v1/plan", json={"config_json": json.dumps(config), "gpu": "H100"}).json()
    from app.service import web_source

    spec = web_source(None, json.dumps(config)).spec
    assert (spec.num_experts, spec.experts_per_token, spec.moe_intermediate_size) == (4, 2, 96)
    assert plan["peak_bytes"] > 0


def test_sizes_taken_from_defaults_are_said(client):
    plan = client.post("/api/v1/plan", json={"config_json": '{"model_type": "llama"}', "gpu": "H100"}).json()
    said = plan["assumptions"][0]
    assert "does not give num_hidden_layers=32, hidden_size=4096" in said and "defaults" in said
    complete = client.post("/api/v1/plan", json={"config_json": json.dumps(SMALL), "gpu": "H100"}).json()
    assert not any("does not give" in a for a in complete["assumptions"])


def test_an_empty_body_plans_nothing(client):
    error = _error(client.post("/api/v1/plan", json={}))
    assert error["loc"] == ["body", "model"] and "catalog id" in error["msg"]


@pytest.mark.parametrize("field,value,says", [
    ("gpu_memory_gib", 5e-324, "greater than or equal to 0.5"),
    ("gradient_checkpointing", 0, "valid boolean"),
    ("lora_targets", [f"proj_{i}" for i in range(65)], "at most 64"),
    ("lora_targets", ["x" * 201], "over 200 characters"),
])
def test_option_values_that_cannot_be_right_are_refused(client, field, value, says):
    error = _error(client.post("/api/v1/check", json={"model": MODEL, field: value}))
    assert error["loc"][-1] == field and says in error["msg"] and error["type"]


def test_a_huge_target_list_is_refused_before_matching(client):
    """250 KB of names once held the event loop for 9 s (layers x names)."""
    names = [f"module_name_number_{i:06d}" for i in range(9000)]
    started = time.monotonic()
    error = _error(client.post("/api/v1/plan", json={"model": MODEL, "lora_targets": names}))
    assert error["loc"][-1] == "lora_targets" and time.monotonic() - started < 5


def test_repeated_targets_count_once(client):
    once = client.post("/api/v1/plan", json={"model": MODEL, "lora_targets": ["q_proj", "v_proj"]}).json()
    repeated = client.post("/api/v1/plan", json={"model": MODEL, "lora_targets": ["q_proj", "v_proj"] * 30}).json()
    assert once["peak_bytes"] == repeated["peak_bytes"] and repeated["options"]["lora_targets"] == ["q_proj", "v_proj"]


# -- the body and its JSON -----------------------------------------------------------------------

@pytest.mark.parametrize("body,says", [
    (b'{"model": "meta-llama/Llama-3.1-8B", "lora_alpha": Infinity}', "Infinity is not a number JSON allows"),
    (b'{"model": "meta-llama/Llama-3.1-8B", "lora_alpha": NaN}', "NaN is not a number JSON allows"),
    (b'{"model": "meta-llama/Llama-3.1-8B", "lora_alpha": 1e999}', "too large for a number"),
    (b'{"model": "meta-llama/Llama-3.1-8B", "batch_size": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests deeper than 32 levels"),
    (b'{"model": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper than 32 levels"),
    (b'{"model": "\xff\xfe"}', "not UTF-8"),
])
@pytest.mark.parametrize("endpoint", ["/api/v1/plan", "/api/v1/check"])
def test_bodies_that_are_not_strict_json_get_a_422(client, body, says, endpoint):
    error = _error(client.post(endpoint, content=body, headers={"content-type": "application/json"}))
    assert error["loc"] == ["body"] and says in error["msg"] and error["type"] == "json_invalid"


def test_a_chunked_body_over_the_limit_is_a_413(client):
    from app.service import MAX_BODY_BYTES

    def chunks():
        for _ in range(40):
            yield b" " * (MAX_BODY_BYTES // 16)

    response = client.post("/api/v1/plan", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["detail"][0]["type"] == "too_large"


def test_every_error_item_has_loc_msg_and_type(client):
    for response in (client.post("/api/v1/plan", json={"model": MODEL, "batch_size": "lots"}),
                     client.post("/api/v1/plan", json={"model": "nope/nope"})):
        assert response.status_code == 422
        assert all(set(item) >= {"loc", "msg", "type"} for item in response.json()["detail"])


def test_plan_and_check_responses_are_documented(client):
    schema = client.get("/openapi.json").json()
    for path, model in (("/api/v1/plan", "PlanResponse"), ("/api/v1/check", "CheckResponse")):
        responses = schema["paths"][path]["post"]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"413", "422", "503"} <= set(responses)
    assert "type" in schema["components"]["schemas"]["ErrorItem"]["required"]


# -- who may ask -------------------------------------------------------------------------------

def test_other_host_names_are_refused(client):
    """A rebinding domain that resolves to 127.0.0.1 reaches the server with its own Host."""
    response = client.post("/api/v1/check", json={"model": MODEL}, headers={"host": "attacker.example"})
    assert response.status_code == 400 and response.json()["detail"][0]["type"] == "host_refused"
    assert client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200


def test_a_cross_site_form_post_is_refused(client):
    """Any page the user visits can post a form to 127.0.0.1 (no preflight for forms)."""
    hostile = client.post("/", data={"config_json": json.dumps(SMALL)}, headers={"origin": "https://attacker.example"})
    assert hostile.status_code == 403 and hostile.json()["detail"][0]["type"] == "origin_refused"
    same_site = client.post("/", data={"model": MODEL, "method": "qlora"}, headers={"origin": "http://testserver"})
    assert same_site.status_code == 200


def test_a_host_with_user_info_or_two_hosts_is_refused(client):
    """`evil.com@127.0.0.1:8000` parses as user info and 127.0.0.1; a proxy or cache may read the
    other half. Two Host headers: the app took the last, a proxy may take the first."""
    for host in ("evil.com@127.0.0.1:8000", "127.0.0.1:8000/x", "127.0.0.1 evil.com", "127.0.0.1:8000@evil.com"):
        response = client.get("/healthz", headers={"host": host})
        assert response.status_code == 400 and response.json()["detail"][0]["type"] == "host_refused", host
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host

    async def two_hosts():
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"", "scheme": "http",
                 "headers": [(b"host", b"evil.example"), (b"host", b"127.0.0.1")], "http_version": "1.1", "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8000), "root_path": "", "asgi": {"version": "3.0"}}
        await app(scope, receive, send)
        return sent[0]["status"]

    import asyncio

    assert asyncio.run(two_hosts()) == 400


def test_an_origin_of_another_scheme_is_another_site(client):
    hostile = client.post("/", data={"model": MODEL}, headers={"origin": "https://testserver"})  # this server is http
    assert hostile.status_code == 403 and hostile.json()["detail"][0]["type"] == "origin_refused"


def test_the_sign_in_page_that_shows_the_token_is_never_cached(client):
    page = client.get("/login", params={"token": "a-token-0123456789abcdef"})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"


# -- the build worker: deadline, memory, cache by bytes ------------------------------------------

def _worker_processes(builder: SpecBuilder) -> list:
    pool = builder._pool
    return list(getattr(pool, "_processes", {}).values()) if pool else []


def test_a_build_past_its_deadline_is_a_422_naming_the_limit_and_the_worker_is_replaced():
    builder = SpecBuilder(BuildLimits(timeout_s=0.2))  # the worker's first import alone takes longer
    text = json.dumps(SMALL)
    with pytest.raises(PlanInputError) as caught:
        builder.build(text)
    assert caught.value.field == "config_json" and "longer than the 0.2 s a build may take" in caught.value.reason
    assert _worker_processes(builder) == []  # killed, not left running
    started = time.monotonic()
    with pytest.raises(PlanInputError):  # the failure is cached: a repeat costs nothing
        builder.build(text)
    assert time.monotonic() - started < 0.1
    builder.shutdown()


def test_a_build_over_its_memory_is_a_422_naming_the_limit():
    builder = SpecBuilder(BuildLimits(memory_bytes=300 << 20))  # less than torch's own import maps
    with pytest.raises(PlanInputError) as caught:
        builder.build(json.dumps(SMALL))
    assert "0.3 GiB a build may use" in caught.value.reason
    builder.shutdown()


def test_the_config_cache_is_bounded_by_bytes():
    builder = SpecBuilder(BuildLimits(cache_bytes=6_000))
    texts = [json.dumps({**SMALL, "num_hidden_layers": layers}) for layers in (1, 2, 3, 4)]
    for text in texts:
        builder.build(text)
    assert 0 < builder.cache_bytes <= 6_000
    assert len(builder._cache) < len(texts)  # the oldest went
    builder.shutdown()


# -- nothing holds the event loop ----------------------------------------------------------------

@pytest.fixture()
def live_server(monkeypatch):
    """The real app under uvicorn, with a fresh build worker (cold: it must start and import torch)."""
    from app import service

    monkeypatch.setattr(service, "BUILDER", SpecBuilder())
    with serving(app) as base:
        yield base
    service.BUILDER.shutdown()


def test_health_and_plans_answer_while_a_hostile_config_is_built(live_server):
    # 1,000 layers pass every cap and take seconds to build (plus the cold worker's start)
    hostile = json.dumps({**SMALL, "num_hidden_layers": 1000})
    done = threading.Event()
    result = {}

    def post_hostile():
        result["response"] = httpx.post(f"{live_server}/api/v1/check", json={"config_json": hostile}, timeout=120)
        done.set()

    threading.Thread(target=post_hostile, daemon=True).start()
    time.sleep(0.3)
    latencies = []
    with httpx.Client(base_url=live_server, timeout=10) as client:
        while not done.is_set() and len(latencies) < 40:
            for request in (lambda: client.get("/healthz"), lambda: client.post("/api/v1/check", json={"model": MODEL, "method": "qlora"})):
                started = time.monotonic()
                assert request().status_code == 200
                latencies.append(time.monotonic() - started)
            time.sleep(0.05)
    assert len(latencies) >= 8, f"the hostile build finished after {len(latencies)} probes"
    assert statistics.median(latencies) < 0.1 and max(latencies) < 1.0, latencies
    done.wait(120)
    assert result["response"].status_code == 200


# -- quiet -------------------------------------------------------------------------------------

def test_planning_a_local_config_prints_nothing_on_stderr(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    run = subprocess.run([sys.executable, "-m", "app.cli", "check", str(tmp_path), "--gpu", "H100"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and run.stdout.startswith("fits") and run.stderr == ""


def test_api_docs_are_served_without_a_cdn(client):
    from app.main import SWAGGER_UI

    if not SWAGGER_UI.is_dir():
        pytest.skip("swagger-ui-dist not installed: run npm ci (CI does)")
    page = client.get("/docs").text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    script = client.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text[:200_000]
    assert client.get("/static/swagger-ui/../../package.json").status_code == 404


def test_distinct_target_lists_do_not_grow_a_catalog_spec_without_bound(client):
    from planner.catalog import load_catalog_spec
    from planner.spec import MAX_MEMO_ENTRIES

    import itertools

    spec = load_catalog_spec(MODEL)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # every ordering is a different list, and each plans: memo keys a client chooses
    for targets in itertools.islice(itertools.permutations(names, 4), MAX_MEMO_ENTRIES + 50):
        assert client.post("/api/v1/check", json={"model": MODEL, "lora_targets": list(targets)}).status_code == 200
    assert len(spec.__dict__["_memo"]) <= MAX_MEMO_ENTRIES


def test_only_plan_shapes_measured_quick_run_on_the_event_loop():
    from app.service import PlanRequest, QuickShapes

    shapes = QuickShapes()
    request = PlanRequest(model=MODEL, method="qlora")
    shape = shapes.shape(request)
    assert not shapes.is_quick(shape)  # never seen: a thread measures it first
    shapes.measured(shape, 0.05)
    assert not shapes.is_quick(shape)  # slow: stays on threads
    shapes.measured(shape, 0.0004)
    assert shapes.is_quick(shape)
    # the sizes do not change a plan's cost, the choices that pick tensors do
    assert shapes.shape(PlanRequest(model=MODEL, method="qlora", batch_size=8, seq_len=8192)) == shape
    assert shapes.shape(PlanRequest(model=MODEL, method="qlora", lora_targets=["q_proj"])) != shape
