"""A single plan simulates the allocator by default (planner/request.single_plan_options): the
API's plan and check, the CLI's plan and check, the page and a launch. Searches and advice keep the
formula, and VRAMPLAN_SIMULATE_ALLOCATOR=off turns the default off (the rest of the suite runs so).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan, plan_is_quick
from planner.request import AUTO_MAX_LAYERS, SIMULATE_ENV, single_plan_options

# imported here, not in a test: it imports conftest, whose setdefault must not run after a fixture
from tests.conftest import TINY
from tests.test_pages import Page

SMALL = {"model": "Qwen/Qwen2.5-0.5B", "method": "lora", "batch_size": 2, "seq_len": 256, "trainer": "hf", "gpu": "L4"}
SIMULATED_NOTE = "simulated over this run's allocations traced on the meta device"


@pytest.fixture
def default_on(monkeypatch):
    monkeypatch.delenv(SIMULATE_ENV, raising=False)


@pytest.fixture(scope="module")
def client():
    # one app for the module: its build worker (pasted configs are traced there) starts once
    from app.main import app

    with TestClient(app) as c:
        yield c


def test_the_option_left_unset_simulates_one_plan_but_not_the_planner_core(default_on):
    spec = load_catalog_spec(SMALL["model"])
    given = TrainingOptions(**{k: v for k, v in SMALL.items() if k != "model"})
    assert given.simulate_allocator is None
    assert single_plan_options(spec, given).simulate_allocator is True
    # what the user said wins, either way
    assert single_plan_options(spec, given.model_copy(update={"simulate_allocator": False})).simulate_allocator is False
    # searches and advice call build_plan with the option unset: the formula, one plan per candidate
    assert build_plan(spec, given).reserve_source == "formula"


def test_the_largest_models_and_the_environment_keep_the_formula(default_on, monkeypatch):
    spec = load_catalog_spec("meta-llama/Llama-3.1-405B")
    assert spec.num_layers > AUTO_MAX_LAYERS
    assert single_plan_options(spec, TrainingOptions(method="qlora")).simulate_allocator is False
    assert single_plan_options(spec, TrainingOptions(method="qlora", simulate_allocator=True)).simulate_allocator is True
    monkeypatch.setenv(SIMULATE_ENV, "off")
    assert single_plan_options(load_catalog_spec(SMALL["model"]), TrainingOptions()).simulate_allocator is False


def test_the_api_check_simulates_by_default_with_the_narrower_band(default_on, client):
    simulated = client.post("/api/v1/check", json=SMALL).json()
    formula = client.post("/api/v1/check", json={**SMALL, "simulate_allocator": False}).json()
    assert (simulated["reserve_source"], formula["reserve_source"]) == ("simulated", "formula")
    width = simulated["peak_high_bytes"] - simulated["peak_low_bytes"]
    assert width < 0.6 * (formula["peak_high_bytes"] - formula["peak_low_bytes"])
    assert width <= 0.15 * simulated["peak_bytes"]
    plan = client.post("/api/v1/plan", json=SMALL).json()
    assert plan["reserve_source"] == "simulated" and plan["options"]["simulate_allocator"] is True and plan["could_simulate"] is False
    assert client.post("/api/v1/plan", json={**SMALL, "simulate_allocator": False}).json()["could_simulate"] is True
    assert any(SIMULATED_NOTE in a for a in plan["assumptions"])


def test_a_plan_the_trace_cannot_stand_in_for_says_why_and_keeps_the_formula(default_on, client):
    plan = client.post("/api/v1/plan", json={**SMALL, "num_gpus": 2, "parallelism": "zero3"}).json()
    assert plan["reserve_source"] == "formula"
    assert any("no simulation: one GPU without offload only" in a for a in plan["assumptions"])


def test_the_cli_simulates_by_default_and_no_simulate_allocator_turns_it_off(default_on, capsys):
    from app.cli import main

    args = ["check", SMALL["model"], "--method", "lora", "--batch-size", "2", "--seq-len", "256", "--trainer", "hf", "--gpu", "L4"]
    # the one-line check gives the simulated plan's band, and says so
    spec = load_catalog_spec(SMALL["model"])
    simulated = build_plan(spec, single_plan_options(spec, TrainingOptions(method="lora", batch_size=2, seq_len=256, trainer="hf", gpu="L4")))
    assert simulated.reserve_source == "simulated"
    main(args)
    line = capsys.readouterr().out
    assert f"(band {simulated.peak_low_bytes / 2**30:.2f}-{simulated.peak_high_bytes / 2**30:.2f}, allocator simulated)" in line
    main([*args, "--no-simulate-allocator", "--json"])
    assert json.loads(capsys.readouterr().out)["reserve_source"] == "formula"


def test_the_page_simulates_and_its_live_update_refines_after_a_formula_answer(default_on, client):
    # a step no earlier test traced (a memoized one is the simulated plan at once)
    params = {k: str(v) for k, v in SMALL.items()} | {"seq_len": "304"}
    # opened whole, the page answers with the formula at once and traces in the background; asked
    # again (the reload without JavaScript, htmx's refine request) it is the simulated plan
    first = Page(client.get("/", params=params).text)
    assert SIMULATED_NOTE not in first.words("assumptions") and "refine=1" in first.attrs["traced-link"]["href"]
    page = Page(client.get("/", params={**params, "refine": "1"}).text)
    assert SIMULATED_NOTE in page.words("assumptions")
    assert "GiB, allocator simulated" in page.words("verdict")
    # as fields change, htmx gets the formula's plan at once and a request for the simulated one
    changed = {**params, "seq_len": "320"}
    live = client.get("/result", params=changed, headers={"HX-Request": "true"}).text
    assert "refine=1" in live and SIMULATED_NOTE not in Page(live).words("assumptions")
    assert "until then the reserve and the band are the calibrated formula" in Page(live).words("refining")
    refined = client.get("/result", params={**changed, "refine": "1"}, headers={"HX-Request": "true"})
    assert 'id="refining"' not in refined.text and SIMULATED_NOTE in Page(refined.text).words("assumptions")
    assert "refine" not in refined.headers["HX-Replace-Url"]
    # a formula asked for is not refined
    asked = client.get("/result", params={**params, "simulate_allocator": "false"}, headers={"HX-Request": "true"}).text
    assert 'id="refining"' not in asked and SIMULATED_NOTE not in Page(asked).words("assumptions")


def test_a_mixture_of_experts_keeps_the_formula_at_once_and_says_why(default_on):
    spec = load_catalog_spec("Qwen/Qwen3-30B-A3B")
    options = TrainingOptions(method="qlora", lora_dropout=0.0, batch_size=1, seq_len=1024)
    assert single_plan_options(spec, options).simulate_allocator is False
    plan = build_plan(spec, options.model_copy(update={"simulate_allocator": True}))
    assert plan.reserve_source == "formula" and plan.could_simulate is False
    assert any("no simulation: a mixture-of-experts model" in a for a in plan.assumptions)


def test_a_simulated_plan_is_quick_only_once_its_trace_is_memoized(default_on):
    """The API runs a plan on the event loop only when it is quick (app/service.py QuickShapes):
    a simulation not yet traced must go to a thread, whatever its shape's earlier plans cost."""
    spec = load_catalog_spec(SMALL["model"])
    options = single_plan_options(spec, TrainingOptions(method="lora", batch_size=3, seq_len=192, trainer="hf", gpu="L4"))
    assert options.simulate_allocator and not plan_is_quick(spec, options)
    assert plan_is_quick(spec, options.model_copy(update={"simulate_allocator": False}))
    build_plan(spec, options)
    assert plan_is_quick(spec, options)
    # another card does not change the step, another batch does
    assert plan_is_quick(spec, options.model_copy(update={"gpu": "H100 SXM"}))
    assert not plan_is_quick(spec, options.model_copy(update={"batch_size": 4}))


