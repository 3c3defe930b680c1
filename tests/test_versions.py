"""The versions a plan says it models are the ones CI pins and the exactness tests ran on."""

from pathlib import Path

from planner.catalog import load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.versions import MODELLED_VERSIONS

ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def test_modelled_versions_are_the_pinned_ones():
    pins = _pins()
    assert {name: pins.get(name) for name in MODELLED_VERSIONS} == MODELLED_VERSIONS


def test_installed_versions_are_the_pinned_ones():
    """The suite's exact-byte tests mean something only against the pinned releases."""
    from importlib.metadata import version

    for name, pinned in MODELLED_VERSIONS.items():
        assert version(name).split("+")[0] == pinned, f"{name} {version(name)} installed, {pinned} pinned: install with -c constraints.txt"


def test_plan_says_which_versions_it_models():
    plan = build_plan(load_catalog_spec("meta-llama/Llama-3.1-8B"), TrainingOptions(gpu="H100"))
    assert plan.to_dict()["library_versions"]["transformers"] == MODELLED_VERSIONS["transformers"]
