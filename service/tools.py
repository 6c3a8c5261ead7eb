"""Tool calling: OpenAI `tools` / `tool_choice` in, `tool_calls` out, the calls generated under a grammar.

    plan = ToolPlan.build(body.tools, body.tool_choice, body.parallel_tool_calls, tokenizer)
    messages = plan.render(history(client_messages, plan.format))  # tool traffic as the template wants it
    tools = plan.template_tools               # for the chat template's own tools section (or None)
    processors = plan.processors(tokenizer)   # the call grammar (none: tool_choice "none")
    calls = plan.parse(reply_text)            # [{"id", "type": "function", "function": {name, arguments}}]

Where the model's chat template has a tools section (it reads `tools`, transformers' convention)
and writes calls in a format we parse, tools go through the template itself (`native`): the
definitions as `tools=`, earlier calls as assistant `tool_calls`, results as `tool` messages, and
the grammar follows the template's call format (`CallFormat`):

- Hermes / Qwen: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one or more;
- Llama 3.1: one bare `{"name": ..., "parameters": {...}}` (its template refuses two calls).

Otherwise (both built-in models: SmolLM2's and Gemma 3's templates have no tools section) tools
are described with this documented fallback prompt (the Hermes / Qwen convention many small
models were tuned on), put at the end of the first system message:

    # Tools
    You may call one or more functions to assist with the user query. ...
    <tools>
    {"type": "function", "function": {...}}          (one JSON line per tool)
    </tools>
    For each function call, return a JSON object with the function name and arguments within
    <tool_call></tool_call> XML tags: <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>

History is kept as text in one convention either way (what memory mode stores in the transcript):
an assistant message's `tool_calls` become calls in the format's own text in its content, and a
`tool` message becomes a user turn `<tool_response>\n...\n</tool_response>`. The fallback prompt
shows that text as is; a native template gets it back as `tool_calls` / `tool` messages.

The grammar (Lark for llguidance, one `%json` schema per call) makes the calls parse whatever the
model's size: `required` / a named function allow only calls; `auto` allows calls or text, and the
reply's first character decides (`<` or `{` starts calls, so an `auto` text reply cannot begin
with it); one call unless `parallel_tool_calls: true` (then up to MAX_PARALLEL_CALLS): OpenAI's
default is true, but a small model given room for more calls repeats the first one until max_tokens.

`auto` with the fallback prompt decides on the first token (`AutoDecision`): the reply is calls
when the model puts at least AUTO_CALL_MIN_P of its next-token probability on tokens starting
with `<`, else text. Small models never tuned on tools put little mass there even when a call
fits (SmolLM2-135M: 1.0-1.5% for questions a tool answers, 0.2-0.7% for chit-chat), so sampling
alone would almost never call. A native template means a model tuned on its tools format: it
chooses for itself.

Function parameters without `additionalProperties` get `false` (what OpenAI's strict mode
requires): left open, a small model fills the arguments with invented keys.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from service.errors import APIError
from service.structured import (
    JSON_DEFAULTS,
    MAX_SCHEMA_CHARS,
    ConstraintFactory,
    check_grammar,
    closed,
    invalid_schema,
    lark_grammar,
)

MAX_PARALLEL_CALLS = 8
AUTO_CALL_MIN_P = 0.008  # calibrated on SmolLM2-135M with the fallback prompt (see the module docstring)
RESPONSE_RE = re.compile(r"\s*<tool_response>\n(.*?)\n</tool_response>", re.S)
FALLBACK_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
FALLBACK_FOOTER = (
    "\n</tools>\n\nFor each function call, return a JSON object with the function name and arguments "
    "within <tool_call></tool_call> XML tags:\n"
    '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>'
)


@dataclass(frozen=True)
class CallFormat:
    """How calls are written: between `open` and `close` tags (none: one bare JSON object)."""

    open: str
    close: str
    args_key: str  # "arguments" (Hermes) | "parameters" (Llama 3.1)
    newline: bool  # "\n" inside the tags, as the template writes calls in history (the grammar too)
    parallel: bool  # the template can show several calls in one turn

    @property
    def first(self) -> str:
        """The character every call reply starts with (an `auto` text reply cannot)."""
        return (self.open or "{")[0]

    def text(self, name: Any, arguments: Any) -> str:
        """One call as the model writes it (history, and what memory mode stores)."""
        pad = "\n" if self.newline else ""
        call = json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)
        return self.open + pad + call + pad + self.close

    def values(self, text: str, anywhere: bool = False) -> list[tuple[str, Any]]:
        """(name, arguments) of each complete call; only a reply that starts with a call unless `anywhere`."""
        body = text.lstrip()
        if not anywhere and not body.startswith(self.first):
            return []
        if self.open:
            pattern = re.escape(self.open) + r"(.*?)" + re.escape(self.close)
            bodies = re.findall(pattern, body, re.S)
        else:
            bodies = [body[body.find("{"):]] if "{" in body else []
        out = []
        for b in bodies:
            try:
                value, _ = json.JSONDecoder().raw_decode(b.strip())
            except json.JSONDecodeError:
                continue  # cut by max_tokens: the grammar guarantees only complete calls
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                out.append((value["name"], value.get(self.args_key, {})))
        return out


HERMES = CallFormat("<tool_call>", "</tool_call>", "arguments", newline=False, parallel=True)
QWEN = CallFormat("<tool_call>", "</tool_call>", "arguments", newline=True, parallel=True)
LLAMA3_JSON = CallFormat("", "", "parameters", newline=False, parallel=False)


def native_format(tokenizer: Any) -> CallFormat | None:
    """The call format of the tokenizer's own template, when it has a tools section we can parse."""
    if not getattr(tokenizer, "has_tools_template", False):
        return None
    source = getattr(tokenizer, "tool_template", None) or tokenizer.chat_template  # the one tools render through
    if QWEN.open in source:
        return QWEN
    if '"parameters": ' in source:  # Llama 3.1 / 3.2 / 3.3: {"name": ..., "parameters": ...}
        return LLAMA3_JSON
    return None  # a format we would not parse (Mistral's [TOOL_CALLS], ...): the fallback prompt


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool objects as plain dicts
    mode: str  # "none" | "auto" | "required" | "named"
    names: list[str]  # the functions the grammar allows
    parallel: bool
    factory: ConstraintFactory | None
    format: CallFormat = HERMES
    native: bool = False  # tools go through the model's own template (see the module docstring)

    @classmethod
    def build(cls, tools: list[Any] | None, tool_choice: Any, parallel: bool | None, tokenizer: Any, *,
              native_ok: bool = True) -> ToolPlan | None:
        """None when the request has no tools; 400 naming the field for an unknown or bad tool.
        `native_ok`: we render the prompt (a remote engine gets OpenAI messages, not template shapes)."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise APIError(400, "tool_choice names a tool but 'tools' is empty; send the tools too",
                               param="tool_choice", code="invalid_value")
            return None
        defs = [t.model_dump(exclude_none=True) for t in tools]
        names = [d["function"]["name"] for d in defs]
        if len(set(names)) != len(names):
            raise APIError(400, f"tool names must be unique, got {names}", param="tools", code="invalid_value")
        mode, allowed = choice_mode(tool_choice, names)
        fmt = native_format(tokenizer) if native_ok else None
        call_format = fmt or HERMES
        parallel = bool(parallel) and call_format.parallel  # unset: one call (see the module docstring)
        factory = None
        if mode != "none":
            schemas = [parameters_of(d, i) for i, d in enumerate(defs) if d["function"]["name"] in allowed]
            grammar = calls_grammar(allowed, schemas, allow_text=mode == "auto", parallel=parallel, fmt=call_format)
            check_grammar(grammar, tokenizer, param="tools")
            factory = ConstraintFactory(tokenizer, grammar)
        return cls(defs, mode, allowed, parallel, factory, call_format, fmt is not None)

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The definitions for the chat template's tools section (native only; none for mode none)."""
        if not self.native or self.mode == "none":
            return None
        return [d for d in self.tools if d["function"]["name"] in self.names]

    @property
    def changes_prompt(self) -> bool:
        return self.native or self.mode != "none"

    def render(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat as the template gets it: native, tool traffic as `tool_calls` / `tool` messages;
        else with the fallback prompt in the system message (unless mode is none)."""
        if self.native:
            return [m for message in messages for m in template_messages(message, self.format)]
        if self.mode == "none":
            return messages
        prompt = tools_prompt([d for d in self.tools if d["function"]["name"] in self.names])
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0], content=messages[0]["content"].rstrip() + "\n\n" + prompt)
            return [first] + messages[1:]
        return [{"role": "system", "content": prompt}] + messages

    def parse(self, text: str) -> list[dict[str, Any]]:
        """The OpenAI `tool_calls` in a reply (empty when it is plain text)."""
        return [openai_call(name, args) for name, args in self.format.values(text)]

    def constraint(self) -> Any:
        return self.factory() if self.factory is not None else None

    def processors(self, tokenizer: Any) -> list[Any]:
        """Fresh processors for one generation: the auto decision (fallback auto only), then the grammar."""
        procs = [AutoDecision(tokenizer)] if self.mode == "auto" and not self.native else []
        return procs + [self.constraint()]


def template_messages(message: dict[str, Any], fmt: CallFormat) -> list[dict[str, Any]]:
    """One history message in transformers' tool shapes: calls in an assistant's text become
    `tool_calls` (arguments as objects), `<tool_response>` blocks leading a user turn `tool` messages."""
    content = message["content"]
    if message["role"] == "assistant":
        calls = fmt.values(content, anywhere=True)
        if not calls:
            return [message]
        text = content[:content.find(fmt.open)].strip() if fmt.open else ""
        tool_calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
        return [dict(message, content=text, tool_calls=tool_calls)]
    if message["role"] != "user":
        return [message]
    out, pos = [], 0  # merged turns (merge_same_roles) hold several results, maybe then the user's text
    while (m := RESPONSE_RE.match(content, pos)) is not None:
        out.append({"role": "tool", "content": m.group(1)})
        pos = m.end()
    rest = content[pos:].strip()
    return out + ([dict(message, content=rest)] if rest or not out else [])


class AutoDecision:
    """`auto`: on the first token, keep only call starts (`<`) or only text starts (see the docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.starts = call_start_ids(tokenizer)

    def __call__(self, generated: list[int], logits: Any) -> Any:
        import torch

        if generated:
            return logits
        ids = self.starts.to(logits.device)
        p_call = float(torch.softmax(logits.float(), dim=-1)[ids].sum())
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[ids] = True
        keep = mask if p_call >= AUTO_CALL_MIN_P else ~mask
        return logits.masked_fill(~keep, float("-inf"))


_STARTS: dict[int, Any] = {}


def call_start_ids(tokenizer: Any) -> Any:
    """Token ids whose text starts with `<` (cached per tokenizer: a vocabulary scan)."""
    import torch

    key = id(tokenizer)
    if key not in _STARTS:
        ids = [i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i).startswith(b"<")]
        _STARTS[key] = torch.tensor(ids, dtype=torch.long)
    return _STARTS[key]


def choice_mode(tool_choice: Any, names: list[str]) -> tuple[str, list[str]]:
    """("none"|"auto"|"required"|"named", allowed names) for OpenAI's tool_choice forms."""
    if tool_choice is None or tool_choice == "auto":
        return "auto", names
    if tool_choice in ("none", "required"):
        return str(tool_choice), names
    name = tool_choice.function.name
    if name not in names:
        raise APIError(400, f"tool_choice names function {name!r}, which is not in 'tools' (have {names})",
                       param="tool_choice.function.name", code="invalid_value")
    return "named", [name]


def parameters_of(tool: dict[str, Any], i: int) -> dict[str, Any]:
    params = tool["function"].get("parameters") or {"type": "object", "properties": {}}
    size = len(json.dumps(params))
    if size > MAX_SCHEMA_CHARS:
        raise APIError(400, f"tools[{i}].function.parameters is {size} characters of JSON; the limit is "
                       f"{MAX_SCHEMA_CHARS}", param=f"tools[{i}].function.parameters", code="schema_too_large")
    if params.get("type", "object") != "object":
        raise invalid_schema(f"tools[{i}].function.parameters", "function parameters must be a JSON object schema")
    return closed(params)


def calls_grammar(names: list[str], schemas: list[dict[str, Any]], *, allow_text: bool, parallel: bool,
                  fmt: CallFormat = HERMES) -> str:
    """Lark: one or more calls in `fmt` (or text not starting like a call, if allowed)."""
    key = fmt.args_key
    one_of = [
        {"type": "object", "properties": {"name": {"const": n}, key: s},
         "required": ["name", key], "additionalProperties": False}
        for n, s in zip(names, schemas, strict=True)
    ]
    # json.dumps' separators, as templates and our own history show calls (see structured.JSON_DEFAULTS)
    call_schema = {"anyOf": one_of, "x-guidance": JSON_DEFAULTS}
    more = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    start = 'start: calls | TEXT | ""' if allow_text else "start: calls"
    pad = ' "\\n"' if fmt.newline else ""
    call = f'{json.dumps(fmt.open)}{pad} %json {json.dumps(call_schema)}{pad} {json.dumps(fmt.close)}' if fmt.open \
        else f"%json {json.dumps(call_schema)}"
    source = (
        f"{start}\n"
        f"TEXT: /[^{re.escape(fmt.first)}](?s:.)*/\n"
        f"calls: call {more}\n"
        f"call: {call}\n"
    )
    return lark_grammar(source)


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return FALLBACK_HEADER + lines + FALLBACK_FOOTER


def history(messages: list[Any], fmt: CallFormat = HERMES) -> list[Any]:
    """The client's messages with tool traffic as text: a `tool` message becomes a user turn
    `<tool_response>...</tool_response>`, an assistant's `tool_calls` become calls in `fmt`."""
    out = []
    for m in messages:
        calls = (m.model_extra or {}).get("tool_calls")
        if m.role == "tool":
            m = m.model_copy(update={"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"})
        elif m.role == "assistant" and calls:
            text = m.text()
            content = "\n".join(([text] if text else []) + [call_text(c, fmt) for c in calls])
            m = m.model_copy(update={"content": content})
        out.append(m)
    return out


def call_text(call: dict[str, Any], fmt: CallFormat = HERMES) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        args_value = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        args_value = args  # the client's history is the client's: keep it as given
    return fmt.text(fn.get("name"), args_value)


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class CallStream:
    """Turns streamed reply text into OpenAI deltas: `("content", text)` or `("tool_call", index, call)`.

    The first non-blank character decides: the format's first (`<` or `{`) means tool calls (the
    grammar allows nothing else there), so text is held until then. Each call is sent when it is
    complete, as one delta with id, name and the whole arguments string (OpenAI's clients
    concatenate fragments, so one fragment is valid).
    """

    def __init__(self, fmt: CallFormat = HERMES) -> None:
        self.format = fmt
        self.buffer = ""
        self.mode: str | None = None  # None (undecided) | "content" | "calls"
        self.sent = 0

    def push(self, text: str) -> list[tuple[Any, ...]]:
        self.buffer += text
        if self.mode is None:
            stripped = self.buffer.lstrip()
            if not stripped:
                return []
            self.mode = "calls" if stripped.startswith(self.format.first) else "content"
        if self.mode == "content":
            out, self.buffer = self.buffer, ""
            return [("content", out)] if out else []
        return self._calls()

    def _calls(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for name, args in self.format.values(self.buffer)[self.sent:]:
            out.append(("tool_call", self.sent, openai_call(name, args)))
            self.sent += 1
        return out

    def finish(self) -> list[tuple[Any, ...]]:
        if self.mode == "calls":
            calls = self._calls()
            if self.sent:
                return calls
            self.mode = "content"  # cut before one call completed: show the text, as the non-stream reply does
        out, self.buffer = self.buffer, ""
        return [("content", out)] if out else []
