"""A catalog plan with the formula's reserve must not import torch or transformers, so a CI capacity
check stays fast; and where they are not installed (the Docker image), a plan that would simulate
the allocator by default falls back to the formula and says why, without trying to import them."""

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


def test_without_torch_installed_the_default_plan_uses_the_formula_and_says_why():
    env = {k: v for k, v in os.environ.items() if k != "VRAMPLAN_SIMULATE_ALLOCATOR"}
    # None in sys.modules: what find_spec and import see where the package is not installed
    block = "for name in ('torch', 'transformers', 'peft', 'trl'): sys.modules[name] = None"
    out = _run(CODE.format(block=block, extra=', "--json"'), env)
    assert "HEAVY [] EXIT 0" in out, out
    assert '"reserve_source": "formula"' in out
    json_out = _run(CODE.replace('"check"', '"plan"').format(block=block, extra=', "--json"'), env)
    assert "no simulation: torch, transformers, peft, trl not installed here (pip install 'vramplan[launch]')" in json_out, json_out
