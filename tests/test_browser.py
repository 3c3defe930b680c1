"""The pages in a real browser: Playwright for Python driving Debian's Chromium, headless,
against the app served by uvicorn on 127.0.0.1. Skipped (with the reason) where no Chromium is
installed; .ci/run installs it with apt. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
ARTIFACTS = Path(__file__).parent / "artifacts"
MODEL = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from app.main import app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _verdict(page) -> str:
    return page.locator("#verdict").inner_text()


def test_form_updates_the_verdict_when_the_gpu_changes(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    page.goto(f"{server}/?" + urlencode({"model": MODEL, "method": "qlora", "gpu": "NVIDIA H100 80GB HBM3"}))
    page.wait_for_function("window.htmx !== undefined", timeout=10_000)
    assert "Fits" in _verdict(page) and "Does not" not in _verdict(page)
    page.select_option("#f-method", "full")
    page.select_option("#f-gpu", "NVIDIA GeForce RTX 4090")
    page.wait_for_function("document.querySelector('#verdict').innerText.includes('Does not fit')", timeout=15_000)
    assert "RTX 4090" in _verdict(page)
    # htmx pushed the state into the URL: the address is shareable
    assert "method=full" in page.url and "RTX" in page.url
    # typing updates the result too (debounced): the plan now uses the typed sequence length
    assert "seq len 2048, not given" in page.locator("#result").inner_text()
    page.fill("#f-seq_len", "8192")
    page.wait_for_function("location.search.includes('seq_len=8192')", timeout=15_000)
    page.wait_for_function("!document.querySelector('#result').innerText.includes('seq len 2048, not given')", timeout=15_000)
    page.screenshot(path=str(ARTIFACTS / "form-does-not-fit.png"), full_page=True)
    shared = browser.new_page()
    shared.goto(page.url)
    assert "Does not fit" in _verdict(shared)
    shared.close()
    page.close()


def test_pages_work_with_javascript_disabled(server, browser):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 390, "height": 1600})
    page = context.new_page()
    page.goto(f"{server}/?" + urlencode({"model": MODEL, "method": "qlora", "gpu": "NVIDIA H100 80GB HBM3"}))
    assert "Fits" in _verdict(page)
    page.select_option("#f-gpu", "NVIDIA GeForce RTX 3080")
    page.select_option("#f-method", "full")
    page.click("#plan-form button[type=submit]")
    page.wait_for_load_state()
    assert "Does not fit" in _verdict(page) and "method=full" in page.url
    page.screenshot(path=str(ARTIFACTS / "phone-no-js.png"), full_page=True)
    # the phone-width page does not scroll sideways
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.goto(f"{server}/compare?" + urlencode({"model": MODEL, "gpu": "RTX 4090"}))
    assert page.locator("#compare svg").count() == 4
    context.close()
