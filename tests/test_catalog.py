"""The shipped catalog: every spec rebuilds by introspection and matches its published size."""

import json

import pytest

from planner.catalog import CONFIGS_DIR, SPECS_DIR, catalog_ids, file_stem, find_catalog_model, load_catalog_spec, spec_note
from planner.request import resolve_model
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


@pytest.mark.parametrize("variant,base", [
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
    ("meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-13b-hf"),
    ("google/gemma-2-9b-it", "google/gemma-2-9b"),
    ("google/gemma-3-1b-it", "google/gemma-3-1b-pt"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-v0.3"),
    ("mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-v0.1"),
    # the 32k-context v0.2 base was published by mistral-community: 32,000 tokens, not v0.3's 32,768
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-community/Mistral-7B-v0.2"),
    ("01-ai/Yi-34B-Chat", "01-ai/Yi-34B"),
    ("mistralai/Mistral-Nemo-Instruct-2407", "mistralai/Mistral-Nemo-Base-2407"),
])
def test_instruct_and_chat_variants_plan_with_the_base_spec_offline(variant, base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    match = find_catalog_model(variant)
    base_spec = load_catalog_spec(base)
    assert match.spec.name == variant  # named as asked
    assert match.spec.tensors == base_spec.tensors and match.spec.total_params == base_spec.total_params
    assert base in match.note and "base model" in match.note and spec_note(match.spec) == match.note
    assert resolve_model(variant).name == variant
    assert match.spec.to_dict() | {"name": base} == base_spec.to_dict()  # the data is the base's


def test_a_catalog_id_has_no_variant_note_and_strangers_are_not_variants():
    assert find_catalog_model("meta-llama/Llama-3.1-8B").note is None
    assert spec_note(load_catalog_spec("meta-llama/Llama-3.1-8B")) is None
    assert find_catalog_model("someone/Llama-3.1-8B-Instruct") is None  # another org's fine-tune may differ
    assert find_catalog_model("meta-llama/Llama-3.3-70B-Instruct") is None  # no such base in the catalog


def test_a_window_the_published_config_sets_to_null_stays_null():
    """Mistral 7B v0.3 (and v0.2, Nemo, Mixtral) publish sliding_window null; left out, MistralConfig's
    default would give them a 4096-token window, and the traced step a sliding-window mask from 4096
    tokens on. v0.1 publishes its window."""
    from planner.introspect import build_config

    windows = {}
    for model in ("mistralai/Mistral-7B-v0.3", "mistral-community/Mistral-7B-v0.2", "mistralai/Mistral-Nemo-Base-2407", "mistralai/Mistral-7B-v0.1"):
        config = json.loads((CONFIGS_DIR / f"{file_stem(model)}.json").read_text())
        windows[model] = build_config(config).sliding_window
    assert windows == {"mistralai/Mistral-7B-v0.3": None, "mistral-community/Mistral-7B-v0.2": None,
                       "mistralai/Mistral-Nemo-Base-2407": None, "mistralai/Mistral-7B-v0.1": 4096}
