"""NVML detection: a fake NVML stands in for absent hardware; the real path runs everywhere."""

import json
import subprocess
import sys

import pytest

from gpu_catalog.detect import detect
from planner.catalog import load_catalog_spec
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.plan import build_plan

MIB = 1 << 20


class FakeNvml:
    """Two H100s, the second half used; or a failure at a chosen call."""

    def __init__(self, fail_at=None, count=2):
        self.fail_at, self.count, self.shut = fail_at, count, False

    def _maybe_fail(self, call):
        if self.fail_at == call:
            raise RuntimeError(f"{call} failed")

    def init(self):
        self._maybe_fail("init")

    def shutdown(self):
        self.shut = True

    def driver_version(self):
        return "580.65"

    def device_count(self):
        self._maybe_fail("count")
        return self.count

    def name(self, index):
        return "NVIDIA H100 80GB HBM3"

    def memory(self, index):
        total = 81559 * MIB
        used = 0 if index == 0 else total // 2
        return total, total - used, used

    def compute_capability(self, index):
        return 9, 0


def test_fake_gpus_are_read_and_matched():
    fake = FakeNvml()
    found = detect(fake)
    assert [g.catalog_name for g in found.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert found.gpus[1].free_bytes == 81559 * MIB - 81559 * MIB // 2
    assert found.gpus[0].compute_capability == "9.0" and found.driver_version == "580.65"
    assert found.reason is None and fake.shut


@pytest.mark.parametrize("call", ["init", "count"])
def test_failures_are_a_reason_not_an_exception(call):
    found = detect(FakeNvml(fail_at=call))
    assert found.gpus == () and call in found.reason


def test_zero_devices():
    assert "0 devices" in detect(FakeNvml(count=0)).reason


def test_real_nvml_path_never_raises():
    found = detect()  # the real pynvml: on a machine without a driver this is a reason, not an error
    assert found.gpus or found.reason.startswith("no NVIDIA GPU detected")


def test_gpu_auto_plans_against_free_memory(monkeypatch):
    import gpu_catalog.detect as detect_module

    monkeypatch.setattr(detect_module, "PynvmlBackend", FakeNvml)
    plan = build_plan(load_catalog_spec("Qwen/Qwen2.5-0.5B"), TrainingOptions(gpu="auto"))
    assert plan.gpu.memory_bytes == 81559 * MIB and plan.gpu.count == 2
    assert any("detected by NVML" in a for a in plan.assumptions)


def test_gpu_auto_without_a_gpu_is_a_clear_input_error(monkeypatch):
    import gpu_catalog.detect as detect_module

    monkeypatch.setattr(detect_module, "PynvmlBackend", lambda: FakeNvml(fail_at="init"))
    with pytest.raises(PlanInputError, match="auto: no NVIDIA GPU detected"):
        build_plan(load_catalog_spec("Qwen/Qwen2.5-0.5B"), TrainingOptions(gpu="auto"))


def test_cli_gpus_json_reports_detection():
    out = subprocess.run([sys.executable, "-m", "app.cli", "gpus", "--json"], capture_output=True, text=True, timeout=60)
    data = json.loads(out.stdout)
    assert out.returncode == 0 and data["catalog"]
    assert data["detected"] or data["reason"]


def test_no_bf16_before_ampere_plans_fp16_and_says_so():
    spec = load_catalog_spec("Qwen/Qwen2.5-0.5B")
    t4 = build_plan(spec, TrainingOptions(gpu="T4", precision="bf16", attention="flash"))
    assert t4.options.precision == "fp16" and t4.options.effective_weights_dtype == "fp16"
    assert t4.options.attention == "sdpa"
    assert any("no bf16" in a for a in t4.assumptions) and any("FlashAttention" in a for a in t4.assumptions)
    h100 = build_plan(spec, TrainingOptions(gpu="H100", precision="bf16", attention="flash"))
    assert h100.options.precision == "bf16" and h100.options.attention == "flash"
