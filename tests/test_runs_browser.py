"""Launching from the browser (Playwright with Debian's Chromium, as tests/test_browser.py): sign in
with the printed URL, plan a tiny local model, "Launch this plan", the dry run, start, and the run
page following the run by server-sent events to `succeeded` with its loss chart and the measured
memory against the prediction; cancel a second run; the same forms with JavaScript off; the
phone-width page; and no Content-Security-Policy violation anywhere (htmx, its SSE extension and
Swagger UI all run under it). The fake backend (tests/fake_backend.py) plays the trainer, slowly
enough to watch. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests import fake_backend
from tests.conftest import TINY
from tests.live_server import serving

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# one pytest-xdist worker runs the whole file: the phone-width test reads the run an earlier test of this file finished, and the file shares one server and browser
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)"),
              pytest.mark.xdist_group("runs_browser")]
ARTIFACTS = Path(__file__).parent / "artifacts"
AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"
TOKEN = "browser-token-0123456789abcdef"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs-browser")
    root = base / "root"
    model = root / "tiny-llama"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({**TINY["llama"], "_name_or_path": "acme/tiny-llama", "architectures": ["LlamaForCausalLM"]}))
    (model / "model.safetensors").write_bytes(b"fake weights: the fake backend never loads them")
    (root / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    patch = pytest.MonkeyPatch()
    for name, value in (("VRAMPLAN_DATA_DIR", str(base / "data")), ("VRAMPLAN_ROOTS", str(root)), ("VRAMPLAN_TOKEN", TOKEN),
                        ("VRAMPLAN_FAKE_STEP_S", "0.12")):
        patch.setenv(name, value)
    patch.delenv("VRAMPLAN_AUTH", raising=False)
    fake_backend.register(patch)
    from app.main import create_app

    with serving(create_app()) as url:
        yield {"url": url, "root": root, "model": model}
    patch.undo()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def watch_console(page) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" or "Content Security Policy" in m.text else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    return problems


def sign_in(page, site, next_path: str) -> None:
    # the URL `vramplan serve` prints fills the token in; signing in is a click (a POST)
    page.goto(f"{site['url']}/login?" + urlencode({"token": TOKEN, "next": next_path}))
    page.click("#login-submit")
    page.wait_for_load_state()


def plan_path(site) -> str:
    return "/?" + urlencode({"model": str(site["model"]), "method": "lora", "gpu": "NVIDIA H100 80GB HBM3", "seq_len": "256"})


def launch_from_the_plan_page(page, site, steps: int) -> None:
    # the local model, planned and named by its directory, as the CLI and a launch name it (not by
    # the config's _name_or_path)
    assert page.locator("#model-name").inner_text().replace("\n", "") == str(site["model"].resolve())
    assert "Fits" in page.locator("#verdict").inner_text()
    page.click("#launch-details summary")
    page.fill("#l-dataset", str(site["root"] / "train.jsonl"))
    page.fill("#l-max_steps", str(steps))
    page.select_option("#l-backend", "fake")
    page.select_option("#l-device", "cpu")
    page.click("#launch-dry-run")
    page.wait_for_selector("#admission")
    assert page.get_attribute("#admission", "data-ok") == "true"
    assert "fake-trainer" in page.locator("#dry-command").inner_text() and page.locator("details.file").count() >= 1
    page.click("#start-run")
    page.wait_for_url(re.compile(r"/runs/[0-9a-f]{32}$"))


def test_launch_from_the_plan_page_and_watch_the_run_succeed(site, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems = watch_console(page)
    sign_in(page, site, plan_path(site))
    page.wait_for_function("() => window.htmx !== undefined", timeout=10_000)
    launch_from_the_plan_page(page, site, steps=20)
    first_state = page.get_attribute("#run-state", "data-state")
    page.evaluate("window.sameDocument = true")
    page.wait_for_selector("#run-state[data-state=succeeded]", timeout=60_000)
    # the page followed the run by server-sent events: it was never reloaded
    assert first_state != "succeeded" and page.evaluate("window.sameDocument === true")
    assert page.locator("#run-step").inner_text() == "20/20"
    assert page.locator("#loss-chart svg line").count() >= 19 and page.locator("#loss-chart svg circle").count() == 20
    memory = page.locator("#memory-chart svg").text_content()
    assert "predicted" in memory and re.search(r"measured peak [\d.]+ GiB: the prediction is [\d.]+% (above|below) it", memory), memory
    assert re.fullmatch(r"[+-]\d+\.\d% \((over|under)-predicted\)", page.locator("#prediction-error").inner_text())
    assert [li.split(" → ")[-1] for li in page.locator("#timeline li").all_inner_texts()] == ["queued", "starting", "running", "succeeded"]
    assert "step 20/20" in page.locator("#log-tail").inner_text()
    page.screenshot(path=str(ARTIFACTS / "run-succeeded-1280.png"), full_page=True)
    page.goto(f"{site['url']}/runs")
    assert page.locator("#runs tr[data-state=succeeded]").count() >= 1
    page.goto(f"{site['url']}/docs")  # Swagger UI runs under the policy too
    page.wait_for_selector(".swagger-ui .info .title", timeout=15_000)
    assert not problems, problems
    page.close()


def test_cancel_a_second_run_from_its_page(site, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems = watch_console(page)
    sign_in(page, site, "/runs")
    body = {"model": str(site["model"]), "dataset": str(site["root"] / "train.jsonl"), "device": "cpu", "backend": "fake",
            "max_steps": 1000, "step_sleep_s": 0.2, "seq_len": 256}
    created = page.request.post(f"{site['url']}/api/v1/runs", data=json.dumps(body),
                                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert created.status == 201, created.text()
    run_id = created.json()["id"]
    page.goto(f"{site['url']}/runs/{run_id}")
    page.wait_for_selector("#run-state[data-state=running]", timeout=20_000)
    page.click("#cancel-run")
    page.wait_for_selector("#run-state[data-state=cancelled]", timeout=20_000)
    assert "cancelled by user" in page.locator("#run-state").inner_text()
    assert page.locator("#resume-run").count() == 1  # it left a checkpoint
    assert not problems, problems
    page.close()


def test_the_same_flow_works_without_javascript(site, browser):
    context = browser.new_context(java_script_enabled=False, viewport=PHONE)
    page = context.new_page()
    sign_in(page, site, plan_path(site))
    launch_from_the_plan_page(page, site, steps=400)
    assert page.get_attribute("#run-state", "data-state") in ("queued", "starting", "running")
    # no events without JavaScript: the page reloads itself while the run is live
    assert page.locator("head meta[http-equiv=refresh]").count() == 1
    page.click("#cancel-run")
    page.wait_for_load_state()
    assert page.get_attribute("#run-state", "data-state") in ("cancelling", "cancelled")
    page.screenshot(path=str(ARTIFACTS / "run-no-js-390.png"), full_page=True)
    context.close()


def test_run_pages_at_phone_width_are_readable_and_pass_axe(site, browser):
    # axe goes in as an inline script, which the pages' Content-Security-Policy refuses: bypassed for the check only
    context = browser.new_context(viewport=PHONE, bypass_csp=True)
    page = context.new_page()
    sign_in(page, site, "/runs")
    run_id = page.locator("#runs tr[data-state=succeeded] a").first.get_attribute("href").rsplit("/", 1)[1]
    for path in ("/runs", f"/runs/{run_id}", "/login"):
        page.goto(site["url"] + path)
        page.wait_for_load_state()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
        if path.startswith("/runs/"):
            heights = page.eval_on_selector_all("#run-live figure svg text", "ts => ts.map(t => t.getBoundingClientRect().height)")
            assert heights and min(heights) >= 11, heights  # chart text stays readable at 390 px
            page.screenshot(path=str(ARTIFACTS / "run-390.png"), full_page=True)
        if AXE.is_file():
            page.add_script_tag(path=str(AXE))
            violations = page.evaluate("async () => (await axe.run()).violations.filter(v => ['serious', 'critical'].includes(v.impact))"
                                       ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))")
            assert not violations, (path, violations)
    context.close()


def test_a_bad_dataset_launch_says_the_file_and_line_and_starts_nothing(site, browser):
    """The launch's preflight (launcher/preflight.py) reads the dataset before anything starts: a
    malformed line is the form's error, with the file, the line and the fix, and no run is made."""
    bad = site["root"] / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + '{"messages": [{"role": "user", "content": "oops"}\n')
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems = watch_console(page)
    sign_in(page, site, plan_path(site))
    runs_before = page.request.get(f"{site['url']}/api/v1/runs", headers={"Authorization": f"Bearer {TOKEN}"}).json()["runs"]
    page.click("#launch-details summary")
    page.fill("#l-dataset", str(bad))
    page.fill("#l-max_steps", "5")
    page.select_option("#l-backend", "fake")
    page.select_option("#l-device", "cpu")
    page.click("#launch-dry-run")
    page.wait_for_selector(".errors")
    error = page.locator(".errors").inner_text()
    assert f"{bad.name} line 2" in error and "not JSON" in error, error
    # nothing was prepared or started: no dry run, no start button, no run stored
    assert page.locator("#admission").count() == 0 and page.locator("#start-run").count() == 0
    assert page.input_value("#l-dataset") == str(bad)  # the form keeps what was typed, to fix it
    runs_after = page.request.get(f"{site['url']}/api/v1/runs", headers={"Authorization": f"Bearer {TOKEN}"}).json()["runs"]
    assert len(runs_after) == len(runs_before)
    page.screenshot(path=str(ARTIFACTS / "launch-bad-dataset.png"), full_page=True)
    assert not [p for p in problems if "422" not in p], problems  # the 422 itself is the browser's console line
    page.close()


