"""Schema-driven fuzzing of every route (schemathesis + hypothesis), here with API keys ON and
streaming allowed, as the authenticated user and as a stranger. No 5xx, ever; errors in the
documented shape. (tests/service/test_api_fuzz.py runs the keyless, non-streaming variant.)

    MEMENTO_FUZZ_EXAMPLES=200 .venv/bin/python -m pytest tests/reliability/test_fuzz_full.py -q -s
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.reliability.conftest import env_int
from tests.service.conftest import make_settings, start_app

EXAMPLES = env_int("MEMENTO_FUZZ_EXAMPLES", 6)
KEY = "sk-fuzz-owner-7Hq2"
ERROR_KEYS = {"message", "type", "param", "code"}


def fuzz(op, headers: dict[str, str], counter: list[int]) -> None:
    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if isinstance(case.body, dict) and ("messages" in case.body or "content" in case.body):
            case.body["max_tokens"] = 2  # keep generation short; "stream" stays whatever was drawn
            case.body.pop("max_completion_tokens", None)
        response = case.call(headers=headers)
        counter[0] += 1
        case.validate_response(response, checks=[checks.not_a_server_error])
        assert response.status_code < 500, (op.label, response.status_code, response.text[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == ERROR_KEYS, (op.label, response.text[:300])

    check()


@pytest.mark.slow
def test_fuzz_every_route_with_keys(tmp_path, tiny_lm):
    settings_ = make_settings(tmp_path, api_keys=f"{KEY}:owner", max_tokens=2)
    counter = [0]
    for h in start_app(settings_, tiny_lm):
        schema = schemathesis.openapi.from_asgi("/openapi.json", h.app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 14
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer not-a-key"}):
            for op in operations:
                fuzz(op, headers, counter)
    print(f"\nschemathesis: {counter[0]} requests over {len(operations)} operations x 2 callers, no 5xx")
    assert counter[0] >= len(operations) * 2
