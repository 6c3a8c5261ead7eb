"""Deletion that holds (issue 10, item 6): deleting a session while Chroma is down leaves a
tombstone in the store; its vectors are deleted when Chroma is back, at the next vector access
or at the next start-up (a new runtime over the same data dir), and `scope: user` retrieval in
the owner's other sessions never brings the deleted chat back. Real Chroma server, real store."""

from __future__ import annotations

import pytest

from memory.vector_store import collection_name
from tests.reliability.harness import free_port, wait_until
from tests.reliability.test_faults import start_chroma
from tests.service.conftest import make_settings, start_app

MEMORY = {"strategy": "vector", "k": 4, "turns": 1, "scope": "user"}
SECRETS = {"a": "my locker code is 4471", "c": "my cat is named Saffron"}


def chroma_ids(port: int, session_id: str) -> list[str]:
    """The session's vectors as Chroma itself holds them (not through our retrieval filter)."""
    import chromadb

    from memory.vector_store import chroma_settings

    client = chromadb.HttpClient(host="127.0.0.1", port=port, settings=chroma_settings())
    col = client.get_collection(collection_name("local", "use-multilingual-v3"))
    return col.get(where={"session_id": session_id})["ids"]


def chat(c, sid: str, text: str) -> None:
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": text})
    assert r.status_code == 200, r.text


def retrieved(c, sid: str, question: str) -> str:
    ctx = c.get(f"/v1/sessions/{sid}/context", params={"message": question}).json()
    return " ".join(m["content"] for ex in ctx["memory"].get("retrieved", []) for m in ex)


def tombstoned(h) -> set[str]:
    return {sid for sid, _ in h.rt.store.list_tombstones()}


@pytest.mark.slow
def test_deleted_sessions_vectors_go_when_chroma_returns_and_across_a_restart(tmp_path, tiny_lm):
    port = free_port()
    settings = make_settings(tmp_path, chroma_url=f"http://127.0.0.1:{port}", max_tokens=4)
    chroma = start_chroma(tmp_path / "chroma", port)
    try:
        for h in start_app(settings, tiny_lm):
            c = h.client
            sids = {name: c.post("/v1/sessions", json={"memory": MEMORY}).json()["id"] for name in ("a", "c", "b")}
            for name in ("a", "c"):
                chat(c, sids[name], SECRETS[name])
                chat(c, sids[name], "the weather is nice")
            chat(c, sids["b"], "hello")
            assert h.rt.background.wait_idle(30)
            assert SECRETS["a"] in retrieved(c, sids["b"], "what is my locker code?")  # scope user works
            assert chroma_ids(port, sids["a"]) and chroma_ids(port, sids["c"])

            # Chroma down: the delete answers at once, the tombstone waits in the store
            chroma.terminate()
            chroma.wait(timeout=20)
            assert c.delete(f"/v1/sessions/{sids['a']}").status_code == 204
            assert h.rt.background.wait_idle(30) and tombstoned(h) == {sids["a"]}

            # Chroma back: the next vector access applies it
            chroma = start_chroma(tmp_path / "chroma", port)
            h.rt.vector().retry_after_s = 0.2  # do not wait out the 5 s back-off in a test
            wait_until(lambda c=c: c.get("/readyz").json().get("vector"), 10, "vector memory back", 0.2)
            chat(c, sids["b"], "what do you remember?")
            wait_until(lambda h=h: not tombstoned(h), 10, "tombstone applied on vector access")
            assert chroma_ids(port, sids["a"]) == []

            # down again: delete c, then stop this runtime with the tombstone pending
            chroma.terminate()
            chroma.wait(timeout=20)
            assert c.delete(f"/v1/sessions/{sids['c']}").status_code == 204
            assert h.rt.background.wait_idle(30) and tombstoned(h) == {sids["c"]}

        chroma = start_chroma(tmp_path / "chroma", port)
        for h in start_app(settings, tiny_lm):  # a new runtime over the same data dir: applied at start-up
            c = h.client
            wait_until(lambda h=h: not tombstoned(h), 20, "tombstone applied at start-up")
            assert chroma_ids(port, sids["c"]) == [] and chroma_ids(port, sids["b"])
            text = retrieved(c, sids["b"], "what is my cat called? my locker code?")
            assert SECRETS["a"] not in text and SECRETS["c"] not in text
            assert c.get(f"/v1/sessions/{sids['c']}").status_code == 404
            assert h.rt.store.get_state(sids["c"], "vector:use-multilingual-v3") is None  # state went too
    finally:
        chroma.terminate()
        chroma.wait(timeout=20)
