"""`PersonaRegistry`: shared personas from files, and owned personas in the transcript store.

Shared (every user sees them, read-only for users): an admin's personas in the store (owner ""),
then the files of `<data dir>/personas` (operator files, `memento persona import`), of
`MEMENTO_PERSONA_DIR` and the bundled `persona/personas/`. Owned: what a user PUT through the API,
in the store under that user, so every replica sees the same set. A user sees their own and the
shared ones; another user's persona is simply not there (404). Lookup, first hit wins: the
caller's own, the admin's shared, then the directories in that order.

Writes (`put`, `delete`) go to the store only. A user's PUT of a shared name is refused
(`PersonaReadOnly`, 409) so nobody can replace what other users' sessions run under; an admin's
PUT of a shared name writes the shared store copy (which overrides a file of that name for everyone).

A persona file is `<name>.md`; the name is a slug, so no name can reach outside its directory,
and a file (or symlink) that resolves outside it is refused.
"""

from __future__ import annotations

import builtins
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from persona.errors import PersonaError, PersonaNotFound, PersonaReadOnly
from persona.schema import Persona, check_name, dump_persona, parse_persona_text, split_front_matter

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "personas"
MAX_FILE_BYTES = 1 << 20  # a persona file over 1 MiB is a mistake, not a persona


def read_inside(directory: Path, path: Path) -> str:
    """Read `path` as UTF-8 only if it resolves to a regular file directly inside `directory`."""
    real_dir = directory.resolve()
    real = path.resolve()
    if real.parent != real_dir:
        raise PersonaError(
            f"refusing to read {path}: it resolves to {real}, outside the persona directory {real_dir}",
            file=str(path),
            fix="copy the file into the persona directory instead of linking to it",
        )
    if not real.is_file():
        raise PersonaError(f"{path} is not a regular file", file=str(path))
    if real.stat().st_size > MAX_FILE_BYTES:
        raise PersonaError(f"file is larger than {MAX_FILE_BYTES} bytes", file=str(path))
    try:
        return real.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PersonaError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path)) from None


def load_persona_file(path: Path, directory: Path | None = None) -> Persona:
    """Parse one persona file; its `name` must match the file name (`<name>.md`)."""
    path = Path(path)
    text = read_inside(directory or path.parent, path)
    persona = parse_persona_text(text, file=str(path))
    if persona.name != path.stem:
        raise PersonaError(
            f"name '{persona.name}' does not match the file name '{path.name}'",
            file=str(path),
            field="name",
            fix=f"rename the file to {persona.name}.md or set name: {path.stem}",
        )
    return persona


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _names_itself(text: str) -> bool:
    front, _ = split_front_matter(text)
    data = yaml.safe_load(front)
    return isinstance(data, dict) and "name" in data


SHARED = ""  # the store owner of shared personas (API key users are never empty)


