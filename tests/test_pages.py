"""The pages as a user reads them (FastAPI's TestClient): what the address reopens, what the
form shows against what the result used, the names a user types, and the words on the page.
Every assertion reads one element (the verdict, a selected option, a link), never text that is
on every page anyway."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi.testclient import TestClient

import app.pages as pages
from app.main import app
from gpu_catalog.detect import DetectedGPU, Detection
from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import GIB, build_plan
from tests.conftest import TINY

MODEL = "meta-llama/Llama-3.1-8B"
FLAGSHIP = {"model": "meta-llama/Llama-2-13b-hf", "method": "qlora", "gpu": "RTX 4000 Ada"}
HTMX = {"HX-Request": "true"}
VOID = {"input", "wbr", "br", "img", "meta", "link", "hr", "col", "source"}


class Page(HTMLParser):
    """Just enough of the DOM for these tests: the text and attributes of elements with an id,
    each select's selected option, option texts and optgroup labels."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict] = {}
        self.selected: dict[str, str] = {}
        self.options: dict[str, list[tuple[str, str]]] = {}
        self.groups: dict[str, list[str]] = {}
        self._open: list[str | None] = []
        self._select: str | None = None
        self._option: list | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.attrs[attrs["id"]] = attrs
            self.text.setdefault(attrs["id"], "")
        if tag == "select":
            self._select = attrs.get("id")
            self.options[self._select], self.groups[self._select] = [], []
        elif tag == "optgroup" and self._select:
            self.groups[self._select].append(attrs.get("label", ""))
        elif tag == "option" and self._select:
            self._option = [attrs.get("value", ""), ""]
            if "selected" in attrs:
                self.selected[self._select] = attrs.get("value", "")
        if tag not in VOID:
            self._open.append(attrs.get("id"))

    def handle_endtag(self, tag):
        if tag == "option" and self._option is not None:
            self.options[self._select].append(tuple(self._option))
            self._option = None
        if tag == "select":
            self._select = None
        if tag not in VOID and self._open:
            self._open.pop()

    def handle_data(self, data):
        for element_id in filter(None, self._open):
            self.text[element_id] += data
        if self._option is not None:
            self._option[1] += data

    def words(self, element_id: str) -> str:
        return " ".join(self.text[element_id].split())


@pytest.fixture(scope="module")
def client():
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(autouse=True)
def no_local_gpu(monkeypatch):
    """The page must not depend on the machine the tests run on."""
    monkeypatch.setattr(pages, "detect", lambda: Detection(reason="no NVIDIA GPU detected: NVML Shared Library Not Found"))


def _page(client, path: str, params=None, headers=None) -> tuple[Page, object]:
    response = client.get(path, params=params, headers=headers)
    return Page(response.text), response


# -- 1. every address reopens the full page -----------------------------------------------------


def test_htmx_fragment_pushes_the_full_page_address(client):
    params = {"model": MODEL, "num_gpus": "", "method": "qlora", "gpu": "NVIDIA GeForce RTX 4090", "seq_len": ""}
    page, response = _page(client, "/result", params, HTMX)
    pushed = urlsplit(response.headers["hx-push-url"])
    assert pushed.path == "/"
    # the empty fields are left out; the rest is the same state
    assert dict(parse_qsl(pushed.query)) == {"model": MODEL, "method": "qlora", "gpu": "NVIDIA GeForce RTX 4090"}
    assert "plan-form" not in page.attrs  # a fragment: the form stays as the user left it
    assert "Vary" in response.headers and "HX-Request" in response.headers["Vary"]
    reopened, again = _page(client, f"{pushed.path}?{pushed.query}")
    assert again.status_code == 200 and "plan-form" in reopened.attrs
    assert reopened.words("verdict") == page.words("verdict")
    assert reopened.selected["f-gpu"] == "NVIDIA GeForce RTX 4090" and reopened.selected["f-method"] == "qlora"


