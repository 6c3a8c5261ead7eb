"""Request and response bodies.

OpenAI models are ordered and named as OpenAI's API reference documents them (required fields
first, then alphabetical); fields marked `# extra (ours)` are Memento additions. Fields OpenAI
has that we do not act on are accepted and ignored, so unchanged clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from memory.config import MemoryConfig  # the one definition: a union on "strategy", with bounds

# Caps that keep one request's work bounded before any model or store work (issue 10)
MAX_MESSAGES = 1024  # messages in one chat request (a long history belongs in a session)
MAX_STOP = 4  # stop sequences, as OpenAI documents
MAX_STOP_CHARS = 256  # characters per stop sequence (each is matched against every decoded piece)
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None

# ---------------------------------------------------------------- OpenAI: chat completions


class StopSequences(BaseModel):
    """OpenAI's `stop`, shared by the request schemas: a string or up to MAX_STOP of them, each at
    most MAX_STOP_CHARS (the `Stop` type checks both, so a 422 names `stop`)."""

    stop: Stop = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]  # "" is no stop


class SamplerExtras(BaseModel):
    """Sampler fields beyond OpenAI's (extra, ours; named as llama.cpp's server names them). Unset
    fields keep the model's preset (`GET /v1/models`) or the persona file's `sampling`."""

    top_k: int | None = Field(None, ge=0)  # extra (ours)
    min_p: float | None = Field(None, ge=0, le=1)  # extra (ours)
    repetition_penalty: float | None = Field(None, gt=0, le=4)  # extra (ours): HF semantics
    dry_multiplier: float | None = Field(None, ge=0, le=100)  # extra (ours): 0 turns DRY off
    dry_base: float | None = Field(None, gt=1, le=8)  # extra (ours)
    dry_allowed_length: int | None = Field(None, ge=1, le=64)  # extra (ours)
    dry_penalty_last_n: int | None = Field(None, ge=-1)  # extra (ours): -1 the whole context
    dry_sequence_breakers: list[Annotated[str, Field(min_length=1, max_length=16)]] | None = Field(
        None, max_length=16)  # extra (ours)

    def sampler_overrides(self) -> dict[str, Any]:
        """The fields this request set (None: not given)."""
        return {k: v for k in SamplerExtras.model_fields if (v := getattr(self, k)) is not None}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... accepted
    content: str | list[ContentPart] | None = None
    role: Literal["system", "developer", "user", "assistant", "tool"]

    def text(self) -> str:
        """Text content; content parts of type text are joined, other parts are rejected earlier."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if part.type != "text":
                    raise ValueError(f"content part type {part.type!r} is not supported; send type 'text'")
        return value


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # "schema" shadows a BaseModel name
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplerExtras, StopSequences):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # OpenAI semantics, over the reply
    logit_bias: dict[str, float] | None = None  # token id -> bias in [-100, 100]
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    metadata: dict[str, str] | None = None
    n: int | None = Field(None, ge=1, le=8)  # stateless only: memory mode stores one reply
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # OpenAI semantics, over the reply
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI documents it
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    session_id: str | None = Field(None, min_length=1, max_length=200)  # extra (ours): memory mode
    persona: str | None = Field(None, min_length=1)  # extra (ours)

    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class FunctionCall(BaseModel):
    arguments: str  # JSON text, as OpenAI sends it
    name: str


class ToolCall(BaseModel):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatCompletionMessage(BaseModel):
    content: str | None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    finish_reason: FinishReason
    index: int = 0
    logprobs: ChoiceLogprobs | None = None
    message: ChatCompletionMessage


class ChatCompletion(BaseModel):
    id: str
    choices: list[Choice]
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: CompletionUsage
    session_id: str | None = None  # extra (ours): set in memory mode


class FunctionCallDelta(BaseModel):
    arguments: str | None = None
    name: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    function: FunctionCallDelta | None = None
    type: Literal["function"] | None = None


class ChoiceDelta(BaseModel):
    content: str | None = None
    role: Literal["assistant"] | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "memento"
    context_window: int | None = None  # extra (ours)
    sampling: dict[str, Any] | None = None  # extra (ours): the model's sampling preset (model/presets.py)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- native API: sessions


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona: str | None = Field(None, min_length=1)
    memory: MemoryConfig | None = None
    metadata: dict[str, Any] | None = None


class SessionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona: str | None = Field(None, min_length=1)
    memory: MemoryConfig | None = None
    metadata: dict[str, Any] | None = None


class SessionOut(BaseModel):
    id: str
    persona: str
    memory: dict[str, Any]
    created_at: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    memory_status: dict[str, Any] | None = None  # extra (ours): {pending, imported, done, state} (GET one)


class MessageOut(BaseModel):
    id: str
    role: str
    content: str
    created_at: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class MessageCreate(SamplerExtras, StopSequences):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI documents it
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # OpenAI semantics, over the reply
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id -> bias in [-100, 100]
    message_id: str | None = Field(None, min_length=1, max_length=128)  # idempotency: same as Idempotency-Key


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class TurnOut(BaseModel):
    message: MessageOut
    usage: Usage


class BudgetParts(BaseModel):
    persona: int
    memory: int
    lore: int = 0  # lorebook entries inserted this turn (memory.lore names each with its cost)
    recent: int


class Budget(BaseModel):
    context_window: int
    reserved_for_reply: int
    used: int
    parts: BudgetParts


class ContextOut(BaseModel):
    messages: list[dict[str, Any]]
    tokens: int
    budget: Budget
    memory: dict[str, Any]
    warnings: list[str] = Field(default_factory=list)  # extra (ours)


# ---------------------------------------------------------------- OpenAI: completions, embeddings


class CompletionRequest(StopSequences):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # OpenAI caps this at 5; we allow the chat API's 20
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    n: int | None = Field(None, ge=1, le=8)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None  # accepted only when empty: no fill-in-the-middle
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(BaseModel):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class Embedding(BaseModel):
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI sends it
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    data: list[Embedding]
    model: str
    object: Literal["list"] = "list"
    usage: EmbeddingUsage


# ---------------------------------------------------------------- llama.cpp server: tokenize, detokenize


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str
    add_special: bool = False  # prepend BOS when the model has one
    parse_special: bool = True  # special-token text like "<|im_end|>" becomes the special token
    with_pieces: bool = False


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]  # the token's text, or its bytes when they are not valid UTF-8 alone


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    content: str
