"""A first answer at once, refined after: a page opened whole (a first visit, a shared or
fit-search link, an upload) answers with the calibrated formula's plan, labelled as the fast
figure, while the trace runs in the background (app/service.py TraceAhead); htmx then swaps the
traced plan in, and without JavaScript the page reloads itself until the trace is done. An upload
whose model is still being read says so at once. The CLI says the formula's fast answer on stderr
before it traces, whoever reads it. The JSON API stays simulated.
"""

from __future__ import annotations

import json
import re
import shlex
import time
import uuid
from html import unescape
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi.testclient import TestClient

from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.request import SIMULATE_ENV

from tests.conftest import TINY
from tests.test_pages import HTMX, Page

MODEL = "Qwen/Qwen2.5-0.5B"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def _params(seq_len: int) -> dict:
    # each test its own sequence length: its trace is not memoized by another test
    return {"model": MODEL, "method": "lora", "batch_size": "2", "seq_len": str(seq_len), "trainer": "hf", "gpu": "L4"}


def _source(html: str) -> str | None:
    found = re.search(r'data-reserve-source="(\w+)"', html)
    return found.group(1) if found else None


def _refresh(html: str) -> str | None:
    found = re.search(r'<noscript><meta http-equiv="refresh" content="(\d+); url=([^"]+)"></noscript>', html)
    return unescape(found.group(2)) if found else None


@pytest.fixture
def default_on(monkeypatch):
    monkeypatch.delenv(SIMULATE_ENV, raising=False)


@pytest.fixture
def traces(monkeypatch):
    """Every trace this process runs, counted."""
    from planner import step_trace

    calls: list[int] = []
    real = step_trace.simulate_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_trace, "simulate_step", counting)
    return calls


@pytest.fixture(autouse=True)
def drained():
    """No test's background trace runs into the next one's counts."""
    from app.service import TRACE_AHEAD

    yield
    deadline = time.time() + 120
    while TRACE_AHEAD.pending() and time.time() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def client():
    from app.main import app

    with TestClient(app) as c:
        yield c


def test_a_page_opened_whole_answers_with_the_formula_and_the_trace_started_in_the_background(default_on, client, traces):
    from app.service import TRACE_AHEAD

    params = _params(160)
    started = time.perf_counter()
    first = client.get("/", params=params)
    assert first.status_code == 200 and time.perf_counter() - started < 5  # a trace of even this model is seconds
    page = Page(first.text)
    # the fast figure, said to be one, with the formula's wider band
    assert _source(first.text) == "formula"
    assert "fast figure (the calibrated formula's wider band); the traced one follows" in page.words("verdict")
    assert "until then the reserve and the band are the calibrated formula's, wider" in page.words("refining")
    # htmx asks for the traced plan at once; without JavaScript a link, and the page reloads itself
    assert "refine=1" in page.attrs["refining"]["hx-get"]
    assert dict(parse_qsl(urlsplit(page.attrs["traced-link"]["href"]).query)) == {**params, "refine": "1"}
    assert dict(parse_qsl(urlsplit(_refresh(first.text)).query)) == params
    # the refine request waits for the trace under way rather than trace the step again
    refined = client.get("/result", params={**params, "refine": "1"}, headers=HTMX)
    assert _source(refined.text) == "simulated" and 'id="refining"' not in refined.text
    assert len(traces) == 1
    # it replaces the address the page has (one history entry per state), never pushes a second
    assert "HX-Push-Url" not in refined.headers and "refine" not in refined.headers["HX-Replace-Url"]
    # reloaded (no JavaScript), the page is the traced plan, and reloads no more
    again = client.get("/", params=params)
    assert _source(again.text) == "simulated" and _refresh(again.text) is None and 'id="fast-figure"' not in again.text
    assert len(traces) == 1 and TRACE_AHEAD.pending() == 0
    # the page's JSON twin and the API are the simulated plan, as before
    assert client.get("/plan.json", params=params).json()["plan"]["reserve_source"] == "simulated"
    body = {**params, "batch_size": 2, "seq_len": 160}
    assert client.post("/api/v1/plan", json=body).json()["reserve_source"] == "simulated"


def test_without_javascript_the_reload_serves_the_traced_plan_once_the_background_trace_is_done(default_on, client, traces):
    params = _params(176)
    first = client.get("/", params=params)
    assert _source(first.text) == "formula"
    reload_to = _refresh(first.text)
    deadline = time.time() + 120
    while True:
        page = client.get(reload_to)
        if _source(page.text) == "simulated" or time.time() > deadline:
            break
        time.sleep(0.5)
    assert _source(page.text) == "simulated" and _refresh(page.text) is None
    assert len(traces) == 1  # the reloads found the background trace; none traced again


def test_the_fast_figure_is_the_formulas_plan_of_the_same_options(default_on, client):
    params = _params(208)
    page = client.get("/", params=params).text
    spec = load_catalog_spec(MODEL)
    formula = build_plan(spec, TrainingOptions(method="lora", batch_size=2, seq_len=208, trainer="hf", gpu="L4", simulate_allocator=False))
    assert f"{formula.peak_bytes / 2**30:.2f} GiB" in Page(page).words("verdict")
    # the page's curl call is the API's plan of the same options: the traced one, that follows
    assert json.loads(shlex.split(Page(page).words("curl-command"))[-1]) == {
        "model": MODEL, "gpu": "NVIDIA L4", "method": "lora", "batch_size": 2, "seq_len": 208, "trainer": "hf"}