def test_a_result_address_opened_directly_is_the_full_page(client):
    page, response = _page(client, "/result", {"model": MODEL, "method": "full", "gpu": "RTX 4090"})
    assert response.status_code == 200 and '<link rel="stylesheet" href="/static/app.css' in response.text
    assert "plan-form" in page.attrs and page.selected["f-method"] == "full"
    assert page.words("verdict").startswith("✘ Does not fit")


# -- 2. the form shows what the result used -----------------------------------------------------


def test_an_empty_form_selects_the_gpu_the_plan_used(client):
    page, _ = _page(client, "/")
    plan = build_plan(load_catalog_spec(MODEL), TrainingOptions())
    assert page.selected["f-gpu"] == plan.gpu.name == "NVIDIA H100 80GB HBM3"
    assert plan.gpu.name in page.words("verdict")
    defaults = TrainingOptions()
    for field in ("method", "stage", "optimizer", "precision", "attention", "trainer", "parallelism", "offload"):
        assert page.selected[f"f-{field}"] == getattr(defaults, field), field
    assert page.selected["f-gradient_checkpointing"] == "true"
    assert page.attrs["f-seq_len"]["placeholder"] == str(defaults.seq_len)


def test_a_short_gpu_name_selects_its_card(client):
    page, _ = _page(client, "/", FLAGSHIP)
    assert page.selected["f-gpu"] == "NVIDIA RTX 4000 Ada Generation"
    assert "NVIDIA RTX 4000 Ada Generation" in page.words("verdict")


def test_an_unknown_gpu_stays_selected_as_given(client):
    page, response = _page(client, "/", {"model": MODEL, "gpu": "toaster 9000"})
    assert response.status_code == 422 and page.selected["f-gpu"] == "toaster 9000"
    assert page.groups["f-gpu"][0] == "As given"


# -- 3. links follow the fields; a pasted config says it overrides the model --------------------


def test_the_compare_link_follows_the_current_fields(client):
    page, _ = _page(client, "/result", {"model": MODEL, "method": "dora", "gpu": "L4", "seq_len": "4096"}, HTMX)
    link = urlsplit(page.attrs["compare-link"]["href"])
    assert link.path == "/compare"
    assert dict(parse_qsl(link.query)) == {"model": MODEL, "method": "dora", "gpu": "L4", "seq_len": "4096"}
    assert page.attrs["compare-link"]["hx-swap-oob"] == "true"


def test_a_pasted_config_names_its_model_and_marks_the_model_field(client):
    config = {**TINY["llama"], "_name_or_path": "acme/tiny-llama"}
    page, response = _page(client, "/", {"model": MODEL, "config_json": json.dumps(config), "gpu_memory_gib": "8"})
    assert response.status_code == 200
    assert page.words("model-name") == "acme/tiny-llama"
    assert "overridden" in page.attrs["model-note"]["class"]
    assert page.words("model-note").startswith("Not used: the pasted config.json (acme/tiny-llama)")
    plain, _ = _page(client, "/", {"model": MODEL})
    assert plain.words("model-note") == "" and "overridden" not in plain.attrs["model-note"]["class"]
    assert plain.words("model-name") == MODEL


def test_the_fragment_updates_the_model_note_out_of_band(client):
    config = {**TINY["llama"], "_name_or_path": "acme/tiny-llama"}
    page, _ = _page(client, "/result", {"model": MODEL, "config_json": json.dumps(config), "gpu_memory_gib": "8"}, HTMX)
    assert page.attrs["model-note"]["hx-swap-oob"] == "true" and "overridden" in page.attrs["model-note"]["class"]


# -- 4. names a user types ----------------------------------------------------------------------


@pytest.mark.parametrize("typed,method", [("QLoRA", "qlora"), ("DoRA", "dora"), ("Prompt-Tuning", "prompt_tuning")])
def test_method_names_are_forgiving_about_case(client, typed, method):
    page, response = _page(client, "/", {"model": MODEL, "method": typed, "optimizer": "Paged AdamW 8bit"})
    assert response.status_code == 200
    assert page.selected["f-method"] == method and page.selected["f-optimizer"] == "paged_adamw_8bit"
    assert f"({method}, sft)" in page.words("model-line")


