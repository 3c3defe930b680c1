"""The plan page's extras (what users expect and do not find): the fit searches, the
command line and curl call that give the same result, the JSON twin of every page, the Markdown
summary, and GiB said where memory is shown. Each test reads the element the user reads and
compares it with what the API or the CLI returns for the same options."""

from __future__ import annotations

import json
import re
import shlex
from html import unescape

import pytest
from fastapi.testclient import TestClient

import app.pages as pages
from app.cli import main as cli_main
from app.main import app
from gpu_catalog.catalog import find_gpu
from gpu_catalog.detect import Detection
from planner.plan import GIB
from tests.conftest import TINY
from tests.test_pages import Page

FLAGSHIP = {"model": "meta-llama/Llama-2-13b-hf", "method": "qlora", "gpu": "RTX 4000 Ada"}
# typed as a user would, with options away from their defaults: every one must reach the command
UNUSUAL = {"model": "meta-llama/Llama-3.1-8B", "method": "QLoRA", "gpu": "rtx4000ada", "batch_size": "3", "seq_len": "3072",
           "gradient_checkpointing": "off", "lora_r": "32", "lora_targets": "q_proj,v_proj", "optimizer": "paged AdamW 8bit", "autocast": "off"}
FAILING = {"model": "meta-llama/Llama-3.1-70B", "method": "full", "gpu": "RTX 4090"}


@pytest.fixture(scope="module")
def client():
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(autouse=True)
def no_local_gpu(monkeypatch):
    monkeypatch.setattr(pages, "detect", lambda: Detection(reason="no NVIDIA GPU detected"))


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


# -- fit searches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [FLAGSHIP, FAILING], ids=["fits", "does-not-fit"])
def test_the_fit_searches_show_the_apis_answers(client, params):
    page = Page(client.get("/", params=params).text)
    twin = client.get("/plan.json", params=params).json()
    api = client.post("/api/v1/fit", json=twin["reproduce"]["body"]).json()
    for key in ("largest_batch", "longest_sequence", "fewest_gpus"):
        row = page.words(f"fit-{key}")
        answer = api[key]
        if answer["value"] is None:
            assert "none fits" in row
        else:
            assert f"{answer['value']:,}" in row and _gib(answer["peak_bytes"]) in row, (key, row)
        assert answer["note"] in row
    cheapest = api["cheapest_gpu"]
    assert f"{cheapest['count']} × {cheapest['gpu']}" in page.words("fit-cheapest_gpu")
    assert _gib(cheapest["peak_bytes"]) in page.words("fit-cheapest_gpu")


def test_the_flagship_fit_search_says_micro_batch_3(client):
    """The release note's numbers: 13B QLoRA on an RTX 4000 Ada fits up to micro-batch 3."""
    html = client.get("/", params=FLAGSHIP).text
    answer = re.search(r'<tr id="fit-largest_batch">.*?<a href="([^"]+)" data-value="(\d+)"', html, re.S)
    assert answer.group(2) == "3" and "batch_size=3" in unescape(answer.group(1))
    # the step beyond, in the numbers its own plan gives
    beyond = client.get("/plan.json", params={**FLAGSHIP, "batch_size": "4"}).json()["plan"]
    assert beyond["verdict"] == "tight"
    words = f"4 would need {beyond['peak_bytes'] / 2**30:.2f} GiB (up to {beyond['peak_high_bytes'] / 2**30:.2f}), tight"
    assert Page(html).words("fit-largest_batch").endswith(words)


def test_the_fewest_gpus_answer_links_to_a_plan_that_fits(client):
    html = client.get("/", params=FAILING).text
    assert Page(html).words("verdict").startswith("✘ Does not fit")
    link = unescape(re.search(r'<tr id="fit-fewest_gpus">.*?href="([^"]+)"', html, re.S).group(1))
    reopened = Page(client.get(link).text)
    assert reopened.words("verdict").startswith("✔ Fits"), link


# -- the command line and curl ------------------------------------------------------------------------


@pytest.mark.parametrize("params", [FLAGSHIP, UNUSUAL, FAILING], ids=["flagship", "unusual", "failing"])
def test_the_shown_command_gives_the_pages_peak(client, params, capsys):
    page = Page(client.get("/", params=params).text)
    twin = client.get("/plan.json", params=params).json()
    words = shlex.split(page.text["cli-command"])
    assert words[:2] == ["vramplan", "check"]
    capsys.readouterr()
    code = cli_main(words[1:])
    line = capsys.readouterr().out
    # the line says the peak the verdict shows, and exits as the contract says for that verdict
    assert _gib(twin["plan"]["peak_bytes"]).replace(",", "") in line.replace(",", "")
    assert _gib(twin["plan"]["peak_bytes"]) in page.words("verdict")
    assert code == (0 if twin["plan"]["verdict"] == "fits" else 1)
    cli_main(words[1:] + ["--json"])
    checked = json.loads(capsys.readouterr().out)
    assert checked["peak_bytes"] == twin["plan"]["peak_bytes"] and checked["verdict"] == twin["plan"]["verdict"]
    assert checked["gpu"] == twin["plan"]["gpu"]


