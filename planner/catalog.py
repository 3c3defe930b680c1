"""The model catalog: the configs and precomputed specs shipped for offline planning, their ids and variants, and the hub lookup (planner/request.py resolves what a request names)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from functools import lru_cache
from pathlib import Path

from planner.spec import ModelSpec

CATALOG_DIR = Path(__file__).with_name("catalog")
SPECS_DIR = CATALOG_DIR / "specs"
CONFIGS_DIR = CATALOG_DIR / "configs"


def file_stem(model_id: str) -> str:
    return model_id.replace("/", "__")


@lru_cache(maxsize=1)
def catalog_ids() -> dict[str, str]:
    """Lower-cased id -> id, for every model with a precomputed spec."""
    index = SPECS_DIR / "index.json"
    ids = json.loads(index.read_text()) if index.is_file() else []
    return {model_id.lower(): model_id for model_id in ids}


@lru_cache(maxsize=64)
def load_catalog_spec(model_id: str) -> ModelSpec:
    return ModelSpec.load(SPECS_DIR / f"{file_stem(model_id)}.json")


# Instruct and chat fine-tunes keep their base model's architecture, so the base's spec plans
# them offline: (pattern in the lower-cased id, what the base id has in its place).
VARIANT_RULES = (
    (r"-instruct(?=-|$)", ("", "-base")),  # Llama-3.1-8B-Instruct, Mistral-Nemo-Instruct-2407
    (r"-chat(?=-hf$|$)", ("",)),  # Llama-2-13b-chat-hf
    (r"-it$", ("", "-pt")),  # gemma-2-9b-it, gemma-3-1b-it
)

# where an organisation's base checkpoint is published by another: Mistral-7B-Instruct-v0.2's base
# (the 32k-context v0.2) was released by mistral-community, not mistralai
BASE_PUBLISHED_BY = {"mistralai": ("mistral-community",)}


@dataclasses.dataclass(frozen=True)
class CatalogMatch:
    spec: ModelSpec
    note: str | None = None  # set when a variant was planned with its base model's spec


def base_catalog_id(model_id: str) -> str | None:
    """The catalog id of the base model an instruct/chat variant was fine-tuned from, or None."""
    ids = catalog_ids()
    org, _, name = model_id.strip().lower().rpartition("/")
    names = {name, re.sub(r"^meta-llama-", "llama-", name)}  # meta-llama/Meta-Llama-3.1-8B-Instruct
    for pattern, replacements in VARIANT_RULES:
        for candidate in names:
            if not re.search(pattern, candidate):
                continue
            for replacement in replacements:
                base_name = re.sub(pattern, replacement, candidate)
                for base_org in (org, *BASE_PUBLISHED_BY.get(org, ())):
                    base = f"{base_org}/{base_name}" if base_org else base_name
                    if base in ids:
                        return ids[base]
    return None


def variant_note(model_name: str) -> str | None:
    """What a plan of a variant should say about its spec (None for anything else)."""
    base = None if model_name.lower() in catalog_ids() else base_catalog_id(model_name)
    if base is None:
        return None
    return f"{model_name} is not in the catalog: planned with the spec of its base model {base} (same architecture; fine-tuning changes the weights, not their shapes)"


@lru_cache(maxsize=64)
def _variant_spec(model_name: str, base: str) -> ModelSpec:
    # cached per name so the spec's memoized tensor walks survive between plans
    spec = dataclasses.replace(load_catalog_spec(base), name=model_name)
    # kept beside the spec's memo, not in a field: the spec's data (and its JSON) stay the base's
    spec.__dict__["_catalog_note"] = variant_note(model_name)
    return spec


def spec_note(spec: ModelSpec) -> str | None:
    """The note a plan of this spec should carry: set only on the variant specs
    find_catalog_model builds, so a pasted config that names an instruct model gets none."""
    return spec.__dict__.get("_catalog_note")


def find_catalog_model(model: str) -> CatalogMatch | None:
    """A catalog id (any case), or an instruct/chat variant of one, named as asked; no network."""
    model = model.strip()
    catalog_id = catalog_ids().get(model.lower())
    if catalog_id is not None:
        return CatalogMatch(load_catalog_spec(catalog_id))
    base = base_catalog_id(model)
    if base is None:
        return None
    spec = _variant_spec(model, base)
    return CatalogMatch(spec, spec_note(spec))


def closest_ids(query: str, n: int = 3) -> list[str]:
    ids = catalog_ids()
    query_l = query.lower()
    by_basename = {k.split("/")[-1]: v for k, v in ids.items()}
    # substring matches first ("llama-3.1-8b" -> "meta-llama/Llama-3.1-8B"), then edit distance
    found = [v for k, v in ids.items() if query_l in k]
    found += [ids[k] for k in difflib.get_close_matches(query_l, list(ids), n=n, cutoff=0.5)]
    found += [by_basename[k] for k in difflib.get_close_matches(query_l.split("/")[-1], list(by_basename), n=n, cutoff=0.5)]
    return list(dict.fromkeys(found))[:n]


def _hub_reachable(timeout: float = 2.0) -> bool:
    """One quick connection attempt, so an offline machine answers at once instead of retrying."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hub(model_id: str) -> ModelSpec | None:
    """Fetch only config.json from the hub (never code) and introspect it."""
    if not _hub_reachable():
        return None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        path = hf_hub_download(model_id, "config.json")
    except Exception:
        return None
    from planner.introspect import spec_from_config
    from planner.model_config import read_config_file

    return spec_from_config(read_config_file(Path(path)), name=model_id)
