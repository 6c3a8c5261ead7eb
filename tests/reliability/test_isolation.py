"""Isolation with API keys: user B reaches nothing of user A's (404, never data), not even
through `vector` memory with scope `user`; keys are compared in constant time and never logged.
(tests/service/test_auth_errors.py covers the 401s and the per-route 404s on one session.)
"""

from __future__ import annotations

import inspect

import httpx
import pytest

from tests.reliability.harness import ServerProcess
from tests.service.conftest import make_settings, start_app

ALICE, BOB = "sk-alice-Zq8f3kP1x9", "sk-bob-Lm2v7Rt4w0"
WRONG = "sk-mallory-Yy5u1Hh6j3"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.slow
def test_vector_scope_user_never_retrieves_another_users_exchanges(tmp_path, tiny_lm):
    settings = make_settings(tmp_path, api_keys=f"{ALICE}:alice,{BOB}:bob", max_tokens=4)
    memory = {"strategy": "vector", "k": 4, "turns": 1, "scope": "user"}
    secret = "my bank PIN hint is the blue elephant"
    for h in start_app(settings, tiny_lm):
        c = h.client
        a1 = c.post("/v1/sessions", json={"memory": memory}, headers=auth(ALICE)).json()["id"]
        for text in (secret, "I like tea", "the weather is nice"):
            assert (
                c.post(f"/v1/sessions/{a1}/messages", json={"content": text}, headers=auth(ALICE)).status_code
                == 200
            )
        # alice herself, from another session, does recall it (scope user works) ...
        a2 = c.post("/v1/sessions", json={"memory": memory}, headers=auth(ALICE)).json()["id"]
        c.post(f"/v1/sessions/{a2}/messages", json={"content": "hello again"}, headers=auth(ALICE))
        ctx = c.get(
            f"/v1/sessions/{a2}/context", params={"message": "what is my PIN hint?"}, headers=auth(ALICE)
        )
        assert secret in ctx.text
        # ... bob, asking the same thing in his own scope-user session, gets nothing of hers
        b1 = c.post("/v1/sessions", json={"memory": memory}, headers=auth(BOB)).json()["id"]
        for text in ("what is my PIN hint?", "tell me about elephants"):
            r = c.post(f"/v1/sessions/{b1}/messages", json={"content": text}, headers=auth(BOB))
            assert r.status_code == 200 and "elephant" not in r.json()["message"]["content"]
        ctx = c.get(
            f"/v1/sessions/{b1}/context", params={"message": "blue elephant PIN hint"}, headers=auth(BOB)
        )
        assert ctx.status_code == 200 and secret not in ctx.text and "I like tea" not in ctx.text
        # and every route on alice's sessions is a 404 for him, with none of her data in the body
        for sid in (a1, a2):
            for method, path, body in [
                ("GET", f"/v1/sessions/{sid}", None),
                ("GET", f"/v1/sessions/{sid}/messages", None),
                ("GET", f"/v1/sessions/{sid}/context?message=PIN", None),
                ("POST", f"/v1/sessions/{sid}/messages", {"content": "x", "stream": True}),
                ("PATCH", f"/v1/sessions/{sid}", {"metadata": {"owned": "bob"}}),
                ("DELETE", f"/v1/sessions/{sid}", None),
            ]:
                r = c.request(method, path, json=body, headers=auth(BOB))
                assert r.status_code == 404 and secret not in r.text, (method, path, r.status_code)
        assert [s["id"] for s in c.get("/v1/sessions", headers=auth(BOB)).json()["data"]] == [b1]
        mine = c.get(f"/v1/sessions/{a1}/messages", headers=auth(ALICE)).json()["data"]
        assert mine[0]["content"] == secret and len(mine) == 6  # nothing bob did reached it
        assert "owned" not in c.get(f"/v1/sessions/{a1}", headers=auth(ALICE)).json()["metadata"]


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    import hmac

    from service import deps

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    owners = {ALICE: "alice", BOB: "bob", "k3": "carol"}
    assert deps.authenticate(owners, f"Bearer {ALICE}") == "alice"
    assert len(calls) == 3  # no early exit on a match: timing does not tell which key matched
    calls.clear()
    assert deps.authenticate(owners, f"Bearer {WRONG}") is None and len(calls) == 3
    source = inspect.getsource(deps.authenticate)
    assert "compare_digest" in source and "owners.get(" not in source and "owners[" not in source


@pytest.mark.slow
def test_keys_never_appear_in_server_logs_or_responses(tmp_path, tiny_model_dir):
    """The whole log of a real server process (uvicorn access log included) and every response."""
    srv = ServerProcess(tmp_path, tiny_model_dir, api_keys=f"{ALICE}:alice,{BOB}:bob")
    bodies = []
    with srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for key in (ALICE, BOB, WRONG, f"{ALICE}x"):
                bodies.append(c.get("/v1/sessions", headers=auth(key)).text)
                r = c.post("/v1/sessions", json={}, headers=auth(key))
                bodies.append(r.text)
                if r.status_code == 201:
                    sid = r.json()["id"]
                    bodies.append(
                        c.post(
                            f"/v1/sessions/{sid}/messages",
                            json={"content": "hi", "max_tokens": 2},
                            headers=auth(key),
                        ).text
                    )
            bodies.append(c.get("/v1/sessions", headers={"Authorization": ALICE}).text)  # no scheme
            bodies.append(c.get("/v1/sessions", headers={"Authorization": f"Basic {ALICE}"}).text)
            bodies.append(c.get("/readyz").text + c.get("/metrics").text)
    log = srv.log()
    assert "GET /v1/sessions" in log  # the access log was captured
    for key in (ALICE, BOB, WRONG):
        assert key not in log, f"key {key[:6]}... in the server log"
        assert not any(key in b for b in bodies), f"key {key[:6]}... echoed in a response"
