"""Property-based checks of the whole API from its OpenAPI schema (schemathesis + hypothesis):
whatever the body, the service answers in the documented error shape and never with a 500."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

ERROR_KEYS = {"message", "type", "param", "code"}


def fuzz_operation(op) -> None:
    label = op.label

    @given(case=op.as_strategy())
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict):
            case.body.pop("stream", None)  # streaming is covered by the framing tests
            case.body.pop("max_completion_tokens", None)
            if "messages" in case.body or "content" in case.body:
                case.body["max_tokens"] = 2  # keep generation short
        response = case.call()
        case.validate_response(response, checks=[checks.not_a_server_error])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == ERROR_KEYS, (label, response.text)

    check()


def test_no_server_errors(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for op in operations:
        fuzz_operation(op)
