"""A mergekit merge is real: `vramplan merge MODEL --method M --merge-with DIR ... --run --output O`
runs mergekit 0.1.5's merge of Llamas built from a config with random weights, in the measured
child, and its anonymous memory's peak sits within the plan's band; the checkpoints' mapped pages
are reported apart (page cache, outside the peak). `--launch` runs it through the local backend as
a run of the launcher. Bad input is exit 2 with one line, before any child starts."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from app.cli import main  # noqa: E402
from tests.served import BEARER, client, root  # noqa: E402, F401 (fixtures)

MIB = 1 << 20


def _llama(path: Path, seed: int, hidden=384, layers=2, vocab=12000, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 2, vocab_size=vocab,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 192),
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    return {"a": _llama(root / "a", 0), "b": _llama(root / "b", 1), "c": _llama(root / "c", 2),
            "small": _llama(root / "small", 3, hidden=128), "root": root}


def _merge(capsys, model, *args):
    code = main(["merge", str(model), *map(str, args), "--json"])
    return code, capsys.readouterr()


def _within(result):
    c = result["comparison"]
    assert result["measured"]["host_peak_bytes"] > 0
    assert c["host_planned_bytes"] == result["plan"]["host_merge_bytes"]
    # the plan within 10% of the measured anonymous peak, never more than 10% under it
    assert -0.10 <= c["host_error"] <= 0.10, c
    assert c["host_within_band"], c
    return c


def test_a_linear_merge_is_the_weighted_mean_and_its_peak_is_the_plans(llamas, capsys, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    code, captured = _merge(capsys, llamas["a"], "--method", "linear", "--merge-with", llamas["b"], "--run", "--output", out)
    assert code == 0, captured.err
    result = json.loads(captured.out)
    merged = load_file(str(out / "model.safetensors"))
    a, b = load_file(str(llamas["a"] / "model.safetensors")), load_file(str(llamas["b"] / "model.safetensors"))
    assert set(merged) == set(a)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = ((a[name].float() + b[name].float()) / 2).to(torch.bfloat16)
    assert merged[name].dtype == torch.bfloat16 and torch.equal(merged[name], expected)
    c = _within(result)
    # the inputs are read by memory map: about both checkpoints, apart from the peak
    both = sum((llamas[k] / "model.safetensors").stat().st_size for k in "ab")
    assert c["host_page_cache_planned_bytes"] == pytest.approx(both, rel=0.01)
    assert both * 0.9 <= c["host_page_cache_measured_bytes"] <= both + 32 * MIB, c
    assert c["host_resident_measured_bytes"] >= c["host_measured_bytes"]
    assert abs(c["runtime_measured_bytes"] - c["runtime_planned_bytes"]) < 0.25 * c["runtime_planned_bytes"]


def test_a_ties_merge_of_three_holds_the_sort_of_its_largest_tensor(llamas, capsys, tmp_path):
    """TIES sorts each task vector's magnitudes (fp32 values, int64 indices) for its largest tensor:
    several times the tensor, which is the peak; the plan says so and is within 10% of it."""
    code, captured = _merge(capsys, llamas["a"], "--method", "ties", "--merge-with", llamas["b"], "--merge-with", llamas["c"],
                            "--run", "--output", tmp_path / "merged")
    assert code == 0, captured.err
    result = json.loads(captured.out)
    c = _within(result)
    largest = 12000 * 384 * 2
    assert c["host_measured_bytes"] > 10 * largest  # far more than the tensor itself: the sort's copies
    assert any("lm_head.weight" in note or "embed_tokens" in note for note in result["plan"]["notes"])
    assert result["plan"]["options"]["num_models"] == 3


def test_a_merge_in_another_dtype_holds_a_cast_copy_of_each_input(llamas, capsys, tmp_path):
    """bf16 checkpoints merged in float32: each input is cast as mergekit loads it."""
    code, captured = _merge(capsys, llamas["a"], "--method", "linear", "--merge-with", llamas["b"], "--dtype", "float32",
                            "--run", "--output", tmp_path / "merged")
    assert code == 0, captured.err
    result = json.loads(captured.out)
    _within(result)
    same = json.loads(_merge(capsys, llamas["a"], "--method", "linear", "--num-models", "2")[1].out)
    # fp32 accumulator alone, plus two fp32 copies, against the bf16 merge's accumulator and cast
    assert result["plan"]["host_merge_bytes"] > same["host_merge_bytes"]


def test_the_text_says_measured_beside_planned_and_the_page_cache_apart(llamas, capsys, tmp_path):
    code = main(["merge", str(llamas["a"]), "--method", "slerp", "--merge-with", str(llamas["b"]), "--run", "--output", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert code == 0
    assert "merged: mergekit slerp of" in out and "host peak above the runtime: measured" in out
    assert "reclaimable, outside the peak" in out and "mergekit imported" in out


def test_a_launched_mergekit_merge_is_a_run_with_its_peak_beside_the_plan(llamas, capsys, tmp_path, client):
    out, data = tmp_path / "merged", tmp_path / "data"
    code = main(["merge", str(llamas["a"]), "--method", "task_arithmetic", "--merge-with", str(llamas["b"]), "--merge-with", str(llamas["c"]),
                 "--launch", "--output", str(out), "--wait", "--json", "--data-dir", str(data)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)
    assert (record["state"], record["stage"], record["method"]) == ("succeeded", "merge", "task_arithmetic"), record
    spec = json.loads((Path(record["run_dir"]) / "spec.json").read_text())
    job = spec["merge"]
    assert job["engine"] == "mergekit" and job["adapter"] is None
    assert job["mergekit_config"]["base_model"] == str(llamas["a"].resolve())
    planned = job["host_planned_bytes"]
    assert record["predicted_peak_bytes"] == planned
    assert planned * 0.9 <= record["measured_peak_bytes"] <= planned / 0.9, record
    assert (out / "model.safetensors").is_file()
    page = client.get(f"/runs/{record['id']}", headers=BEARER)
    assert page.status_code == 200 and "succeeded" in page.text
    assert "task_arithmetic merge with" in page.text and str(llamas["c"].resolve()).split("/")[-1] in page.text
    assert "A mergekit task_arithmetic merge" in page.text and "adapter <code" not in page.text


def _one_line_error(code, captured, *words):
    assert code == 2, captured
    line = captured.err.strip()
    assert "\n" not in line and "Traceback" not in line, line
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("extra, words", [
    (["--method", "ties"], ["merge_with", "--merge-with DIR"]),
    (["--method", "slerp", "--merge-with", "B", "--merge-with", "C"], ["merge_with", "slerp merges exactly two models"]),
    (["--method", "linear", "--merge-with", "SMALL"], ["merge_with", "mergekit merges models of one size"]),
    (["--method", "linear", "--merge-with", "B", "--merge-with", "B"], ["merge_with", "named twice"]),
    (["--method", "linear", "--merge-with", "NOWHERE"], ["merge_with", "no such directory"]),
    (["--method", "linear", "--merge-with", "B", "--adapter-dir", "B"], ["--adapter-dir is for a PEFT merge"]),
    (["--method", "peft", "--adapter-dir", "B", "--merge-with", "B"], ["--merge-with is for mergekit's methods"]),
])
def test_bad_input_is_one_line_and_exit_2(llamas, capsys, tmp_path, extra, words):
    names = {"B": str(llamas["b"]), "C": str(llamas["c"]), "SMALL": str(llamas["small"]), "NOWHERE": str(tmp_path / "nowhere")}
    args = [names.get(a, a) for a in extra]
    for flag in ("--run", "--launch"):
        code = main(["merge", str(llamas["a"]), *args, flag, "--output", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
        _one_line_error(code, capsys.readouterr(), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data" / "runs").exists()


def test_a_model_with_only_bin_weights_is_refused_by_name(llamas, capsys, tmp_path):
    import shutil

    other = tmp_path / "bin-only"
    shutil.copytree(llamas["b"], other)
    (other / "model.safetensors").rename(other / "pytorch_model.bin")
    code = main(["merge", str(llamas["a"]), "--method", "linear", "--merge-with", str(other), "--run", "--output", str(tmp_path / "o")])
    _one_line_error(code, capsys.readouterr(), "merge_with", "safetensors")


def _wait_terminal(client, run_id, timeout=180):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/v1/runs/{run_id}", headers=BEARER).json()
        if run["state"] in ("succeeded", "failed", "cancelled", "lost"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not end in {timeout} s: {run}")


def test_the_api_launches_a_merge_inside_the_roots_and_keeps_its_peak(client, root, monkeypatch):
    """POST /api/v1/merges: the same merge as `vramplan merge --launch`, every path confined to the
    server's roots; the run ends succeeded with its measured peak beside the plan's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _llama(root / "a", 0, hidden=128, vocab=4000)
    _llama(root / "b", 1, hidden=128, vocab=4000)
    body = {"model": "a", "method": "linear", "merge_with": ["b"], "output_dir": "merged"}
    assert client.post("/api/v1/merges", json=body).status_code == 401  # the token first
    made = client.post("/api/v1/merges", json=body, headers=BEARER)
    assert made.status_code == 201, made.text
    run = _wait_terminal(client, made.json()["id"])
    assert (run["state"], run["stage"], run["method"]) == ("succeeded", "merge", "linear"), run
    assert run["measured_peak_bytes"] and run["error_pct"] is not None
    assert (root / "merged" / "model.safetensors").is_file()
    spec = json.loads((Path(run["run_dir"]) / "spec.json").read_text())
    assert str(root.resolve()) in spec["confine_to"]


