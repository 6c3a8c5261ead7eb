"""What the persona editor (web page) asks of a draft: validation with line and field, the form's
fields <-> the file text, the exact pinned prompt with token costs, register flags, card import.

    check_text(text)            # {"ok", "persona"?, "error"?: {message, line, field, fix}}
    text_from_fields(fields)    # persona file text from the form's fields (PersonaError names the field)
    register_flags(persona)     # greeting / example lines in the wrong register (Kiwi detector)
    preview(persona, counter)   # {"messages", "costs"} exactly as build_prompt_parts makes them
    card_text(raw, filename)    # a dropped PNG or JSON card -> persona file text (not saved)
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from pydantic import ValidationError

from persona.errors import CardError, PersonaError
from persona.schema import Persona, dump_persona, parse_persona_text


def error_json(e: PersonaError) -> dict[str, Any]:
    return {"message": e.message, "line": e.line, "field": e.field, "fix": e.fix, "text": str(e)}


def check_text(text: str, name: str | None = None) -> dict[str, Any]:
    """Validate a draft persona file: the parsed persona, or the first error with its line and field."""
    try:
        persona = parse_persona_text(text, file=f"{name or 'draft'}.md", name=name)
    except PersonaError as e:
        return {"ok": False, "error": error_json(e)}
    return {"ok": True, "persona": persona.model_dump()}


def text_from_fields(fields: dict[str, Any]) -> str:
    """The persona file for the form's fields (empty ones dropped)."""
    clean = {k: v for k, v in fields.items() if v not in ("", None, [], {})}
    try:
        return dump_persona(Persona.model_validate(clean))
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise PersonaError(err["msg"].removeprefix("Value error, "), field=field) from None


def register_flags(persona: Persona) -> list[dict[str, str]]:
    """Greeting, alternate greetings and the character's example lines not in the persona's register."""
    if persona.register not in ("banmal", "polite"):
        return []
    from persona.guard import forbidden_label
    from persona.korean import classify_sentences

    bad = forbidden_label(persona.register)
    lines = [("greeting", persona.greeting)]
    lines += [(f"alternate_greetings.{i}", g) for i, g in enumerate(persona.alternate_greetings)]
    for i, dialogue in enumerate(persona.examples):
        lines += [(f"examples.{i}.{j}", t.content) for j, t in enumerate(dialogue) if t.role == "assistant"]
    flags = []
    for where, text in lines:
        for s in classify_sentences(text or ""):
            if s.label in (bad, "mixed"):
                flags.append({"field": where, "text": s.text, "label": s.label, "expected": persona.register})
    return flags


def preview(persona: Persona, counter: Any) -> dict[str, Any]:
    """The pinned prompt the model sees at the top of every turn, and what each part costs."""
    from persona.prompt import build_prompt_parts, post_history_message, token_costs

    parts = build_prompt_parts(persona)
    messages = list(parts.pinned)
    if parts.post_history:
        messages.append(post_history_message(parts.post_history))
    return {"messages": messages, "costs": token_costs(parts, counter), "register_flags": register_flags(persona)}


def card_text(raw: bytes, filename: str = "card") -> str:
    """A character card (PNG with a `chara`/`ccv3` chunk, or JSON) as persona file text."""
    from persona.cards import PNG_SIGNATURE, card_slug, card_to_persona, parse_card_json, png_text_chunks

    if raw.startswith(PNG_SIGNATURE):
        texts = png_text_chunks(raw, filename)
        key = "chara" if "chara" in texts else "ccv3" if "ccv3" in texts else None
        if key is None:
            raise CardError("PNG has no 'chara' text chunk: it is an image, not a character card", file=filename)
        try:
            raw = base64.b64decode(texts[key], validate=True)
        except (binascii.Error, ValueError):
            raise CardError(f"the '{key}' chunk is not valid base64", file=filename) from None
    card = parse_card_json(raw, filename)
    stem = filename.rsplit(".", 1)[0]
    return dump_persona(card_to_persona(card, name=card_slug(card, stem), source=filename))
