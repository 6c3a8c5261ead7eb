"""Plain functions behind `memento persona list|show|validate|import` and `memento register`.

service/cli.py wires them to typer; they take and return plain values so they are easy to test.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from persona.cards import card_slug, card_to_persona, read_card
from persona.errors import PersonaError
from persona.prompt import build_prompt_parts, post_history_message
from persona.registry import PersonaRegistry, load_persona_file, write_atomic
from persona.schema import Persona, dump_persona


def list_personas(registry: PersonaRegistry) -> list[tuple[str, str, str, str]]:
    """(name, display_name, language, register) of every valid persona, sorted by name."""
    return [(p.name, p.char, p.language, p.register) for p in registry.list()]


def prompt_messages(persona: Persona, user_name: str | None = None) -> list[dict[str, str]]:
    """What the model sees of a persona before any history: pinned messages + post-history."""
    parts = build_prompt_parts(persona, user_name=user_name)
    return parts.pinned + ([post_history_message(parts.post_history)] if parts.post_history else [])


def _plain_render(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def show_persona(registry: PersonaRegistry, name: str, tokenizer=None) -> tuple[str, int | None]:
    """The persona's rendered prompt and its token count.

    The prompt is the pinned part (system + example dialogues) followed by the post-history note
    as a user turn, the way memory/context.py appends it to the next user message. With a tokenizer
    (`model.tokenizer.Tokenizer`): the chat template's rendering and the exact token count of it.
    Without one: a plain `[role]` rendering and None.
    """
    messages = prompt_messages(registry.get(name))
    if tokenizer is None:
        return _plain_render(messages), None
    return (
        tokenizer.render_chat(messages, add_generation_prompt=False),
        tokenizer.count_messages(messages, add_generation_prompt=False),
    )


def validate_file(path: str | Path) -> Persona:
    """Parse and validate one persona file; raises PersonaError naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise PersonaError("no such file", file=str(path), fix="give the path of a .md persona file")
    return load_persona_file(path)


def import_card(path: str | Path, out_dir: str | Path) -> Path:
    """Convert a Character Card V2 (.json or .png) into `<out_dir>/<name>.md`; returns that path.

    The name comes from the card (slugified), else the card's file name. An existing file is not
    overwritten.
    """
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise PersonaError("no such card file", file=str(path))
    card = read_card(path)
    persona = card_to_persona(card, name=card_slug(card, fallback=path.stem), source=str(path))
    target = out_dir / f"{persona.name}.md"
    if target.exists():
        raise PersonaError(
            f"{target} already exists",
            file=str(path),
            fix="delete or rename the existing persona file, then import again",
        )
    write_atomic(target, dump_persona(persona))
    return target


def register_lines(lines: Iterable[str]) -> Iterator[str]:
    """One register label (banmal, polite, mixed or none) per input line (a reply per line)."""
    from persona.korean import classify_reply

    for line in lines:
        yield classify_reply(line.rstrip("\r\n")) if line.strip() else "none"
