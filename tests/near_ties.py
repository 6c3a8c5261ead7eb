"""Comparing greedy outputs whose kernels round differently (int4 against float32, compiled against
eager): they may part at a near-tie, so the tests look at the first place they differ."""

from __future__ import annotations

from collections.abc import Sequence


def first_difference(a: Sequence, b: Sequence) -> int | None:
    """The first index where a and b differ over their common length; None if they agree there."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
