"""`memento memory rebuild|reindex`: derived memory recomputed offline from the durable transcript."""

from __future__ import annotations

from tests.service.conftest import make_settings, start_app


def test_rebuild_summary_and_reindex_vector(tmp_path, tiny_lm):
    from memory.store import open_store
    from service.maintenance import rebuild_session, reindex_sessions

    settings = make_settings(tmp_path)
    for h in start_app(settings, tiny_lm):
        c = h.client
        summary = c.post("/v1/sessions", json={"memory": {"strategy": "summary"}}).json()["id"]
        vector = c.post("/v1/sessions", json={"memory": {"strategy": "vector", "k": 2, "turns": 1}}).json()["id"]
        for sid in (summary, vector):
            for text in ("I have a cat named Miso.", "I work as a nurse."):
                assert c.post(f"/v1/sessions/{sid}/messages", json={"content": text, "max_tokens": 2}).status_code == 200
        assert h.rt.background.wait_idle(timeout=120)

    store = open_store(settings.store_url)
    store.put_state(summary, "summary", {"text": "stale", "count": 1, "first_id": "x", "last_id": "y"})
    store.close()

    assert rebuild_session(settings, summary, lm=tiny_lm) == "summary"
    store = open_store(settings.store_url)
    state = store.get_state(summary, "summary")
    assert state["count"] == 4 and state["text"] != "stale"  # recomputed over the whole transcript
    store.close()

    assert reindex_sessions(settings, lm=tiny_lm) == 4  # two complete exchanges in each of 2 sessions
    assert reindex_sessions(settings, vector, lm=tiny_lm) == 2
