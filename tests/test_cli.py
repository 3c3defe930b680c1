"""The CLI contract: JSON shapes, exit codes 0/1/2, one readable line on bad input, no traceback."""

import errno
import json
import os
import subprocess
import sys

import pytest

CATALOG_MODEL = "meta-llama/Llama-3.1-8B"


def vramplan(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_params_json_matches_published_count():
    out = vramplan("params", CATALOG_MODEL, "--method", "full", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["total"] == data["trainable"] == 8_030_261_248


def test_plan_json_contract():
    out = vramplan("plan", CATALOG_MODEL, "--method", "qlora", "--gpu", "RTX 4000 Ada", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["peak_bytes"] == sum(c["bytes"] for c in plan["components"])
    assert plan["gpu"]["name"] == "NVIDIA RTX 4000 Ada Generation"
    names = {c["name"] for c in plan["components"]}
    assert names >= {"weights.base", "weights.quant_constants", "weights.adapter", "optimizer_state", "runtime.cuda_context"}
    assert plan["peak_phase"] in plan["phase_totals"] and plan["peak_bytes"] == max(plan["phase_totals"].values())
    assert all(c["note"] for c in plan["components"])
    assert isinstance(plan["fits"], bool) and plan["assumptions"]


def test_check_exit_codes():
    fits = vramplan("check", CATALOG_MODEL, "--method", "qlora", "--gpu", "h100")
    assert fits.returncode == 0 and fits.stdout.startswith("fits")
    too_big = vramplan("check", CATALOG_MODEL, "--method", "full", "--gpu", "rtx 3080")
    assert too_big.returncode == 1 and too_big.stdout.startswith("does not fit")
    custom = vramplan("check", CATALOG_MODEL, "--method", "full", "--gpu-memory-gib", "1000")
    assert custom.returncode == 0


@pytest.mark.parametrize(
    "args,field",
    [
        (["--method", "qlora", "--quantization", "none"], "quantization"),
        (["--method", "full", "--quantization", "nf4"], "method"),
        (["--lora-r", "0"], "lora_r"),
        (["--batch-size", "0"], "batch_size"),
        (["--weights-dtype", "fp8"], "weights_dtype"),
        (["--gpu", "voodoo 5"], "gpu"),
        (["--lora-targets", "q_prj"], "lora_targets"),
        (["--parallelism", "zero3"], "parallelism"),
    ],
)
def test_bad_options_exit_2_with_field(args, field):
    out = vramplan("check", CATALOG_MODEL, *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 or "usage" in out.stderr, out.stderr
    assert field.replace("_", "-") in out.stderr or field in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_model_suggests_catalog_ids():
    out = vramplan("check", "llama-3.1-8b")
    assert out.returncode == 2
    assert CATALOG_MODEL in out.stderr and "Traceback" not in out.stderr


HOSTILE = {
    "huge layers": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 10**12, "vocab_size": 10},
    "huge product": {"model_type": "llama", "hidden_size": 131072, "intermediate_size": 1048576, "num_hidden_layers": 1024, "vocab_size": 4000000},
    "wrong type": {"model_type": "llama", "hidden_size": "4096", "num_hidden_layers": 2, "vocab_size": 10},
    "negative": {"model_type": "llama", "hidden_size": -1, "num_hidden_layers": 2, "vocab_size": 10},
    "remote code": {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "evil.Model"}},
    "unknown type": {"model_type": "my_secret_arch", "hidden_size": 64},
    "not an object": [1, 2, 3],
    "no model type": {"hidden_size": 64},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_config_is_refused_cleanly(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(HOSTILE[name]))
    out = vramplan("check", str(tmp_path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("vramplan: error: model:") and "Traceback" not in out.stderr
    if name == "remote code" or name == "unknown type":
        assert "remote code" in out.stderr or "trust_remote_code" in out.stderr


def test_malformed_and_oversized_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert vramplan("check", str(tmp_path)).returncode == 2
    (tmp_path / "config.json").write_text(" " * (2 << 20))
    out = vramplan("check", str(tmp_path))
    assert out.returncode == 2 and "at most" in out.stderr


def test_local_config_is_introspected(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = vramplan("params", str(tmp_path / "config.json"), "--method", "full", "--json")
    assert out.returncode == 0, out.stderr
    # embed 100x64 (tied), per layer: q 64x64+64, k 32x64+32, v 32x64+32, o 64x64, mlp 3x64x128, 2 norms; final norm
    per_layer = (64 * 64 + 64) + 2 * (32 * 64 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert json.loads(out.stdout)["total"] == 100 * 64 + 2 * per_layer + 64


def test_advise_json_answers_the_13b_qlora_question():
    out = vramplan("advise", "meta-llama/Llama-2-13b-hf", "--gpu", "RTX 4000 Ada", "--num-examples", "8000", "--json")
    assert out.returncode == 0, out.stderr
    advice = json.loads(out.stdout)
    assert advice["approach"] == "fine-tune" and advice["method"] == "qlora" and advice["fits"]
    assert advice["plan"]["peak_bytes"] == advice["peak_bytes"] <= advice["plan"]["usable_bytes"]
    assert advice["settings"]["batch_size"] * advice["settings"]["gradient_accumulation_steps"] == 16
    assert advice["reasons"] and advice["alternatives"]


def test_advise_rejects_an_unknown_goal_with_the_field():
    out = vramplan("advise", CATALOG_MODEL, "--goal", "vibes")
    assert out.returncode == 2 and out.stderr.startswith("vramplan: error: goal:") and "Traceback" not in out.stderr


def test_fit_json_reports_each_search():
    out = vramplan("fit", CATALOG_MODEL, "--method", "full", "--gpu", "4090", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert not data["fits"]
    assert data["largest_batch"]["value"] is None
    assert data["fewest_gpus"]["value"] > 1 and data["fewest_gpus"]["fits"]
    assert data["fixes"]["smallest"]["fits"]


def test_fit_bad_input_is_exit_2():
    out = vramplan("fit", CATALOG_MODEL, "--batch-size", "0")
    assert out.returncode == 2 and "batch_size" in out.stderr and "Traceback" not in out.stderr


# --- exit codes survive the environment: pipes, full disks, unreadable files ---

NOT_FIT = ["check", CATALOG_MODEL, "--method", "full", "--gpu", "T4"]
# stdout as users get it, block-buffered, whatever this shell exports: the write then fails at the final flush
BUFFERED = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


@pytest.mark.parametrize(
    "args,code,nbytes",
    [
        (NOT_FIT, 1, 0),  # `| true`: the reader is gone before the CLI writes; the final flush breaks
        (NOT_FIT, 1, 1),  # `| head -c 1`
        (["fit", CATALOG_MODEL, "--json"], 0, 0),  # over the 8 KiB stdout buffer: print() itself breaks
    ],
)
def test_reader_leaving_early_keeps_the_verdict_and_stderr_quiet(args, code, nbytes):
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=BUFFERED)
    if nbytes:
        assert len(proc.stdout.read(nbytes)) == nbytes
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=300) == code
    assert stderr == ""


def test_broken_pipe_while_printing_keeps_the_verdict(monkeypatch):
    # the pipe may break inside print(), before the command has returned its verdict
    from app.cli import main

    class GoneReader:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", GoneReader())
    assert main(NOT_FIT) == 1
    sys.stdout.close()  # the CLI swapped in os.devnull; monkeypatch puts the real one back


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "args",
    [
        NOT_FIT,  # one short line: fails at the final flush
        ["fit", CATALOG_MODEL, "--json"],  # over the stdout buffer: fails inside print()
    ],
)
def test_full_disk_is_exit_2_with_one_line(args):
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "app.cli", *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, env=BUFFERED)
    assert out.returncode == 2
    assert out.stderr == "vramplan: error: cannot write the output: No space left on device\n"


def test_unreadable_config_is_exit_2_not_internal_error(tmp_path, monkeypatch, capsys):
    # tests run as root, so chmod 000 would not stop a read: refuse it the way the kernel would
    import pathlib

    from app.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    for name in ("read_bytes", "read_text", "open"):
        monkeypatch.setattr(pathlib.Path, name, denied)
    assert main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"vramplan: error: cannot read {tmp_path / 'config.json'}: Permission denied\n"


# --- usage errors: one line, exit 2 ---


@pytest.mark.parametrize(
    "args,names",
    [
        (["check"], "model"),
        (["check", CATALOG_MODEL, "--batch-size"], "--batch-size"),
        ([], "command"),
    ],
)
def test_usage_error_is_one_line_exit_2(args, names):
    out = vramplan(*args)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("vramplan: error: ") and names in lines[0]
    assert lines[0].endswith("--help)")


# --- JSON output is always JSON ---


@pytest.mark.parametrize(
    "args,field",
    [
        (["check", CATALOG_MODEL, "--gpu-memory-gib", "nan"], "gpu_memory_gib"),
        (["plan", CATALOG_MODEL, "--lora-alpha", "inf", "--json"], "lora_alpha"),
    ],
)
def test_non_finite_options_are_refused(args, field):
    out = vramplan(*args)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vramplan: error: "), out.stderr
    assert field in lines[0] and "finite" in lines[0]


def test_non_finite_number_in_json_output_is_a_bug_not_invalid_json(monkeypatch, capsys):
    # NaN/Infinity would print as bare NaN/Infinity, which no strict JSON parser reads
    import planner.plan
    from app.cli import main

    class NanPlan:
        def to_dict(self):
            return {"peak_bytes": float("nan")}

    monkeypatch.setattr(planner.plan, "build_plan", lambda spec, options, config=None, tracer=None: NanPlan())
    assert main(["plan", CATALOG_MODEL, "--json"]) == 3
    out = capsys.readouterr()
    assert out.out == "" and "internal error: ValueError" in out.err


@pytest.mark.parametrize("args,code", [(["--method", "qlora", "--gpu", "H100"], 0), (["--method", "full", "--gpu", "T4"], 1)])
def test_check_json_matches_the_api_shape(args, code):
    out = vramplan("check", CATALOG_MODEL, *args, "--json")
    assert out.returncode == code, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"fits", "verdict", "peak_bytes", "peak_low_bytes", "peak_high_bytes", "usable_bytes", "headroom_bytes", "gpu", "model", "reserve_source", "band_source",
                         "unmeasured_parts", "unmeasured_allowance_bytes", "runs_within_bytes", "runs_within_low_bytes", "runs_within_high_bytes",
                         "allocator_release_bytes"}
    assert data["runs_within_bytes"] == data["peak_bytes"] - data["allocator_release_bytes"]
    assert data["fits"] is (code == 0) and data["verdict"] == ("fits" if code == 0 else "does not fit")
    assert data["peak_low_bytes"] <= data["peak_bytes"] <= data["peak_high_bytes"]
    assert data["headroom_bytes"] == data["usable_bytes"] - data["peak_bytes"]
    assert set(data["gpu"]) == {"name", "label", "memory_bytes", "count"} and data["model"] == CATALOG_MODEL


# -- the band: "tight" when the usable memory falls inside it -----------------------------------

EDGE_MODEL, EDGE = "meta-llama/Llama-2-13b-hf", ("--method", "qlora", "--batch-size", "4")


def _edge_gib(where: float) -> str:
    """A custom GPU whose usable memory lies `where` of the way from the band's low end (0) to
    its high end (1), for the plan of EDGE on it."""
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.plan import GIB, build_plan

    plan = build_plan(load_catalog_spec(EDGE_MODEL), TrainingOptions(method="qlora", batch_size=4, gpu_memory_gib=80))
    usable = plan.peak_low_bytes + where * (plan.peak_high_bytes - plan.peak_low_bytes)
    return repr(usable / (1 - plan.options.headroom) / GIB)


@pytest.mark.parametrize("where", [0.2, 0.9], ids=["usable-below-central", "usable-above-central"])
def test_check_says_tight_with_the_band_and_exits_1(where):
    memory = _edge_gib(where)
    out = vramplan("check", EDGE_MODEL, *EDGE, "--gpu-memory-gib", memory)
    assert out.returncode == 1, out.stderr
    assert out.stdout.startswith("tight: ") and "it may run out of memory" in out.stdout
    # a tight formula plan points at the narrower, simulated band (QLoRA on one GPU can be traced)
    assert "--simulate-allocator narrows the band" in out.stdout
    data = json.loads(vramplan("check", EDGE_MODEL, *EDGE, "--gpu-memory-gib", memory, "--json").stdout)
    assert data["verdict"] == "tight" and data["fits"] is False
    assert data["peak_low_bytes"] <= data["usable_bytes"] < data["peak_high_bytes"]
    low, high = (f"{data[k] / 2**30:.2f}" for k in ("peak_low_bytes", "peak_high_bytes"))
    assert f"needs {data['peak_bytes'] / 2**30:.2f} GiB per GPU (band {low}-{high})" in out.stdout


def test_check_fits_only_when_the_high_end_fits():
    fits = vramplan("check", EDGE_MODEL, *EDGE, "--gpu-memory-gib", _edge_gib(1.01))
    assert fits.returncode == 0 and fits.stdout.startswith("fits: ")
    short = vramplan("check", EDGE_MODEL, *EDGE, "--gpu-memory-gib", _edge_gib(-0.05))
    assert short.returncode == 1 and short.stdout.startswith("does not fit: ")


def test_plan_fit_and_advise_text_carry_the_band():
    plan = vramplan("plan", EDGE_MODEL, *EDGE, "--gpu-memory-gib", _edge_gib(0.5))
    assert plan.returncode == 0 and "(band " in plan.stdout.splitlines()[0] and "tight" in plan.stdout.splitlines()[0]
    fit = vramplan("fit", EDGE_MODEL, *EDGE, "--gpu-memory-gib", _edge_gib(0.5))
    head = fit.stdout.splitlines()[0]
    assert fit.returncode == 0 and ": tight (" in head and "band " in head
