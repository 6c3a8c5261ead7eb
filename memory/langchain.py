"""LangChain interop: message converters, a chat history on our stores, a chat model on our Engine.

    from memory.langchain import StoreChatMessageHistory, MementoChatModel, to_langchain, from_langchain

    history = StoreChatMessageHistory(store, "sess_1", owner="alice")   # BaseChatMessageHistory
    chat = MementoChatModel(engine, lm.tokenizer, max_tokens=128, temperature=0.7)  # BaseChatModel
    RunnableWithMessageHistory(chat, lambda sid: StoreChatMessageHistory(store, sid)).invoke(...)

Only user/assistant/system turns exist in Memento; tool and function messages are refused with a
clear error rather than silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from memory.store import ROLES, SessionExists, SessionNotFound, Store
from memory.types import Message

_TO_LC = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}
_ROLE_ALIASES = {"human": "user", "ai": "assistant", "user": "user", "assistant": "assistant", "system": "system"}

# -- converters ----------------------------------------------------------------------------


def _text(content: str | list, what: str) -> str:
    """LangChain content (a string or content blocks) as plain text; non-text blocks are refused."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"{what}: content block of type {kind!r} is not supported; Memento models take text only")
    return "".join(parts)


def _role(msg: BaseMessage, what: str) -> str:
    if isinstance(msg, ChatMessage):
        role = _ROLE_ALIASES.get(msg.role)
    else:
        role = _ROLE_ALIASES.get(msg.type)
    if role is None:
        raise ValueError(
            f"{what}: a {type(msg).__name__} (type {msg.type!r}) cannot be stored or sent: "
            f"Memento keeps {', '.join(ROLES)} turns only"
        )
    return role


def from_langchain(messages: Iterable[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> [{"role", "content"}] (what stores and chat templates take)."""
    return [
        {"role": _role(m, f"message {i}"), "content": _text(m.content, f"message {i}")}
        for i, m in enumerate(messages)
    ]


def to_langchain(messages: Iterable[Message | dict[str, Any]]) -> list[BaseMessage]:
    """Stored `Message`s (id and metadata kept) or {"role", "content"} dicts -> LangChain messages."""
    out: list[BaseMessage] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            role, content = m.role, m.content
            extra: dict[str, Any] = {"id": m.id, "additional_kwargs": {"metadata": m.metadata, "created_at": m.created_at}}
        else:
            role, content, extra = m.get("role"), m.get("content"), {}
        if role not in _TO_LC:
            raise ValueError(f"message {i}: role {role!r} is not supported: use one of {', '.join(ROLES)}")
        out.append(_TO_LC[role](content=content, **extra))
    return out


# -- chat history --------------------------------------------------------------------------


class StoreChatMessageHistory(BaseChatMessageHistory):
    """A session's transcript in one of our stores, as LangChain chat history.

    The session is created on the first `add_messages` (with `persona` and `memory`) if it does
    not exist yet. A session that belongs to another owner reads as not found (SessionNotFound),
    never as someone else's messages.
    """

    def __init__(
        self,
        store: Store,
        session_id: str,
        owner: str = "local",
        persona: str = "assistant",
        memory: dict[str, Any] | None = None,
    ):
        self.store = store
        self.session_id = session_id
        self.owner = owner
        self.persona = persona
        self.memory = memory or {"strategy": "buffer"}

    def _session(self):
        session = self.store.get_session(self.session_id)
        if session is not None and session.owner != self.owner:
            raise SessionNotFound(self.session_id)
        return session

    def _ensure_session(self):
        session = self._session()
        if session is not None:
            return session
        try:
            return self.store.create_session(self.owner, self.persona, self.memory, session_id=self.session_id)
        except SessionExists:  # created meanwhile by another writer: fine if it is ours
            session = self._session()
            if session is None:
                raise
            return session

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        if self._session() is None:
            return []
        return to_langchain(self.store.list_messages(self.session_id))

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        turns = from_langchain(messages)  # validate all before storing any
        self._ensure_session()
        for turn, msg in zip(turns, messages, strict=True):
            meta = msg.additional_kwargs.get("metadata")
            self.store.append_message(
                self.session_id, turn["role"], turn["content"], meta if isinstance(meta, dict) else None
            )

    def clear(self) -> None:
        """Forget the transcript and strategy state; the session (persona, memory, metadata) stays."""
        s = self._session()
        if s is None:
            return
        self.store.delete_session(s.id)
        self.store.create_session(s.owner, s.persona, s.memory, s.metadata, session_id=s.id)


# -- chat model ----------------------------------------------------------------------------


class MementoChatModel(BaseChatModel):
    """A LangChain chat model over our generation `Engine` (model.engine.Engine).

    `session_id` lets the engine keep the KV cache between calls of one conversation.
    Sampling fields can be overridden per call: `chat.invoke(msgs, max_tokens=16, seed=1)`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any
    tokenizer: Any
    model_name: str = "memento"
    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    session_id: str | None = None

    def __init__(self, engine: Any = None, tokenizer: Any = None, **kwargs: Any):
        if engine is None or tokenizer is None:
            raise ValueError("MementoChatModel needs an engine and a tokenizer: MementoChatModel(Engine(lm), lm.tokenizer)")
        super().__init__(engine=engine, tokenizer=tokenizer, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "memento"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}

    def _params(self, stop: list[str] | None, overrides: dict[str, Any]):
        from model import SamplingParams  # lazy: importing memory must not pull torch

        fields = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
        kw = {f: overrides.get(f, getattr(self, f)) for f in fields}
        stops = [*(self.stop or []), *(stop or []), *(overrides.get("stop") or [])]
        return SamplingParams(**kw, stop=stops)

    def _events(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]):
        prompt = self.tokenizer.apply_chat_template(from_langchain(messages), add_generation_prompt=True)
        session_id = kwargs.get("session_id", self.session_id)
        return self.engine.generate(prompt, self._params(stop, kwargs), session_id=session_id)

    def _final(self, ev) -> dict[str, Any]:
        u = ev.usage
        usage = None
        if u is not None:
            usage = {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                     "total_tokens": u.prompt_tokens + u.completion_tokens,
                     "input_token_details": {"cache_read": u.cached_tokens}}
        return {"usage_metadata": usage,
                "response_metadata": {"finish_reason": ev.finish_reason, "model_name": self.model_name}}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        parts: list[str] = []
        final: dict[str, Any] = {}
        for ev in self._events(messages, stop, kwargs):
            parts.append(ev.text)
            if ev.finished:
                final = self._final(ev)
        message = AIMessage(content="".join(parts), **final)
        info = {"finish_reason": final.get("response_metadata", {}).get("finish_reason")}
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        events = self._events(messages, stop, kwargs)
        try:
            for ev in events:
                if ev.text:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=ev.text))
                    if run_manager is not None:
                        run_manager.on_llm_new_token(ev.text, chunk=chunk)
                    yield chunk
                if ev.finished:
                    final = self._final(ev)
                    info = {"finish_reason": ev.finish_reason}
                    yield ChatGenerationChunk(message=AIMessageChunk(content="", **final), generation_info=info)
        finally:
            events.close()  # a consumer that stops early must release the engine's lock
