"""The trainer entry drops bitsandbytes' notice about the optional `kernels` package, which its CPU
backend logs at import in every run (issue 24), and nothing else that logger says."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_kernels_notice_is_dropped_and_other_records_are_not():
    code = (
        "import logging\n"
        "from launcher.entry import quiet_optional_kernels, BNB_CPU_LOGGER\n"
        "quiet_optional_kernels()\n"
        "log = logging.getLogger(BNB_CPU_LOGGER)\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure', \"No module named 'kernels'\")\n"
        "log.warning('something else went wrong')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "kernels-community" not in err and "something else went wrong" in err


def test_importing_bitsandbytes_after_the_filter_says_nothing_of_kernels():
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, check=True).stderr
    if "kernels-community" not in bare:
        pytest.skip("this CPU does not take bitsandbytes' optional kernels path (no AVX512-BF16)")
    code = "from launcher.entry import quiet_optional_kernels\nquiet_optional_kernels()\nimport bitsandbytes\n"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "kernels" not in err, err


# A run that needs nothing of bitsandbytes starts without importing it (2.5 s of every start on CPU);
# one that does (4-bit or 8-bit weights, 8-bit or paged optimizers) still gets it through PEFT and TRL.
_IMPORTS_OF_A_RUN = (
    "import sys\n"
    "from launcher.entry import leave_bitsandbytes_unloaded\n"
    "leave_bitsandbytes_unloaded({options!r})\n"
    "import peft, trl\n"
    "from trl import SFTConfig, SFTTrainer, get_quantization_config\n"
    "from peft import LoraConfig, get_peft_model\n"
    "from transformers import BitsAndBytesConfig\n"
    "from transformers.utils import is_bitsandbytes_available\n"
    "print(sys.modules.get('bitsandbytes') is not None, is_bitsandbytes_available())\n"
)


def test_a_run_without_bitsandbytes_imports_peft_trl_and_transformers_without_it():
    options = {"method": "lora", "optimizer": "adamw"}
    out = subprocess.run([sys.executable, "-c", _IMPORTS_OF_A_RUN.format(options=options)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_only_the_runs_that_do_not_use_it_leave_bitsandbytes_unloaded(monkeypatch):
    from launcher.entry import leave_bitsandbytes_unloaded

    # recorded either way, so the worker's own sys.modules entry is back after the test
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    leave_bitsandbytes_unloaded({"method": "qlora", "optimizer": "adamw"})
    assert "bitsandbytes" not in sys.modules  # left for PEFT and TRL to import
    leave_bitsandbytes_unloaded({"method": "lora", "optimizer": "adamw"})
    assert "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None


@pytest.mark.parametrize(("options", "uses"), [
    ({"method": "full", "optimizer": "adamw_foreach", "quantization": None}, False),
    ({"method": "dora", "optimizer": "adafactor", "quantization": "none"}, False),
    ({"method": "qlora", "optimizer": "adamw", "quantization": None}, True),
    ({"method": "lora", "optimizer": "adamw", "quantization": "fp4"}, True),
    ({"method": "lora", "optimizer": "adamw", "quantization": "int8"}, True),
    ({"method": "full", "optimizer": "adamw_8bit"}, True),
    ({"method": "lora", "optimizer": "paged_adamw_32bit"}, True),
])
def test_what_uses_bitsandbytes(options, uses):
    from launcher.entry import uses_bitsandbytes

    assert uses_bitsandbytes(options) is uses
