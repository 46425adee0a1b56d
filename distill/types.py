"""Constrained option types for module, DataModule and CLI signatures.

jsonargparse checks these when a YAML or command-line value is parsed, so a bad value is refused
before any work starts, in one line naming the key, and ``--help`` shows the constraint
(e.g. ``temperature: PositiveFloat``). Called from Python they behave as plain numbers.
"""

from __future__ import annotations

from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)

__all__ = [
    "ClosedUnitInterval",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnitInterval",
    "PositiveFloat",
    "PositiveInt",
]