@pytest.mark.parametrize("typed,shown", [("off", "false"), ("No", "false"), ("on", "true")])
def test_checkpointing_words_select_what_the_plan_used(client, typed, shown):
    page, _ = _page(client, "/", {"model": MODEL, "gradient_checkpointing": typed})
    assert page.selected["f-gradient_checkpointing"] == shown
    # and the plan did what the select says: only a checkpointed plan keeps layer checkpoints
    assert ("activations.checkpoints" in page.words("components")) == (shown == "true")


@pytest.mark.parametrize("typed", ["RTX4090", "rtx 4090", "Rtx-4090"])
def test_gpu_names_are_forgiving_about_case_spaces_and_hyphens(client, typed):
    page, response = _page(client, "/", {"model": MODEL, "method": "qlora", "gpu": typed})
    assert response.status_code == 200 and "NVIDIA GeForce RTX 4090" in page.words("verdict")


def test_a_line_name_plans_its_usual_card_and_says_which(client):
    page, _ = _page(client, "/", {"model": MODEL, "method": "qlora", "gpu": "a100"})
    assert page.selected["f-gpu"] == "NVIDIA A100-SXM4-80GB" and "NVIDIA A100-SXM4-80GB" in page.words("verdict")
    first = page.words("assumptions").split("GPU 'a100'", 1)
    assert len(first) == 2 and "planned on NVIDIA A100-SXM4-80GB" in first[1] and "NVIDIA A100-PCIE-40GB" in first[1]


def test_an_instruct_variant_plans_with_its_base_spec(client):
    page, response = _page(client, "/", {"model": "meta-llama/Llama-3.1-8B-Instruct", "method": "qlora", "gpu": "L4"})
    base, _ = _page(client, "/", {"model": MODEL, "method": "qlora", "gpu": "L4"})
    assert response.status_code == 200
    assert page.words("model-name") == "meta-llama/Llama-3.1-8B-Instruct"
    assert page.words("verdict") == base.words("verdict")
    assert f"base model {MODEL}" in page.words("assumptions")
    compare, response = _page(client, "/compare", {"model": "google/gemma-2-9b-it", "gpu": "L4"})
    assert response.status_code == 200 and response.text.count("<svg") == 4


# -- 5. the repository cites only what it holds -------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_readme_and_docs_cite_only_files_in_the_repository():
    # paths in the docs pages are written from the repository's top level too
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    cited = re.findall(r"`(?:python )?([\w.-]+(?:/[\w.<>*-]+)+/?)`", text)
    # a path starts at the repository's top level, or outside it (model ids and flags also hold "/")
    roots = {p.name for p in ROOT.iterdir()} | {"..", "shared"}
    paths = [c for c in cited if c.split("/")[0] in roots and not re.search(r"[<>*]", c)]
    assert len(paths) > 5, paths
    missing = [c for c in paths if ".." in c.split("/") or not (ROOT / c).exists()]
    assert not missing, missing


def test_plan_notes_cite_no_file_outside_the_repository():
    for method in ("full", "qlora"):
        plan = build_plan(load_catalog_spec(MODEL), TrainingOptions(method=method, gpu="RTX 4090"))
        for text in [c.note for c in plan.all_components] + list(plan.assumptions):
            assert "shared/" not in text, text


# -- 6. words and layout on the page ------------------------------------------------------------


def test_a_failing_plan_says_how_short_it_is(client):
    page, _ = _page(client, "/", {"model": MODEL, "method": "full", "gpu": "RTX 4090"})
    plan = build_plan(load_catalog_spec(MODEL), TrainingOptions(method="full", gpu="RTX 4090"))
    short = plan.peak_bytes - plan.usable_bytes
    assert f"short by {short / GIB:,.2f} GiB" in page.words("verdict")
    assert "headroom" not in page.words("verdict") and "-" not in page.words("verdict").split("short by")[1]
    fits, _ = _page(client, "/", {"model": MODEL, "method": "qlora", "gpu": "H100 SXM"})
    assert "headroom" in fits.words("verdict") and "short by" not in fits.words("verdict")


