"""Regenerate the model catalog: models.toml -> configs/*.json and specs/*.json (+ index.json).

    python -m planner.catalog_build          # write everything
    python -m planner.catalog_build --check  # exit 1 if any committed file is stale

The TOML holds the reviewed facts (architecture numbers from each published config.json and the
published parameter count). Specs are built by introspection, so this needs torch and transformers;
planning from the results needs neither.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib

from planner.catalog import CATALOG_DIR, CONFIGS_DIR, SPECS_DIR, file_stem

MODELS_TOML = CATALOG_DIR / "models.toml"


def load_entries() -> list[dict]:
    return tomllib.loads(MODELS_TOML.read_text())["model"]


def config_json(entry: dict) -> dict:
    """The config.json a user would download, restricted to the keys that decide the shapes and
    the attention. TOML has no null: `null_config_keys` lists the keys the published config sets
    to null, which must not fall back to the config class's default (MistralConfig's 4096-token
    sliding window, for checkpoints that have none)."""
    nulls = dict.fromkeys(entry.get("null_config_keys", ()))
    return {"model_type": entry["model_type"], "architectures": entry["architectures"], **entry["config"], **nulls}


def published_matches(entry: dict, total: int) -> bool:
    if "published_params" in entry:
        return total == entry["published_params"]
    return format_rounded(total, entry["published_params_rounded"]) == entry["published_params_rounded"]


def format_rounded(total: int, like: str) -> str:
    """Format `total` the way a rounded published figure is written ("8.03B", "135M")."""
    unit = like[-1]
    scale = {"B": 1e9, "M": 1e6}[unit]
    decimals = len(like[:-1].split(".")[1]) if "." in like else 0
    return f"{total / scale:.{decimals}f}{unit}"


def build(check: bool) -> int:
    from planner.introspect import spec_from_config

    entries = load_entries()
    stale = []
    outputs: dict = {}
    for entry in entries:
        stem = file_stem(entry["id"])
        config = config_json(entry)
        spec = spec_from_config(config, entry["id"])
        if not published_matches(entry, spec.total_params):
            print(f"{entry['id']}: built {spec.total_params:,} parameters, published {entry.get('published_params', entry.get('published_params_rounded'))}", file=sys.stderr)
            return 1
        outputs[CONFIGS_DIR / f"{stem}.json"] = json.dumps(config, indent=2) + "\n"
        outputs[SPECS_DIR / f"{stem}.json"] = spec.to_json() + "\n"
    outputs[SPECS_DIR / "index.json"] = json.dumps(sorted(e["id"] for e in entries), indent=1) + "\n"
    for path, text in outputs.items():
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale catalog files (run python -m planner.catalog_build): {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{len(entries)} models {'checked' if check else 'written'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify instead of writing")
    return build(parser.parse_args().check)


if __name__ == "__main__":
    sys.exit(main())
