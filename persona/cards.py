"""Character Card V2 import/export: JSON cards and PNG cards (base64 JSON in a `chara` tEXt chunk).

Spec: https://github.com/malfoyslastname/character-card-spec-v2 . V3 cards (`chara_card_v3`, chunk
`ccv3`) share the V2 fields we use and are read the same way. PNG chunks are parsed here with
`struct`/`zlib` (CRC-checked); no image library is needed.

Field mapping (card `data.*` -> Persona): name -> display_name (+ slug), description, personality,
scenario, first_mes -> greeting, alternate_greetings, mes_example -> examples (`<START>` blocks of
`{{user}}:`/`{{char}}:` lines), system_prompt, post_history_instructions -> post_history, tags,
creator_notes, character_book -> lorebook (persona/lorebook.py: V3 `@@depth`/`@@role` decorators and
SillyTavern's entry extensions included), V3 group_only_greetings. Memento's own fields (language,
register, ...) travel in `data.extensions.memento`. Exported cards carry the lorebook as `character_book`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from persona.errors import CardError
from persona.lorebook import book_from_card, book_to_card
from persona.schema import Persona

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_SPECS = ("chara_card_v2", "chara_card_v3")
MEMENTO_EXT = ("language", "register", "register_mode", "user_name")
_HANGUL_RE = re.compile(r"[\uac00-\ud7a3]")

# ---------------------------------------------------------------- PNG chunks


# The V2 card's free-text fields that map onto a persona.
CARD_TEXT_FIELDS = (
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
    "creator_notes",
)


def png_chunks(data: bytes, source: str = "<png>") -> list[tuple[bytes, bytes]]:
    """All (type, payload) chunks of a PNG, CRC-checked."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError("not a PNG file (bad signature)", file=source, fix="give a .png card or a .json card")
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise CardError(f"truncated PNG chunk header at byte {pos}", file=source)
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise CardError(f"truncated PNG chunk {ctype!r} at byte {pos}", file=source)
        payload = data[pos + 8 : end]
        (crc,) = struct.unpack(">I", data[end : end + 4])
        if zlib.crc32(ctype + payload) != crc:
            raise CardError(f"PNG chunk {ctype!r} at byte {pos} has a bad CRC (file damaged)", file=source)
        chunks.append((ctype, payload))
        pos = end + 4
        if ctype == b"IEND":
            break
    return chunks


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def png_text_chunks(data: bytes, source: str = "<png>") -> dict[str, str]:
    """Keyword -> text of the tEXt (and uncompressed iTXt) chunks."""
    out: dict[str, str] = {}
    for ctype, payload in png_chunks(data, source):
        if ctype == b"tEXt" and b"\x00" in payload:
            key, text = payload.split(b"\x00", 1)
            out[key.decode("latin-1")] = text.decode("latin-1")
        elif ctype == b"iTXt" and b"\x00" in payload:
            key, rest = payload.split(b"\x00", 1)
            if rest[:1] == b"\x00":  # compression flag 0: plain UTF-8 after lang and translated keyword
                parts = rest[2:].split(b"\x00", 2)
                if len(parts) == 3:
                    out[key.decode("latin-1")] = parts[2].decode("utf-8", "replace")
    return out


