"""Acceptance: LangChain's own standard integration tests for chat models (`langchain-tests`,
`ChatModelIntegrationTests`) through `langchain_openai.ChatOpenAI` against a real Memento server
on 127.0.0.1 serving the built-in SmolLM2-135M, with tool calling, tool choice, structured output
and JSON mode on (multimodal off). Greedy decoding and a small `max_tokens` bound the runtime."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.service.conftest import LiveServer, free_port, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="class", autouse=True)
def memento_server(request, tmp_path_factory, smol_lm):
    from service.main import create_app

    settings = make_settings(tmp_path_factory.mktemp("lc"), max_tokens=160, keepalive_seconds=5.0)
    with LiveServer(create_app(settings, lm=smol_lm), free_port()) as server:
        request.cls.base_url = server.url + "/v1"
        yield server


# Tests whose request, grammar and response shape all work but whose assertion is about what a 135M
# model chooses. Non-strict xfail, so a larger MEMENTO_MODEL (or a better prompt) that passes shows
# up as XPASS. The tool-calling ones passed once the call grammar used json.dumps' separators and the
# grammar's repetition penalty stopped counting the prompt (service/routers/chat.py, constrained_penalty).
MODEL_CAPACITY = {
    # greedy output depends on the host's int4 kernel: it passes on AVX-512/AMX hosts; on an AVX2
    # host SmolLM2-135M wrote the whole joke under 'setup' and closed the object
    "test_json_mode": "json_object only promises an object: on some hosts SmolLM2-135M writes the whole "
                      "joke under 'setup' and closes it, with no 'punchline' key",
}


@pytest.fixture(autouse=True)
def model_capacity_xfail(request):
    reason = MODEL_CAPACITY.get(request.node.originalname)
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


class TestMementoChatOpenAI(ChatModelIntegrationTests):
    base_url = ""

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict:
        return {
            "model": "smollm2-135m-instruct",
            "base_url": self.base_url,
            "api_key": "unused",
            "temperature": 0,
            "max_tokens": 160,
            "max_retries": 0,
            "timeout": 120,
            "stream_usage": True,
        }

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True
