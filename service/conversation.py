"""One conversation turn, from a stored session to a stored reply.

    conv = Conversations(rt)
    prep = conv.prepare(session, "hi")                  # blocking: run in a thread
    job_fn = conv.turn_job(prep, sampling)              # runs on the engine worker
    result = job_fn(job)                                # -> TurnResult (message stored, usage)

Order of a turn: load the session (owner-checked) -> persona parts (with a register reminder
when recent replies drifted) -> the memory strategy's view -> `build_context` -> chat template
-> [worker] store the user message -> backend.stream (session id = KV reuse; RegisterGuard as a
logit processor in `guard` mode where the backend applies them; the model's sampling preset and
the carriers' stop strings, service/reply_check.py) -> reply check (a leaked instruction cut, a
degenerate reply generated again) -> register post-check / repair
-> store the reply with metadata -> `after_turn` on the background thread, off the critical path.

Everything model-side goes through `rt.backend` (service/backend.py): the local engine or a remote
OpenAI-compatible one. This module handles messages and text only, never token ids.

Interrupted replies (client gone, deadline passed) ARE stored, with whatever text was generated
and metadata `{"interrupted": true, "finish_reason": "cancelled"}`: the transcript keeps the
user/assistant alternation and shows what the user saw.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from memory.config import validate_memory_config
from memory.strategies import StrategyDeps, build_strategy
from memory.types import Message, Session
from persona import quality
from persona.register_policy import guards
from service import register, reply_check
from service.backend import GenParams, Rendered
from service.errors import APIError, not_found
from service.runtime import Runtime
from service.worker import Job

log = logging.getLogger("memento.conversation")

REPAIR_MAX_TOKENS = 48  # one regenerated sentence when repairing the register
SENTENCE_END = re.compile(r"[.!?。…]+|\n")


@dataclass
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # fresh logit processors per generation (grammars keep parser state); one with
    # `advance(index, token_id)` hears each sampled token early (service/structured.py)
    processors: Callable[[], list[Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more SamplingParams fields (penalties, logprobs)
    tool_parser: Callable[[str], list[dict[str, Any]]] | None = None  # reply text -> OpenAI tool calls


@dataclass
class TokenLogprob:
    """One generated token with its log-probability (emitted instead of plain text when asked)."""

    text: str  # the text this token added (may be "" while a character is incomplete)
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives (id, log p)


@dataclass
class Prepared:
    """Everything the worker needs for one generation; built off the worker thread."""

    messages: list[dict[str, str]]  # what the chat template saw
    prompt: Rendered  # as the backend will send it (local: ids + the pinned prefix's length)
    max_tokens: int  # reply limit that still fits the window
    persona: Any  # persona.Persona
    session: Session | None = None  # None: stateless
    new_message: str | None = None  # memory mode: the user turn to store first
    ctx: Any = None  # memory.context.Context (memory mode)
    remind: bool = False
    message_id: str | None = None  # the Idempotency-Key: the user message's id, the reply's reply_to
    rules: Any = None  # persona.quality.ReplyRules the reply is checked against (None: no persona prompt)


@dataclass
class TurnResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    usage: dict[str, int]
    message: Message | None = None  # the stored reply (memory mode)
    register_meta: dict[str, Any] = field(default_factory=dict)  # register label (+ repairs)
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI tool calls parsed from the reply (service/tools.py)
    token_logprobs: list[Any] = field(default_factory=list)  # (token_id, logprob, top) per token, when asked

    def openai_finish_reason(self) -> Literal["stop", "length", "tool_calls"]:
        if self.tool_calls and self.finish_reason == "stop":
            return "tool_calls"
        return "stop" if self.finish_reason == "stop" else "length"


def sampling_extra(vocab_size: int, presence: float | None, frequency: float | None,
                   bias: dict[str, float] | None, logprobs: int | None) -> dict[str, Any]:
    """The request's SamplingParams fields beyond the basic ones; logit_bias checked against the vocabulary."""
    from service.client_messages import logit_bias

    extra: dict[str, Any] = {}
    if presence:
        extra["presence_penalty"] = presence
    if frequency:
        extra["frequency_penalty"] = frequency
    if bias:
        extra["logit_bias"] = logit_bias(bias, vocab_size)  # 422 naming the bad key
    if logprobs is not None:
        extra["logprobs"] = logprobs
    return extra


