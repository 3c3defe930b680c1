"""Every failure reason a run can carry is documented where users look (issue 25, item 8 and 14):
docs/launching.md's table, docs/backends.md for backend authors, the API schema's reason field; the
host_busy refusal and the entry's exit code 4 (disk full) too."""

from pathlib import Path

import pytest

from launcher.backend import Reason

DOCS = Path(__file__).resolve().parent.parent / "docs"
NEW = ("killed", "shim_killed", "disk_full", "path_outside_roots")


@pytest.mark.parametrize("reason", [r.value for r in Reason])
def test_every_reason_is_in_the_api_schema(reason):
    from app.schemas import RunOut

    assert reason in RunOut.model_fields["reason"].description


@pytest.mark.parametrize("reason", [*NEW, "killed_after_grace", "server_restart", "host_busy"])
def test_the_new_reasons_are_in_the_docs(reason):
    assert f"`{reason}`" in (DOCS / "launching.md").read_text()
    assert f"`{reason}`" in (DOCS / "backends.md").read_text()


def test_exit_code_4_is_documented():
    from launcher.entry import EXIT_DISK_FULL

    assert EXIT_DISK_FULL == 4
    for page in ("launching.md", "backends.md"):
        text = (DOCS / page).read_text()
        assert "EXIT_DISK_FULL" in text and "4" in text


def test_host_busy_is_a_documented_429_of_launches():
    from app.main import create_app

    responses = create_app().openapi()["paths"]["/api/v1/runs"]["post"]["responses"]
    assert "429" in responses and "host_busy" in responses["429"]["description"]