def tiny_png() -> bytes:
    """A valid 1x1 transparent PNG, the default image for exported cards."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00\x00\x00\x00")
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def write_png_card(card: dict, png: bytes | None = None) -> bytes:
    """`png` (default: a 1x1 image) with `card` embedded as a base64 `chara` tEXt chunk."""
    chunks = [c for c in png_chunks(png or tiny_png()) if not _is_card_chunk(c)]
    b64 = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
    out = PNG_SIGNATURE
    for ctype, payload in chunks:
        if ctype == b"IEND":
            out += _chunk(b"tEXt", b"chara\x00" + b64)
        out += _chunk(ctype, payload)
    return out


def _is_card_chunk(chunk: tuple[bytes, bytes]) -> bool:
    ctype, payload = chunk
    return ctype in (b"tEXt", b"iTXt") and payload.split(b"\x00", 1)[0] in (b"chara", b"ccv3")


# ---------------------------------------------------------------- card JSON


def parse_card_json(text: str | bytes, source: str = "<card>") -> dict:
    """Validate a card's JSON; returns the whole card dict (`spec`, `data`, ...)."""
    try:
        card = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CardError(f"card is not valid JSON: {e}", file=source) from None
    except RecursionError:  # json recurses per nesting level
        raise CardError("card JSON is nested too deeply", file=source, fix="export the card again") from None
    if not isinstance(card, dict):
        raise CardError("card JSON must be an object", file=source)
    spec = card.get("spec")
    if spec not in CARD_SPECS:
        raise CardError(
            f"unsupported card spec {spec!r} (expected 'chara_card_v2')",
            file=source,
            field="spec",
            fix="export the character as a Character Card V2",
        )
    data = card.get("data")
    if not isinstance(data, dict):
        raise CardError("card has no 'data' object", file=source, field="data")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CardError("card has no character name", file=source, field="data.name", fix="set data.name")
    for key in CARD_TEXT_FIELDS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise CardError(f"must be text, got {type(data[key]).__name__}", file=source, field=f"data.{key}")
    _check_card_shapes(data, source)
    return card


CARD_TEXT_LISTS = ("tags", "alternate_greetings", "group_only_greetings")
CARD_OBJECTS = ("extensions", "character_book")


def _check_card_shapes(data: dict, source: str) -> None:
    """Lists of text and objects where the spec says so (other tools write junk; never a 500)."""
    for key in CARD_TEXT_LISTS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CardError(f"must be a list of text, got {json.dumps(value)[:60]}", file=source, field=f"data.{key}",
                            fix=f"write data.{key} as a JSON array of strings")
    for key in CARD_OBJECTS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise CardError(f"must be an object, got {type(data[key]).__name__}", file=source, field=f"data.{key}")
    memento = (data.get("extensions") or {}).get("memento")
    if memento is not None and not isinstance(memento, dict):
        raise CardError("must be an object", file=source, field="data.extensions.memento")


def read_card(path: str | Path) -> dict:
    """Read a .json or .png card file into its card dict."""
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(PNG_SIGNATURE) or path.suffix.lower() == ".png":
        texts = png_text_chunks(raw, str(path))
        key = "chara" if "chara" in texts else "ccv3" if "ccv3" in texts else None
        if key is None:
            raise CardError(
                "PNG has no 'chara' text chunk: it is an image, not a character card", file=str(path)
            )
        try:
            decoded = base64.b64decode(texts[key], validate=True)
        except (binascii.Error, ValueError):
            raise CardError(f"the '{key}' chunk is not valid base64", file=str(path)) from None
        return parse_card_json(decoded, str(path))
    return parse_card_json(raw, str(path))


# ---------------------------------------------------------------- mapping


def _legacy_macros(text: str) -> str:
    return text.replace("<USER>", "{{user}}").replace("<BOT>", "{{char}}")


_SPEAKER_RE = re.compile(r"^\s*(\{\{user\}\}|\{\{char\}\}|<USER>|<BOT>)\s*:\s?(.*)$", re.IGNORECASE)


def parse_mes_example(text: str, char_name: str | None = None) -> list[list[dict]]:
    """`<START>` blocks of `{{user}}: ...` / `{{char}}: ...` lines -> dialogues of {role, content}.

    A line without a speaker prefix continues the previous turn; text before a block's first
    speaker line is dropped. `char_name:` also counts as the character speaking.
    """
    dialogues = []
    for block in re.split(r"<START>", text or "", flags=re.IGNORECASE):
        turns: list[dict] = []
        for line in block.splitlines():
            m = _SPEAKER_RE.match(line)
            if not m and char_name and line.strip().startswith(f"{char_name}:"):
                m = re.match(r"^\s*(.*?):\s?(.*)$", line)
                speaker = "{{char}}"
            elif m:
                speaker = m.group(1).lower()
            if m:
                role = "user" if speaker in ("{{user}}", "<user>") else "assistant"
                turns.append({"role": role, "content": m.group(2).strip()})
            elif turns and line.strip():
                turns[-1]["content"] += "\n" + line.strip()
        turns = [t for t in turns if t["content"]]
        if turns:
            dialogues.append(turns)
    return dialogues