def gen_params(sampling: Sampling, limit: int) -> GenParams:
    """The request's sampling within the reply limit that fits the window (OpenAI's defaults otherwise)."""
    temperature = 0.7 if sampling.temperature is None else sampling.temperature
    top_p = 1.0 if sampling.top_p is None else sampling.top_p
    return GenParams(min(sampling.max_tokens or limit, limit), temperature, top_p, sampling.seed, sampling.stop,
                     dict(sampling.extra))


def usage_dict(u: Any) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "cached_tokens": u.cached_tokens,
    }


class Conversations:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.store = rt.store
        self.settings = rt.settings

    # ------------------------------------------------------------------ sessions

    def get_session(self, session_id: str, owner: str) -> Session:
        session = self.store.get_session(session_id, owner=owner)
        if session is None:  # missing and "someone else's" look the same: no existence leak
            raise not_found("session", session_id)
        return session

    def create_session(
        self,
        owner: str,
        persona: str | None = None,
        memory: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        persona_name = persona or self.settings.persona
        self.rt.personas.get(persona_name, owner)  # 404 for an unknown (or another user's) persona, before any write
        config = self.check_memory(memory if memory is not None else self.settings.memory)
        return self.store.create_session(owner, persona_name, config, metadata or {}, session_id=session_id)

    def update_session(
        self, session: Session, *, persona: str | None, memory: dict[str, Any] | None, metadata: dict | None
    ) -> Session:
        if persona is not None:
            self.rt.personas.get(persona, session.owner)  # a session runs only its owner's or shared personas
        config = self.check_memory(memory) if memory is not None else None
        return self.store.update_session(session.id, persona=persona, memory=config, metadata=metadata)

    def delete_session(self, session: Session) -> None:
        self.store.delete_session(session.id)
        backend = self.rt.backend
        self.rt.worker.submit(lambda _job: backend.drop_session(session.id), background=True)
        # the store left a tombstone with the delete: the vectors go off the request path, now or,
        # if Chroma is down, at the next vector access or start-up (retrieval drops them meanwhile)
        self.rt.background.submit(("tombstones", ""), self.rt.apply_tombstones)

    @staticmethod
    def check_memory(config: dict[str, Any]) -> dict[str, Any]:
        """The completed config (memory.config is the one definition), or a 422 naming the field."""
        from memory.config import MemoryConfigError

        try:
            return validate_memory_config(config)
        except MemoryConfigError as exc:
            raise APIError(422, str(exc), param=exc.param, code="invalid_memory") from exc

    # ------------------------------------------------------------------ memory

    def strategy_deps(self, config: dict[str, Any]) -> StrategyDeps:
        long_term = config.get("strategy") == "long_term"
        vector = self.rt.vector() if config.get("strategy") in ("vector", "long_term") else None
        editor = self.block_editor() if long_term else None
        return StrategyDeps(self.store, self.rt.tokenizer, summarizer=self.summarizer(), vector=vector,
                            block_editor=editor)

    def block_editor(self) -> Any:
        """long_term: the model proposes core-block edits after the turn, on the worker like summaries."""
        from memory.blocks import ModelBlockEditor

        return ModelBlockEditor(WorkerEngine(self.rt), self.rt.tokenizer)

    def strategy(self, session: Session) -> Any:
        return build_strategy(session.memory, self.strategy_deps(session.memory))

    def summarizer(self) -> Any:
        from memory.summarizer import ModelSummarizer

        return ModelSummarizer(WorkerEngine(self.rt), self.rt.tokenizer, max_tokens=self.settings.summary_max_tokens)

    def schedule_after_turn(self, session_id: str) -> None:
        def task() -> None:
            session = self.store.get_session(session_id)
            if session is None:  # deleted meanwhile
                return
            self.strategy(session).after_turn(session, self.store.list_messages(session_id))

        self.rt.background.submit(("after_turn", session_id), task)

    # ------------------------------------------------------------------ building the prompt

    def persona(self, name: str | None, owner: str | None) -> Any:
        """`owner`'s persona or a shared one (another user's is a 404, like their sessions)."""
        return self.rt.personas.get(name or self.settings.persona, owner)

    def session_persona(self, session: Session, override: str | None) -> tuple[Any, str | None]:
        """The turn's persona; if the session's was deleted since, the default one and a warning
        (a named override that does not exist is still the caller's 404)."""
        from persona.errors import PersonaNotFound

        if override:
            return self.persona(override, session.owner), None
        try:
            return self.persona(session.persona, session.owner), None
        except PersonaNotFound:
            default = self.settings.persona
            log.warning("session %s: persona %r is gone, using %r", session.id, session.persona, default)
            return self.persona(default, session.owner), f"persona {session.persona!r} no longer exists: using {default!r}"

    def reserve(self, requested: int | None) -> int:
        """Context tokens kept free for the reply: the configured reserve or the request's max, within half the window."""
        want = max(self.settings.reserve_for_reply, requested or 0)
        return max(1, min(want, self.rt.context_window // 2))

    def prepare(
        self,
        session: Session,
        new_message: str,
        *,
        persona_name: str | None = None,
        max_tokens: int | None = None,
        history: list[Message] | None = None,
    ) -> Prepared:
        """Memory mode: what the model sees for `new_message` in `session` (nothing is written).
        `history`: the transcript to answer from (default: the stored one; regenerate passes a prefix)."""
        from memory.context import build_context
        from persona.prompt import build_prompt_parts

        persona, warning = self.session_persona(session, persona_name)
        history = self.store.list_messages(session.id) if history is None else history
        remind = register.drifted(persona, history)
        parts = build_prompt_parts(persona, remind=remind)
        view = self.strategy(session).view(session, history, new_message)
        reserved = self.reserve(max_tokens)
        lore = active_lore(persona, history, new_message, session.metadata.get("authors_note"))
        ctx = build_context(
            pinned=parts.pinned,
            post_history=parts.post_history,
            view=view,
            new_message=new_message,
            counter=self.rt.tokenizer,
            context_window=self.rt.context_window,
            reserved_for_reply=reserved,
            strategy=session.memory.get("strategy", ""),
            lore=lore,
            lore_budget=persona.lorebook.token_budget if persona.lorebook else None,
        )
        if warning:
            ctx.warnings.append(warning)
        prep = self._render(ctx.messages, len(parts.pinned), persona, max_tokens)
        prep.session, prep.new_message, prep.ctx, prep.remind = session, new_message, ctx, remind
        earlier = [m.content for m in history if m.role == "assistant"]
        prep.rules = quality.rules_for(persona, parts.post_history, earlier)
        return prep

    def prepare_stateless(
        self, messages: list[dict[str, str]], *, persona_name: str | None, max_tokens: int | None, owner: str | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Prepared:
        """Stateless: the client's messages as given, the persona's pinned parts first if one is named.
        `tools`: for a chat template with a tools section (service/tools.py)."""
        from persona.prompt import build_prompt_parts

        persona = self.persona(persona_name, owner)
        pinned: list[dict[str, str]] = []
        if persona_name:
            parts = build_prompt_parts(persona)
            pinned = parts.pinned
            messages = [m for m in messages if m["role"] != "system"] if pinned else messages
        prep = self._render(pinned + messages, len(pinned), persona, max_tokens, tools)
        if pinned:
            prep.rules = quality.rules_for(persona, None, [m["content"] for m in messages if m["role"] == "assistant"])
        return prep

    def _render(self, messages: list[dict[str, str]], n_pinned: int, persona: Any, max_tokens: int | None,
                tools: list[dict[str, Any]] | None = None) -> Prepared:
        """The backend's prompt (400 when it cannot fit) and the reply limit that still fits the window."""
        prompt = self.rt.backend.render(messages, n_pinned, tools=tools)
        limit = max_tokens or self.settings.max_tokens
        return Prepared(messages, prompt, max(1, min(limit, self.rt.context_window - prompt.tokens)), persona)

    # ------------------------------------------------------------------ generating (worker thread)

    def turn_job(self, prep: Prepared, sampling: Sampling) -> Any:
        """A worker job: store the user turn, generate (emitting text deltas), store the reply."""

        def run(job: Job) -> TurnResult:
            if prep.session is not None and prep.new_message is not None:
                self.store.append_message(prep.session.id, "user", prep.new_message, message_id=prep.message_id)
            result = self._generate(job, prep, sampling)
            if sampling.tool_parser is not None:
                result.tool_calls = sampling.tool_parser(result.text) or None
            if prep.session is not None:
                result.message = self._store_reply(prep, result)
                self.schedule_after_turn(prep.session.id)
            return result

        return run

    def _generate(self, job: Job, prep: Prepared, sampling: Sampling) -> TurnResult:
        if sampling.processors is not None:  # a grammar writes tool calls / JSON: not a persona's reply
            prep.rules = None
        sampling = reply_check.turn_sampling(sampling, self.rt.backend.name, prep.persona, prep.rules is not None)
        params = gen_params(sampling, prep.max_tokens)
        backend = self.rt.backend
        # where the logits are not ours (a remote engine) guard mode degrades to post-check + repair
        guard = register.guard_for(prep.persona, self.rt.tokenizer) if backend.capabilities.logit_processors else None
        extra = sampling.processors() if sampling.processors is not None else []
        if extra and not backend.capabilities.logit_processors:
            raise APIError(400, f"the engine at {self.settings.engine_url} cannot apply grammars (tools, "
                           "response_format): the logits are not Memento's", code="unsupported_by_engine")
        early = [p for p in extra if hasattr(p, "advance")]
        events = backend.stream(
            prep.prompt,
            params,
            session_id=prep.session.id if prep.session is not None else None,
            processors=([guard] if guard is not None else []) + extra,
            should_stop=job.should_stop,
            owner=job.owner,  # the cache finds only this user's blocks (and shared persona blocks)
        )
        pieces: list[str] = []
        first_token_at = None
        n_tokens = 0
        scored: list[TokenLogprob] = []  # with logprobs: one per generated token
        for ev in events:
            if first_token_at is None and (ev.token_id is not None or ev.text):
                first_token_at = time.monotonic()
            if ev.token_id is not None:
                for proc in early:  # the next mask is computed while the engine runs the forward
                    proc.advance(n_tokens, ev.token_id)
                n_tokens += 1
            if ev.token_id is not None and ev.logprob is not None:
                scored.append(TokenLogprob(ev.text, ev.token_id, ev.logprob, ev.top_logprobs or []))
                job.emit(scored[-1])  # the OpenAI routes stream logprobs with the text
            elif ev.text:
                job.emit(ev.text)
            if ev.text:
                pieces.append(ev.text)
            if ev.finished:
                result = self._finish(job, prep, "".join(pieces), ev, first_token_at, params, guard)
                result.token_logprobs = scored
                return result
        raise RuntimeError("the engine ended without a final event")

    def _finish(
        self, job: Job, prep: Prepared, text: str, ev: Any, first_token_at: float | None, params: GenParams, guard: Any
    ) -> TurnResult:
        now = time.monotonic()
        usage = usage_dict(ev.usage)
        self.rt.metrics.record_generation(
            ttft=(first_token_at - job.submitted) if first_token_at else None,
            decode_seconds=(now - first_token_at) if first_token_at else 0.0,
            prompt=usage["prompt_tokens"],
            cached=usage["cached_tokens"],
            completion=usage["completion_tokens"],
            reason=ev.finish_reason,
            queue_wait=(job.started - job.submitted) if job.started is not None else None,
        )
        quality_meta: dict[str, Any] = {}
        if prep.rules is not None:  # a leaked instruction is cut, a degenerate reply generated again
            # unless it was streamed: the client saw this reply, so it is only cut (leak, looping phrase)
            again = None if job.streams else self._reply_again(prep, params, guard)
            text, quality_meta = reply_check.settle_reply(prep.rules, text, again, job.should_stop)
        guarding = prep.persona is not None and guards(prep.persona)
        regenerate = self._regenerator(prep, params, guard) if guarding else None
        text, register_meta = register.post_check(prep.persona, text, self.rt.metrics, regenerate, job.should_stop)
        register_meta.update(quality_meta)
        if guarding and guard is None:  # say which guard ran: no logits here, only the check and repair
            register_meta["register_guard"] = "post_check"
            if "register_repairs" in register_meta:
                register_meta["register_repair_mode"] = getattr(self.rt.backend, "continue_mode", "continue")
        return TurnResult(text, ev.finish_reason, usage, register_meta=register_meta)

    def _reply_again(self, prep: Prepared, params: GenParams, guard: Any) -> Any:
        """For the quality check: a whole new reply with another seed (worker thread)."""
        backend = self.rt.backend

        def again(attempt: int) -> str:  # greedy would only say it again: at least 0.7, as register repair
            seed = None if params.seed is None else params.seed + 7919 * attempt
            p = replace(params, seed=seed, temperature=max(params.temperature, 0.7))
            return backend.complete(prep.prompt, p, [guard] if guard is not None else [])

        return again

    def _regenerator(self, prep: Prepared, params: GenParams, guard: Any) -> Any:
        """For register repair: one new sentence continuing the reply so far, guard on where the
        backend applies logit processors (worker thread)."""
        backend = self.rt.backend
        processors = [guard] if guard is not None else []

        def regenerate(prefix: str) -> str:
            p = GenParams(max_tokens=REPAIR_MAX_TOKENS, temperature=max(params.temperature, 0.7), top_p=params.top_p)
            prompt = backend.extend(prep.prompt, prefix) if prefix else prep.prompt
            return first_sentence(backend.complete(prompt, p, processors))

        return regenerate

    def _store_reply(self, prep: Prepared, result: TurnResult) -> Message:
        assert prep.session is not None
        metadata: dict[str, Any] = {
            "finish_reason": result.finish_reason,
            "usage": result.usage,
            "persona": prep.persona.name,
            "model": self.rt.backend.name,
        }
        metadata.update(result.register_meta)
        if prep.message_id:  # an idempotent turn: a retry finds this reply by its key
            metadata["reply_to"] = prep.message_id
        if result.tool_calls:  # the content keeps them as <tool_call> text; metadata as OpenAI objects
            metadata["tool_calls"] = result.tool_calls
        if prep.remind:
            metadata["reminded"] = True
        if result.finish_reason == "cancelled":
            metadata["interrupted"] = True
        if prep.ctx is not None and prep.ctx.warnings:  # e.g. vector memory down: the client sees why
            metadata["warnings"] = list(prep.ctx.warnings)
        return self.store.append_message(prep.session.id, "assistant", result.text, metadata)

    # ------------------------------------------------------------------ the context inspector

    def context_view(self, session: Session, message: str) -> dict[str, Any]:
        prep = self.prepare(session, message)
        ctx = prep.ctx
        return {
            "messages": ctx.messages,
            "tokens": ctx.tokens,
            "budget": ctx.budget,
            "memory": _memory_json(ctx.memory),
            "warnings": list(ctx.warnings),
        }


class WorkerEngine:
    """The backend as seen from other threads: generations run as background jobs on the worker,
    so summaries and block edits queue behind (never ahead of) the users' replies."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.context_window = rt.context_window

    def complete_messages(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float = 0.0,
                          repetition_penalty: float = 1.0, processors: Any = ()) -> str:
        backend = self.rt.backend
        # a remote engine cannot run our grammars: the caller parses what the model wrote instead
        usable = list(processors) if backend.capabilities.logit_processors else []
        extra = {"repetition_penalty": repetition_penalty} if repetition_penalty != 1.0 else {}
        params = GenParams(max_tokens=max_tokens, temperature=temperature, extra=extra)
        return self.rt.worker.call(
            lambda _job: backend.complete(backend.render(messages), params, usable), background=True
        )


def active_lore(persona: Any, history: list[Message], new_message: str, note: dict | None = None) -> list[Any]:
    """The persona's lorebook entries the recent chat activates (persona/lorebook.py), and the
    session's author's note (`PUT .../authors_note`) when this user turn is one of its every Nth."""
    from persona.lorebook import Activated, activate
    from persona.prompt import render_macros, user_name_for

    user = user_name_for(persona)
    recent = [m.content for m in history if m.role in ("user", "assistant")]
    lore = activate(persona.lorebook, recent, new_message, char=persona.char, user=user) if persona.lorebook else []
    if note and note.get("text"):
        turn = 1 + sum(1 for m in history if m.role == "user")
        if turn % int(note.get("every", 1)) == 0:
            text = render_macros(note["text"], persona.char, user)
            # kept last under a lorebook's token budget: the author asked for it explicitly
            lore.append(Activated("authors_note", text, "at_depth", int(note.get("depth", 4)),
                                  note.get("role", "system"), 10**9, 10**9))
    return lore


def first_sentence(text: str) -> str:
    """Up to and including the first sentence end (the ending is kept: the register lives there)."""
    text = text.lstrip()
    m = SENTENCE_END.search(text)
    return text[: m.end()].strip() if m else text.strip()


def _memory_json(memory: dict[str, Any]) -> dict[str, Any]:
    """Messages inside `retrieved` as plain dicts (JSON-ready)."""
    out = dict(memory)
    if "retrieved" in out:
        out["retrieved"] = [
            [m.to_chat() if isinstance(m, Message) else m for m in ex] if isinstance(ex, list) else ex
            for ex in out["retrieved"]
        ]
    return out