SERVER_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import pytest
import uvicorn
from tests import fake_backend
fake_backend.register(pytest.MonkeyPatch())
from app.main import create_app
uvicorn.run(create_app(), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def test_the_run_page_says_when_it_has_lost_the_server(site, browser, tmp_path):
    """Start a run, kill the server: the live page says "Connection to the server lost — retrying"
    and greys the state it last received, instead of showing "running · step N/M" as if current."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VRAMPLAN_DATA_DIR": str(tmp_path / "data"), "VRAMPLAN_ROOTS": str(site["root"]), "VRAMPLAN_TOKEN": TOKEN,
           "VRAMPLAN_FAKE_STEP_S": "0.2"}
    server = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(Path(__file__).resolve().parent.parent), str(port)],
                              env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        deadline = time.time() + 60
        while True:
            try:
                if page.request.get(f"{url}/healthz").ok:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert server.poll() is None and time.time() < deadline, server.stderr.read() if server.poll() is not None else "no answer"
            time.sleep(0.3)
        sign_in(page, {"url": url}, "/runs")
        body = {"model": str(site["model"]), "dataset": str(site["root"] / "train.jsonl"), "device": "cpu", "backend": "fake",
                "max_steps": 1000, "step_sleep_s": 0.2, "seq_len": 256}
        created = page.request.post(f"{url}/api/v1/runs", data=json.dumps(body),
                                    headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert created.status == 201, created.text()
        page.goto(f"{url}/runs/{created.json()['id']}")
        page.wait_for_selector("#run-state[data-state=running]", timeout=30_000)
        page.wait_for_function("() => Number(document.querySelector('#run-step').innerText.split('/')[0]) >= 2", timeout=30_000)
        assert page.locator("#run-connection").is_hidden()
        page.evaluate("window.sameDocument = true")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        page.wait_for_selector("#run-connection", state="visible", timeout=20_000)
        assert "Connection to the server lost — retrying" in page.locator("#run-connection").inner_text()
        # the stale state is marked as such, on the same page (nothing reloaded it)
        assert "lost" in page.get_attribute("#run-feed", "class") and page.evaluate("window.sameDocument === true")
        assert page.evaluate("getComputedStyle(document.querySelector('#run-state')).opacity") != "1"
        page.screenshot(path=str(ARTIFACTS / "run-server-lost.png"), full_page=True)
        page.close()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
