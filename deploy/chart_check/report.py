"""Failures of the checks: fail() reports one, capture() collects them for negative cases."""

from __future__ import annotations

from typing import Any, Callable

failures: list[str] = []
# While not None, fail() records here silently (negative cases expect failures).
_captured: list[str] | None = None


def fail(case: str, message: str) -> None:
    if _captured is not None:
        _captured.append(f"{case}: {message}")
        return
    failures.append(f"{case}: {message}")
    print(f"FAIL {case}: {message}")


def capture(check: Callable[..., None], *args: Any) -> list[str]:
    """The failures `check(*args)` reports, without counting them."""
    global _captured
    _captured = []
    try:
        check(*args)
        return _captured
    finally:
        _captured = None