def test_a_tight_live_answer_says_the_simulation_is_narrowing_its_band(default_on, client):
    spec = load_catalog_spec(SMALL["model"])
    # a step no other test traced: a live update refines only a trace still to run
    run = {**SMALL, "seq_len": 336}
    formula = build_plan(spec, TrainingOptions(**{k: v for k, v in run.items() if k not in ("model", "gpu")}, gpu_memory_gib=80, simulate_allocator=False))
    usable_gib = (formula.peak_low_bytes + formula.peak_high_bytes) / 2 / (1 - formula.options.headroom) / 2**30
    params = {**{k: str(v) for k, v in run.items() if k != "gpu"}, "gpu_memory_gib": repr(usable_gib)}
    words = Page(client.get("/result", params=params, headers={"HX-Request": "true"}).text).words("verdict")
    assert words.startswith("⚠ Tight") and "simulating the allocator to narrow the band" in words
    assert "Allocator reserve › simulated narrows the band" not in words


def test_past_the_traces_in_line_a_plan_keeps_the_formula_at_once_and_the_next_ask_traces(monkeypatch):
    """A server's planning threads must not all wait on traces: a plan that would queue behind
    MAX_TRACES_IN_LINE others answers with the formula, says why, and is not remembered so."""
    from planner import step_trace

    spec = load_catalog_spec(SMALL["model"])
    options = TrainingOptions(method="lora", batch_size=5, seq_len=96, trainer="hf", gpu="L4", simulate_allocator=True)
    monkeypatch.setattr(step_trace, "_in_line", step_trace.MAX_TRACES_IN_LINE)
    busy = build_plan(spec, options)
    assert busy.reserve_source == "formula"
    assert any(f"no simulation: {step_trace.MAX_TRACES_IN_LINE} other plans are being traced here" in a for a in busy.assumptions)
    monkeypatch.setattr(step_trace, "_in_line", 0)
    assert build_plan(spec, options).reserve_source == "simulated"
    assert step_trace._in_line == 0  # every trace leaves the line, traced or refused


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "/etc/hostname"])
def test_a_pasted_config_is_traced_as_itself_whatever_it_calls_itself(default_on, client, name):
    """A pasted config's name is the user's: named like a catalog model it must not be traced as
    that model (a 2-layer toy planned at 8B's reserve), and named like a path it must not make the
    server read that file (whose error would say it exists). It is traced from its own text, in
    the build worker."""
    config = {**TINY["llama"], "_name_or_path": name}
    body = {"config_json": json.dumps(config), "method": "lora", "trainer": "hf", "gpu": "L4"}
    response = client.post("/api/v1/plan", json=body)
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["reserve_source"] == "simulated" and plan["peak_bytes"] < 2 * 2**30
    # the trace's own figure: the same toy with the formula differs only by the reserve
    formula = client.post("/api/v1/plan", json={**body, "simulate_allocator": False}).json()
    assert abs(plan["peak_bytes"] - formula["peak_bytes"]) < 2**30


