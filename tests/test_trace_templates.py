"""planner/trace_templates.py: a shipped template replays a catalog step's trace exactly, without
torch, and is used only where it was recorded for these options, sizes and libraries."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner import step_trace, trace_templates
from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.request import single_plan_options
from planner.template_build import encoded, solve

MODEL = "HuggingFaceTB/SmolLM2-135M"
README_MODEL = "meta-llama/Llama-3.1-8B"


def _settled(model, **options):
    spec = load_catalog_spec(model)
    settled = single_plan_options(spec, TrainingOptions(**options), None)
    return step_trace._config_to_trace(spec, None), settled


def test_every_shipped_template_was_recorded_with_the_pinned_libraries_and_this_trace_code():
    # CI installs the pins: a template recorded under others would never be used, and plans would
    # trace for seconds where they should answer at once. Record them again: python -m planner.template_build
    shipped = sorted(trace_templates.TEMPLATES_DIR.glob("*.json.xz"))
    assert len(shipped) >= 2
    for path in shipped:
        data = trace_templates._read(path)
        assert data is not None and data["fingerprint"] == trace_templates.fingerprint(), path.name


@pytest.mark.parametrize(("method", "batch_size", "seq_len"), [("lora", 5, 640), ("full", 1, 2944)])
def test_a_template_gives_the_traced_step_at_a_size_it_was_not_recorded_at(method, batch_size, seq_len):
    config, options = _settled(MODEL, method=method, batch_size=batch_size, seq_len=seq_len)
    templated = step_trace.from_template(config, options)
    assert templated is not None and templated.from_template
    traced = step_trace.simulate_step(config, options)
    assert (templated.peaks, templated.default_peaks, templated.outside_allocator_bytes) == (
        traced.peaks, traced.default_peaks, traced.outside_allocator_bytes)
    # event for event, size for size: not only where the allocator's rounding would hide a difference
    template = trace_templates.find(config, step_trace.template_options(options), batch_size, seq_len)
    assert encoded(template.events_for(batch_size, seq_len)) == encoded(step_trace.traced_events(config, options).events)


def test_a_length_between_multiples_of_128_is_traced():
    # FlashAttention's backward pads the sequence to 128 for two workspaces: between multiples a
    # size is not linear in the length (2,249 tokens: the padded workspace is 2,304 long)
    config, options = _settled(MODEL, method="lora", batch_size=1, seq_len=2249)
    assert step_trace.from_template(config, options) is None
    assert step_trace.from_template(config, options.model_copy(update={"seq_len": 2304})) is not None


def test_a_template_is_not_used_for_other_options_sizes_outside_its_region_or_other_libraries(monkeypatch):
    config, options = _settled(MODEL, method="lora")
    assert step_trace.from_template(config, options) is not None
    for other in ({"lora_r": 32}, {"method": "dora"}, {"gradient_checkpointing": False}, {"seq_len": 12000}, {"batch_size": 16, "seq_len": 256}):
        assert step_trace.from_template(config, options.model_copy(update=other)) is None, other
    assert step_trace.from_template({**config, "intermediate_size": 1600}, options) is None
    monkeypatch.setenv("VRAMPLAN_TRACE_TEMPLATES", "off")
    assert step_trace.from_template(config, options) is None
    monkeypatch.delenv("VRAMPLAN_TRACE_TEMPLATES")
    monkeypatch.setattr(trace_templates, "fingerprint", lambda: {"libraries": {"transformers": "9.0"}, "code": "x"})
    assert step_trace.from_template(config, options) is None


def test_sizes_are_solved_from_four_points_and_a_size_of_another_form_is_refused():
    points = ((2, 1024), (3, 1024), (2, 1280), (3, 1280))

    def sizes(b, s):  # a weight, shifted labels b * (s - 1) * 8, activations b * s * 576 * 2
        return [1_000_000, 8 * b * (s - 1), 1152 * b * s]

    assert solve(points, {point: sizes(*point) for point in points}) == [(1_000_000, 0, 0, 0), (0, 0, -8, 8), (0, 0, 0, 1152)]
    from planner.template_build import NotATemplate

    with pytest.raises(NotATemplate):  # a third of the tokens is no integer term
        solve(points, {(b, s): [b * s // 3 + b * s % 3] for b, s in points})
    # eager attention's b * heads * s * s solves to integers, wrong elsewhere: why build() checks corners
    ((constant, per_seq, per_batch, per_token),) = solve(points, {(b, s): [9 * b * s * s] for b, s in points})
    assert constant + per_seq * 2048 + per_batch + per_token * 2048 != 9 * 2048 * 2048
    events = [("alloc", 1, 10), ("alloc", 2, 20), ("free", 1), ("alloc", 3, 30), ("free", 3), ("free", 2)]
    assert encoded(events) == ([0, 0, -2, 0, -1, -2], [10, 20, 30])


def test_the_readme_check_answers_from_its_template_without_importing_torch(tmp_path):
    # the README's main job: one line, the simulated plan's numbers, no torch, no trace, no fast line
    code = (
        "import sys\n"
        "from app.cli import main\n"
        f"code = main(['check', {README_MODEL!r}, '--method', 'qlora', '--gpu', 'RTX 4000 Ada'])\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "VRAMPLAN_SIMULATE_ALLOCATOR": "", "VRAMPLAN_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "allocator simulated" in done.stdout and done.stdout.startswith("fits: ")
    assert "no torch" in done.stderr and "fast answer" not in done.stderr
    plan = subprocess.run([sys.executable, "-m", "app.cli", "plan", README_MODEL, "--method", "qlora", "--json"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    trace = json.loads(plan.stdout)["trace"]
    assert trace["from_template"] and not trace["kept_in_trace_cache"]


def test_the_first_visit_shows_the_default_plan_simulated_at_once_without_tracing(monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import app

    monkeypatch.delenv("VRAMPLAN_SIMULATE_ALLOCATOR", raising=False)
    traced = []
    monkeypatch.setattr(step_trace, "simulate_step", lambda *args, **kwargs: traced.append(args))
    with TestClient(app) as client:
        page = client.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert 'data-reserve-source="simulated"' in page.text and "fast figure" not in page.text
    assert README_MODEL in page.text and traced == []


def test_templates_stay_current_through_comments_and_glue_and_go_stale_with_the_trace_code():
    source = Path(step_trace.__file__).read_text()
    shape = trace_templates._code_shape(source)
    # a comment, a docstring, or how traces are cached and refused: the same templates
    assert trace_templates._code_shape(source.replace('"""The event list of', '"""The list of events of')) == shape
    assert trace_templates._code_shape(source.replace("MAX_TRACES_IN_LINE = 3", "MAX_TRACES_IN_LINE = 4")) == shape
    # what the step allocates: every template is stale
    assert trace_templates._code_shape(source.replace("CUBLAS_WORKSPACE_BYTES = 32 << 20", "CUBLAS_WORKSPACE_BYTES = 16 << 20")) != shape


def test_a_large_model_s_template_is_replayed_after_the_formula_s_fast_answer(monkeypatch, capsys):
    # a 70B model's template is about 130,000 events: a second to replay, so the page and the CLI
    # answer with the formula first, as for a trace, and say the template follows
    from app.cli.plan import single_plan

    monkeypatch.delenv("VRAMPLAN_SIMULATE_ALLOCATOR", raising=False)
    monkeypatch.setenv("VRAMPLAN_TRACE_CACHE", "off")
    traced = []
    monkeypatch.setattr(step_trace, "simulate_step", lambda *args, **kwargs: traced.append(args))
    _, plan = single_plan("meta-llama/Llama-3.1-70B", TrainingOptions(method="qlora", gpu="A100 80GB"))
    assert "replaying its shipped trace template for the exact one" in capsys.readouterr().err
    assert plan.reserve_source == "simulated" and plan.trace["from_template"] and traced == []


def test_a_second_template_takes_trl_s_second_tile_of_tokens():
    # TRL's fused head loops over 4,096-token tiles: one sequence of 8k is another event list
    config, options = _settled(MODEL, method="lora", seq_len=8192)
    templated = step_trace.from_template(config, options)
    assert templated is not None
    assert templated.peaks == step_trace.simulate_step(config, options).peaks


def test_an_option_added_after_a_template_leaves_it_for_plans_at_its_default(monkeypatch):
    """A template's key is the traced options less those at today's default: one recorded before
    an option existed holds for plans that leave it there, not for plans that set it, and a
    changed default parts the template's recorded value from it."""
    config, options = _settled(MODEL, method="lora", batch_size=2, seq_len=1024)
    dump = step_trace.template_options(options)
    assert trace_templates.find(config, dump, 2, 1024) is not None
    older = {k: v for k, v in dump.items() if k != "modules_to_save"}
    data = trace_templates._read(trace_templates.template_path(config))
    assert all("modules_to_save" not in entry["options"] or entry["options"]["modules_to_save"] is None for entry in data["templates"])
    assert trace_templates._set_options(older) == trace_templates._set_options(dump)
    assert trace_templates.find(config, dict(dump, modules_to_save=["lm_head"]), 2, 1024) is None
    defaults = dict(trace_templates._option_defaults(), lora_r=8)
    monkeypatch.setattr(trace_templates, "_option_defaults", lambda: defaults)
    assert trace_templates.find(config, dict(dump, lora_r=8), 2, 1024) is None
