"""User-facing errors: one clear message naming the problem and the fix, printed without a stack trace."""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class WCTError(Exception):
    """A problem with the user's input or files; its message says what is wrong and how to fix it."""


# a write refused for lack of room: the disk is full, the file-size limit (``ulimit -f``), the user's disk quota
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def no_room(e: BaseException | None) -> int | None:
    """The errno (:data:`NO_ROOM`) when ``e`` or an exception it wraps (its cause or context) is a write refused for
    lack of room, else None. Libraries that write in native code report it in their message only: safetensors
    ("File too large (os error 27)"), torch's zip writer (an ``OSError`` in its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            return e.errno
        text = str(e)
        for code in NO_ROOM:
            if f"{os.strerror(code)} (os error {code})" in text or f"[Errno {code}]" in text:
                return code
        e = e.__cause__ or e.__context__
    return None


def cli_errors(fn: F) -> F:
    """Wrap an entry point so a :class:`WCTError` ends the program with its message and exit code 2; so does a
    write refused for lack of room outside wct's own output writers (which name the output and its size,
    :mod:`wct.io`), e.g. a log file."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WCTError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as e:
            code = no_room(e)
            if code is None:
                raise
            where = next((x.filename for x in (e, e.__cause__, e.__context__)
                          if isinstance(x, OSError) and x.filename), None)
            print(f"error: a write{f' to {where}' if where else ''} failed: {os.strerror(code)} (errno "
                  f"{errno.errorcode[code]}); free disk space or raise the file-size limit (ulimit -f) and run "
                  "again", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
