"""A second Memento, stateless, is a valid engine: one Memento keeps the session and the persona,
the other only generates. Counting goes through the engine's POST /tokenize (MEMENTO_MODEL unset)."""

from __future__ import annotations

from tests.remote.conftest import make_settings, start_app


def test_memento_in_front_of_memento(tmp_path, memento_engine):
    settings = make_settings(tmp_path, engine_url=memento_engine.url, max_tokens=12)
    for app in start_app(settings, None):
        rt = app.rt
        assert rt.backend.kind == "memento" and rt.backend.local_tokenizer is None
        assert rt.context_window > 0  # the engine's /v1/models context_window
        c = app.client
        sid = c.post("/v1/sessions", json={"persona": "pirate"}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "My name is Ada."})
        assert r.status_code == 200 and r.json()["message"]["content"]
        assert r.json()["usage"]["prompt_tokens"] > 0  # the engine's own count
        context = c.get(f"/v1/sessions/{sid}/context", params={"message": "Who am I?"}).json()
        assert any("Ada" in m["content"] for m in context["messages"])
        assert "pirate" in context["messages"][0]["content"]  # the persona is the front's, not the engine's
        with c.stream("POST", "/v1/chat/completions", headers={"X-Session-ID": sid},
                      json={"messages": [{"role": "user", "content": "Who am I?"}], "stream": True}) as s:
            body = "".join(s.iter_lines())
        assert s.status_code == 200 and "[DONE]" in body
        assert len(c.get(f"/v1/sessions/{sid}/messages").json()["data"]) == 4


def test_counting_through_the_engines_tokenize(tmp_path, memento_engine, smol_tokenizer):
    settings = make_settings(tmp_path, engine_url=memento_engine.url)
    for app in start_app(settings, None):
        counter = app.rt.tokenizer
        text = "Memento counts in the engine's own tokens."
        assert counter.count(text) == smol_tokenizer.count(text)  # the same SmolLM2 vocabulary
        assert counter.count(text) == counter.count(text)  # the second is from the cache
        assert len(counter._cache) == 1
