"""The OpenAPI schema states what schemathesis found unsaid (issue 25, item 14): a plan request needs
`model` or `config_json`, a well-formed request may still be a 422 by what it means (a dataset
that does not exist), and what `events?after=` accepts. bench/schemathesis_run.py runs every check."""

import re

from app.main import create_app


def test_model_or_config_json_is_required_by_the_schema():
    schema = create_app().openapi()
    components = schema["components"]["schemas"]
    for name in ("PlanRequest", "AdviseRequest"):
        assert {"required": ["model"]} in components[name]["anyOf"] and {"required": ["config_json"]} in components[name]["anyOf"]


def test_refusals_by_meaning_are_documented_422s():
    paths = create_app().openapi()["paths"]
    for path in ("/api/v1/plan", "/api/v1/runs", "/api/v1/runs/dry-run"):
        text = paths[path]["post"]["responses"]["422"]["description"]
        assert "does not exist" in text and "`dataset`" in text


def test_what_events_after_accepts_is_stated():
    operation = create_app().openapi()["paths"]["/api/v1/runs/{run_id}/events"]["get"]
    after = next(p for p in operation["parameters"] if p["name"] == "after")
    pattern = after["schema"].get("pattern") or next(s["pattern"] for s in after["schema"]["anyOf"] if "pattern" in s)
    assert re.fullmatch(pattern, "12.3.4096") and re.fullmatch(pattern, "-1.0.0") and re.fullmatch(pattern, "")
    assert not re.fullmatch(pattern, "abc") and not re.fullmatch(pattern, "1.2") and not re.fullmatch(pattern, "-2.0.0")
    assert "STEP.TRANSITIONS.LOG_OFFSET" in after["description"]
