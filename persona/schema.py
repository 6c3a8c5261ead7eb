"""The `Persona` model and the persona file format: Markdown with YAML front matter.

    ---
    name: daughter-ko            # slug: the file is daughter-ko.md
    display_name: 지우
    language: ko
    register: banmal             # banmal | polite | any
    register_mode: guard         # off | remind | guard
    user_name: 아빠
    greeting: 아빠 왔어?
    sampling: {min_p: 0.05}      # optional: over the model's preset (model/presets.py), under the request
    examples:
      - user: 밥 먹었어?
        assistant: 응, 먹었어! 아빠는?
    ---
    {{char}} is ... (the body is the description when the front matter has none)

`parse_persona_text` validates with pydantic and turns every failure into a `PersonaError`
naming the file, the line in the file and the field; `dump_persona` writes the same format back.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from persona.errors import PersonaError
from persona.lorebook import Lorebook, check_book

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
MAX_TEXT = 32_000  # characters per text field: a persona is a prompt, not a book

Register = Literal["banmal", "polite", "any"]
RegisterMode = Literal["off", "remind", "guard"]


def check_name(name: str, *, file: str | None = None) -> str:
    """Return `name` if it is a valid persona slug, else raise PersonaError (blocks path traversal)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PersonaError(
            f"invalid persona name {name!r}",
            file=file,
            field="name",
            fix="use 1-64 characters: lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    return name


class Turn(BaseModel):
    """One line of an example dialogue."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_TEXT)


def _as_turns(item: Any, where: str) -> list[dict]:
    """One examples item -> turns. Accepts {user, assistant}, {role, content} or a list of either."""
    if isinstance(item, list):
        turns: list[dict] = []
        for j, sub in enumerate(item):
            turns.extend(_as_turns(sub, f"{where}.{j}"))
        return turns
    if not isinstance(item, dict):
        raise ValueError(f"at {where}: expected a mapping like {{user: ..., assistant: ...}}, got {item!r}")
    if "role" in item or "content" in item:
        return [item]
    unknown = set(item) - {"user", "assistant"}
    if unknown or not item:
        key = f".{sorted(map(str, unknown))[0]}" if unknown else ""
        raise ValueError(
            f"at {where}{key}: unknown key; "
            "write {user: ..., assistant: ...} or {role: user|assistant, content: ...}"
        )
    turns = []
    for role in ("user", "assistant"):
        if role in item:
            if not isinstance(item[role], str) or not item[role].strip():
                raise ValueError(f"at {where}.{role}: must be non-empty text")
            turns.append({"role": role, "content": item[role]})
    return turns


warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class PersonaSampling(BaseModel):
    """A persona's own sampling defaults (over the model's preset, under the request's fields)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=4)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    dry_multiplier: float | None = Field(None, ge=0, le=100)
    dry_base: float | None = Field(None, gt=1, le=8)
    dry_allowed_length: int | None = Field(None, ge=1, le=64)
    dry_penalty_last_n: int | None = Field(None, ge=-1)
    dry_sequence_breakers: list[str] | None = Field(None, max_length=16)


class Persona(BaseModel):
    """A character the bot plays. Text fields may use the `{{char}}` and `{{user}}` macros."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="slug; also the file name")
    display_name: str = Field("", max_length=100, description="{{char}}; defaults to name")
    description: str = Field("", max_length=MAX_TEXT, description="who the character is (system prompt body)")
    personality: str = Field("", max_length=MAX_TEXT)
    scenario: str = Field("", max_length=MAX_TEXT)
    system_prompt: str = Field("", max_length=MAX_TEXT, description="extra instructions placed first")
    greeting: str = Field("", max_length=MAX_TEXT)
    alternate_greetings: list[str] = Field(default_factory=list)
    group_only_greetings: list[str] = Field(default_factory=list, description="V3 cards: greetings for group chats")
    language: str = Field("en", pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
    register: Register = "any"
    register_mode: RegisterMode = "off"
    examples: list[list[Turn]] = Field(default_factory=list, description="example dialogues")
    post_history: str = Field("", max_length=MAX_TEXT, description="instruction placed after the history")
    user_name: str = Field("", max_length=100, description="{{user}} unless the caller names the user")
    tags: list[str] = Field(default_factory=list)
    creator_notes: str = Field("", max_length=MAX_TEXT)
    lorebook: Lorebook | None = Field(None, description="world info: entries inserted when their keys appear")
    sampling: PersonaSampling | None = Field(None, description="sampling defaults over the model's preset")

    @field_validator("register_mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @field_validator("language", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # ... and a bare `no` (Norwegian) as false

    @field_validator("examples", mode="before")
    @classmethod
    def _normalise_examples(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError(
                "at examples: expected a list of {user: ..., assistant: ...} pairs or of dialogues"
            )
        if v and all(isinstance(x, dict) and ("role" in x or "content" in x) for x in v):
            return [v]  # a flat list of turns is one dialogue
        return [_as_turns(item, f"examples.{i}") for i, item in enumerate(v)]

    @model_validator(mode="after")
    def _check(self) -> Persona:
        if not self.display_name:
            self.display_name = self.name
        if self.register_mode != "off" and self.register == "any":
            raise ValueError(
                f"at register_mode: '{self.register_mode}' needs register banmal or polite "
                "(set register, or register_mode: off)"
            )
        if self.lorebook is not None:
            check_book(self.lorebook)
        return self

    @property
    def char(self) -> str:
        return self.display_name or self.name


# ---------------------------------------------------------------- the file format


def split_front_matter(text: str, file: str | None = None) -> tuple[str, str]:
    """Return (front matter YAML, Markdown body). The file must start with a `---` line."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    lines = text.split("\n")
    if not lines or lines[0].strip() != "---":
        raise PersonaError(
            "a persona file must start with a '---' line (YAML front matter)",
            file=file,
            line=1,
            fix="put the fields between two '---' lines at the top, the description below",
        )
    for i in range(1, len(lines)):
        if lines[i].strip() in ("---", "..."):
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :]).strip()
    raise PersonaError(
        "the YAML front matter is not closed", file=file, line=1, fix="add a '---' line after the fields"
    )


