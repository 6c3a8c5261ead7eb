"""Tool calling: OpenAI `tools` / `tool_choice` in, `tool_calls` out, the calls generated under a grammar.

    plan = ToolPlan.build(body.tools, body.tool_choice, body.parallel_tool_calls, tokenizer)
    messages = plan.render(history)           # tool definitions + tool-call history as prompt text
    processors = [plan.constraint()]          # the call grammar (None: tool_choice "none")
    calls = parse_calls(reply_text)           # [{"id", "type": "function", "function": {name, arguments}}]

The built-in models' chat templates have no tools section, so tools are described with this
documented fallback prompt (the Hermes / Qwen convention many small models were tuned on), put
at the end of the first system message:

    # Tools
    You may call one or more functions to assist with the user query. ...
    <tools>
    {"type": "function", "function": {...}}          (one JSON line per tool)
    </tools>
    For each function call, return a JSON object with the function name and arguments within
    <tool_call></tool_call> XML tags: <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>

History uses the same convention: an assistant message's `tool_calls` become `<tool_call>` blocks
in its content, and a `tool` message becomes a user turn `<tool_response>...</tool_response>`.

The grammar (Lark for llguidance, one `%json` schema per call) makes the calls parse whatever the
model's size: `required` / a named function allow only calls; `auto` allows calls or text, and the
reply's first character decides (`<` starts calls, so an `auto` text reply cannot begin with `<`);
one call unless `parallel_tool_calls: true` (then up to MAX_PARALLEL_CALLS): OpenAI's default is
true, but a small model given room for more calls repeats the first one until max_tokens.

`auto` decides on the first token (`AutoDecision`): the reply is calls when the model puts at
least AUTO_CALL_MIN_P of its next-token probability on tokens starting with `<`, else text. Small
models never tuned on tools put little mass there even when a call fits (SmolLM2-135M: 1.0-1.5%
for questions a tool answers, 0.2-0.7% for chit-chat), so sampling alone would almost never call;
a model that means to call puts far more there, so the rule only matters near the margin.

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
    MAX_SCHEMA_CHARS,
    ConstraintFactory,
    check_grammar,
    closed,
    invalid_schema,
    lark_grammar,
)

MAX_PARALLEL_CALLS = 8
AUTO_CALL_MIN_P = 0.008  # calibrated on SmolLM2-135M with the fallback prompt (see the module docstring)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)
FALLBACK_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
FALLBACK_FOOTER = (
    "\n</tools>\n\nFor each function call, return a JSON object with the function name and arguments "
    "within <tool_call></tool_call> XML tags:\n"
    '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>'
)


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool objects as plain dicts
    mode: str  # "none" | "auto" | "required" | "named"
    names: list[str]  # the functions the grammar allows
    parallel: bool
    factory: ConstraintFactory | None

    @classmethod
    def build(cls, tools: list[Any] | None, tool_choice: Any, parallel: bool | None, tokenizer: Any) -> ToolPlan | None:
        """None when the request has no tools; 400 naming the field for an unknown or bad tool."""
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
        parallel = bool(parallel)  # unset: one call (see the module docstring)
        factory = None
        if mode != "none":
            schemas = [parameters_of(d, i) for i, d in enumerate(defs) if d["function"]["name"] in allowed]
            grammar = calls_grammar(allowed, schemas, allow_text=mode == "auto", parallel=parallel)
            check_grammar(grammar, tokenizer, param="tools")
            factory = ConstraintFactory(tokenizer, grammar)
        return cls(defs, mode, allowed, parallel, factory)

    def render(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat with tool definitions in the system message (fallback prompt) unless mode is none."""
        if self.mode == "none":
            return messages
        prompt = tools_prompt([d for d in self.tools if d["function"]["name"] in self.names])
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0], content=messages[0]["content"].rstrip() + "\n\n" + prompt)
            return [first] + messages[1:]
        return [{"role": "system", "content": prompt}] + messages

    def constraint(self) -> Any:
        return self.factory() if self.factory is not None else None

    def processors(self, tokenizer: Any) -> list[Any]:
        """Fresh processors for one generation: the auto decision (auto only), then the grammar."""
        procs = [AutoDecision(tokenizer)] if self.mode == "auto" else []
        return procs + [self.constraint()]


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


def calls_grammar(names: list[str], schemas: list[dict[str, Any]], *, allow_text: bool, parallel: bool) -> str:
    """Lark: one or more `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (or text, if allowed)."""
    one_of = [
        {"type": "object", "properties": {"name": {"const": n}, "arguments": s},
         "required": ["name", "arguments"], "additionalProperties": False}
        for n, s in zip(names, schemas, strict=True)
    ]
    call_schema = {"anyOf": one_of, "x-guidance": {"whitespace_flexible": False, "coerce_one_of": True}}
    more = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    start = 'start: calls | TEXT | ""' if allow_text else "start: calls"
    source = (
        f"{start}\n"
        "TEXT: /[^<](?s:.)*/\n"
        f"calls: call {more}\n"
        f'call: "{CALL_OPEN}" %json {json.dumps(call_schema)} "{CALL_CLOSE}"\n'
    )
    return lark_grammar(source)


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return FALLBACK_HEADER + lines + FALLBACK_FOOTER


def history(messages: list[Any]) -> list[Any]:
    """The client's messages with tool traffic as text: a `tool` message becomes a user turn
    `<tool_response>...</tool_response>`, an assistant's `tool_calls` become `<tool_call>` blocks."""
    out = []
    for m in messages:
        calls = (m.model_extra or {}).get("tool_calls")
        if m.role == "tool":
            m = m.model_copy(update={"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"})
        elif m.role == "assistant" and calls:
            text = m.text()
            content = "\n".join(([text] if text else []) + [call_text(c) for c in calls])
            m = m.model_copy(update={"content": content})
        out.append(m)
    return out


def call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        args_value = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        args_value = args  # the client's history is the client's: keep it as given
    return CALL_OPEN + json.dumps({"name": fn.get("name"), "arguments": args_value}, ensure_ascii=False) + CALL_CLOSE


def parse_calls(text: str) -> list[dict[str, Any]]:
    """The OpenAI `tool_calls` in a reply (empty when it is plain text)."""
    if not text.lstrip().startswith(CALL_OPEN):
        return []
    calls = []
    for body in CALL_RE.findall(text):
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            continue  # cut by max_tokens: the grammar guarantees only complete calls
        calls.append(openai_call(value["name"], value.get("arguments", {})))
    return calls


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class CallStream:
    """Turns streamed reply text into OpenAI deltas: `("content", text)` or `("tool_call", index, call)`.

    The first non-blank character decides: `<` means tool calls (the grammar allows nothing else
    there), so text is held until then. Each call is sent when its closing tag arrives, as one
    delta with id, name and the whole arguments string (OpenAI's clients concatenate fragments, so
    one fragment is valid).
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.mode: str | None = None  # None (undecided) | "content" | "calls"
        self.sent = 0

    def push(self, text: str) -> list[tuple[Any, ...]]:
        self.buffer += text
        if self.mode is None:
            stripped = self.buffer.lstrip()
            if not stripped:
                return []
            self.mode = "calls" if stripped.startswith("<") else "content"
        if self.mode == "content":
            out, self.buffer = self.buffer, ""
            return [("content", out)] if out else []
        return self._calls()

    def _calls(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for call in parse_calls(self.buffer)[self.sent:]:
            out.append(("tool_call", self.sent, call))
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
