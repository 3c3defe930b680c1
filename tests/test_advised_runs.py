"""The advice is what runs (issue 24, item 3): a launch, its dry run and the exports take the
advisor's hyperparameters for the method and stage wherever the user gave none (learning rate,
accumulation, epochs, warmup, schedule, LoRA alpha and dropout), show them before the start, keep
a value the user gave, and an export marks what is a placeholder or an assumption."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from app.cli import main
from planner.advisor import LEARNING_RATE, run_defaults
from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions

MODEL = "Qwen/Qwen2.5-0.5B"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _yaml(text: str) -> dict:
    return yaml.safe_load(text)


def test_run_defaults_are_the_advices_for_the_method_and_stage():
    spec = load_catalog_spec(MODEL)
    lora = run_defaults(spec, TrainingOptions(method="lora", batch_size=2), num_examples=1_000)
    assert lora["learning_rate"] == LEARNING_RATE[("sft", "adapter")] == 2e-4
    assert lora["gradient_accumulation_steps"] == 8 and lora["lora_alpha"] == 32 and lora["lora_dropout"] == 0.1  # small data
    assert lora["epochs"] == 3 and lora["warmup_steps"] == 0.03 and lora["lr_scheduler_type"] == "cosine"
    full = run_defaults(spec, TrainingOptions(method="full"), num_examples=100_000)
    assert full["learning_rate"] == 2e-5 and full["epochs"] == 1 and "lora_alpha" not in full
    # GRPO: accumulation is TRL's generation batch, which the plan's KV cache holds: not advised
    assert "gradient_accumulation_steps" not in run_defaults(spec, TrainingOptions(method="lora", stage="grpo"))


def test_the_trl_export_carries_the_advice_and_marks_placeholders(capsys):
    code = main(["export", MODEL, "--format", "trl", "--method", "lora"])
    out, err = capsys.readouterr()
    assert code == 0, err
    config = _yaml(out)
    assert config["learning_rate"] == 2e-4 and config["gradient_accumulation_steps"] == 16 and config["num_train_epochs"] == 3
    assert config["warmup_steps"] == 0.03 and config["lr_scheduler_type"] == "cosine"
    assert config["lora_alpha"] == 32 and config["lora_dropout"] == 0.05
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert any(line.startswith("# placeholder: set dataset_name") for line in comments)
    assert any(line.startswith("# assumed: bf16") for line in comments)
    assert any(line.startswith("# advised: ") and "learning_rate 0.0002" in line for line in comments)
    assert "vramplan: placeholder: set dataset_name" in err and "assumed: bf16" in err


def test_a_value_the_user_gave_is_kept_and_not_called_a_placeholder(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    code = main(["export", MODEL, "--format", "axolotl", "--method", "lora", "--dataset", str(data), "--precision", "bf16",
                 "--learning-rate", "1e-4", "--gradient-accumulation-steps", "2", "--lora-dropout", "0", "--max-steps", "50"])
    out, err = capsys.readouterr()
    assert code == 0, err
    config = _yaml(out)
    assert config["learning_rate"] == 1e-4 and config["gradient_accumulation_steps"] == 2 and config["lora_dropout"] == 0
    assert config["max_steps"] == 50 and "num_epochs" not in config  # steps given: no advised epochs beside them
    assert config["warmup_ratio"] == 0.03 and config["lr_scheduler"] == "cosine"
    assert "placeholder" not in out and "assumed: bf16" not in out and "placeholder" not in err


def test_the_cli_dry_run_shows_the_advice_and_leaves_no_run_directory(tiny_run, tmp_path, capsys):
    data_dir = tmp_path / "data"
    args = ["launch", str(tiny_run["model"]), "--dataset", str(tiny_run["sft"]), "--device", "cpu", "--dry-run",
            "--data-dir", str(data_dir), "--method", "lora", "--lora-r", "4", "--learning-rate", "3e-4"]
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    dry = json.loads(out)
    trl = _yaml(dry["files"]["trl.yaml"])
    assert trl["learning_rate"] == 3e-4  # given: kept
    assert trl["gradient_accumulation_steps"] == 16 and trl["lora_alpha"] == 8 and trl["lora_dropout"] == 0.1  # 48 rows: small data
    assert trl["num_train_epochs"] == 3 and trl["lr_scheduler_type"] == "cosine" and trl["warmup_steps"] == 0.03
    assert "learning_rate" not in dry["advised"] and dry["advised"]["gradient_accumulation_steps"] == 16
    assert dry["plan"]["options"]["gradient_accumulation_steps"] == 16  # planned with the accumulation it runs with
    assert not Path(dry["run_dir"]).exists()
    code = main(args)
    out, _ = capsys.readouterr()
    assert code == 0 and re.search(r"settings from the advice for lora sft: epochs 3, warmup_steps 0.03, .*gradient_accumulation_steps 16", out)
    assert "learning_rate" not in out.split("settings from the advice", 1)[1].splitlines()[0]


def test_runs_export_with_no_rows_says_so(tmp_path, capsys):
    code = main(["runs", "export", "--data-dir", str(tmp_path / "data")])
    out, err = capsys.readouterr()
    assert code == 0 and out == "" and "no finished runs" in err
