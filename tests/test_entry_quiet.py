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