def test_the_unusual_options_all_reach_the_command(client):
    command = Page(client.get("/", params=UNUSUAL).text).text["cli-command"]
    for flag in ("--method qlora", "--batch-size 3", "--seq-len 3072", "--no-gradient-checkpointing", "--lora-r 32",
                 "--lora-targets q_proj,v_proj", "--optimizer paged_adamw_8bit", "--no-autocast", "--gpu 'NVIDIA RTX 4000 Ada Generation'"):
        assert flag in command, (flag, command)


@pytest.mark.parametrize("params", [UNUSUAL, FAILING], ids=["unusual", "failing"])
def test_the_shown_curl_call_gives_the_pages_plan(client, params):
    page = Page(client.get("/", params=params).text)
    words = shlex.split(page.text["curl-command"])
    assert words[0] == "curl" and words[words.index("-X") + 1] == "POST"
    url = next(w for w in words if w.startswith("http"))
    assert url.endswith("/api/v1/plan")
    body = json.loads(words[words.index("-d") + 1])
    answer = client.post("/api/v1/plan", json=body).json()
    twin = client.get("/plan.json", params=params).json()
    assert answer["peak_bytes"] == twin["plan"]["peak_bytes"] and answer["components"] == twin["plan"]["components"]
    assert _gib(answer["peak_bytes"]) in page.words("verdict")


def test_a_pasted_config_gives_a_command_for_the_saved_file():
    """Unit-level (a pasted config builds a model, seconds of torch import): the command plans the
    saved file and the curl call sends the config's text."""
    config = json.dumps(TINY["llama"])
    request = pages.AdviseRequest(config_json=config, method="lora", gpu="L4")
    plan = {"gpu": {"name": "NVIDIA L4", "count": 1}}
    shown = pages.reproduce(request, plan, "http://127.0.0.1:8000/")
    assert shlex.split(shown["cli"]) == ["vramplan", "check", "config.json", "--gpu", "NVIDIA L4", "--method", "lora"]
    assert json.loads(shlex.split(shown["curl"])[-1]) == {"config_json": config, "gpu": "NVIDIA L4", "method": "lora"}
    assert shown["pasted"]


# -- the JSON twins ---------------------------------------------------------------------------------


def test_the_plan_pages_json_twin_is_the_apis_objects(client):
    # the API's names, so the API's plan echoes the same options back
    params = UNUSUAL | {"method": "qlora", "gpu": "NVIDIA RTX 4000 Ada Generation", "optimizer": "paged_adamw_8bit", "gradient_checkpointing": "false"}
    page = Page(client.get("/", params=params).text)
    link = page.attrs["json-link"]["href"]
    assert link.startswith("/plan.json?")
    twin = client.get(link).json()
    body = twin["reproduce"]["body"]
    assert twin["plan"] == client.post("/api/v1/plan", json=body).json()
    assert twin["fit"] == client.post("/api/v1/fit", json=body).json()
    assert twin["advice"] == client.post("/api/v1/advise", json=body).json()
    # the twin points back at the page it is the twin of
    assert Page(client.get(twin["page"]).text).words("verdict") == page.words("verdict")


def test_the_compare_pages_json_twin_is_the_apis_plans(client):
    params = {"model": "meta-llama/Llama-3.1-8B", "gpu": "RTX 4090"}
    page = Page(client.get("/compare", params=params).text)
    link = page.attrs["json-link"]["href"]
    assert link == "/compare.json?model=meta-llama/Llama-3.1-8B&gpu=RTX+4090"
    assert "reserve and band come from the calibrated formula" in page.words("compare-formula")
    twin = client.get(link).json()
    assert [m["method"] for m in twin["methods"]] == list(pages.COMPARE_METHODS)
    for row in twin["methods"]:
        # a view of four plans uses the formula (a trace each would take long), and says so in each plan
        assert row["plan"]["options"]["simulate_allocator"] is False and row["plan"]["could_simulate"] is True
        assert row["plan"] == client.post("/api/v1/plan", json=params | {"method": row["method"], "simulate_allocator": False}).json()


def test_the_matrix_pages_json_twin_is_the_apis_checks(client):
    page = Page(client.get("/matrix", params={"method": "qlora"}).text)
    link = page.attrs["json-link"]["href"]
    assert "Reserves and bands from the calibrated formula" in page.words("matrix-formula")
    assert link.startswith("/matrix.json?") and "method=qlora" in link
    twin = client.get(link).json()
    assert [row["model"] for row in twin["models"]] == list(pages.MATRIX_MODELS)
    for row in (twin["models"][0], twin["models"][-1]):
        for cell in (row["checks"][0], row["checks"][-1]):
            api = client.post("/api/v1/check", json={"model": row["model"], "method": "qlora", "gpu": cell["gpu"]["name"], "simulate_allocator": False}).json()
            assert cell == api