@pytest.mark.parametrize("body, field", [
    ({"model": "/etc", "method": "linear", "merge_with": ["b"], "output_dir": "o"}, "model"),
    ({"model": "a", "method": "linear", "merge_with": ["/tmp"], "output_dir": "o"}, "merge_with"),
    ({"model": "a", "method": "linear", "merge_with": ["b"], "output_dir": "/tmp/elsewhere"}, "output_dir"),
    ({"model": "a", "method": "peft", "merge_with": ["b"], "output_dir": "o"}, "adapter_dir"),
    ({"model": "a", "method": "slerp", "merge_with": ["b", "b2"], "output_dir": "o"}, "merge_with"),
])
def test_the_api_refuses_a_merge_outside_the_roots_or_malformed_with_422(client, root, body, field):
    for name, seed in (("a", 0), ("b", 1), ("b2", 2)):
        _llama(root / name, seed, hidden=64, layers=1, vocab=500)
    refused = client.post("/api/v1/merges", json=body, headers=BEARER)
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"][0]
    assert detail["loc"][-1] == field, detail
    assert client.get("/api/v1/runs", headers=BEARER).json()["runs"] == []


def test_the_merge_job_confines_a_served_merge_again_when_it_opens_the_paths(tmp_path):
    """A model directory swapped for a symlink out of the roots after the launch is refused by the
    merge job itself; in place, every name is replaced by its resolved path."""
    from launcher.merge_job import _confined

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    outside.mkdir()
    config = {"merge_method": "linear", "models": [{"model": str(root / "a")}, {"model": str(root / "b")}], "dtype": "bfloat16"}
    spec = {"confine_to": [str(root)], "model": {"kind": "directory", "location": str(root / "a")}, "output_dir": str(root / "out"),
            "merge": {"engine": "mergekit", "mergekit_config": config}}
    confined, problem = _confined(spec)
    assert problem is None and confined["merge"]["mergekit_config"]["models"][1]["model"] == str((root / "b").resolve())
    (root / "b").rmdir()
    (root / "b").symlink_to(outside)
    _, problem = _confined(spec)
    assert problem and "merge_with" in problem and "outside the server's roots" in problem
    assert _confined({**spec, "confine_to": []}) == ({**spec, "confine_to": []}, None)  # the CLI's merges are not confined


