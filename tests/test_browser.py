"""The pages in a real browser: Playwright for Python driving Debian's Chromium, headless,
against the app served by uvicorn on 127.0.0.1. Skipped (with the reason) where no Chromium is
installed; .ci/run installs it with apt. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlparse

import pytest

from tests.live_server import serving

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# one pytest-xdist worker runs the whole file: the file shares one server and browser
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)"),
              pytest.mark.xdist_group("browser")]
ARTIFACTS = Path(__file__).parent / "artifacts"
MODEL = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def server():
    from app.main import app

    with serving(app) as url:
        yield url


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
    # predicates are functions: an expression string would be eval'd in the page, which its CSP refuses
    page.wait_for_function("() => window.htmx !== undefined", timeout=10_000)
    assert "Fits" in _verdict(page) and "Does not" not in _verdict(page)
    page.evaluate("window.liveVerdict = document.querySelector('#verdict')")
    page.select_option("#f-method", "full")
    page.select_option("#f-gpu", "NVIDIA GeForce RTX 4090")
    page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('Does not fit')", timeout=15_000)
    assert "RTX 4090" in _verdict(page)
    # the live region is the element that was there, its text changed: a screen reader announces
    # that, where a live region swapped in whole may go unsaid
    assert page.evaluate("window.liveVerdict === document.querySelector('#verdict') && liveVerdict.getAttribute('aria-live') === 'polite'")
    # htmx pushed the state into the URL: the address is shareable
    assert "method=full" in page.url and "RTX" in page.url
    # typing updates the result too (debounced): the plan now uses the typed sequence length
    assert "seq len 2048, not given" in page.locator("#result").inner_text()
    page.fill("#f-seq_len", "8192")
    page.wait_for_function("() => location.search.includes('seq_len=8192')", timeout=15_000)
    page.wait_for_function("() => !document.querySelector('#result').innerText.includes('seq len 2048, not given')", timeout=15_000)
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


FLAGSHIP = {"model": "meta-llama/Llama-2-13b-hf", "method": "qlora", "gpu": "RTX 4000 Ada"}
PHONE = {"width": 390, "height": 844}


def _fields(page) -> dict:
    return page.evaluate("Object.fromEntries(['f-model', 'f-gpu', 'f-method', 'f-seq_len'].map(id => [id, document.getElementById(id).value]))")


def test_every_address_reopens_the_same_page_and_back_restores_it(server, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(f"{server}/?" + urlencode({"model": MODEL, "method": "qlora", "gpu": "NVIDIA H100 80GB HBM3"}))
    page.wait_for_function("() => window.htmx !== undefined", timeout=10_000)
    first_url, first_verdict, first_fields = page.url, _verdict(page), _fields(page)
    page.select_option("#f-gpu", "NVIDIA GeForce RTX 3080")
    page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('RTX 3080')", timeout=15_000)
    page.wait_for_function("() => location.search.includes('RTX+3080')", timeout=15_000)
    # the address is the full page's, and the links on the page follow the fields
    assert urlparse(page.url).path == "/"
    assert "RTX+3080" in page.get_attribute("#compare-link", "href") and "RTX+3080" in page.get_attribute("#result-link", "href")
    changed_verdict, changed_fields = _verdict(page), _fields(page)
    fresh = browser.new_page()
    fresh.goto(page.url)
    assert fresh.locator("#plan-form").count() == 1 and _verdict(fresh) == changed_verdict
    assert _fields(fresh) == changed_fields and changed_fields["f-gpu"] == "NVIDIA GeForce RTX 3080"
    fresh.close()
    page.go_back()
    page.wait_for_function("() => !document.querySelector('#verdict').innerText.includes('RTX 3080')", timeout=15_000)
    page.wait_for_load_state()
    assert page.url == first_url and _verdict(page) == first_verdict and _fields(page) == first_fields
    page.go_forward()
    page.wait_for_function("() => document.querySelector('#verdict').innerText.includes('RTX 3080')", timeout=15_000)
    page.wait_for_load_state()
    assert _verdict(page) == changed_verdict and _fields(page) == changed_fields
    page.close()


def test_a_pasted_config_marks_the_model_field_as_the_user_types(server, browser):
    from tests.conftest import TINY

    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(f"{server}/?" + urlencode({"model": MODEL, "gpu_memory_gib": "8"}))
    page.wait_for_function("() => window.htmx !== undefined", timeout=10_000)
    assert page.locator("#model-note").inner_text() == ""
    page.click("details summary")  # Advanced
    page.fill("#f-config_json", json.dumps({**TINY["llama"], "_name_or_path": "acme/tiny-llama"}))
    page.wait_for_function("() => document.querySelector('#model-name').innerText === 'acme/tiny-llama'", timeout=15_000)
    assert page.locator("#model-note").inner_text().startswith("Not used: the pasted config.json (acme/tiny-llama)")
    # struck through, so the field no longer reads as the model being planned. htmx settles a
    # swapped element's new class about 20 ms after its new text: wait for it, do not race it
    page.wait_for_function("() => getComputedStyle(document.querySelector('#f-model')).textDecorationLine.includes('line-through')",
                           timeout=5_000)
    assert "line-through" in page.eval_on_selector("#f-model", "e => getComputedStyle(e).textDecorationLine")
    page.close()


def _no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_phone_shows_the_verdict_first_and_nothing_scrolls_sideways(server, browser):
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    page.goto(f"{server}/?" + urlencode(FLAGSHIP))
    assert page.locator("#verdict").bounding_box()["y"] < 700
    assert _no_sideways_scroll(page)
    # the chart's text renders at a readable size, not scaled down with the drawing
    heights = page.eval_on_selector_all("#result figure svg text", "ts => ts.map(t => t.getBoundingClientRect().height)")
    assert heights and min(heights) >= 11, heights
    page.goto(f"{server}/compare?" + urlencode({"model": MODEL, "gpu": "RTX 4090"}))
    assert _no_sideways_scroll(page)
    bars = page.eval_on_selector_all("#compare svg", "ss => ss.map(s => s.getBoundingClientRect().right)")
    assert len(bars) == 4 and max(bars) <= PHONE["width"], bars
    page.goto(f"{server}/matrix")
    assert _no_sideways_scroll(page)
    # a model name wraps only after its "/": each part stays on one line
    lines = page.eval_on_selector_all("#matrix th.model span", "ss => ss.map(s => s.getClientRects().length)")
    assert lines and set(lines) == {1}, lines
    context.close()


def test_flagship_screenshots(server, browser):
    """The 13B QLoRA on an RTX 4000 Ada, as a desktop and a phone user see it (tests/artifacts/)."""
    ARTIFACTS.mkdir(exist_ok=True)
    for name, viewport in (("flagship-1280.png", {"width": 1280, "height": 900}), ("flagship-390.png", PHONE)):
        page = browser.new_page(viewport=viewport)
        page.goto(f"{server}/?" + urlencode(FLAGSHIP))
        assert _verdict(page).startswith("✔ Fits") and "RTX 4000 Ada" in _verdict(page)
        page.screenshot(path=str(ARTIFACTS / name), full_page=True)
        page.close()


AXE = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"
AXE_PAGES = {
    "empty form": "/",
    "flagship": "/?" + urlencode(FLAGSHIP),
    "failing plan": "/?" + urlencode({"model": "meta-llama/Llama-3.1-70B", "method": "full", "gpu": "RTX 4090"}),
    "compare": "/compare?" + urlencode({"model": MODEL, "gpu": "RTX 4090"}),
    "matrix": "/matrix?method=qlora",
}


@pytest.mark.skipif(not AXE.is_file(), reason="axe-core not installed: run npm ci (node_modules/axe-core is missing)")
@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 900}, PHONE], ids=["desktop", "390px"])
@pytest.mark.parametrize("name", list(AXE_PAGES))
def test_axe_finds_nothing_serious(server, browser, name, viewport):
    # axe goes in as an inline script, which the pages' Content-Security-Policy refuses: bypassed for the check only
    page = browser.new_page(viewport=viewport, bypass_csp=True)
    bad = serious_axe_findings(page, server + AXE_PAGES[name])
    page.close()
    assert not bad, "\n".join(f"{v['impact']} {v['id']} ({v['help']}): {v['nodes']}" for v in bad)


def serious_axe_findings(page, url: str) -> list[dict]:
    """axe-core's serious and critical findings on the page at url (moderate and minor ones are advisory)."""
    page.goto(url)
    page.wait_for_load_state()
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate(
        "async () => (await axe.run()).violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.target.join(' '))}))"
    )
    return [v for v in violations if v["impact"] in ("serious", "critical")]


