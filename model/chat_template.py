"""Chat templates: render a model's own Jinja template the way Hugging Face transformers does.

The template comes from the checkpoint (GGUF `tokenizer.chat_template`, or `chat_template` in
tokenizer_config.json / chat_template.jinja). It runs in Jinja's ImmutableSandboxedEnvironment
with the globals and filters transformers provides, so a template renders identically here and
in `transformers.apply_chat_template`.

Checkpoints without a template (e.g. the Gemma 3 270M base GGUF) fall back to a built-in
template picked from the turn markers found in the vocabulary (Gemma, ChatML, Llama 3); a
vocabulary with none of those gets a `ChatTemplateError` telling how to supply one.

Tools follow transformers' convention: `tools` (OpenAI-style {"type": "function", "function":
{...}} dicts) is a template global, assistant messages may carry `tool_calls` (arguments as a
dict) and `role: "tool"` messages hold results. `has_tools_section()` says whether a template
reads `tools` at all; the caller describes tools some other way when it does not.

`locate_contents()` finds where each message's content lies in the rendered text, so the
tokenizer can tokenize content as plain text (a user typing "<|im_start|>system" must never
produce the special token) while the template's own markers stay special.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template is missing, fails to compile or render, or messages are malformed."""


# Official Gemma 3 instruction template (system prompt folded into the first user turn).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

# ChatML as SmolLM2 / Qwen write it, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta's Llama 3 instruct template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# (markers that must all be in the vocabulary, template), first match wins.
BUILTIN_TEMPLATES: list[tuple[tuple[str, ...], str]] = [
    (("<start_of_turn>", "<end_of_turn>"), GEMMA3_TEMPLATE),
    (("<|im_start|>", "<|im_end|>"), CHATML_TEMPLATE),
    (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), LLAMA3_TEMPLATE),
]


def builtin_template_for(vocab: Container[str]) -> str | None:
    """The built-in template whose turn markers are all in `vocab`, or None."""
    for markers, template in BUILTIN_TEMPLATES:
        if all(marker in vocab for marker in markers):
            return template
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON (as in transformers).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text (templates are untrusted: sandboxed, immutable)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e


@lru_cache(maxsize=32)
def has_tools_section(source: str) -> bool:
    """Whether the template reads the `tools` global (HF's convention for templates that describe tools)."""
    env = ImmutableSandboxedEnvironment(extensions=[loopcontrols])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError:
        return False  # compile_template says why when it is rendered


def check_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Plain dict copies of `messages` with string content; a clear error naming the bad message otherwise.

    OpenAI-style content parts ([{"type": "text", "text": ...}]) are joined into one string: we are
    text-only, and string content is what the tokenizer can keep plain (see locate_contents).
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
        content = m["content"]
        if isinstance(content, list):
            content = _join_text_parts(content, i)
        if not isinstance(m["role"], str) or not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}]: 'role' and 'content' must be strings, "
                                    f"got {type(m['role']).__name__} / {type(content).__name__}")
        out.append(dict(m, content=content))
    return out


def _join_text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"messages[{i}].content: only text parts {{'type': 'text', 'text': ...}} "
                                    f"are supported, got {part!r:.80}")
        texts.append(part["text"])
    return "".join(texts)


def render(source: str, messages: Sequence[Any], *, add_generation_prompt: bool = True,
           variables: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None) -> str:
    """Render `source` for `messages`; `variables` are extra globals such as bos_token/eos_token,
    `tools` the function definitions a template with a tools section describes (None: no tools)."""
    template = compile_template(source)
    try:
        return template.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                               tools=tools or None, documents=None, **(variables or {}))
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


# Content is replaced by PAD + sentinel + PAD; whether PAD survives tells if the template trims.
_PAD = " \u3000\t"
_SENTINEL = re.compile("(?:" + re.escape(_PAD) + ")?\ue000(\\d+)\ue001(" + re.escape(_PAD) + ")?")


@dataclass(frozen=True)
class LocatedChat:
    text: str  # the rendered chat, identical to `render(...)`
    content_spans: list[tuple[int, int]]  # [start, end) of message content inside text


def locate_contents(source: str, messages: Sequence[Any], *, add_generation_prompt: bool = True,
                    variables: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> LocatedChat | None:
    """Render and find each string content in the output, or None if it cannot be located exactly.

    Renders once with real contents and once with unique sentinels in their place; the sentinel
    render gives the template's own text, and putting the (possibly trimmed) contents back must
    reproduce the real render exactly, else we return None rather than guess.
    """
    messages = check_messages(messages)
    kw: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, "variables": variables, "tools": tools}
    text = render(source, messages, **kw)
    # empty content stays empty: templates test it ("{% if message.content %}" before tool calls)
    probes = [dict(m, content=f"{_PAD}\ue000{i}\ue001{_PAD}") if m["content"] else m for i, m in enumerate(messages)]
    try:
        probe_text = render(source, probes, **kw)
    except ChatTemplateError:
        return None
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = length = 0
    for m in _SENTINEL.finditer(probe_text):
        literal = probe_text[pos:m.start()]
        out.append(literal)
        length += len(literal)
        content = messages[int(m.group(1))]["content"]
        kept_left = probe_text.startswith(_PAD, m.start())
        content = content if kept_left else content.lstrip()
        content = content if m.group(2) else content.rstrip()
        out.append(content)
        spans.append((length, length + len(content)))
        length += len(content)
        pos = m.end()
    out.append(probe_text[pos:])
    if "".join(out) != text or "\ue000" in probe_text[pos:]:
        return None
    return LocatedChat(text=text, content_spans=[s for s in spans if s[1] > s[0]])
