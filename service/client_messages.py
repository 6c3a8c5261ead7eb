"""Client-sent chat messages (stateless `/v1/chat/completions`) made fit for any chat template.

SillyTavern's "Chat Completion -> Custom (OpenAI-compatible)" sends shapes a strict template
(Gemma: one system message, first; then user/assistant alternation) rejects:

- several system messages: the main prompt, the character description, `[Start a new Chat]`,
  and mid-chat ones (author's note, world info at depth). The leading ones are merged into one
  first system message; a later one becomes a marked user-side note `[System note: ...]`,
  merged with its neighbour, as memory/context.py does with stored system messages.
- `name` fields: `name: example_user` / `example_assistant` on a system message is SillyTavern's
  example dialogue, so it becomes a user / assistant turn; any other name (group chats, "names
  in the completion object") is kept by prefixing the text: `Mina: ...`.
- a chat that opens with the assistant (the character's first message) gets a marked user opener.
"""

from __future__ import annotations

from typing import Any

from memory.context import CONVERSATION_START, merge_same_roles

ROLE_MAP = {"developer": "system", "tool": "user"}  # roles chat templates know
EXAMPLE_NAMES = {"example_user": "user", "example_assistant": "assistant"}


def chat_messages(messages: list[Any]) -> list[dict[str, str]]:
    """`ChatMessage`s (service/schemas.py) -> {"role", "content"} dicts every template accepts."""
    head: list[str] = []
    body: list[dict[str, str]] = []
    for m in messages:
        role = ROLE_MAP.get(m.role, m.role)
        name = getattr(m, "name", None)  # an extra field of ChatMessage (extra="allow")
        text = m.text()
        if role == "system" and name in EXAMPLE_NAMES:
            role, name = EXAMPLE_NAMES[name], None
        if name and isinstance(name, str):
            text = f"{name}: {text}"
        if role == "system":
            if not body:
                head.append(text)
            else:
                body.append({"role": "user", "content": f"[System note: {text}]"})
            continue
        body.append({"role": role, "content": text})
    if body and body[0]["role"] != "user":
        body.insert(0, {"role": "user", "content": CONVERSATION_START})
    out = ([{"role": "system", "content": "\n\n".join(head)}] if head else []) + body
    return merge_same_roles(out)


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's `logit_bias` ({"token id": -100..100}) checked against the model's vocabulary."""
    from service.errors import APIError

    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not str(key).lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise APIError(422, f"logit_bias key {key!r} is not a token id of this model (0-{vocab_size - 1}); "
                           "use POST /tokenize to find ids", param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise APIError(422, f"logit_bias[{key!r}] = {value} is outside [-100, 100]", param="logit_bias",
                           code="invalid_value")
        out[int(key)] = float(value)
    return out
