"""A catalog plan with the formula's reserve must not import torch or transformers, so a CI capacity
check stays fast; and where they are not installed (the Docker image), a plan that would simulate
the allocator by default replays its shipped trace template where there is one, and otherwise
falls back to the formula and says why, without trying to import them."""

import os
import subprocess
import sys

CODE = """
import sys
{block}
from app.cli import main
code = main(["check", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--gpu", "RTX 4000 Ada"{extra}])
heavy = sorted(m for m in ("torch", "transformers", "peft", "fastapi") if sys.modules.get(m) is not None)
print("HEAVY", heavy, "EXIT", code)
"""


def _run(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return out.stdout + out.stderr


def test_catalog_plan_with_the_formula_imports_neither_torch_nor_transformers():
    env = {k: v for k, v in os.environ.items() if k != "VRAMPLAN_SIMULATE_ALLOCATOR"}
    out = _run(CODE.format(block="", extra=', "--no-simulate-allocator"'), env)
    assert "HEAVY [] EXIT 0" in out, out


def test_without_torch_installed_a_plan_replays_its_shipped_template_or_uses_the_formula_and_says_why():
    env = {k: v for k, v in os.environ.items() if k != "VRAMPLAN_SIMULATE_ALLOCATOR"}
    # None in sys.modules: what find_spec and import see where the package is not installed
    block = "for name in ('torch', 'transformers', 'peft', 'trl'): sys.modules[name] = None"
    # the README's check has a shipped trace template (planner/trace_templates.py): the best answer
    # there is without torch, saying which versions it stands for
    json_out = _run(CODE.replace('"check"', '"plan"').format(block=block, extra=', "--json"'), env)
    assert "HEAVY [] EXIT 0" in json_out, json_out
    assert '"reserve_source": "simulated"' in json_out and "replayed from vramplan's shipped trace template, recorded with torch " in json_out
    # options no template was recorded for: the formula, and why
    out = _run(CODE.format(block=block, extra=', "--lora-r", "32", "--json"'), env)
    assert "HEAVY [] EXIT 0" in out, out
    assert '"reserve_source": "formula"' in out
    json_out = _run(CODE.replace('"check"', '"plan"').format(block=block, extra=', "--lora-r", "32", "--json"'), env)
    assert "no simulation: torch, transformers, peft, trl not installed here (pip install 'vramplan[launch]')" in json_out, json_out
