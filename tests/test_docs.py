"""The documentation keeps up with the code: every CLI flag is in docs/cli.md, the README stays short
and links only to pages that exist, and no page speaks of history instead of the code.

Modelled on datasette's test_plugin_hooks_are_documented: one test per flag, so a failure names
the flag that is missing."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# -- every subcommand and flag of the CLI is in docs/cli.md ----------------------------------------


def _subcommands() -> dict:
    from app.cli import build_parser

    parser = build_parser()
    return dict(parser._subparsers._group_actions[0].choices)


def _model_fields() -> dict[str, str]:
    """Fields of the pydantic option models the CLI makes flags of, and the cli.md section that
    lists them in a table (a flag taken by several commands is documented once there)."""
    from launcher.spec import RunSettings
    from planner.advisor import Task
    from planner.options import TrainingOptions

    fields = {}
    for model, section in ((TrainingOptions, "Plan options"), (Task, "The task"), (RunSettings, "Run settings")):
        fields.update({name: section for name in model.model_fields})
    return fields


def _flags() -> list[tuple[str, str, str | None]]:
    """(subcommand, flag, shared section or None) for every option flag, -h/--help left out."""
    fields = _model_fields()
    out = []
    for name, sub in _subcommands().items():
        for action in sub._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                out.append((name, flag, fields.get(action.dest)))
    return out


def _sections(text: str) -> dict[str, str]:
    """cli.md's '## ' sections by title, each with its text down to the next '## ' heading."""
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2])}


def _mentions(text: str, flag: str) -> bool:
    # --autocast must be named itself: the word inside --no-autocast does not count
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_the_cli_has_subcommands_and_flags_to_check():
    flags = _flags()
    assert {"plan", "check", "serve", "launch", "runs"} <= set(_subcommands())
    assert len(flags) > 100 and any(section for _, _, section in flags) and any(section is None for _, _, section in flags)


@pytest.mark.parametrize("subcommand", sorted(_subcommands()))
def test_subcommand_is_documented(subcommand):
    sections = _sections(CLI_DOC.read_text())
    assert f"vramplan {subcommand}" in sections, f"docs/cli.md has no '## vramplan {subcommand}' section"


@pytest.mark.parametrize("subcommand,flag,shared", [pytest.param(*f, id=f"{f[0]} {f[1]}") for f in _flags()])
def test_flag_is_documented(subcommand, flag, shared):
    """A command's own flag is in its section; a flag made from an option model (TrainingOptions,
    Task, RunSettings) is in that model's table, and the command's section links to the table."""
    sections = _sections(CLI_DOC.read_text())
    own = sections.get(f"vramplan {subcommand}", "")
    if shared is None:
        assert _mentions(own, flag), f"{flag} of 'vramplan {subcommand}' is not in its section of docs/cli.md"
    else:
        assert _mentions(sections.get(shared, ""), flag), f"{flag} is not in the '{shared}' table of docs/cli.md"
        assert f"(#{_anchor(shared)})" in own, f"the 'vramplan {subcommand}' section of docs/cli.md does not link to '{shared}'"


def test_cli_doc_names_no_flag_the_cli_lacks():
    known = {flag for _, flag, _ in _flags()} | {"--help", "--version"}
    # another program's command line (`trl sft --config FILE`) names that program's flags
    text = re.sub(r"`(?!vramplan\b)[a-z][\w.-]* [^`]*`", "", CLI_DOC.read_text())
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w-])", text))
    assert not named - known, f"docs/cli.md names flags the CLI does not have: {sorted(named - known)}"


# -- the README: short, linked to pages that exist, with CI's own commands -------------------------


def _ci_commands() -> tuple[list[str], str]:
    """The pip/npm set-up commands .ci/run runs (without --quiet/--silent) and its last line, the tests."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    setup = []
    for line in lines:
        if re.match(r"(python3? -m venv|python -m pip install|npm ci)\b", line):
            setup.append(" ".join(word for word in line.split() if word not in ("--quiet", "--silent")))
    return setup, lines[-1]


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the reference belongs in docs/"


def test_readme_gives_the_set_up_and_test_commands_ci_runs():
    text = README.read_text()
    setup, tests = _ci_commands()
    assert "pytest" in tests and len(setup) >= 3, (setup, tests)
    for command in [*setup, tests]:
        assert command in text, f"README.md does not give CI's command: {command}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_links_only_to_files_that_exist(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t.split("#")[0]]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_links_only_to_headings_that_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]*#[^)\s]+)\)", page.read_text()):
        path, fragment = target.split("#", 1)
        linked = page.parent / path if path else page
        if re.match(r"[a-z]+:", target) or linked.suffix != ".md" or not linked.exists():
            continue
        headings = re.findall(r"^#+ +(.+?)\s*$", linked.read_text(), flags=re.M)
        if fragment not in {_anchor(h) for h in headings}:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to headings that do not exist: {broken}"


def test_readme_links_every_docs_page():
    text = README.read_text()
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if f"](docs/{p.name})" not in text]
    assert not unlinked, f"README.md does not link to {unlinked}"


def test_the_readme_picture_is_there_and_small():
    picture = DOCS / "page.png"
    assert "](docs/page.png)" in README.read_text()
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size < 300_000


# -- the pages speak of the code, not of its history ----------------------------------------------


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_speaks_of_the_code_not_its_history(page):
    text = page.read_text()
    assert "DESIGN.md" not in text, f"{page.relative_to(ROOT)} cites DESIGN.md, which the repository does not have"
    history = re.findall(r"\b(?:issue #?\d+|in a later issue|as before)\b", text, flags=re.I)
    assert not history, f"{page.relative_to(ROOT)} speaks of history: {history}"


# -- what the docs show a person typing works as shown (issue 24) ---------------------------------


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_runs_commands_put_the_run_id_before_their_flags(page):
    """argparse takes `runs cancel ID --wait`; `runs cancel --wait ID` stops at the id."""
    for line in page.read_text().splitlines():
        for shown in re.findall(r"vramplan runs [^`|]*?(?:\\\|[^`|]*?)*ID", line):
            assert not re.search(r"--\w[\w-]*\]?\s+ID", shown), f"{page.name}: {shown!r} puts a flag before the run id"


def test_the_order_the_docs_show_for_runs_parses(tmp_path, capsys):
    from app.cli import main

    code = main(["runs", "cancel", "0123abcd", "--wait", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "unrecognized arguments" not in err and "0123abcd" in err  # parsed; then: no such run


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_only_plan_is_said_to_print_kept_in_the_trace_cache(page):
    """`vramplan plan` prints "traced: kept in the trace cache"; `check` prints no such words."""
    for paragraph in page.read_text().split("\n\n"):
        if "kept in the trace cache" in paragraph:
            assert "vramplan plan" in paragraph and "vramplan check" not in paragraph, paragraph