def examples_to_mes_example(persona: Persona) -> str:
    blocks = []
    for dialogue in persona.examples:
        lines = [f"{'{{user}}' if t.role == 'user' else '{{char}}'}: {t.content}" for t in dialogue]
        blocks.append("<START>\n" + "\n".join(lines))
    return "\n".join(blocks)


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:64]
    return slug


def card_slug(card: dict, fallback: str | None = None) -> str:
    """A persona name for a card: Memento's own name if exported by us, else its name, else `fallback` (file stem), else a content hash."""
    ext_name = ((card["data"].get("extensions") or {}).get("memento") or {}).get("name")
    for candidate in (ext_name or "", card["data"]["name"], fallback or ""):
        slug = slugify(str(candidate))
        if slug:
            return slug
    digest = hashlib.sha256(json.dumps(card, sort_keys=True).encode()).hexdigest()[:8]
    return f"card-{digest}"


def card_to_persona(card: dict, name: str | None = None, source: str = "<card>") -> Persona:
    """Map a validated card (see `parse_card_json`) to a Persona called `name` (default: from the card)."""
    d = card["data"]
    text = {k: _legacy_macros(d.get(k) or "") for k in CARD_TEXT_FIELDS}
    ext = (d.get("extensions") or {}).get("memento") or {}
    blob = text["description"] + text["first_mes"]
    fields: dict[str, Any] = {
        "name": name or card_slug(card),
        "display_name": d["name"].strip()[:100],
        "description": text["description"],
        "personality": text["personality"],
        "scenario": text["scenario"],
        "system_prompt": text["system_prompt"],
        "greeting": text["first_mes"],
        "alternate_greetings": [_legacy_macros(g) for g in d.get("alternate_greetings") or [] if g],
        "group_only_greetings": [_legacy_macros(g) for g in d.get("group_only_greetings") or [] if isinstance(g, str) and g],
        "lorebook": book_from_card(d.get("character_book"), source),
        "examples": parse_mes_example(text["mes_example"], d["name"]),
        "post_history": text["post_history_instructions"],
        "tags": [str(t) for t in d.get("tags") or []],
        "creator_notes": text["creator_notes"],
        "language": "ko" if _HANGUL_RE.search(blob) else "en",
    }
    fields.update({k: ext[k] for k in MEMENTO_EXT if k in ext})
    try:
        return Persona.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise CardError(
            f"card field does not fit a persona: {err['msg']}", file=source, field=field
        ) from None


def persona_to_card(persona: Persona) -> dict:
    """A Character Card V2 dict for `persona` (Memento fields under data.extensions.memento)."""
    return {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": persona.char,
            "description": persona.description,
            "personality": persona.personality,
            "scenario": persona.scenario,
            "first_mes": persona.greeting,
            "mes_example": examples_to_mes_example(persona),
            "creator_notes": persona.creator_notes,
            "system_prompt": persona.system_prompt,
            "post_history_instructions": persona.post_history,
            "alternate_greetings": list(persona.alternate_greetings),
            **({"group_only_greetings": list(persona.group_only_greetings)} if persona.group_only_greetings else {}),
            **({"character_book": book_to_card(persona.lorebook)} if persona.lorebook else {}),
            "tags": list(persona.tags),
            "creator": "",
            "character_version": "",
            "extensions": {
                "memento": {"name": persona.name, **{k: getattr(persona, k) for k in MEMENTO_EXT}}
            },
        },
    }


def export_card(persona: Persona, path: str | Path) -> Path:
    """Write `persona` as a Character Card V2: a PNG card if `path` ends in .png, else JSON."""
    path = Path(path)
    card = persona_to_card(persona)
    if path.suffix.lower() == ".png":
        path.write_bytes(write_png_card(card))
    else:
        path.write_text(json.dumps(card, ensure_ascii=False, indent=2), encoding="utf-8")
    return path