@pytest.mark.parametrize("path", ["/plan.json", "/compare.json", "/matrix.json"])
def test_a_json_twin_refuses_bad_input_as_the_api_does(client, path):
    response = client.get(path, params={"model": "no/such-model", "method": "full"} if path != "/matrix.json" else {"seq_len": "-1"})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail and {"loc", "msg"} <= detail[0].keys()


# -- Markdown ---------------------------------------------------------------------------------------


def test_the_markdown_summary_says_model_gpu_verdict_band_and_components(client):
    page = Page(client.get("/", params=FLAGSHIP).text)
    twin = client.get("/plan.json", params=FLAGSHIP).json()
    plan = twin["plan"]
    text = page.text["markdown-summary"]
    assert text.startswith(f"### VRAM plan: {plan['model']['name']} on 1 × {plan['gpu']['name']}")
    assert f"**Fits**: peak {plan['peak_bytes'] / GIB:.2f} GiB per GPU (band {plan['peak_low_bytes'] / GIB:.2f}–{plan['peak_high_bytes'] / GIB:.2f} GiB" in text
    for component in plan["components"]:
        assert f"| `{component['name']}` | {component['bytes'] / GIB:.2f} |" in text
    assert twin["reproduce"]["cli"] in text
    assert f"- Allocator reserve: from the calibrated formula ({plan['calibration']})" in text
    download = client.get(page.attrs["markdown-link"]["href"])
    assert download.text.strip() == text.strip()
    assert download.headers["content-type"].startswith("text/markdown")
    assert download.headers["content-disposition"].startswith("attachment;")


def test_a_failing_plans_markdown_says_so(client):
    text = Page(client.get("/", params=FAILING).text).text["markdown-summary"]
    assert "**Does not fit**" in text and "short by" in text


# -- GB and GiB ---------------------------------------------------------------------------------------


def test_gpu_choices_give_the_drivers_memory_in_gib(client):
    page = Page(client.get("/").text)
    h100 = find_gpu("H100 SXM")
    labels = dict(page.options["f-gpu"])
    # "80GB" is the maker's; the driver's 81,559 MiB is 79.6 GiB, never rounded up to look like 80
    assert labels[h100.name] == f"{h100.name} ({h100.memory_mib / 1024:.1f} GiB)"
    assert labels[h100.name].endswith("(79.6 GiB)")


@pytest.mark.parametrize("path", ["/", "/compare", "/matrix"])
def test_each_page_says_once_which_unit_is_which(client, path):
    html = client.get(path).text
    assert html.count('class="field-note units"') == 1
    note = Page(html).words("gpu-units" if path == "/" else "units-note")
    assert "maker's GB" in note and "GiB" in note and "79.6 GiB" in note


def test_autocast_off_from_the_form_reaches_the_plan_and_says_so(client):
    """A plain loop over bf16 weights: PEFT's fp32 adapters save fp32 input copies, so the same LoRA
    plan is larger, and the page says which autocast it assumed."""
    base = {"model": "meta-llama/Llama-3.2-1B", "method": "lora", "gradient_checkpointing": "off", "trainer": "hf", "gpu": "H100 SXM"}
    on = client.get("/plan.json", params=base).json()["plan"]
    off = client.get("/plan.json", params={**base, "autocast": "off"}).json()["plan"]
    assert off["peak_bytes"] > 1.1 * on["peak_bytes"]
    page = Page(client.get("/", params={**base, "autocast": "off"}).text)
    assert "no autocast: a plain loop over bf16 weights" in page.words("assumptions")


def test_the_simulated_reserve_from_the_form_reaches_the_plan_and_says_so(client):
    """Advanced > Allocator reserve: the same plan with its reserve from a traced step, and the page
    says which one it used."""
    base = {"model": "meta-llama/Llama-3.2-1B", "method": "lora", "batch_size": "2", "seq_len": "512", "trainer": "hf", "gpu": "H100 SXM"}
    formula = client.get("/plan.json", params=base).json()["plan"]
    simulated = client.get("/plan.json", params={**base, "simulate_allocator": "true"}).json()["plan"]
    assert (formula["reserve_source"], simulated["reserve_source"]) == ("formula", "simulated")
    assert simulated["peak_high_bytes"] - simulated["peak_low_bytes"] < formula["peak_high_bytes"] - formula["peak_low_bytes"]
    page = Page(client.get("/", params={**base, "simulate_allocator": "true"}).text)
    assert "simulated over this run's allocations traced on the meta device" in page.words("assumptions")
    # the searches say they used the formula (one trace per candidate would take minutes)
    assert "use the calibrated formula's reserve and band" in page.words("fit-formula")
