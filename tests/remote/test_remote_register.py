"""The register where the logits are not ours: guard mode degrades to post-check + repair, and a
repair continues the reply from the last good sentence through the engine."""

from __future__ import annotations

from service.backend import GenParams
from service.remote_engine import RemoteBackend, sampling_body


def test_guard_persona_runs_post_check_remotely(remote_app):
    c = remote_app.client
    sid = c.post("/v1/sessions", json={"persona": "daughter-ko"}).json()["id"]
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "오늘 뭐 했어?"})
    assert r.status_code == 200
    meta = r.json()["message"]["metadata"]
    assert meta["register_guard"] == "post_check"  # no RegisterGuard logit processor: checked after
    assert "register" in meta


def test_repair_continues_the_reply_through_the_engine(remote_app):
    backend: RemoteBackend = remote_app.rt.backend
    assert backend.continue_mode == "raw_completion"  # llama.cpp with our chat template
    prompt = backend.render([{"role": "user", "content": "Tell me about cats."}])
    text = backend.complete(backend.extend(prompt, "Cats are small animals."), GenParams(max_tokens=12, temperature=0))
    assert text.strip()
    path, body = backend._request(backend.extend(prompt, "Cats are"), GenParams(max_tokens=4))
    assert path == "/completions" and body["prompt"].endswith("<|im_start|>assistant\nCats are")


def test_vllm_continues_the_final_message():
    backend = RemoteBackend.__new__(RemoteBackend)
    backend.kind, backend.local_tokenizer, backend._model = "vllm", None, "m"
    prompt = backend_render_free([{"role": "user", "content": "hi"}])
    path, body = backend._request(prompt, GenParams(max_tokens=4))
    assert path == "/chat/completions" and body["continue_final_message"] is True
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert body["add_generation_prompt"] is False


def test_sampling_body_names_penalties_for_both_engines():
    body = sampling_body(GenParams(max_tokens=5, extra={"repetition_penalty": 1.1, "logit_bias": {7: -100.0}}))
    assert body["repetition_penalty"] == body["repeat_penalty"] == 1.1
    assert body["logit_bias"] == {"7": -100.0}


def backend_render_free(messages):
    from service.backend import Rendered

    return Rendered(messages, 10, continuation="Hello")


def test_a_drifted_reply_is_repaired_by_continuing_it(tmp_path, monkeypatch):
    """An engine that answers politely (존댓말) to a banmal persona: the post-check labels it, the
    repair asks the same engine to continue from the last good sentence (raw /completions of our
    rendered prompt), and the stored reply says which mode ran."""
    import json

    import httpx

    import service.remote_engine as remote
    from tests.remote.conftest import make_settings, start_app

    raw_prompts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m", "owned_by": "me"}]})
        body = json.loads(request.content) if request.content else {}
        if request.url.path.endswith("/chat/completions"):
            text = "네, 잘 먹었어요. 아빠는 뭐 드셨어요?"  # polite: off the persona's register
        elif request.url.path.endswith("/completions"):
            raw_prompts.append(body["prompt"])
            text = " 아빠는 뭐 먹었어?"
        else:
            return httpx.Response(404)
        chunk = {"choices": [{"index": 0, "delta": {"content": text}, "text": text, "finish_reason": "stop"}]}
        return httpx.Response(200, content=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

    original = remote.EngineHTTP.__init__

    def mocked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.client = httpx.Client(transport=httpx.MockTransport(handler))

    monkeypatch.setattr(remote.EngineHTTP, "__init__", mocked)
    settings = make_settings(tmp_path, engine_url="http://engine.test/v1", model="smollm2-135m-instruct",
                             context_window=4096)
    for app in start_app(settings, None):
        c = app.client
        sid = c.post("/v1/sessions", json={"persona": "daughter-ko"}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "밥 먹었어?"})
        assert r.status_code == 200
        meta = r.json()["message"]["metadata"]
        assert meta["register_guard"] == "post_check"
        assert meta["register_repairs"] >= 1 and meta["register_repair_mode"] == "raw_completion"
        assert meta["register"] == "banmal" and r.json()["message"]["content"].endswith("아빠는 뭐 먹었어?")
        # the continuation: our chat template, then the reply up to its last good (rewritten) sentence
        assert raw_prompts[-1].endswith("밥 먹었어?<|im_end|>\n<|im_start|>assistant\n네, 잘 먹었어.")