def test_the_merge_page_runs_a_merge_once_signed_in(client, root, monkeypatch):
    """The merge page's "Run this merge" form, no JavaScript: signed out it offers the sign-in; a
    bad directory comes back with the form refilled and the field named; a good one starts the run
    and lands on its page."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    page = client.get("/merge").text
    assert 'id="merge-launch-sign-in"' in page and 'id="merge-launch-form"' not in page
    assert client.post("/launch/merge", data={"model": "a"}, follow_redirects=False).status_code in (401, 403, 303)
    assert client.get("/api/v1/runs", headers=BEARER).json()["runs"] == []  # nothing started without the token
    assert client.post("/login", data={"token": "test-token-0123456789abcdef", "next": "/merge"}, follow_redirects=False).status_code == 303
    assert 'id="merge-launch-form"' in client.get("/merge").text
    _llama(root / "a", 0, hidden=128, vocab=4000)
    _llama(root / "b", 1, hidden=128, vocab=4000)
    origin = {"Origin": "http://testserver"}
    bad = client.post("/launch/merge", data={"model": "a", "method": "linear", "merge_with": "/etc\n", "output_dir": "merged"},
                      headers=origin, follow_redirects=False)
    assert bad.status_code == 422 and "merge_with" in bad.text and "outside the directories this server may use" in bad.text
    assert 'value="merged"' in bad.text  # the form keeps what was typed
    made = client.post("/launch/merge", data={"model": "a", "method": "linear", "merge_with": "b\n", "output_dir": "merged"},
                       headers=origin, follow_redirects=False)
    assert made.status_code == 303 and made.headers["location"].startswith("/runs/"), made.text
    run = _wait_terminal(client, made.headers["location"].rsplit("/", 1)[-1])
    assert run["state"] == "succeeded" and run["measured_peak_bytes"]
    shown = client.get(made.headers["location"]).text
    assert "linear merge with" in shown and "Measured host peak" in shown
