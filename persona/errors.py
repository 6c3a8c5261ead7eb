"""Errors raised by the persona package. Each names what is wrong, where, and how to fix it."""

from __future__ import annotations


class PersonaError(ValueError):
    """A persona file or card that cannot be used.

    `file`, `line` (1-based, in the whole file) and `field` (dotted path such as `examples.0.user`)
    are filled in where known, so the CLI and the API can point at the exact spot.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<persona>"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: "
        if self.field:
            text += f"field '{self.field}': "
        text += self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return text


class PersonaNotFound(PersonaError, KeyError):
    """No persona with that name in any persona directory."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return PersonaError.__str__(self)


class CardError(PersonaError):
    """A character card (JSON or PNG) that cannot be read."""


class PersonaReadOnly(PersonaError):
    """The name is a shared persona (bundled, a persona directory, or an admin's) this caller may not change."""