def test_the_chart_gives_the_unit_of_the_gpu_memory(client):
    response = client.get("/", params=FLAGSHIP)
    usable = re.search(r"<text[^>]*>(usable [^<]*)</text>", response.text).group(1)
    assert re.fullmatch(r"usable \d+\.\d GiB of \d+\.\d GiB", usable), usable


def test_component_names_break_only_at_their_dots(client):
    response = client.get("/", params=FLAGSHIP)
    names = re.findall(r'<code class="name">(.*?)</code>', response.text)
    assert "activations.<wbr>checkpoints" in names
    assert all(part and "<" not in part for n in names for part in n.split(".<wbr>"))


def test_the_weights_dtype_default_is_labelled(client):
    page, _ = _page(client, "/")
    assert page.options["f-weights_dtype"][0] == ("", "same as precision")
    assert page.selected["f-weights_dtype"] == ""


def test_gpus_are_grouped_by_family(client):
    page, _ = _page(client, "/")
    assert page.groups["f-gpu"] == ["Data centre", "Workstation", "Consumer (GeForce)", "AMD"]
    values = [v for v, _ in page.options["f-gpu"]]
    assert values.index("NVIDIA H100 80GB HBM3") < values.index("NVIDIA RTX A6000") < values.index("NVIDIA GeForce RTX 4090") < values.index("AMD Instinct MI300X")


