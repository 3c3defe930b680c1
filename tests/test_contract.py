"""Every API operation against its own OpenAPI schema (schemathesis): a few hundred generated
requests each, valid and invalid, and every response must be documented, match its schema, and
never be a server error."""

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import app

# the runs API answers only 401 here without a token: tests/test_runs_contract.py covers it signed in
schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path_regex=r"^/api/v1/(runs|backends)")
EXAMPLES = int(os.environ.get("VRAMPLAN_CONTRACT_EXAMPLES", "300"))


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_its_contract(case):
    # Every check but one: a request the schema allows may still be refused with a 422 by design,
    # for what a schema cannot say (an id outside the catalog, qlora with an int8 base, zero3 on
    # one GPU, a config.json text that is not a model). Those 422s are held to the error schema.
    case.call_and_validate(headers={"host": "localhost"}, excluded_checks=[positive_data_acceptance])
