"""Value checks shared by the config dataclasses: each raises ``ValueError`` naming ``owner.name=value`` and the fix."""

from __future__ import annotations


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def at_least(owner: str, name: str, value, low) -> None:
    if value is None or value < low:
        raise ValueError(f"{owner}.{name}={value!r} must be >= {low}")