def test_a_page_with_nothing_to_trace_answers_in_full(default_on, client):
    asked = client.get("/", params={**_params(224), "simulate_allocator": "false"}).text
    assert _source(asked) == "formula" and _refresh(asked) is None and 'id="refining"' not in asked
    # a model the trace cannot stand in for keeps the formula, with no promise of a trace
    moe = client.get("/", params={"model": "Qwen/Qwen3-30B-A3B", "method": "qlora", "gpu": "H100 SXM"}).text
    assert _source(moe) == "formula" and _refresh(moe) is None


def test_an_upload_still_being_read_says_so_at_once_and_its_plan_follows(default_on, client, monkeypatch):
    from app import pages

    config = {**TINY["llama"], "_name_or_path": f"acme/tiny-{uuid.uuid4().hex[:8]}"}  # bytes no build has seen
    monkeypatch.setattr(pages, "BUILD_WAIT_S", 0.0)
    files = {"config_file": ("config.json", json.dumps(config).encode(), "application/json")}
    response = client.post("/", data={"method": "lora", "gpu": "L4", "trainer": "hf"}, files=files, headers=BROWSER)
    assert response.status_code == 200 and _source(response.text) is None
    page = Page(response.text)
    assert page.words("refining").startswith("Reading the model from the config.json")
    # the form keeps the uploaded text, so htmx's request and the reload carry it
    assert json.loads(unescape(re.search(r'<textarea id="f-config_json"[^>]*>(.*?)</textarea>', response.text, re.S).group(1))) == config
    reload_to = _refresh(response.text)
    assert json.loads(dict(parse_qsl(urlsplit(reload_to).query))["config_json"]) == config
    assert page.attrs["refining"]["hx-get"].startswith("/result?")
    # a script posting the form (no text/html asked for) still gets the page with its plan
    monkeypatch.setattr(pages, "BUILD_WAIT_S", 60.0)
    scripted = client.post("/", data={"method": "lora", "gpu": "L4", "trainer": "hf"}, files=files)
    assert _source(scripted.text) in ("formula", "simulated")
    # the reload finds the model built: the formula's plan at once, then the traced one
    planned = client.get(reload_to, headers=BROWSER)
    assert Page(planned.text).words("model-name") == config["_name_or_path"]
    traced = client.get(reload_to + "&refine=1", headers=BROWSER)
    assert _source(traced.text) == "simulated"


def test_the_live_update_answers_at_once_and_starts_no_background_trace(default_on, client, traces):
    from app.service import TRACE_AHEAD

    params = _params(240)
    live = client.get("/result", params=params, headers=HTMX)
    assert _source(live.text) == "formula" and "refine=1" in live.text
    assert dict(parse_qsl(urlsplit(live.headers["HX-Push-Url"]).query)) == params
    assert TRACE_AHEAD.pending() == 0 and not traces
    # once traced, a live update of the same run is the traced plan at once
    client.get("/result", params={**params, "refine": "1"}, headers=HTMX)
    assert _source(client.get("/result", params=params, headers=HTMX).text) == "simulated"


def test_the_cli_says_the_fast_answer_on_stderr_before_it_traces(default_on, capsys, monkeypatch):
    """Not a terminal (capsys): piped output and CI logs get the line too."""
    from app.cli import main
    from planner import step_trace

    seen_before_trace: list = []
    real = step_trace.simulate_step

    def watching(*args, **kwargs):
        seen_before_trace.append(capsys.readouterr())
        return real(*args, **kwargs)

    monkeypatch.setattr(step_trace, "simulate_step", watching)
    args = ["check", MODEL, "--method", "lora", "--batch-size", "2", "--seq-len", "272", "--trainer", "hf", "--gpu", "L4"]
    assert main(args) == 0
    (before,) = seen_before_trace
    formula = build_plan(load_catalog_spec(MODEL), TrainingOptions(method="lora", batch_size=2, seq_len=272, trainer="hf", gpu="L4", simulate_allocator=False))
    assert before.out == ""
    assert before.err == (f"vramplan: fast answer (formula): {formula.peak_bytes / 2**30:.1f} GiB per GPU (band {formula.peak_low_bytes / 2**30:.1f}-"
                          f"{formula.peak_high_bytes / 2**30:.1f}) of {formula.usable_bytes / 2**30:.1f} GiB usable on NVIDIA L4, fits; "
                          "tracing two training steps for the exact one (about 8 s)…\n")
    after = capsys.readouterr()
    assert after.err == "" and "allocator simulated" in after.out  # stdout's answer is the traced one
    # nothing to trace, nothing said: the same check again (memoized), or the formula asked for
    assert main(args) == 0 and capsys.readouterr().err == ""
    assert main(["check", MODEL, "--method", "lora", "--seq-len", "288", "--gpu", "L4", "--no-simulate-allocator", "--json"]) == 0
    assert capsys.readouterr().err == "" and len(seen_before_trace) == 1
