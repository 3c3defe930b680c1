"""The runs API and pages behind the guard, with the fake backend (tests/fake_backend.py): the token
(401), cross-site requests (403), foreign Host names (400), a plan that does not fit the free memory
(409 with the numbers), Idempotency-Key, paths outside the roots, the live feed's replay after a
reconnect, cancel and resume, the queue, the security headers, signing in, and the launch flow's
forms. The app runs with its lifespan (the loop that follows runs), as `vramplan serve` runs it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import serving
from tests.served import BEARER, MODEL, TOKEN, client, root  # noqa: F401 (fixtures)

GIB = 1 << 30


def body(root: Path, **changes) -> dict:
    return {"model": MODEL, "dataset": str(root / "train.jsonl"), "device": "cpu", "backend": "fake", "max_steps": 6, **changes}


def wait_until(client, run_id: str, predicate, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/v1/runs/{run_id}", headers=BEARER).json()
        if predicate(run):
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id[:8]} never got there: {run}")


def finished(client, run_id: str) -> dict:
    return wait_until(client, run_id, lambda r: r["terminal"])


def events(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


def busy_gpu(monkeypatch, free_gib: float) -> None:
    from gpu_catalog import detect as detect_module

    gpu = detect_module.DetectedGPU(0, "NVIDIA H100 80GB HBM3", 80 * GIB, int(free_gib * GIB), int((80 - free_gib) * GIB), "9.0", None, "GPU-fake-0")
    monkeypatch.setattr(detect_module, "detect", lambda backend=None: detect_module.Detection(gpus=(gpu,), driver_version="580"))


# -- the guard ---------------------------------------------------------------------------------------


def test_runs_need_the_token_and_pages_send_you_to_sign_in(client, root):
    for method, path in (("GET", "/api/v1/runs"), ("POST", "/api/v1/runs"), ("POST", "/api/v1/runs/dry-run"), ("GET", "/api/v1/backends"),
                         ("GET", "/api/v1/runs/abcd/events"), ("POST", "/api/v1/runs/abcd/cancel"), ("POST", "/api/v1/runs/abcd/resume")):
        response = client.request(method, path, json=body(root))
        assert response.status_code == 401, (path, response.text)
        assert response.json()["detail"][0]["loc"] == ["header", "authorization"] and response.headers["www-authenticate"].startswith("Bearer")
    wrong = client.get("/api/v1/runs", headers={"Authorization": "Bearer not-the-token-at-all"})
    assert wrong.status_code == 401 and "wrong" in wrong.json()["detail"][0]["msg"]
    assert client.get("/api/v1/runs", headers=BEARER).json() == {"runs": []}
    page = client.get("/runs/abcd?x=1", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/runs/abcd%3Fx%3D1"
    # planning stays open
    assert client.post("/api/v1/check", json={"model": MODEL}).status_code == 200


def test_everything_needs_the_token_when_the_operator_says_so(client, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_AUTH", "all")
    assert client.post("/api/v1/check", json={"model": MODEL}).status_code == 401
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.post("/api/v1/check", json={"model": MODEL}, headers=BEARER).status_code == 200
    assert client.get("/healthz").status_code == 200 and client.get("/login").status_code == 200


def test_cross_site_posts_foreign_hosts_and_state_changing_gets_are_refused(client, root):
    evil = client.post("/api/v1/runs", json=body(root), headers={**BEARER, "Origin": "http://evil.example"})
    assert evil.status_code == 403 and evil.json()["detail"][0]["type"] == "origin_refused"
    sibling = client.post("/api/v1/runs", json=body(root), headers={**BEARER, "Sec-Fetch-Site": "same-site"})  # another port on localhost
    assert sibling.status_code == 403
    assert client.get("/api/v1/runs", headers={**BEARER, "Host": "attacker.example"}).status_code == 400
    assert client.get("/runs", headers={"Host": "rebound.example:8000"}).status_code == 400
    # GET never starts, stops or resumes anything: those routes take POST only
    for path in ("/api/v1/runs/abcd/cancel", "/api/v1/runs/abcd/resume", "/runs/abcd/cancel", "/launch/start"):
        assert client.get(path, headers=BEARER).status_code == 405, path


def test_a_signed_in_browser_must_prove_its_posts_come_from_this_server(client, root):
    page = client.get("/login", params={"token": TOKEN, "next": "/runs"})
    assert f'value="{TOKEN}"' in page.text  # the printed URL fills the form; signing in is a POST
    assert client.post("/login", data={"token": "wrong-token-0000000000", "next": "/runs"}).status_code == 401
    signed = client.post("/login", data={"token": TOKEN, "next": "//evil.example/x"}, follow_redirects=False)
    assert signed.status_code == 303 and signed.headers["location"] == "/runs"  # never off this server
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    assert client.get("/runs").status_code == 200 and client.get("/api/v1/runs").status_code == 200  # the cookie works for reads and SSE
    # a cookie-carrying POST with no Origin and no Sec-Fetch-Site could come from anywhere
    assert client.post("/api/v1/runs", json=body(root)).status_code == 403
    assert client.post("/api/v1/runs", json=body(root), headers={"Origin": "null"}).status_code == 403
    assert client.post("/api/v1/runs", json=body(root), headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    started = client.post("/api/v1/runs", json=body(root), headers={"Origin": "http://testserver"})
    assert started.status_code == 201
    same = client.post("/api/v1/runs", json=body(root), headers={"Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 201
    client.post("/logout", headers={"Origin": "http://testserver"})
    assert client.get("/api/v1/runs").status_code == 401


def test_every_response_carries_the_security_headers(client, root):
    responses = [client.get("/"), client.get("/runs", follow_redirects=False), client.get("/api/v1/runs"), client.get("/docs"),
                 client.post("/api/v1/plan", json={}), client.get("/", headers={"Host": "evil.example"}), client.get("/static/app.css")]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff" and response.headers["referrer-policy"] == "same-origin"
    assert client.get("/api/v1/runs", headers=BEARER).headers["cache-control"] == "no-store"
    # no page holds an inline script or style the policy would block
    for path in ("/", "/login", "/docs"):
        html = client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html and " style=" not in html, path


def test_the_token_is_made_once_owner_only_and_refused_when_others_can_read_it(tmp_path, monkeypatch):
    from app.auth import TokenError, read_or_create_token

    monkeypatch.delenv("VRAMPLAN_TOKEN", raising=False)
    token, created = read_or_create_token(tmp_path / "d")
    path = tmp_path / "d" / "token"
    assert created and len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert read_or_create_token(tmp_path / "d") == (token, False)
    os.chmod(path, 0o644)
    with pytest.raises(TokenError, match="other users"):
        read_or_create_token(tmp_path / "d")
    monkeypatch.setenv("VRAMPLAN_TOKEN", "short")
    with pytest.raises(TokenError, match="shorter"):
        read_or_create_token(tmp_path / "d")


# -- launching -------------------------------------------------------------------------------------


def test_launch_is_201_and_a_repeated_idempotency_key_returns_the_same_run(client, root):
    key = {**BEARER, "Idempotency-Key": "launch-1"}
    first = client.post("/api/v1/runs", json=body(root), headers=key)
    assert first.status_code == 201, first.text
    run = first.json()
    assert first.headers["location"] == f"/api/v1/runs/{run['id']}" and run["backend"] == "fake" and run["device"] == "cpu"
    again = client.post("/api/v1/runs", json=body(root), headers=key)
    assert again.status_code == 201 and again.json()["id"] == run["id"] and again.headers["idempotent-replayed"] == "true"
    other = client.post("/api/v1/runs", json=body(root, max_steps=7), headers=key)
    assert other.status_code == 422 and other.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert len(client.get("/api/v1/runs", headers=BEARER).json()["runs"]) == 1
    done = finished(client, run["id"])
    assert done["state"] == "succeeded" and done["last_step"] == 6
    # the fake reports memory near the plan's peak: measured beside predicted, with the error
    assert done["measured_peak_bytes"] > 0 and abs(done["error_pct"]) < 10
    metrics = client.get(f"/api/v1/runs/{run['id']}/metrics", params={"after_step": 3}, headers=BEARER).json()["metrics"]
    assert [m["step"] for m in metrics] == [4, 5, 6] and all(m["loss"] > 0 for m in metrics)
    log = client.get(f"/api/v1/runs/{run['id'][:8]}/logs", params={"offset": 0, "limit": 22}, headers=BEARER).json()
    assert log["text"] == "step 1/6: loss 1.5385\n" and log["next_offset"] == 22 and not log["eof"]
    download = client.get(f"/api/v1/runs/{run['id']}/logs", params={"download": "true"}, headers=BEARER)
    assert download.text.count("\n") == 6 and "attachment" in download.headers["content-disposition"]


def test_dry_run_shows_files_command_and_admission_and_starts_nothing(client, root):
    dry = client.post("/api/v1/runs/dry-run", json=body(root), headers=BEARER)
    assert dry.status_code == 200, dry.text
    data = dry.json()
    assert "spec.json" in data["files"] and data["argv"][0] == "fake-trainer" and data["admission"]["ok"]
    assert data["plan"]["verdict"] in ("fits", "tight", "does not fit") and data["predicted_peak_bytes"] == data["plan"]["peak_bytes"]
    assert client.get("/api/v1/runs", headers=BEARER).json()["runs"] == []
    assert not Path(data["run_dir"]).exists()


def test_a_plan_that_does_not_fit_the_free_memory_is_409_with_the_numbers(client, root, monkeypatch):
    busy_gpu(monkeypatch, free_gib=1.0)
    refused = client.post("/api/v1/runs", json=body(root, device="cuda"), headers=BEARER)
    assert refused.status_code == 409, refused.text
    data = refused.json()
    assert data["detail"][0]["type"] == "does_not_fit" and "1.00 GiB free" in data["detail"][0]["msg"]
    assert data["admission"]["free_bytes"] == [GIB] and data["admission"]["needed_bytes"] == data["predicted_high_bytes"] > GIB
    assert client.get("/api/v1/runs", headers=BEARER).json()["runs"] == []
    forced = client.post("/api/v1/runs", json=body(root, device="cuda", force=True), headers=BEARER)
    assert forced.status_code == 201 and forced.json()["gpu_uuids"] == ["GPU-fake-0"]


def test_a_queued_run_waits_for_memory_then_the_app_starts_it(client, root, monkeypatch):
    busy_gpu(monkeypatch, free_gib=1.0)
    queued = client.post("/api/v1/runs", json=body(root, device="cuda", queue=True), headers=BEARER).json()
    assert queued["state"] == "queued" and queued["queue_position"] == 1 and "1.00 GiB free" in queued["message"]
    time.sleep(0.6)
    assert client.get(f"/api/v1/runs/{queued['id']}", headers=BEARER).json()["state"] == "queued"
    busy_gpu(monkeypatch, free_gib=70.0)  # the memory comes free: the app's loop admits it
    assert finished(client, queued["id"])["state"] == "succeeded"


def test_cancel_keeps_a_checkpoint_and_resume_continues_from_it(client, root):
    run = client.post("/api/v1/runs", json=body(root, max_steps=400, step_sleep_s=0.05), headers=BEARER).json()
    wait_until(client, run["id"], lambda r: (r["last_step"] or 0) >= 2)
    cancelled = client.post(f"/api/v1/runs/{run['id']}/cancel", headers=BEARER)
    assert cancelled.status_code == 200 and cancelled.json()["state"] in ("cancelling", "cancelled")
    done = finished(client, run["id"])
    assert done["state"] == "cancelled" and done["reason"] == "cancelled_by_user" and done["last_step"] < 400
    assert (Path(done["output_dir"]) / f"checkpoint-{done['last_step']}").is_dir()
    resumed = client.post(f"/api/v1/runs/{run['id']}/resume", headers=BEARER)
    assert resumed.status_code == 201, resumed.text
    again = resumed.json()
    assert again["attempt"] == 2 and again["resumed_from_run_id"] == run["id"]
    client.post(f"/api/v1/runs/{again['id']}/cancel", headers=BEARER)
    finished(client, again["id"])
    succeeded = client.post("/api/v1/runs", json=body(root, max_steps=2), headers=BEARER).json()
    finished(client, succeeded["id"])
    nothing = client.post(f"/api/v1/runs/{succeeded['id']}/resume", json={"force": False}, headers=BEARER)
    assert nothing.status_code == 409 and "nothing to resume" in nothing.json()["detail"][0]["msg"]
    assert client.get("/api/v1/runs/ffffffff", headers=BEARER).status_code == 404


def test_paths_outside_the_roots_are_refused(client, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("{}\n")
    (root / "link.jsonl").symlink_to(outside / "secret.jsonl")
    for changes, field in (
        ({"dataset": "../outside/secret.jsonl"}, "dataset"),
        ({"dataset": str(outside / "secret.jsonl")}, "dataset"),
        ({"dataset": str(root / "link.jsonl")}, "dataset"),  # a symlink is followed, then held to the roots
        ({"dataset": "/etc/passwd"}, "dataset"),
        ({"output_dir": str(outside / "out")}, "output_dir"),
        ({"output_dir": "../../elsewhere"}, "output_dir"),
        ({"model": "/etc"}, "model"),
        ({"model": "../outside"}, "model"),
        ({"stage": "grpo", "reward_model": str(outside)}, "reward_model"),
    ):
        response = client.post("/api/v1/runs", json=body(root, **changes), headers=BEARER)
        assert response.status_code == 422, (changes, response.text)
        assert response.json()["detail"][0]["loc"] == ["body", field], (changes, response.json())
    # a backend is named from the registry with bounded options; a command never is
    bad = client.post("/api/v1/runs", json=body(root, backend="../../bin/sh"), headers=BEARER)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "backend"
    unknown = client.post("/api/v1/runs", json=body(root, backend="nosuch"), headers=BEARER)
    assert unknown.status_code == 422 and "no backend named" in unknown.json()["detail"][0]["msg"]
    extra = client.post("/api/v1/runs", json=body(root, backend_options={"command": "rm -rf /"}), headers=BEARER)
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "backend_options"]
    assert client.post("/api/v1/runs", json={**body(root), "argv": ["sh"]}, headers=BEARER).status_code == 422
    assert client.get("/api/v1/runs/..%2F..%2Fetc/logs", headers=BEARER).status_code in (404, 422)
    assert client.get("/api/v1/runs", headers=BEARER).json()["runs"] == []


# -- the live feed ---------------------------------------------------------------------------------


def test_the_event_feed_replays_from_last_event_id(client, root):
    run = client.post("/api/v1/runs", json=body(root), headers=BEARER).json()
    finished(client, run["id"])
    whole = events(client.get(f"/api/v1/runs/{run['id']}/events", headers=BEARER).text)
    kinds = [e["event"] for e in whole]
    assert kinds[-1] == "end" and whole[-1]["data"]["state"] == "succeeded"
    assert [e["data"]["step"] for e in whole if e["event"] == "metric"] == [1, 2, 3, 4, 5, 6]
    assert [e["data"]["to_state"] for e in whole if e["event"] == "state"] == ["queued", "starting", "running", "succeeded"]
    # reconnect after the third metric: the rest, nothing twice, nothing missed
    cut = next(i for i, e in enumerate(whole) if e["event"] == "metric" and e["data"]["step"] == 3)
    rest = events(client.get(f"/api/v1/runs/{run['id']}/events", headers={**BEARER, "Last-Event-ID": whole[cut]["id"]}).text)
    assert [e["data"]["step"] for e in rest if e["event"] == "metric"] == [4, 5, 6]
    assert "".join(e["data"]["text"] for e in whole if e["event"] == "log") == "".join(e["data"]["text"] for e in whole[:cut + 1] if e["event"] == "log") + "".join(e["data"]["text"] for e in rest if e["event"] == "log")
    # after the last event there is nothing left but the end
    assert [e["event"] for e in events(client.get(f"/api/v1/runs/{run['id']}/events", headers={**BEARER, "Last-Event-ID": whole[-1]["id"]}).text)] == ["end"]
    assert client.get(f"/api/v1/runs/{run['id']}/events", headers={**BEARER, "Last-Event-ID": "nonsense"}).status_code == 422


@pytest.fixture
def live_server(root):
    from app.main import create_app

    with serving(create_app()) as url:
        yield url


def test_a_client_that_drops_mid_run_gets_the_rest_on_reconnect(live_server, root):
    with httpx.Client(base_url=live_server, headers=BEARER, timeout=30) as http:
        run = http.post("/api/v1/runs", json=body(root, max_steps=12, step_sleep_s=0.15)).json()
        seen, last_id = [], None
        with http.stream("GET", f"/api/v1/runs/{run['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            block = []
            for line in stream.iter_lines():
                if line:
                    block.append(line)
                    continue
                parsed = events("\n".join(block))
                block = []
                for event in parsed:
                    seen.append(event)
                    last_id = event["id"]
                if sum(e["event"] == "metric" for e in seen) >= 3:
                    break  # the connection drops while the run goes on
        assert not seen[-1]["data"].get("terminal", False)
        rest = events(http.get(f"/api/v1/runs/{run['id']}/events", headers={"Last-Event-ID": last_id}).text)
    steps = [e["data"]["step"] for e in seen + rest if e["event"] == "metric"]
    assert steps == list(range(1, 13)) and rest[-1]["event"] == "end"


# -- the pages -------------------------------------------------------------------------------------


def sign_in(client) -> None:
    assert client.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False).status_code == 303


ORIGIN = {"Origin": "http://testserver"}


def test_the_plan_page_says_why_it_cannot_launch(client, root, monkeypatch):
    page = client.get("/", params={"model": MODEL, "method": "lora"}).text
    assert 'id="launch-sign-in"' in page and "Sign in to launch this plan" in page
    sign_in(client)
    assert 'id="launch-form"' in client.get("/", params={"model": MODEL, "method": "lora"}).text
    for params, why in (({"model": "meta-llama/Llama-3.1-70B", "method": "full", "gpu": "RTX 4090"}, "It does not fit"),
                        ({"model": MODEL, "stage": "ppo"}, "ppo cannot be launched"),
                        ({"model": MODEL, "method": "freeze"}, "freeze is planned but not launched")):
        page = client.get("/", params=params).text
        assert 'id="launch-form"' not in page and why in page, params
    from importlib import metadata

    from launcher import registry

    broken = metadata.EntryPoint(name="broken", value="no_such_vramplan_plugin:Backend", group=registry.GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: {"broken": broken})
    page = client.get("/", params={"model": MODEL, "method": "qlora", "gpu": "L4"}).text
    assert "No backend can run it here" in page and "no_such_vramplan_plugin" in page


def test_the_launch_forms_dry_run_then_start_then_the_run_page(client, root):
    sign_in(client)
    form = {"model": MODEL, "method": "lora", "dataset": str(root / "train.jsonl"), "max_steps": "5", "backend": "fake", "device": "cpu"}
    dry = client.post("/launch", data=form, headers=ORIGIN)
    assert dry.status_code == 200, dry.text
    assert 'data-ok="true"' in dry.text and "fake-trainer" in dry.text and "spec.json" in dry.text and 'id="start-run"' in dry.text
    key = re.search(r'name="idempotency_key" value="([^"]+)"', dry.text).group(1)
    assert client.get("/api/v1/runs", headers=BEARER).json()["runs"] == []  # the dry run started nothing
    started = client.post("/launch/start", data={**form, "idempotency_key": key}, headers=ORIGIN, follow_redirects=False)
    assert started.status_code == 303 and started.headers["location"].startswith("/runs/")
    twice = client.post("/launch/start", data={**form, "idempotency_key": key}, headers=ORIGIN, follow_redirects=False)
    assert twice.headers["location"] == started.headers["location"]  # a double click starts one run
    run_id = started.headers["location"].rsplit("/", 1)[1]
    finished(client, run_id)
    page = client.get(f"/runs/{run_id}").text
    assert 'data-state="succeeded"' in page and 'id="loss-chart"' in page and "<circle" in page
    assert "measured peak" in page and "predicted" in page and 'id="prediction-error"' in page
    assert 'http-equiv="refresh"' not in page  # an ended run does not reload itself
    listing = client.get("/runs").text
    assert run_id[:8] in listing and "succeeded" in listing
    # without the token a form post goes nowhere; with a bad field it says which
    bad = client.post("/launch", data={**form, "dataset": "/etc/passwd"}, headers=ORIGIN)
    assert bad.status_code == 422 and "outside the directories" in bad.text


def test_a_live_run_page_updates_by_events_or_reloads_without_javascript(client, root):
    sign_in(client)
    run = client.post("/api/v1/runs", json=body(root, max_steps=400, step_sleep_s=0.05), headers=BEARER).json()
    wait_until(client, run["id"], lambda r: r["state"] == "running")
    page = client.get(f"/runs/{run['id']}").text
    assert 'sse-connect="/api/v1/runs/' in page and 'hx-trigger="sse:update"' in page and 'sse-close="end"' in page
    assert '<noscript><meta http-equiv="refresh"' in page  # and without JavaScript: a reload every few seconds
    assert '<script src="/static/htmx-ext-sse.js"' in page
    assert client.get("/static/htmx-ext-sse.js").status_code == 200
    cancel = client.post(f"/runs/{run['id']}/cancel", headers=ORIGIN, follow_redirects=False)
    assert cancel.status_code == 303
    finished(client, run["id"])
    assert 'id="resume-run"' in client.get(f"/runs/{run['id']}").text


def test_serve_makes_the_token_at_first_start_and_prints_the_sign_in_url(tmp_path):
    import signal
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "VRAMPLAN_TOKEN"}
    env.update({"HF_HUB_OFFLINE": "1", "VRAMPLAN_DATA_DIR": str(tmp_path / "data")})
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", "0"], stdout=subprocess.DEVNULL, stderr=err,
                                env=env, start_new_session=True)
        try:
            deadline, match = time.monotonic() + 60, None
            while match is None and time.monotonic() < deadline:
                err.seek(0)
                match = re.search(r"sign in at (http://127\.0\.0\.1:(\d+))/login\?token=(\S+) \(the token was made now", err.read())
                assert proc.poll() is None
                time.sleep(0.1)
            assert match, "no sign-in line"
            base, token = match.group(1), match.group(3)
            path = tmp_path / "data" / "token"
            assert path.read_text().strip() == token and stat.S_IMODE(path.stat().st_mode) == 0o600
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert httpx.get(f"{base}/api/v1/runs").status_code == 401
            assert httpx.get(f"{base}/api/v1/runs", headers={"Authorization": f"Bearer {token}"}).json() == {"runs": []}
            assert f'value="{token}"' in httpx.get(f"{base}/login", params={"token": token}).text
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


def test_the_runs_pages_link_their_json_twin_which_a_signed_in_browser_can_open(client, root):
    sign_in(client)
    run_id = client.post("/api/v1/runs", json=body(root), headers=BEARER).json()["id"]
    finished(client, run_id)
    page = client.get(f"/runs/{run_id}").text
    link = re.search(r'id="json-link" href="([^"]+)"', page).group(1)
    assert link == f"/api/v1/runs/{run_id}"
    twin = client.get(link)  # the browser's cookie, no Bearer header
    assert twin.status_code == 200 and twin.json() == client.get(link, headers=BEARER).json() and twin.json()["state"] == "succeeded"
    listing = re.search(r'id="json-link" href="([^"]+)"', client.get("/runs").text).group(1)
    assert run_id in [r["id"] for r in client.get(listing).json()["runs"]]


def test_the_launch_page_dry_run_shows_the_advices_settings_as_fields_and_keeps_a_given_one(client, root):
    sign_in(client)
    form = {"model": MODEL, "method": "lora", "dataset": str(root / "train.jsonl"), "max_steps": "5", "backend": "fake", "device": "cpu"}
    dry = client.post("/launch", data=form, headers=ORIGIN)
    assert dry.status_code == 200, dry.text
    assert re.search(r'id="dry-advised">Settings from the advice for lora sft: learning_rate 0.0002', dry.text)
    fields = dict(re.findall(r'<input id="l-[a-z_]+" name="([a-z_]+)" inputmode="decimal" value="([^"]*)"', dry.text))
    assert fields["learning_rate"] == "0.0002" and fields["gradient_accumulation_steps"] == "16" and fields["lora_alpha"] == "32"
    assert re.search(r'name="lr_scheduler_type">.*<option value="cosine" selected>', dry.text)
    assert "&#34;learning_rate&#34;: 0.0002" in dry.text  # the spec.json shown carries it
    # an edited field is the user's: kept, and no longer called the advice's
    again = client.post("/launch", data={**form, "learning_rate": "5e-5", "gradient_accumulation_steps": "4"}, headers=ORIGIN)
    assert again.status_code == 200, again.text
    assert "&#34;learning_rate&#34;: 0.00005" in again.text and "&#34;gradient_accumulation_steps&#34;: 4" in again.text
    assert "learning_rate 0.0002" not in again.text and again.text.count('name="gradient_accumulation_steps"') == 1


def test_a_web_launch_names_the_model_as_the_cli_does(client, root, tiny_run):
    import shutil

    model = root / "tiny"
    shutil.copytree(tiny_run["model"], model)
    run = client.post("/api/v1/runs", json=body(root, model=str(model), method="lora"), headers=BEARER)
    assert run.status_code == 201, run.text
    assert run.json()["model"] == str(model.resolve())  # the full path, not the config's model type ("llama")
    finished(client, run.json()["id"])
    sign_in(client)  # the runs page is the signed-in browser's
    assert str(model.resolve()) in client.get("/runs").text.replace("<wbr>", "")


def test_a_live_run_page_says_when_it_has_lost_the_server(client, root):
    """The feed's error (htmx's SSE extension fires htmx:sseError) shows a note over the stale state;
    its reopening hides it. Without JavaScript the page reloads itself instead."""
    sign_in(client)
    run = client.post("/api/v1/runs", json=body(root, max_steps=400, step_sleep_s=0.05), headers=BEARER).json()
    wait_until(client, run["id"], lambda r: r["state"] == "running")
    page = client.get(f"/runs/{run['id']}").text
    note = re.search(r'<p id="run-connection"[^>]*>([^<]*)</p>', page)
    assert note and " hidden" in note.group(0) and "Connection to the server lost — retrying" in note.group(1)
    assert re.search(r'<script src="/static/run-live.js\?v=\w+" defer>', page)
    script = client.get("/static/run-live.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "htmx:sseError" in script.text and "htmx:sseOpen" in script.text and "run-connection" in script.text
    client.post(f"/runs/{run['id']}/cancel", headers=ORIGIN, follow_redirects=False)
    finished(client, run["id"])


def test_the_loss_chart_is_drawn_right_of_its_axis_labels_which_stay_on_top():
    from app.charts import X_LEFT, loss_chart_svg, memory_chart_svg

    svg = loss_chart_svg([(1, 2.31), (2, 2.2), (3, 1.4)], total_steps=300)
    xs = [float(x) for x in re.findall(r'(?:x1|x2|cx)="([\d.]+)%"', svg)]
    assert xs and min(xs) >= X_LEFT >= 6  # the curve starts right of labels like "2.25"
    labels = [m.start() for m in re.finditer(r'class="y-label"', svg)]
    assert labels and min(labels) > svg.index("<circle")  # drawn after the curve: never under it
    assert 'paint-order="stroke"' in svg
    memory = memory_chart_svg([(1, 3 << 30)], 4 << 30, 3 << 30, 5 << 30, None, None, total_steps=10)
    assert memory.index('class="y-label"') > memory.index("<circle")
