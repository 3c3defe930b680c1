"""The shipped catalog: every spec rebuilds by introspection and matches its published size."""

import json

import pytest

from planner.catalog import CONFIGS_DIR, SPECS_DIR, catalog_ids, file_stem, load_catalog_spec, resolve_model
from planner.catalog_build import config_json, load_entries, published_matches
from planner.errors import PlanInputError
from planner.introspect import spec_from_config

ENTRIES = load_entries()


def test_catalog_spans_sizes_and_families():
    totals = [load_catalog_spec(e["id"]).total_params for e in ENTRIES]
    assert len(ENTRIES) >= 25
    assert min(totals) < 600_000_000 and max(totals) > 400_000_000_000
    assert sorted(catalog_ids().values()) == sorted(e["id"] for e in ENTRIES)
    assert any(load_catalog_spec(e["id"]).num_experts for e in ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_spec_rebuilds_by_introspection_and_matches_published_count(entry):
    stem = file_stem(entry["id"])
    shipped_config = json.loads((CONFIGS_DIR / f"{stem}.json").read_text())
    assert shipped_config == config_json(entry)
    rebuilt = spec_from_config(shipped_config, entry["id"])
    shipped = load_catalog_spec(entry["id"])
    assert rebuilt.to_dict() == shipped.to_dict()
    assert published_matches(entry, shipped.total_params), (shipped.total_params, entry)
    assert (SPECS_DIR / f"{stem}.json").stat().st_size < 1 << 20


def test_catalog_ids_resolve_case_insensitively_without_network():
    first = ENTRIES[0]["id"]
    assert resolve_model(first.upper()).name == first


def test_unknown_id_lists_closest():
    with pytest.raises(PlanInputError) as err:
        resolve_model("Llama-3.1-8B")
    assert "meta-llama/Llama-3.1-8B" in err.value.reason
