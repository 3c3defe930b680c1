"""A merge run is real: `vramplan merge BASE --run --adapter-dir A --output O` merges a PEFT LoRA
adapter into a Llama built from a config with random weights, the saved shards hold
base + B @ A x scaling, and the host peak the child measured (ru_maxrss less its RSS once
imported) sits within the plan's range (at least the model and adapter, at most the plan's upper
bound, each widened by the band): in the checkpoint's own dtype and from an fp32 checkpoint
merged in bf16. Bad input is exit 2 with one line, before any child starts."""

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from app.cli import main  # noqa: E402
from tests.served import BEARER, client, root  # noqa: E402, F401 (fixtures)


def _build(root, hidden, layers, inter, vocab, dtype, r=8, alpha=16, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    small = _build(root / "small", 512, 4, 1408, 8000, torch.bfloat16)
    other = _build(root / "other", 128, 2, 256, 8000, torch.bfloat16)
    return {"small": small, "other": other, "root": root}


def _run(capsys, base, adapter, out, *extra):
    code = main(["merge", str(base), "--run", "--adapter-dir", str(adapter), "--output", str(out), "--json", *extra])
    captured = capsys.readouterr()
    return code, captured


def test_the_merge_happens_and_its_host_peak_is_within_the_plan(models, capsys):
    from safetensors.torch import load_file

    base, adapter = models["small"]
    out = models["root"] / "merged"
    code, captured = _run(capsys, base, adapter, out)
    assert code == 0, captured.err
    result = json.loads(captured.out)
    # the weights: one layer's merged weight is the base's plus B @ A x alpha / r
    merged = load_file(str(out / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    a = lora[f"base_model.model.{name}.lora_A.weight"].float()
    b = lora[f"base_model.model.{name}.lora_B.weight"].float()
    expected = original[f"{name}.weight"].float() + (b @ a) * (16 / 8)
    got = merged[f"{name}.weight"]
    assert got.dtype == torch.bfloat16
    update = ((b @ a) * (16 / 8)).abs().max()
    assert (got.float() - expected).abs().max() < update / 20  # bf16 rounding, far below the update
    assert (got.float() - original[f"{name}.weight"].float()).abs().max() > update / 2  # it changed, by the update
    assert not any(k for k in merged if "lora" in k)
    # the plan was made for this adapter: its rank and modules
    plan = result["plan"]
    assert plan["options"]["lora_r"] == 8 and "down_proj" in plan["options"]["lora_targets"]
    # measured beside planned: between the floor (model and adapter) and the upper bound, +-10%
    c = result["comparison"]
    assert result["measured"]["host_peak_bytes"] > 0 and c["host_planned_bytes"] == plan["host_merge_bytes"]
    assert c["host_floor_bytes"] * 0.9 <= c["host_measured_bytes"] <= c["host_planned_bytes"] / 0.9, c
    assert c["host_within_band"], c
    assert abs(c["runtime_measured_bytes"] - c["runtime_planned_bytes"]) < 0.25 * c["runtime_planned_bytes"]


def test_an_fp32_checkpoint_merged_in_bf16_holds_the_file_too(models, capsys, tmp_path):
    base, adapter = _build(tmp_path, 512, 2, 1408, 8000, torch.float32)
    code, captured = _run(capsys, base, adapter, tmp_path / "merged")
    assert code == 0, captured.err
    result = json.loads(captured.out)
    names = [c["name"] for c in result["plan"]["host_components"]]
    assert "host.checkpoint" in names
    assert result["comparison"]["host_within_band"], result["comparison"]


def test_a_launched_merge_is_a_run_with_its_measured_peak_beside_the_plan(models, capsys, tmp_path, client):
    """`vramplan merge --launch`: the merge goes through the local backend (shim, entry, events) like a
    training run, ends succeeded in the run store, and the store keeps the measured host peak beside
    the predicted one; `vramplan runs show`, the runs API and the run's page say both."""
    from safetensors.torch import load_file

    base, adapter = models["small"]
    out, data = tmp_path / "merged", tmp_path / "data"  # the served app's data directory (tests/served.py)
    code = main(["merge", str(base), "--launch", "--adapter-dir", str(adapter), "--output", str(out), "--wait", "--json",
                 "--data-dir", str(data)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)
    assert (record["state"], record["stage"], record["method"]) == ("succeeded", "merge", "lora"), record
    spec = json.loads((Path(record["run_dir"]) / "spec.json").read_text())
    assert spec["task"] == "merge" and not (Path(record["run_dir"]) / "trl.yaml").exists()
    floor, planned = spec["merge"]["host_floor_bytes"], spec["merge"]["host_planned_bytes"]
    assert record["predicted_peak_bytes"] == planned
    assert floor * 0.9 <= record["measured_peak_bytes"] <= planned / 0.9, record
    assert record["error_pct"] == pytest.approx(100 * (planned - record["measured_peak_bytes"]) / record["measured_peak_bytes"], abs=0.01)
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    assert main(["runs", "show", record["id"], "--data-dir", str(data)]) == 0
    shown = capsys.readouterr().out
    assert "succeeded" in shown and "measured" in shown and "predicted host peak" in shown
    served = client.get(f"/api/v1/runs/{record['id']}", headers=BEARER)
    assert served.status_code == 200 and served.json()["measured_peak_bytes"] == record["measured_peak_bytes"]
    page = client.get(f"/runs/{record['id']}", headers=BEARER)
    assert page.status_code == 200 and "succeeded" in page.text
    # the page speaks of a merge: its host peak and its adapter, no loss or GPU chart of a training run
    assert "Measured host peak" in page.text and "adapter <code" in page.text and "dataset <code" not in page.text
    assert "Loss per step" not in page.text and "GPU memory per step" not in page.text
    # not a training step: the refit's rows leave it out
    from launcher.supervisor import Supervisor

    assert Supervisor(data).calibration_rows() == []


def test_a_merge_peft_refuses_in_the_run_fails_with_its_reason_and_is_not_resumable(models, capsys, tmp_path):
    """An adapter whose shapes fit but which PEFT will not load (an unknown task_type) passes the
    parent's checks; the run fails with the merge job's words, and resume says a merge keeps no checkpoint."""
    base, adapter = models["small"]
    odd = tmp_path / "odd-adapter"
    shutil.copytree(adapter, odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "task_type": "NOT_A_TASK"}))
    data = tmp_path / "data"
    code = main(["merge", str(base), "--launch", "--adapter-dir", str(odd), "--output", str(tmp_path / "o"), "--wait", "--json",
                 "--data-dir", str(data)])
    record = json.loads(capsys.readouterr().out)
    assert code == 4 and record["state"] == "failed", record
    assert record["hint"] and "adapter" in record["hint"]
    code = main(["runs", "resume", record["id"], "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "is a merge, which keeps no checkpoint" in err and err.count("\n") == 1


def test_a_merge_launch_with_a_bad_adapter_starts_nothing(models, capsys, tmp_path):
    base, _ = models["small"]
    _, other_adapter = models["other"]
    code = main(["merge", str(base), "--launch", "--adapter-dir", str(other_adapter), "--output", str(tmp_path / "o"),
                 "--data-dir", str(tmp_path / "data")])
    _one_line_error(code, capsys.readouterr(), "adapter_dir", "another model")
    assert not (tmp_path / "data" / "runs").exists() or not any((tmp_path / "data" / "runs").iterdir())


def test_a_peak_under_the_floor_or_over_the_plan_is_outside_the_band(models):
    from app.merge_run import compare, plan_run
    from planner.merge import MergeOptions

    base, adapter = models["small"]
    plan = plan_run(str(base), str(adapter), str(models["root"] / "unused"), MergeOptions(method="peft"))[0]
    floor, high = plan.host_floor_bytes, plan.host_merge_bytes
    assert 0 < floor < high
    runtime = {"rss_after_imports_bytes": 400 * 2**20}
    verdict = {got: compare(plan, {"host_peak_bytes": got, **runtime})["host_within_band"]
               for got in (floor, high, int(high * 1.2), int(floor * 0.8))}
    assert verdict == {floor: True, high: True, int(high * 1.2): False, int(floor * 0.8): False}


def _one_line_error(code, captured, *words):
    assert code == 2
    assert captured.err.count("\n") == 1, captured.err
    for word in words:
        assert word in captured.err


def test_bad_input_is_one_line_and_exit_2(models, capsys, tmp_path):
    base, adapter = models["small"]
    _one_line_error(*_run(capsys, base, tmp_path / "missing", tmp_path / "o1"), "adapter_dir", "no such directory")
    other_base, other_adapter = models["other"]
    _one_line_error(*_run(capsys, base, other_adapter, tmp_path / "o2"), "adapter_dir", "another model")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _one_line_error(*_run(capsys, base, adapter, tmp_path / "full"), "output")
    _one_line_error(*_run(capsys, tmp_path, adapter, tmp_path / "o3"), "model")  # no config.json
    code = main(["merge", str(base), "--run", "--output", str(tmp_path / "o4")])
    _one_line_error(code, capsys.readouterr(), "--adapter-dir")
    # an adapter_config.json whose rank or modules are not what PEFT writes: bad input, not an internal error
    for field, value in (("r", "abc"), ("rank_pattern", {"q_proj": -1}), ("target_modules", 7)):
        broken = tmp_path / f"broken-{field}"
        shutil.copytree(adapter, broken)
        config = json.loads((broken / "adapter_config.json").read_text())
        (broken / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        _one_line_error(*_run(capsys, base, broken, tmp_path / "o5"), "adapter_dir", field)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5"))


def test_a_run_the_plan_refuses_does_not_start(models, capsys, tmp_path):
    base, adapter = models["small"]
    code, captured = _run(capsys, base, adapter, tmp_path / "o", "--host-memory-gib", "0.1")
    assert code == 1 and json.loads(captured.out)["refused"] is True
    assert not (tmp_path / "o").exists()