def test_a_detected_gpu_comes_first(client, monkeypatch):
    h100 = DetectedGPU(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, GIB, "9.0", "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(pages, "detect", lambda: Detection((h100,), "570.00"))
    page, _ = _page(client, "/")
    assert page.groups["f-gpu"][0] == "Detected on this server" and page.options["f-gpu"][0][0] == "auto"
    assert "gpu-hint" not in page.attrs


def test_no_gpu_is_said_once_plainly_near_the_gpu_field(client):
    page, response = _page(client, "/")
    assert page.words("gpu-hint") == "No GPU detected on this server; pick one from the list."
    assert "NVML" not in response.text and response.text.count("No GPU detected") == 1


def test_pages_have_a_favicon(client):
    for path in ("/", "/compare", "/matrix"):
        icon = re.search(r'<link rel="icon" href="([^"]+)"', client.get(path).text)
        assert icon and icon.group(1).startswith("data:image/svg+xml,"), path


# -- 7. accessibility: landmarks, names, what is announced ---------------------------------------

FAILING = {"model": "meta-llama/Llama-3.1-70B", "method": "full", "gpu": "RTX 4090"}


def _element(html: str, element_id: str) -> str:
    """The outer HTML of the element with this id, its nested same-tag elements balanced."""
    start = re.search(rf'<(\w+)[^>]*\bid="{element_id}"', html)
    assert start, element_id
    tag, depth = start.group(1), 0
    for m in re.finditer(rf"<(/?){tag}\b[^>]*>", html[start.start():]):
        depth += -1 if m.group(1) else 1
        if depth == 0:
            return html[start.start(): start.start() + m.end()]
    raise AssertionError(f"{element_id} is not closed")


def _tight_params() -> dict:
    """The flagship at micro-batch 4 on a custom card whose usable memory lies between the
    central figure and the band's high end."""
    plan = build_plan(load_catalog_spec(FLAGSHIP["model"]), TrainingOptions(method="qlora", batch_size=4, gpu_memory_gib=80))
    usable = (plan.peak_bytes + plan.peak_high_bytes) / 2
    return {"model": FLAGSHIP["model"], "method": "qlora", "batch_size": "4", "gpu_memory_gib": repr(usable / 0.95 / GIB)}


def test_a_tight_plan_says_tight_with_the_band(client):
    params = _tight_params()
    page, response = _page(client, "/", params)
    words = page.words("verdict")
    assert response.status_code == 200 and words.startswith("⚠ Tight: ")
    plan = build_plan(load_catalog_spec(FLAGSHIP["model"]), TrainingOptions(method="qlora", batch_size=4, gpu_memory_gib=float(params["gpu_memory_gib"])))
    assert plan.verdict == "tight"
    assert f"band {plan.peak_low_bytes / GIB:.2f}–{plan.peak_high_bytes / GIB:,.2f} GiB" in words
    assert "it may run out of memory" in words and "headroom" not in words
    assert "Allocator reserve › simulated narrows the band" in words  # the way to a narrower band
    box = _element(response.text, "verdict")
    assert 'class="verdict tight"' in box and 'data-verdict="tight"' in box
    # the htmx fragment says the same
    fragment, _ = _page(client, "/result", params, HTMX)
    assert fragment.words("verdict") == words


def test_a_fitting_plan_shows_its_band(client):
    page, _ = _page(client, "/", FLAGSHIP)
    plan = build_plan(load_catalog_spec(FLAGSHIP["model"]), TrainingOptions(method="qlora", gpu="RTX 4000 Ada"))
    assert plan.verdict == "fits" and page.words("verdict").startswith("✔ Fits")
    assert f"band {plan.peak_low_bytes / GIB:.2f}–{plan.peak_high_bytes / GIB:,.2f} GiB" in page.words("verdict")


@pytest.mark.parametrize("params", [FLAGSHIP, FAILING], ids=["fits", "does-not-fit"])
def test_only_the_verdict_is_announced(client, params):
    html = client.get("/", params=params).text
    assert html.count("aria-live") == 1
    live = _element(html, "verdict")
    assert 'aria-live="polite"' in live.split(">", 1)[0]
    words = " ".join(re.sub(r"<[^>]+>", " ", live).split())
    assert re.match(r"(✔ Fits|⚠ Tight|✘ Does not fit): ", words), words
    # not the plan: a screen reader would read it all again after every keystroke
    assert 'id="components"' not in live and 'id="assumptions"' not in live and 'id="model-line"' not in live
    assert "aria-live" not in _element(html, "summary").split(">", 1)[0] and "aria-live" not in _element(html, "result").split(">", 1)[0]


def test_htmx_fills_the_live_verdict_in_place(client):
    """A live region added with its text is not announced: the fragment swaps the inside of the
    #verdict already on the page and leaves the element (and its aria-live) where it is."""
    page, response = _page(client, "/result", FLAGSHIP, HTMX)
    assert page.attrs["verdict"]["hx-swap-oob"] == "innerHTML"
    assert page.words("verdict").startswith("✔ Fits")
    assert "components" not in _element(response.text, "verdict")


@pytest.mark.parametrize("path,params", [("/", {}), ("/", FLAGSHIP), ("/", FAILING), ("/compare", {"model": MODEL, "gpu": "RTX 4090"}), ("/matrix", {"method": "qlora"})])
def test_every_table_header_has_text(client, path, params):
    html = client.get(path, params=params).text
    headers = re.findall(r"<th\b[^>]*>(.*?)</th>", html, re.DOTALL)
    assert headers
    empty = [h for h in headers if not re.sub(r"<[^>]+>", "", h).strip()]
    assert not empty, empty


def test_the_peak_rows_last_header_is_for_screen_readers(client):
    html = client.get("/", params=FLAGSHIP).text
    peak_row = re.search(r"<tr><th>peak per GPU</th>.*?</tr>", html).group(0)
    assert re.search(r'<span class="visually-hidden">reached during \w', peak_row), peak_row
    # the class is defined (in the page's stylesheet: the CSP allows no inline styles), so the text is not shown
    assert ".visually-hidden {" in client.get("/static/app.css").text and 'href="/static/app.css' in html


@pytest.mark.parametrize("path", ["/", "/compare", "/matrix"])
def test_every_page_has_one_main_landmark(client, path):
    html = client.get(path, params={"model": MODEL, "gpu": "RTX 4090"}).text
    assert len(re.findall(r"<main\b", html)) == 1 and html.count("</main>") == 1, path


def test_the_matrix_scroller_can_be_reached_by_keyboard(client):
    html = client.get("/matrix", params={"method": "qlora"}).text
    scroller = re.search(r'<div ([^>]*)><table id="matrix"', html)
    assert scroller, "the matrix is not in its own scrolling box"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', scroller.group(1)))
    assert attrs.get("tabindex") == "0" and attrs.get("role") == "region" and attrs.get("aria-label", "").strip(), attrs


# -- 8. compare: a legend for the bars, one error for the page ------------------------------------


def test_compare_has_a_legend_for_every_fill_in_its_bars(client):
    html = client.get("/compare", params={"model": MODEL, "gpu": "RTX 4090"}).text
    drawn = dict.fromkeys(re.findall(r"<title>(\w+): [\d.]+ GiB</title>", _element(html, "compare")))
    assert {"weights", "gradients", "optimizer_state", "activations"} <= drawn.keys()
    legend = _element(html, "legend")
    items = re.findall(r'<li><img src="([^"]+)" alt="" width="14" height="12"> ([^<]+)</li>', legend)
    labels = [label for _, label in items]
    assert labels[: len(drawn)] == [f.replace("_", " ") for f in drawn]  # each once, in the bars' order
    assert "dashed line: usable memory" in labels
    swatches = {label: src for src, label in items}
    # each swatch is drawn in its family's colour, the same as the bars
    assert "%23f28e2b" in swatches["gradients"] and 'fill="url(#' in html
    assert all(src.startswith("data:image/svg+xml,%3Csvg") for src in swatches.values())
    assert html.count("<svg") == 4  # the swatches are images: the page still draws one bar per method


@pytest.mark.parametrize("gpu,says", [("toaster 9000", "unknown GPU"), ("RTX", "is ambiguous")])
def test_compare_says_a_gpu_error_once(client, gpu, says):
    page, response = _page(client, "/compare", {"model": MODEL, "gpu": gpu})
    assert response.status_code == 422
    assert response.text.count(says) == 1, response.text.count(says)
    assert re.search(r"<li><code>gpu</code>: ", response.text)
    assert "compare" not in page.attrs and "legend" not in page.attrs  # no rows repeating it
    assert page.attrs["c-gpu"]["value"] == gpu  # left as typed, to correct


# -- the upload form and the options the form has no input for ----------------------------------


def _hidden_inputs(html: str, container_id: str) -> dict[str, str]:
    """name -> value of the hidden inputs inside the element with this id."""
    block = re.search(rf'<div id="{container_id}"[^>]*>(.*?)</div>', html, re.S)
    assert block is not None, f"no #{container_id} on the page"
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', block.group(1)))


def test_the_upload_form_carries_the_plans_fields(client):
    """An uploaded config.json is planned with the method and sizes the form shows (it once sent
    only the GPU, so QLoRA became LoRA); the htmx fragment refreshes the copy out of band."""
    params = {"model": MODEL, "method": "qlora", "gpu": "NVIDIA GeForce RTX 4090", "seq_len": "1024"}
    page = client.get("/", params=params)
    carried = _hidden_inputs(page.text, "upload-fields")
    assert carried == {"gpu": "NVIDIA GeForce RTX 4090", "method": "qlora", "seq_len": "1024"}
    fragment = client.get("/result", params={**params, "method": "dora"}, headers=HTMX)
    assert _hidden_inputs(fragment.text, "upload-fields")["method"] == "dora"
    upload = client.post("/", data={k: v for k, v in carried.items()},
                         files={"config_file": ("config.json", json.dumps(TINY["llama"]), "application/json")})
    assert upload.status_code == 200
    assert "(qlora, sft)" in Page(upload.text).words("model-line")


def test_an_option_the_form_has_no_input_for_is_planned_and_kept(client):
    """Every plan option is read from the address, as the CLI and the API take it, and rides along
    in the form: the page plans what a link from them says."""
    params = {"model": MODEL, "method": "qlora", "gpu": "NVIDIA GeForce RTX 4090", "headroom": "0.2", "allocator": "expandable_segments",
              "simulate_allocator": "false"}
    twin = client.get("/plan.json", params=params).json()["plan"]
    assert twin["options"]["headroom"] == 0.2 and twin["options"]["allocator"] == "expandable_segments"
    page = client.get("/", params=params)
    assert re.search(r'<input type="hidden" name="headroom" value="0.2">', page.text)
    assert Page(page.text).selected["f-allocator"] == "expandable_segments"
