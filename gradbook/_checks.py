"""Argument checks shared by the package: every bad value gets a message naming it and the allowed ones."""
from __future__ import annotations

from typing import Iterable


def choice(what: str, value, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError`` naming both."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(map(repr, allowed))}")
    return value


def positive_int(what: str, value) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def non_negative(what: str, value) -> float:
    """Return ``value`` if it is a finite number >= 0, else raise ``ValueError``."""
    try:
        ok = float(value) >= 0 and float(value) != float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value