class PersonaRegistry:
    """Personas by name for an owner (see module docstring)."""

    def __init__(
        self,
        extra_dir: str | Path | None = None,
        local_dir: str | Path | None = None,
        bundled_dir: str | Path = BUNDLED_DIR,
        store: Any = None,
    ) -> None:
        self.bundled_dir = Path(bundled_dir)
        self.extra_dir = Path(extra_dir) if extra_dir else None
        self.local_dir = Path(local_dir) if local_dir else None
        self.store = store  # memory.store.Store; None: files only, read-only (the offline CLI)
        self.errors: list[PersonaError] = []  # malformed files skipped by the last list()

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> PersonaRegistry:
        """Registry for `MEMENTO_PERSONA_DIR` and `<data dir>/personas` (MEMENTO_DATA_DIR, default ./data)."""
        data = Path(data_dir or os.environ.get("MEMENTO_DATA_DIR") or "./data")
        return cls(extra_dir=os.environ.get("MEMENTO_PERSONA_DIR") or None, local_dir=data / "personas")

    def dirs(self) -> list[Path]:
        """Directories in lookup order (first wins)."""
        return [d for d in (self.local_dir, self.extra_dir, self.bundled_dir) if d is not None]

    # ------------------------------------------------------------------ reading

    def _stored(self, owner: str | None, name: str) -> str | None:
        if self.store is None or owner is None:
            return None
        return self.store.get_persona(owner, name)

    def _file(self, name: str) -> tuple[Path, Path] | None:
        for d in self.dirs():
            path = d / f"{name}.md"
            if path.exists() or path.is_symlink():
                return d, path
        return None

    def origin(self, name: str, owner: str | None = None) -> str | None:
        """Where `owner` finds `name`: "own", "shared" (an admin's, in the store), "file", or None."""
        check_name(name)
        if owner not in (None, SHARED) and self._stored(owner, name) is not None:
            return "own"
        if self._stored(SHARED, name) is not None:
            return "shared"
        return "file" if self._file(name) is not None else None

    def get(self, name: str, owner: str | None = None) -> Persona:
        """The persona `owner` sees as `name` (None: shared ones only); PersonaNotFound otherwise."""
        where = self.origin(name, owner)
        if where is None:
            raise PersonaNotFound(
                f"no persona named '{name}'",
                field="name",
                fix="see `memento persona list` or GET /v1/personas for the names",
            )
        if where == "file":
            directory, path = self._file(name)  # type: ignore[misc]
            return load_persona_file(path, directory)
        text = self._stored(owner if where == "own" else SHARED, name)
        return parse_persona_text(text or "", file=f"{name}.md", name=name)

    def list(self, owner: str | None = None) -> builtins.list[Persona]:
        """What `owner` sees, sorted by name: own first, then shared. Malformed entries are skipped,
        logged and kept in `.errors`."""
        seen: dict[str, Persona] = {}
        self.errors = []
        for who in ([owner] if owner not in (None, SHARED) else []) + [SHARED]:
            texts = self.store.list_personas(who) if self.store is not None else {}
            for name, text in texts.items():
                if name not in seen:
                    self._keep(seen, name, lambda t=text, n=name: parse_persona_text(t, file=f"{n}.md", name=n))
        for d in self.dirs():
            if not d.is_dir():
                continue
            for path in sorted(d.glob("*.md")):
                if path.stem not in seen:  # else shadowed by the store or an earlier directory
                    self._keep(seen, path.stem, lambda p=path, d=d: load_persona_file(p, d), str(path))
        return [seen[k] for k in sorted(seen)]

    def _keep(self, seen: dict[str, Persona], name: str, load: Any, file: str | None = None) -> None:
        try:
            check_name(name, file=file or f"{name}.md")
            seen[name] = load()
        except PersonaError as e:
            log.warning("skipping persona: %s", e)
            self.errors.append(e)

    def is_writable(self, name: str, owner: str | None, admin: bool = False) -> bool:
        """True if `owner` may replace or delete `name` (their own; an admin's shared store copy)."""
        where = self.origin(name, owner)
        return where == "own" or (admin and where == "shared")

    # ------------------------------------------------------------------ writing (the store only)

    def put(self, name: str, text: str, owner: str, admin: bool = False, shared: bool = False) -> Persona:
        """Create or replace `name` from persona file text or character card JSON, as `owner`.

        Their own persona is replaced; a shared name is refused unless `admin` (then the shared
        copy is written); a new name is `owner`'s, or shared when an admin asks for `shared`."""
        persona, out = _parse_upload(name, text)
        where = self.origin(name, owner)
        if where in ("shared", "file") and not admin:
            raise PersonaReadOnly(
                f"'{name}' is a shared persona; only an admin key may change it",
                field="name",
                fix="pick another name for your own persona",
            )
        target = SHARED if where in ("shared", "file") or (where is None and admin and shared) else owner
        self._writable_store().put_persona(target, name, out)
        return persona

    def delete(self, name: str, owner: str, admin: bool = False) -> None:
        """Delete `owner`'s persona (or, for an admin, the shared store copy). Files are read-only."""
        where = self.origin(name, owner)
        if where is None:
            raise PersonaNotFound(f"no persona named '{name}'", field="name")
        if where == "own" or (where == "shared" and admin):
            self._writable_store().delete_persona(owner if where == "own" else SHARED, name)
            return
        raise PersonaReadOnly(
            f"persona '{name}' is shared and read-only"
            + (" (bundled or from a persona directory)" if where == "file" else ""),
            field="name",
            fix="only your own personas (PUT /v1/personas/{name}) can be deleted" if not admin
            else "remove the file from the persona directory",
        )

    def _writable_store(self) -> Any:
        if self.store is None:
            raise PersonaError("this registry has no store to write to", fix="write through the API (memento serve)")
        return self.store


def _parse_upload(name: str, text: str) -> tuple[Persona, str]:
    """The persona and the text to store: the author's own text (comments, layout) unless it is
    a card or the name had to be filled in."""
    from persona.cards import card_to_persona, parse_card_json

    check_name(name)
    if text.lstrip().startswith("{"):
        persona = card_to_persona(parse_card_json(text, source=f"card for {name}"), name=name)
        out = dump_persona(persona)
    else:
        persona = parse_persona_text(text, file=f"{name}.md", name=name)
        out = text if _names_itself(text) else dump_persona(persona)
    if persona.name != name:
        raise PersonaError(
            f"the body names '{persona.name}' but the request is for '{name}'",
            field="name",
            fix=f"set name: {name} or leave name out",
        )
    return persona, out