def test_a_catalog_spec_is_traced_only_as_itself():
    """planner-level guard: a spec that merely carries a catalog id as its name is refused."""
    import dataclasses

    from planner.step_trace import simulated_for

    spec = load_catalog_spec(SMALL["model"])
    impostor = dataclasses.replace(spec, num_layers=2)
    reason = simulated_for(impostor, TrainingOptions(method="lora", trainer="hf", simulate_allocator=True))
    assert reason == "only a catalog model or a config file given to the CLI is traced (a pasted config is not kept)"


def test_the_cli_traces_a_config_file_it_is_given(default_on, tmp_path, capsys):
    from app.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY["llama"], "architectures": ["LlamaForCausalLM"]}))
    main(["plan", str(path), "--method", "lora", "--trainer", "hf", "--gpu", "L4", "--json"])
    assert json.loads(capsys.readouterr().out)["reserve_source"] == "simulated"


def test_the_page_traces_a_pasted_config_too(default_on, client):
    config = {**TINY["qwen2"], "_name_or_path": "acme/tiny-qwen"}
    params = {"config_json": json.dumps(config), "method": "lora", "trainer": "hf", "gpu": "L4", "refine": "1"}
    page = Page(client.get("/", params=params).text)
    assert SIMULATED_NOTE in page.words("assumptions")


def test_a_pasted_trace_past_the_build_deadline_is_refused_with_the_reason_and_the_worker_replaced():
    from app.model_builder import BuildLimits, SpecBuilder
    from planner.step_trace import SimulationUnsupported

    builder = SpecBuilder(BuildLimits(timeout_s=0.5))
    try:
        with pytest.raises(SimulationUnsupported, match="tracing this model took longer than the 0.5 s a build may take"):
            builder.trace(dict(TINY["llama"]), TrainingOptions(method="lora", trainer="hf", simulate_allocator=True))
        assert builder._pool is None  # killed: a trace cannot be interrupted any other way
    finally:
        builder.shutdown()


def test_a_simulated_trl_plan_says_what_its_band_allows_for_the_unmeasured_fused_head(default_on, client, capsys):
    """TRL's fused head is simulated from the code but no GPU run has checked it: the plan, the
    check, the page's verdict and the CLI say what the band's high end allows for it."""
    body = {**SMALL, "trainer": "trl"}
    check = client.post("/api/v1/check", json=body).json()
    assert (check["reserve_source"], check["band_source"], check["unmeasured_parts"]) == ("simulated", "simulated", ["TRL's fused LM head"])
    allowance = check["unmeasured_allowance_bytes"]
    assert allowance > 0
    plain = client.post("/api/v1/check", json=SMALL).json()
    assert (plain["unmeasured_parts"], plain["unmeasured_allowance_bytes"]) == ([], 0)
    html = client.get("/", params={k: str(v) for k, v in body.items()}).text
    words = Page(html).words("verdict")
    assert f"allocator simulated (the high end allows {allowance / 2**30:.2f} GiB for TRL’s fused LM head until a GPU run measures it)" in words
    # the chart's band bracket draws the allowance dashed, with what it is for
    assert 'class="allowance"' in html and f"{allowance / 2**30:.2f} GiB allowed for TRL" in html
    assert f"unmeasured allowance: {allowance / 2**30:.2f} GiB" in html  # its legend entry
    assert (f"- Allocator reserve: simulated over the run's traced allocations; the band's high end allows {allowance / 2**30:.2f} GiB "
            "for TRL's fused LM head until a GPU run measures it") in Page(html).text["markdown-summary"]
    assert 'class="allowance"' not in client.get("/", params={k: str(v) for k, v in SMALL.items()}).text
    from app.cli import main

    main(["check", SMALL["model"], "--method", "lora", "--batch-size", "2", "--seq-len", "256", "--trainer", "trl", "--gpu", "L4"])
    assert f"allocator simulated; the high end allows {allowance / 2**30:.2f} GiB for TRL's fused LM head until a GPU run measures it" in capsys.readouterr().out
