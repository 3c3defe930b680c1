"""Schemathesis against the app's own OpenAPI schema, in process (issue 25, item 14).

Every operation of /openapi.json, signed in with a Bearer token, the test Host allowed, every
built-in check on (not_a_server_error, status_code_conformance, content_type_conformance,
response_schema_conformance, response_headers_conformance, positive_data_acceptance,
negative_data_rejection, missing_required_header, unsupported_method, use_after_free,
ensure_resource_availability, ignored_auth, ...), a bounded number of examples per operation. The
fake backend stands in for every backend (tests/fake_backend.py), so no generated launch starts a
process.

positive_data_acceptance: a request the schema allows may still be refused by what it means, never
by its form: a dataset path that does not exist, a model that is not in the catalog, a plan that
does not fit. The schema documents those as 422 with the field named (and says so in the field's
description), so 422 is among the statuses that check accepts; everything else is as shipped.

    python bench/schemathesis_run.py [--examples N] [--out bench/results/schemathesis-DATE.json]

Prints a summary and writes it as JSON; exits 1 when any check failed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "schemathesis-token-0123456789abcdef"


def _environment(tmp: Path) -> None:
    root = tmp / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    os.environ.update({"VRAMPLAN_DATA_DIR": str(tmp / "data"), "VRAMPLAN_ROOTS": str(root), "VRAMPLAN_TOKEN": TOKEN,
                       "VRAMPLAN_ALLOWED_HOSTS": "localhost,127.0.0.1,::1,testserver", "HF_HUB_OFFLINE": "1"})
    os.environ.pop("VRAMPLAN_AUTH", None)


class _Patch:
    """pytest's monkeypatch.setattr/setenv, for tests/fake_backend.register outside pytest."""

    def setattr(self, target, name, value=None, raising=True):
        if value is None and isinstance(target, str):
            module, _, attr = target.rpartition(".")
            import importlib

            target, name, value = importlib.import_module(module), attr, name
        setattr(target, name, value)

    def setenv(self, name, value):
        os.environ[name] = str(value)

    def delenv(self, name, raising=True):
        os.environ.pop(name, None)

    def setitem(self, mapping, key, value):
        mapping[key] = value


def run(examples: int, seed: int, strict: bool = False) -> dict:
    import schemathesis
    from schemathesis import GenerationMode
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.config import SchemathesisConfig
    from schemathesis.core.failures import Failure, FailureGroup

    from app.main import create_app
    from tests import fake_backend

    fake_backend.register(_Patch(), also_as_local=True)
    accepted = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"] + ([] if strict else ["422"])
    config = SchemathesisConfig.from_dict({"checks": {"enabled": True, "positive_data_acceptance": {"expected-statuses": accepted}}})
    app = create_app()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    headers = {"host": "localhost", "Authorization": f"Bearer {TOKEN}"}
    per_operation, failures = {}, collections.Counter()
    examples_seen: dict[str, str] = {}
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = operation.label
        counts = collections.Counter()

        @hypothesis_seed(seed)
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        def probe(case):
            counts["cases"] += 1
            try:
                case.call_and_validate(headers=headers)
            except FailureGroup as group:
                for failure in group.exceptions:
                    title = getattr(failure, "title", type(failure).__name__)
                    counts[title] += 1
                    failures[title] += 1
                    examples_seen.setdefault(f"{label}: {title}", str(failure)[:500])
            except Failure as failure:
                counts[failure.title] += 1
                failures[failure.title] += 1
                examples_seen.setdefault(f"{label}: {failure.title}", str(failure)[:500])

        probe()
        per_operation[label] = dict(counts)
        print(f"{label}: {counts['cases']} cases, {sum(v for k, v in counts.items() if k != 'cases')} failures", flush=True)
    return {"date": datetime.date.today().isoformat(), "schemathesis": schemathesis.__version__, "examples_per_operation": examples,
            "seed": seed, "checks": "all built-in" + ("" if strict else " (positive_data_acceptance also accepts the documented 422)"),
            "operations": len(per_operation), "cases": sum(v.get("cases", 0) for v in per_operation.values()),
            "failures": sum(failures.values()), "failures_by_kind": dict(failures), "per_operation": per_operation,
            "failure_examples": examples_seen, "seconds": round(time.monotonic() - started, 1), "python": sys.version.split()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=25)
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--strict", action="store_true", help="positive_data_acceptance without the documented 422 (shows which refusals are by meaning)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _environment(Path(tmp))
        summary = run(args.examples, args.seed, args.strict)
    text = json.dumps(summary, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"{summary['cases']} cases over {summary['operations']} operations: {summary['failures']} failures {summary['failures_by_kind']}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
