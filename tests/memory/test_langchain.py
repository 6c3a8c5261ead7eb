"""LangChain interop: converters, chat history on real stores, chat model on our real Engine."""

from __future__ import annotations

import os

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

from memory.langchain import MementoChatModel, StoreChatMessageHistory, from_langchain, to_langchain
from memory.store import SessionNotFound

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The brief's interop target; LangChain now points new code at LangGraph persistence instead.
pytestmark = pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")


# -- converters ----------------------------------------------------------------------------


def test_converters_map_roles_both_ways_and_keep_ids(store):
    s = store.create_session("alice", "assistant", {"strategy": "buffer"})
    stored = [
        store.append_message(s.id, "system", "be brief"),
        store.append_message(s.id, "user", "안녕 🙂", {"lang": "ko"}),
        store.append_message(s.id, "assistant", "hi"),
    ]
    lc = to_langchain(stored)
    assert [type(m) for m in lc] == [SystemMessage, HumanMessage, AIMessage]
    assert [m.id for m in lc] == [m.id for m in stored]
    assert lc[1].additional_kwargs["metadata"] == {"lang": "ko"}
    assert from_langchain(lc) == [m.to_chat() for m in stored]
    assert to_langchain([{"role": "user", "content": "x"}])[0] == HumanMessage("x")


def test_converters_refuse_what_memento_cannot_keep():
    blocks = HumanMessage(content=[{"type": "text", "text": "a"}, "b"])
    assert from_langchain([blocks]) == [{"role": "user", "content": "ab"}]
    with pytest.raises(ValueError, match="message 0: a ToolMessage .* user, assistant, system"):
        from_langchain([ToolMessage("42", tool_call_id="t1")])
    with pytest.raises(ValueError, match="content block of type 'image_url'"):
        from_langchain([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])
    with pytest.raises(ValueError, match="role 'tool'"):
        to_langchain([{"role": "tool", "content": "x"}])


# -- chat history --------------------------------------------------------------------------


def test_history_creates_session_appends_and_clears(store):
    h = StoreChatMessageHistory(store, "lc-session", owner="alice", persona="tutor")
    assert h.messages == []
    h.add_messages([HumanMessage("안녕하세요"), AIMessage("반가워요 🎉")])
    h.add_message(HumanMessage("again"))
    assert [(type(m), m.content) for m in h.messages] == [
        (HumanMessage, "안녕하세요"), (AIMessage, "반가워요 🎉"), (HumanMessage, "again")]
    assert [m.content for m in store.list_messages("lc-session")] == ["안녕하세요", "반가워요 🎉", "again"]
    assert store.get_session("lc-session").persona == "tutor"
    store.put_state("lc-session", "summary", {"text": "old"})
    h.clear()
    assert h.messages == [] and store.get_state("lc-session", "summary") is None
    assert store.get_session("lc-session", owner="alice").persona == "tutor"  # the session stays


def test_history_of_another_owner_is_not_found(store):
    StoreChatMessageHistory(store, "shared-id", owner="alice").add_messages([HumanMessage("secret")])
    bob = StoreChatMessageHistory(store, "shared-id", owner="bob")
    with pytest.raises(SessionNotFound):
        _ = bob.messages
    with pytest.raises(SessionNotFound):
        bob.add_messages([HumanMessage("mine now")])
    assert [m.content for m in store.list_messages("shared-id")] == ["secret"]


def test_runnable_with_message_history_sees_and_stores_the_conversation(store):
    seen: list[int] = []

    def chat(messages):
        seen.append(len(messages))
        return AIMessage(f"you said {messages[-1].content!r} after {len(messages) - 1} messages")

    chain = RunnableWithMessageHistory(
        RunnableLambda(chat), lambda sid: StoreChatMessageHistory(store, sid, owner="alice")
    )
    cfg = {"configurable": {"session_id": "rwmh"}}
    assert chain.invoke("hello", config=cfg).content == "you said 'hello' after 0 messages"
    assert chain.invoke([HumanMessage("둘째")], config=cfg).content == "you said '둘째' after 2 messages"
    assert seen == [1, 3]
    assert [(m.role, m.content) for m in store.list_messages("rwmh")] == [
        ("user", "hello"),
        ("assistant", "you said 'hello' after 0 messages"),
        ("user", "둘째"),
        ("assistant", "you said '둘째' after 2 messages"),
    ]


# -- chat model on the real Engine (tiny random weights, SmolLM2's real tokenizer) ----------


@pytest.fixture(scope="module")
def tiny_lm():
    torch = pytest.importorskip("torch")
    from model.config import ModelArgs
    from model.registry import LoadedModel, build_model, model_class, smollm2_path
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_path())
    args = ModelArgs(family="llama", vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                     hidden_dim=64, max_seq_len=512, context_length=512, tie_embeddings=True)
    with torch.device("meta"):
        shapes = model_class(args)(args).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in shapes.items()}
    model = build_model(args, state)
    return LoadedModel("tiny", args, model, tok, 512, torch.device("cpu"), torch.float32, smollm2_path())


@pytest.fixture
def chat_model(tiny_lm):
    from model import Engine

    return MementoChatModel(Engine(tiny_lm, kv_budget_bytes=64 << 20), tiny_lm.tokenizer,
                            max_tokens=12, temperature=0.0)


def test_chat_model_invoke_and_stream_agree_and_report_usage(chat_model, tiny_lm):
    msgs = [SystemMessage("be brief"), HumanMessage("Say hi")]
    reply = chat_model.invoke(msgs)
    assert isinstance(reply, AIMessage) and reply.content
    prompt_len = len(tiny_lm.tokenizer.apply_chat_template(from_langchain(msgs)))
    assert reply.usage_metadata["input_tokens"] == prompt_len
    assert reply.usage_metadata["output_tokens"] == 12  # random weights rarely emit EOS in 12 tokens
    assert reply.response_metadata["finish_reason"] == "length"

    chunks = list(chat_model.stream(msgs))
    assert len([c for c in chunks if c.content]) > 2  # token by token, not one blob
    merged = sum(chunks[1:], chunks[0])
    assert merged.content == reply.content  # greedy: the same text either way
    assert merged.usage_metadata["output_tokens"] == 12
    assert merged.response_metadata["finish_reason"] == "length"


def test_chat_model_honours_per_call_params_and_stop(chat_model):
    msgs = [HumanMessage("Say hi")]
    short = chat_model.invoke(msgs, max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3
    full = chat_model.invoke(msgs).content
    cut = full.strip()[2:4]  # a stop string from inside the greedy reply
    stopped = chat_model.invoke(msgs, stop=[cut]).content
    assert cut not in stopped and full.startswith(stopped)


def test_chat_model_with_store_history(chat_model, store):
    chain = RunnableWithMessageHistory(chat_model, lambda sid: StoreChatMessageHistory(store, sid))
    cfg = {"configurable": {"session_id": "lc-model"}}
    first = chain.invoke("Hello there", config=cfg)
    second = chain.invoke("And again", config=cfg)
    stored = store.list_messages("lc-model")
    assert [(m.role, m.content) for m in stored] == [
        ("user", "Hello there"), ("assistant", first.content), ("user", "And again"), ("assistant", second.content)]
    # The second call's prompt contained the first exchange.
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"] + 5
