"""A third-party backend is a separate package that only declares an entry point in the group
`vramplan.backends`. The example in tests/example_plugin is made installed here the way pip leaves a
package (a dist-info with entry_points.txt on the path), then listed, dry-run and run through vramplan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).with_name("example_plugin")


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist = site / "vramplan_example_backend-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vramplan-example-backend\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vramplan.backends]\nexample = vramplan_example:NohupBackend\nfuture = vramplan_example:FutureBackend\n")
    (site / "vramplan_example").symlink_to(PLUGIN / "vramplan_example")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return site


def test_an_installed_plugin_is_listed_and_a_wrong_api_version_is_unavailable(installed_plugin):
    out = subprocess.run([sys.executable, "-m", "app.cli", "backends", "--json"], capture_output=True, text=True, timeout=120, check=True).stdout
    backends = {b["name"]: b for b in json.loads(out)}
    assert backends["example"]["available"] and backends["example"]["detail"] == "example plugin: nohup on this machine"
    assert backends["example"]["options"][0]["name"] == "grace_period_s"
    assert not backends["future"]["available"] and "speaks backend API 2" in backends["future"]["detail"]
    assert {"local", "slurm", "ray"} <= set(backends)  # ours register through the same group


def test_a_plugin_backend_runs_a_real_launch(installed_plugin, tiny_run, tmp_path, capsys, monkeypatch):
    from app.cli import main
    from tests.test_launcher import launch_args

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(launch_args(tiny_run, tmp_path / "d", "--backend", "example", "--dry-run", "--json")) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["argv"][0] == "nohup" and dry["summary"].startswith("example plugin:")
    assert main(launch_args(tiny_run, tmp_path / "d", "--backend", "example", "--wait", "--json", steps=2)) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["backend"] == "example" and record["state"] == "succeeded" and record["last_step"] == 2
