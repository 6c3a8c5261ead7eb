"""`PersonaRegistry`: persona files from the bundled, extra and writable directories.

Lookup order (first hit wins): writable dir (PUT via the API), extra dir (`MEMENTO_PERSONA_DIR`),
bundled `persona/personas/`. A persona is the file `<name>.md`; the name is a slug, so no name can
reach outside its directory, and a file (or symlink) that resolves outside it is refused.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import yaml

from persona.errors import PersonaError, PersonaNotFound
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


class PersonaRegistry:
    """Personas by name from up to three directories (see module docstring)."""

    def __init__(
        self,
        extra_dir: str | Path | None = None,
        writable_dir: str | Path | None = None,
        bundled_dir: str | Path = BUNDLED_DIR,
    ) -> None:
        self.bundled_dir = Path(bundled_dir)
        self.extra_dir = Path(extra_dir) if extra_dir else None
        self.writable_dir = Path(writable_dir) if writable_dir else None
        self.errors: list[PersonaError] = []  # malformed files skipped by the last list()

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None) -> PersonaRegistry:
        """Registry for `MEMENTO_PERSONA_DIR` and `<data dir>/personas` (MEMENTO_DATA_DIR, default ./data)."""
        data = Path(data_dir or os.environ.get("MEMENTO_DATA_DIR") or "./data")
        return cls(extra_dir=os.environ.get("MEMENTO_PERSONA_DIR") or None, writable_dir=data / "personas")

    def dirs(self) -> list[Path]:
        """Directories in lookup order (first wins)."""
        return [d for d in (self.writable_dir, self.extra_dir, self.bundled_dir) if d is not None]

    def _find(self, name: str) -> tuple[Path, Path] | None:
        for d in self.dirs():
            path = d / f"{name}.md"
            if path.exists() or path.is_symlink():
                return d, path
        return None

    def get(self, name: str) -> Persona:
        """The persona called `name`; PersonaNotFound if no directory has it."""
        check_name(name)
        found = self._find(name)
        if found is None:
            raise PersonaNotFound(
                f"no persona named '{name}'",
                field="name",
                fix="see `memento persona list` or GET /v1/personas for the names",
            )
        directory, path = found
        return load_persona_file(path, directory)

    def list(self) -> list[Persona]:
        """All valid personas, sorted by name. Malformed files are skipped, logged and kept in `.errors`."""
        seen: dict[str, Persona] = {}
        self.errors = []
        for d in self.dirs():
            if not d.is_dir():
                continue
            for path in sorted(d.glob("*.md")):
                if path.stem in seen:
                    continue  # shadowed by an earlier directory
                try:
                    check_name(path.stem, file=str(path))
                    seen[path.stem] = load_persona_file(path, d)
                except PersonaError as e:
                    log.warning("skipping persona file: %s", e)
                    self.errors.append(e)
        return [seen[k] for k in sorted(seen)]

    def is_writable(self, name: str) -> bool:
        """True if `name` lives in the writable directory (so it can be deleted)."""
        return self.writable_dir is not None and (self.writable_dir / f"{check_name(name)}.md").exists()

    def put(self, name: str, text: str) -> Persona:
        """Create or replace `name` from persona file text or character card JSON. Returns the persona."""
        from persona.cards import card_to_persona, parse_card_json

        check_name(name)
        if self.writable_dir is None:
            raise PersonaError("this registry has no writable directory", fix="configure the data dir")
        if text.lstrip().startswith("{"):
            persona = card_to_persona(parse_card_json(text, source=f"card for {name}"), name=name)
            out = dump_persona(persona)
        else:
            persona = parse_persona_text(text, file=f"{name}.md", name=name)
            # keep the author's text (comments, layout) unless the name had to be filled in
            out = text if _names_itself(text) else dump_persona(persona)
        if persona.name != name:
            raise PersonaError(
                f"the body names '{persona.name}' but the request is for '{name}'",
                field="name",
                fix=f"set name: {name} or leave name out",
            )
        write_atomic(self.writable_dir / f"{name}.md", out)
        return persona

    def delete(self, name: str) -> None:
        """Delete a persona from the writable directory; bundled/extra ones cannot be deleted."""
        check_name(name)
        if self.is_writable(name):
            (self.writable_dir / f"{name}.md").unlink()  # type: ignore[operator]
            return
        if self._find(name) is None:
            raise PersonaNotFound(f"no persona named '{name}'", field="name")
        raise PersonaError(
            f"persona '{name}' is read-only (bundled or from MEMENTO_PERSONA_DIR)",
            field="name",
            fix="only personas created with PUT /v1/personas/{name} can be deleted",
        )
