"""The backend contract is written down: every member of the Backend protocol has a docstring in the
code and a place in docs/backends.md (the model: datasette's test_plugin_hooks_are_documented), and
backends share code through public modules only (launcher.run_files), never another backend's
private helpers.

The members are found by introspecting the protocol, so a member added to it without its
documentation fails here.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from launcher import run_files
from launcher.backend import Backend

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "backends.md"
BACKEND_SOURCE = ROOT / "launcher" / "backend.py"


def _protocol_members() -> list[str]:
    """The protocol's public attributes (its annotations) and methods, as the class defines them."""
    names = [name for name in Backend.__dict__.get("__annotations__", {}) if not name.startswith("_")]
    names += [name for name, value in vars(Backend).items() if not name.startswith("_") and inspect.isfunction(value)]
    return sorted(set(names))


def _attribute_docstrings() -> dict[str, str]:
    """Attribute docstrings: the string literal right after an annotated attribute in class Backend."""
    tree = ast.parse(BACKEND_SOURCE.read_text())
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Backend")
    docs = {}
    for stmt, following in zip(cls.body, cls.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[stmt.target.id] = following.value.value
    return docs


MEMBERS = _protocol_members()


def test_the_protocol_is_introspected():
    # a guard on the introspection itself: the four attributes and seven methods the README names
    assert {"name", "api_version", "capabilities", "Options"} <= set(MEMBERS)
    assert {"check", "render", "submit", "poll", "cancel", "kill", "read_logs"} <= set(MEMBERS)


def test_the_protocol_class_is_documented():
    doc = inspect.getdoc(Backend) or ""
    assert len(doc) > 200, "launcher.backend.Backend needs its contract in its docstring"


@pytest.mark.parametrize("member", MEMBERS)
def test_protocol_member_has_a_docstring(member):
    value = vars(Backend).get(member)
    if inspect.isfunction(value):
        doc = inspect.getdoc(value)
    else:
        doc = _attribute_docstrings().get(member)
    assert doc and doc.strip(), f"Backend.{member} has no docstring in launcher/backend.py"


@pytest.mark.parametrize("member", MEMBERS)
def test_protocol_member_is_in_the_docs(member):
    text = DOCS.read_text()
    # named as code: `member`, `member()` or `member(args...)`, in a heading of its own
    assert re.search(rf"^#+ .*`{re.escape(member)}(\(\))?`", text, re.MULTILINE), f"docs/backends.md has no section for Backend.{member}"


@pytest.mark.parametrize("target", ["launcher.backends.local:LocalBackend", "launcher.backends.slurm:SlurmBackend", "launcher.backends.ray:RayBackend"])
def test_shipped_backends_have_every_member(target):
    import importlib

    module, attr = target.split(":")
    cls = getattr(importlib.import_module(module), attr)
    missing = [m for m in MEMBERS if not hasattr(cls, m)]
    assert not missing, f"{target} lacks {missing}"


def _backend_sources() -> list[Path]:
    files = sorted((ROOT / "launcher" / "backends").glob("*.py")) + sorted((ROOT / "tests" / "example_plugin").rglob("*.py"))
    assert files, "no backend sources found"
    return files


def _private_imports(path: Path) -> list[str]:
    """`from launcher... import _name` (or a relative import of one) anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            ours = node.level > 0 or module == "launcher" or module.startswith("launcher.")
            if ours:
                found += [f"line {node.lineno}: from {'.' * node.level}{module} import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith("launcher") and any(part.startswith("_") and part != "__init__" for part in a.name.split("."))]
    return found


@pytest.mark.parametrize("path", _backend_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_backends_import_no_private_names(path):
    assert _private_imports(path) == [], f"{path.relative_to(ROOT)} imports private names of launcher; use launcher.run_files"


def test_the_private_import_check_catches_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from launcher.backends.local import LocalBackend, _free_port\nfrom .local import _is_entry\n")
    assert len(_private_imports(bad)) == 2


def test_run_files_names_match_the_run_side():
    """run_files repeats the names launcher.events defines (it imports torch, so run_files cannot)."""
    tree = ast.parse((ROOT / "launcher" / "events.py").read_text())
    values = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
              for t in node.targets if isinstance(t, ast.Name)}
    assert values["EVENTS_FILE"] == run_files.EVENTS_FILE
    assert values["STOP_FILE"] == run_files.STOP_FILE
    assert values["LOG_PREFIX"] == run_files.EVENT_LOG_PREFIX
    assert f'"{run_files.EVENTS_TO_LOG_ENV}"' in (ROOT / "launcher" / "events.py").read_text()


def test_run_files_is_documented():
    assert (inspect.getdoc(run_files) or "").strip()
    for name in run_files.__all__:
        value = getattr(run_files, name)
        if inspect.isfunction(value):
            assert (inspect.getdoc(value) or "").strip(), f"launcher.run_files.{name} has no docstring"
        assert f"`{name}" in DOCS.read_text(), f"docs/backends.md does not name launcher.run_files.{name}"
