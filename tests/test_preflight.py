"""The dataset preflight (launcher/preflight.py) and its doors: a bad dataset is answered before any
plan is built or process started, with the file, the line and the fix; a good one with its rows and
its longest row against the planned sequence length.

Each case is what a user writes by mistake; each assertion is what the user reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.cli import main
from launcher.preflight import check_dataset
from planner.errors import PlanInputError
from tests.test_runs_api import BEARER, ORIGIN, body, client, root, sign_in  # noqa: F401  (fixtures)

CHAT = {"messages": [{"role": "user", "content": "Is 2 even?"}, {"role": "assistant", "content": "yes"}]}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def problem(*args, **kwargs) -> str:
    with pytest.raises(PlanInputError) as info:
        check_dataset(*args, **kwargs)
    assert info.value.field == "dataset"
    return info.value.reason


@pytest.mark.parametrize(("stage", "rows", "expected"), [
    ("sft", [CHAT] * 6 + ['{"messages": [{"role": "user", "content": "hi"} {"role": "assistant"}]}'],
     "data.jsonl line 7: not JSON (Expecting ',' delimiter, column 49); each line must be one JSON object"),
    ("sft", [{"text": "a"}, {"text": "b"}, {"prompt": "c"}], 'data.jsonl line 3: no "text" field (line 1 has it); every row needs text'),
    ("sft", [{"question": "q", "answer": "a"}], "data.jsonl line 1: has question, answer, not the fields the sft trainer reads; "
                                                "give every row text, messages, or prompt and completion"),
    ("sft", [CHAT, {"messages": [{"role": "user", "content": "hi"}, {"content": "yes"}]}], 'data.jsonl line 2: messages[1] has no "role"'),
    ("sft", [CHAT, {"messages": []}], 'data.jsonl line 2: "messages" is an empty list'),
    ("sft", [{"messages": "Is 2 even?"}], 'data.jsonl line 1: "messages" is a string; it must be a list of {"role": ..., "content": ...} objects'),
    ("sft", [{"text": "a"}, {"text": 5}], 'data.jsonl line 2: "text" is a number; it must be a string'),
    ("dpo", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": None}],
     'data.jsonl line 2: "rejected" is null'),
    ("dpo", [{"prompt": "p", "chosen": "a"}], "data.jsonl line 1: has prompt, chosen (no rejected), not the fields the dpo trainer reads"),
    ("kto", [{"prompt": "p", "completion": "a", "label": "yes"}], 'data.jsonl line 1: "label" is a string; it must be true'),
    ("grpo", [{"text": "p"}], "data.jsonl line 1: has text, not the fields the grpo trainer reads; give every row prompt"),
    ("sft", [], "data.jsonl: no rows; the sft trainer needs at least one row"),
    ("sft", ["", "   "], "data.jsonl: no rows"),
])
def test_a_bad_jsonl_is_named_by_file_line_and_fix(tmp_path, stage, rows, expected):
    reason = problem(str(jsonl(tmp_path / "data.jsonl", rows)), stage)
    assert reason.startswith(expected), reason


def test_every_stage_takes_the_data_its_trainer_reads(tiny_run):
    for stage, data in (("sft", "sft"), ("dpo", "pref"), ("orpo", "pref"), ("simpo", "pref"), ("reward", "pref"), ("kto", "kto"),
                        ("kto", "pref"), ("grpo", "prompts"), ("rloo", "prompts")):
        check = check_dataset(str(tiny_run[data]), stage, seq_len=64, model=tiny_run["model"])
        assert check.checked and check.rows == 48 and not check.warnings, (stage, check)
    # SFT also takes text rows and prompt/completion rows
    assert check_dataset(str(tiny_run["kto"]), "sft").fields == ("prompt", "completion")


def test_a_bad_line_deep_in_a_large_file_is_found_and_named(tmp_path):
    rows = [CHAT] * 20_000
    rows[15_000] = {"messages": [{"role": "user", "content": None}]}
    reason = problem(str(jsonl(tmp_path / "big.jsonl", rows)), "sft")
    assert reason.startswith('big.jsonl line 15001: messages[0] has null "content"'), reason


def test_the_longest_row_is_counted_with_the_models_tokenizer_and_chat_template(tiny_run, tmp_path):
    long_answer = " ".join(f"The number {i} is even." for i in range(60))
    path = jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT, {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": long_answer}]}, CHAT])
    check = check_dataset(str(path), "sft", seq_len=64, model=tiny_run["model"])
    assert check.longest_row == "line 3" and check.tokens_counted and check.longest_tokens > 64
    assert check.warnings == [f"the longest row (line 3) is {check.longest_tokens:,} tokens, over the planned seq_len 64: the trainer truncates it "
                              "(raise --seq-len, and plan again, to keep it whole)"]
    # the same row within a longer seq_len: no warning; without a tokenizer, an estimate that says so
    assert check_dataset(str(path), "sft", seq_len=4096, model=tiny_run["model"]).warnings == []
    estimated = check_dataset(str(path), "sft", seq_len=64)
    assert not estimated.tokens_counted and "is about" in estimated.warnings[0]


def test_messages_need_a_chat_template_and_one_that_takes_them(tiny_run, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_run["model"], model)
    template = model / "chat_template.jinja"
    assert template.exists()  # the tiny tokenizer's, saved by transformers
    template.write_text("{% for m in messages %}{% if m['role'] == 'assistant' and loop.first %}{{ raise_exception('Conversations must start with the user') }}"
                        "{% endif %}{{ m['content'] }}{% endfor %}")
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "yes"}]}])
    assert problem(str(path), "sft", model=model).startswith(
        "chat.jsonl line 1: the model's chat template refuses these messages (Conversations must start with the user)")
    template.unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert "the model's tokenizer has no chat template" in problem(str(path), "sft", model=model)
    # text rows need none
    assert check_dataset(str(jsonl(tmp_path / "text.jsonl", [{"text": "Is 2 even? yes"}])), "sft", model=model).rows == 1


def test_json_csv_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "list.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"txt": "c"}]))
    assert problem(str(tmp_path / "list.json"), "sft").startswith('list.json row 3: no "text" field (row 1 has it)')
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert check_dataset(str(tmp_path / "lines.json"), "sft").rows == 2
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n {"text": "b"\n]')
    assert problem(str(tmp_path / "broken.json"), "sft").startswith("broken.json line 3: not JSON")

    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\nIs 2 even?,yes,no\nIs 3 even?,no,yes\n")
    assert check_dataset(str(tmp_path / "pairs.csv"), "dpo").rows == 2
    (tmp_path / "bad.csv").write_text("prompt,chosen,rejected\nIs 2 even?,yes,no\nIs 3 even?,no,\n")
    assert problem(str(tmp_path / "bad.csv"), "dpo").startswith('bad.csv line 3: "rejected" is')
    (tmp_path / "chat.csv").write_text('messages\n"[{""role"": ""user""}]"\n')
    assert "a CSV cell holds text, not a list of messages" in problem(str(tmp_path / "chat.csv"), "sft")

    pq.write_table(pa.table({"prompt": ["a", "b", None]}), tmp_path / "prompts.parquet")
    assert problem(str(tmp_path / "prompts.parquet"), "grpo").startswith('prompts.parquet row 3: "prompt" is null')
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "good.parquet")
    assert check_dataset(str(tmp_path / "good.parquet"), "grpo").rows == 2
    (tmp_path / "not.parquet").write_text("hello")
    assert problem(str(tmp_path / "not.parquet"), "grpo").startswith("not.parquet: not a Parquet file")

    folder = tmp_path / "folder"
    folder.mkdir()
    assert "a directory holding no data file" in problem(str(folder), "sft")
    jsonl(folder / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    assert check_dataset(str(folder), "sft").rows == 2
    assert problem(str(tmp_path / "missing.jsonl"), "sft").endswith("/missing.jsonl: no such file or directory")
    assert not check_dataset("org/some-dataset", "sft").checked  # a hub dataset is not read here


# -- the doors ------------------------------------------------------------------------------------


def test_the_cli_answers_a_dataset_typo_and_a_bad_line_before_planning(tiny_run, tmp_path, capsys, monkeypatch):
    import app.cli.runs as cli_runs

    def no_plan(*args, **kwargs):
        raise AssertionError("planned before the dataset was checked")

    monkeypatch.setattr(cli_runs, "_plan", no_plan)
    bad = jsonl(tmp_path / "data.jsonl", [CHAT] * 6 + ['{"messages": [}'])
    base = ["--device", "cpu", "--data-dir", str(tmp_path / "d"), "--max-steps", "2"]
    for command in (["launch", str(tiny_run["model"])], ["launch", str(tiny_run["model"]), "--dry-run"],
                    ["export", "Qwen/Qwen2.5-0.5B", "--format", "trl"]):
        extra = base if command[0] == "launch" else []
        if command[0] == "launch":  # an export names a path on the machine it is for: one not here is not read
            started = time.monotonic()
            code = main([*command, "--dataset", str(tmp_path / "dta.jsonl"), *extra])
            err = capsys.readouterr().err
            assert code == 2 and err.strip().endswith("dta.jsonl: no such file or directory") and err.count("\n") == 1, (command, err)
            assert time.monotonic() - started < 5
        code = main([*command, "--dataset", str(bad), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err == "vramplan: error: dataset: data.jsonl line 7: not JSON (Expecting value, column 15); each line must be one JSON object\n", (command, err)


def test_a_cli_dry_run_shows_the_check_and_warns_of_a_row_over_seq_len(tiny_run, tmp_path, capsys):
    long_row = {"text": " ".join(f"The number {i} is even." for i in range(40))}
    data = jsonl(tmp_path / "long.jsonl", [{"text": "Is 2 even? yes"}] * 3 + [long_row])
    code = main(["launch", str(tiny_run["model"]), "--dataset", str(data), "--dry-run", "--json", "--device", "cpu", "--seq-len", "32",
                 "--max-steps", "2", "--data-dir", str(tmp_path / "d")])
    out, err = capsys.readouterr()
    assert code == 0, err
    check = json.loads(out)["dataset_check"]
    assert check["rows"] == 4 and check["fields"] == ["text"] and check["longest_row"] == "line 4" and check["tokens_counted"]
    assert f"vramplan: warning: dataset {data}: the longest row (line 4) is {check['longest_tokens']:,} tokens, over the planned seq_len 32" in err


def test_the_runs_api_and_the_page_refuse_a_bad_dataset_with_422_on_dataset(client, root):  # noqa: F811
    jsonl(root / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    for path in ("/api/v1/runs/dry-run", "/api/v1/runs"):
        answer = client.post(path, json=body(root, dataset=str(root / "pairs.jsonl"), stage="dpo"), headers=BEARER)
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"] == ["body", "dataset"]
        assert answer.json()["detail"][0]["msg"].startswith('pairs.jsonl line 2: no "rejected" field (line 1 has it)')
    assert client.get("/api/v1/runs", headers=BEARER).json()["runs"] == []
    dry = client.post("/api/v1/runs/dry-run", json=body(root), headers=BEARER)
    assert dry.status_code == 200 and dry.json()["dataset_check"]["rows"] == 1 and dry.json()["dataset_check"]["fields"] == ["messages"]

    sign_in(client)
    form = {"model": "Qwen/Qwen2.5-0.5B", "stage": "dpo", "dataset": str(root / "pairs.jsonl"), "device": "cpu", "backend": "fake", "max_steps": "2"}
    page = client.post("/launch", data=form, headers=ORIGIN)
    assert page.status_code == 422 and "pairs.jsonl line 2: no &#34;rejected&#34; field" in page.text


def test_chunks_of_lines_count_every_row_and_name_the_line_across_boundaries(tmp_path, monkeypatch):
    import launcher.preflight as preflight

    monkeypatch.setattr(preflight, "CHUNK_BYTES", 1000)  # many chunks, each cut mid-line and completed
    rows = [{"text": f"row {i} " + "x" * (i % 37)} for i in range(3000)]
    rows[1234] = {"text": "the longest row " + "y" * 500}
    path = jsonl(tmp_path / "rows.jsonl", rows)
    check = check_dataset(str(path), "sft")
    assert check.rows == 3000 and check.longest_row == "line 1235"
    rows[2718] = {"txt": "moved"}
    assert problem(str(jsonl(tmp_path / "rows.jsonl", rows)), "sft").startswith('rows.jsonl line 2719: no "text" field')
