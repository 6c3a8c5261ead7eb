"""Personas: persona files, character cards, prompt assembly and the Korean register guard.

    from persona import Persona, PersonaRegistry
    reg = PersonaRegistry(extra_dir=None, local_dir=data_dir / "personas", store=store)
    persona = reg.get("daughter-ko")

Heavier parts are imported from their modules: `persona.prompt.build_prompt_parts`,
`persona.korean.classify_reply` (loads Kiwi lazily), `persona.guard.RegisterGuard` (needs torch).
"""

from persona.errors import CardError, PersonaError, PersonaNotFound
from persona.registry import PersonaRegistry
from persona.schema import Persona

__all__ = ["CardError", "Persona", "PersonaError", "PersonaNotFound", "PersonaRegistry"]
