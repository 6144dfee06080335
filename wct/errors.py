"""User-facing errors: one clear message naming the problem and the fix, printed without a stack trace."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class WCTError(Exception):
    """A problem with the user's input or files; its message says what is wrong and how to fix it."""


def cli_errors(fn: F) -> F:
    """Wrap an entry point so a :class:`WCTError` ends the program with its message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WCTError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
