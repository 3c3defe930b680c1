"""IA3, prompt tuning and prefix tuning are launched, not only planned: TRL's config file has no
words for them, so the trainer entry builds PEFT's config from the plan's options
(launcher/entry.py peft_config_for). A real CPU run of each trains the adapter the plan counted,
tensor for tensor; what cannot run (prefix tuning with gradient checkpointing, an export to a
config file) is refused as bad input before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_launcher import launch_args, run_cli

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(("method", "extra", "peft_type", "advised_rate"), [
    ("ia3", [], "IA3", "0.003"),
    ("prompt_tuning", ["--num-virtual-tokens", "6"], "PROMPT_TUNING", "0.03"),
    ("prefix_tuning", ["--num-virtual-tokens", "6", "--no-gradient-checkpointing"], "PREFIX_TUNING", "0.03"),
])
def test_the_run_trains_the_adapter_the_plan_counted(tiny_run, tmp_path, capsys, method, extra, peft_type, advised_rate):
    from safetensors.torch import load_file

    data_dir = tmp_path / "data"
    code, out, err = run_cli(capsys, launch_args(tiny_run, data_dir, "--method", method, *extra, "--wait", "--json", steps=3))
    record = json.loads(out)
    assert code == 0 and record["state"] == "succeeded", (record, err)
    assert record["method"] == method and record["last_step"] == 3 and record["final_loss"] > 0
    output = Path(record["output_dir"])
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["peft_type"] == peft_type
    saved = load_file(str(output / "adapter_model.safetensors"))
    plan = json.loads((Path(record["run_dir"]) / "spec.json").read_text())["plan"]
    assert sum(t.numel() for t in saved.values()) == plan["model"]["params"]["trainable"] > 0
    if method != "ia3":
        assert adapter["num_virtual_tokens"] == 6
    # the advice's rate for the method (PEFT's examples'), not LoRA's 2e-4
    assert f"learning_rate: {advised_rate}" in (Path(record["run_dir"]) / "trl.yaml").read_text()


def test_ia3_on_named_modules_uses_them(tiny_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, launch_args(tiny_run, tmp_path / "data", "--method", "ia3", "--lora-targets", "q_proj,down_proj",
                                                 "--feedforward-modules", "down_proj", "--wait", "--json", steps=2))
    record = json.loads(out)
    assert code == 0 and record["state"] == "succeeded", (record, err)
    adapter = json.loads((Path(record["output_dir"]) / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "q_proj"] and adapter["feedforward_modules"] == ["down_proj"]


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_no_config_file_exports_them(tiny_run, tmp_path, capsys, method):
    from app.cli import main

    code = main(["export", str(tiny_run["model"]), "--method", method, "--dataset", str(tiny_run["sft"]), "--format", "trl"])
    err = capsys.readouterr().err
    assert code == 2 and "vramplan launch" in err and err.count("\n") == 1, err