def _node_line(root: yaml.Node | None, loc: tuple) -> int | None:
    """0-based line of the deepest YAML node along `loc` (a pydantic error location)."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            line, node = match[0][0].start_mark.line, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line
        else:
            break
    return line


_AT_RE = re.compile(r"^(?:Value error, )?at ([\w.]+): ")


def _validation_error(err: ValidationError, front: str, file: str | None) -> PersonaError:
    """The first pydantic error as a PersonaError with the field path and its line in the file."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    msg = first["msg"]
    at = _AT_RE.match(msg)
    if at:  # our validators name a finer path than pydantic's loc
        loc = tuple(int(p) if p.isdigit() else p for p in at.group(1).split("."))
        msg = msg[at.end() :]
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see persona/schema.py for the fields)"
    elif first["type"] == "missing":
        msg = "is required"
    try:
        root = yaml.compose(front)
    except yaml.YAMLError:
        root = None
    line0 = _node_line(root, loc)
    # front matter starts on file line 2 (after '---'); no node found -> point at the opening line
    line = line0 + 2 if line0 is not None else 1
    field = ".".join(str(p) for p in loc) or None
    return PersonaError(msg, file=file, line=line, field=field)


def _refuse_aliases(front: str, file: str | None) -> None:
    """YAML anchors/aliases can expand a small file into a huge structure ("billion laughs"): refuse them."""
    for token in yaml.scan(front):
        if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
            raise PersonaError(
                "YAML anchors and aliases (&name, *name) are not allowed in persona files",
                file=file,
                line=token.start_mark.line + 2,
                fix="write the text out in full",
            )


def parse_persona_text(text: str, file: str | None = None, *, name: str | None = None) -> Persona:
    """Parse and validate a persona file. `name`, when given, fills a missing `name` field."""
    front, body = split_front_matter(text, file)
    try:
        _refuse_aliases(front, file)
        data = yaml.safe_load(front) if front.strip() else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise PersonaError(
            f"invalid YAML: {problem}",
            file=file,
            line=mark.line + 2 if mark else 1,
            fix="check indentation and quote values that contain ':' or '#'",
        ) from None
    except RecursionError:  # PyYAML recurses per nesting level: a hostile file would be a 500
        raise PersonaError("YAML front matter is nested too deeply", file=file,
                           fix="a persona's fields are text and short lists; flatten the structure") from None
    if not isinstance(data, dict):
        raise PersonaError("the front matter must be a mapping of fields (key: value)", file=file, line=2)
    if body:
        if data.get("description"):
            raise PersonaError(
                "the description is given twice (front matter and body)",
                file=file,
                line=_node_line(yaml.compose(front), ("description",)) + 2,
                field="description",
                fix="keep one: the Markdown body or the description field",
            )
        data["description"] = body
    if name is not None and "name" not in data:
        data["name"] = name
    try:
        return Persona.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, front, file) from None


def _examples_for_yaml(persona: Persona) -> list:
    out: list = []
    for dialogue in persona.examples:
        roles = [t.role for t in dialogue]
        if roles == ["user", "assistant"]:
            out.append({"user": dialogue[0].content, "assistant": dialogue[1].content})
        else:
            out.append([{"role": t.role, "content": t.content} for t in dialogue])
    return out


def dump_persona(persona: Persona) -> str:
    """The persona as a persona file (front matter + description as the Markdown body)."""
    data = persona.model_dump(exclude={"description", "examples"}, exclude_defaults=True)
    data = {"name": persona.name, **data}
    if persona.examples:
        data["examples"] = _examples_for_yaml(persona)
    front = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=100)
    return f"---\n{front}---\n{persona.description.strip()}\n"