# -- the plan page's extras: copy buttons, dark theme ------------------------------------------------


def test_copy_buttons_copy_the_command_and_are_hidden_without_javascript(server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    page = context.new_page()
    page.goto(f"{server}/?" + urlencode(FLAGSHIP))
    command = page.locator("#cli-command").inner_text()
    assert command.startswith("vramplan check meta-llama/Llama-2-13b-hf ")
    button = page.locator("button.copy[data-copy=cli-command]")
    button.click()
    page.wait_for_function("() => document.querySelector('button.copy[data-copy=cli-command]').textContent === 'Copied'", timeout=5_000)
    assert page.evaluate("() => navigator.clipboard.readText()") == command
    # after an htmx update the new result's button copies the new command
    page.select_option("#f-method", "lora")
    page.wait_for_function("() => document.querySelector('#cli-command').textContent.includes('--method lora')", timeout=15_000)
    page.locator("button.copy[data-copy=curl-command]").click()
    page.wait_for_function("() => document.querySelector('button.copy[data-copy=curl-command]').textContent === 'Copied'", timeout=5_000)
    assert '"method":"lora"' in page.evaluate("() => navigator.clipboard.readText()")
    context.close()
    # without JavaScript there is no button that does nothing: the text is there to select
    context = browser.new_context(java_script_enabled=False, viewport=PHONE)
    page = context.new_page()
    page.goto(f"{server}/?" + urlencode(FLAGSHIP))
    assert page.locator("#cli-command").is_visible() and not page.locator("button.copy").first.is_visible()
    context.close()


def _luminance(rgb: str) -> float:
    r, g, b = (int(v) for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def test_dark_theme_follows_the_system_and_keeps_the_chart_readable(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    colours = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(color_scheme=scheme, viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(f"{server}/?" + urlencode(FLAGSHIP))
        colours[scheme] = page.evaluate("""() => ({
            body: getComputedStyle(document.body).backgroundColor,
            text: getComputedStyle(document.body).color,
            chartText: getComputedStyle(document.querySelector('figure svg text')).fill,
            chartLine: getComputedStyle(document.querySelector('figure svg line[stroke-dasharray]')).stroke,
        })""")
        if scheme == "dark":
            page.screenshot(path=str(ARTIFACTS / "flagship-dark-1280.png"), full_page=True)
        context.close()
    light, dark = colours["light"], colours["dark"]
    assert _luminance(dark["body"]) < 0.15 and _luminance(dark["text"]) > 0.8, dark
    # the chart's words and usable-memory line follow the text colour: light on dark, dark on light
    assert _luminance(dark["chartText"]) > 0.8 and _luminance(dark["chartLine"]) > 0.8, dark
    assert _luminance(light["chartText"]) < 0.2 and _luminance(light["body"]) > 0.9, light


@pytest.mark.skipif(not AXE.is_file(), reason="axe-core not installed: run npm ci (node_modules/axe-core is missing)")
@pytest.mark.parametrize("name", ["flagship", "failing plan", "compare", "matrix"])
def test_axe_finds_nothing_serious_in_the_dark_theme(server, browser, name):
    context = browser.new_context(color_scheme="dark", viewport={"width": 1280, "height": 900}, bypass_csp=True)
    bad = serious_axe_findings(context.new_page(), server + AXE_PAGES[name])
    context.close()
    assert not bad, "\n".join(f"{v['impact']} {v['id']} ({v['help']}): {v['nodes']}" for v in bad)


def test_the_live_form_answers_at_once_then_refines_with_the_simulated_allocator(server, browser, monkeypatch):
    """A plan simulates the allocator by default (seconds): as fields change, the page shows the
    formula's plan at once, says the simulation is coming, then swaps the simulated plan in; a
    change made meanwhile wins over the refinement of the fields before it."""
    monkeypatch.delenv("VRAMPLAN_SIMULATE_ALLOCATOR", raising=False)
    simulated = "simulated over this run's allocations"
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    page.goto(f"{server}/?" + urlencode({"model": "Qwen/Qwen2.5-0.5B", "method": "lora", "trainer": "hf", "gpu": "L4", "batch_size": "2", "seq_len": "256"}))
    page.wait_for_function("() => window.htmx !== undefined", timeout=10_000)
    page.wait_for_selector("#verdict [data-reserve-source=simulated]", timeout=60_000)  # the first visit refines too
    assert simulated in page.locator("#assumptions").inner_text()
    page.fill("#f-seq_len", "512")
    page.wait_for_function("() => document.querySelector('#refining') !== null", timeout=15_000)
    assert simulated not in page.locator("#assumptions").inner_text()
    page.fill("#f-seq_len", "1024")
    page.wait_for_function("() => location.search.includes('seq_len=1024')", timeout=15_000)
    page.wait_for_function("() => document.querySelector('#refining') === null && "
                           "document.querySelector('#assumptions').innerText.includes(\"simulated over this run's allocations\")", timeout=60_000)
    page.wait_for_timeout(1500)  # a late answer for 512 tokens would land now
    assert "--seq-len 1024" in page.locator("#cli-command").inner_text()
    assert simulated in page.locator("#assumptions").inner_text() and page.locator("#refining").count() == 0
    page.close()


def test_the_first_visit_shows_the_fast_figure_at_once_then_the_traced_one_replaces_it(server, browser, monkeypatch):
    """A page opened whole answers with the calibrated formula's plan, labelled as the fast figure,
    while its step is traced in the background; htmx swaps the traced plan in, in place (the
    address and the history stay as they were). Without JavaScript the page reloads itself until
    the traced plan is there."""
    monkeypatch.delenv("VRAMPLAN_SIMULATE_ALLOCATOR", raising=False)
    problems: list[str] = []
    context = browser.new_context(viewport={"width": 1200, "height": 1400})
    page = context.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    # a small model, so the trace is a few seconds; its own sequence length, traced by no other test
    url = f"{server}/?" + urlencode({"model": "Qwen/Qwen2.5-0.5B", "method": "lora", "trainer": "hf", "gpu": "L4", "batch_size": "2", "seq_len": "448"})
    response = page.goto(url, wait_until="commit")
    # the first answer is the formula's, said to be the fast figure
    assert response.status == 200
    page.wait_for_selector("#verdict [data-reserve-source]")
    first = page.locator("#verdict [data-reserve-source]").get_attribute("data-reserve-source")
    assert first == "formula", first
    assert "fast figure (the calibrated formula's wider band); the traced one follows" in _verdict(page)
    assert "Simulating the allocator" in page.locator("#refining").inner_text()
    band = lambda: page.locator("#verdict .band").first.inner_text()  # noqa: E731
    fast_band = band()
    page.evaluate("window.sameDocument = true")
    entries = page.evaluate("history.length")
    page.wait_for_selector("#verdict [data-reserve-source=simulated]", timeout=90_000)
    # swapped in place: the same document, the label and the note gone, the narrower band shown
    assert page.evaluate("window.sameDocument === true")
    assert "fast figure" not in _verdict(page) and "allocator simulated" in _verdict(page)
    assert page.locator("#refining").count() == 0 and band() != fast_band
    # the address is the same state (written in the form's order) and no history entry was added
    assert parse_qsl(urlparse(page.url).query) != [] and dict(parse_qsl(urlparse(page.url).query)) == dict(parse_qsl(urlparse(url).query))
    assert page.evaluate("history.length") == entries
    page.screenshot(path=str(ARTIFACTS / "first-visit-refined.png"), full_page=True)
    assert not problems, problems
    context.close()
    # without JavaScript: another run's page, reloaded by itself until its trace is done
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(url.replace("seq_len=448", "seq_len=464"))
    assert page.locator("#verdict [data-reserve-source]").get_attribute("data-reserve-source") == "formula"
    assert page.locator("head noscript").count() == 1 and page.locator("#traced-link").count() == 1
    page.wait_for_selector("#verdict [data-reserve-source=simulated]", timeout=90_000)
    assert "fast figure" not in _verdict(page)
    context.close()
