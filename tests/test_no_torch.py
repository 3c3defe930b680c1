"""A catalog plan must not import torch or transformers: CI capacity checks stay fast."""

import subprocess
import sys

CODE = """
import sys
from app.cli import main
code = main(["check", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--gpu", "RTX 4000 Ada"])
heavy = sorted(m for m in ("torch", "transformers", "peft", "fastapi") if m in sys.modules)
print("HEAVY", heavy, "EXIT", code)
"""


def test_catalog_plan_imports_neither_torch_nor_transformers():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert "HEAVY [] EXIT 0" in out.stdout, out.stdout + out.stderr
