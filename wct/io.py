"""Safe outputs: they appear complete under their final name or not at all, and never destroy what wct did not
write (docs/guarantees.md).

* :func:`atomic_dir` builds a folder in a temporary sibling ``.NAME.tmp-<host>-<pid>-<random>`` and renames it into
  place. An existing path is refused (:class:`OutputExistsError`, one line naming it) unless it is an empty folder,
  or a wct output of the same kind (its :data:`MARKER` file says so) and the caller passed ``overwrite=True``; then
  the two folders are swapped in one ``renameat2(RENAME_EXCHANGE)`` call, so a ``kill -9`` at any moment leaves
  either the old output or the new one. A file is never replaced by a folder.
* Temporary siblings of killed writes (this host, a process that no longer runs) are removed by the next write to
  the same target.
* :func:`atomic_file` writes a temporary sibling file and ``os.replace``-s it over the target.
* Both follow the process umask (``mkdtemp`` / ``mkstemp`` alone would leave 0700 / 0600).
* A write refused for lack of room (disk full ``ENOSPC``, file-size limit ``EFBIG`` from ``ulimit -f``, disk quota
  ``EDQUOT``; also when a library wraps it, :func:`wct.errors.no_room`) removes the temporary and raises one
  :class:`~wct.errors.WCTError` naming the output, the bytes written before the refusal and the limit or the free
  space (:func:`no_room_error`). Python ignores ``SIGXFSZ``, so ``ulimit -f`` reaches wct as ``EFBIG``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO, Iterator

from wct.errors import WCTError, no_room

MARKER = ".wct-output"  # JSON {"kind": ...} in every folder atomic_dir writes
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_RENAME_EXCHANGE = 2


class OutputExistsError(WCTError, FileExistsError):
    """The output path exists and may not be replaced (a user's file, another kind of output, or no overwrite)."""


def _sizes(path: Path) -> dict[Path, int]:
    """Size of every file at or under ``path`` (a file or a folder)."""
    if path.is_file():
        return {path: path.stat().st_size}
    return {f: f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()}


def no_room_error(final: Path, tmp: Path, code: int, what: str, needs: int | None = None) -> WCTError:
    """The one-line error for a write of ``final`` (``what``: how the message names it) refused with errno ``code``
    (:data:`wct.errors.NO_ROOM`), ``tmp`` its partly written temporary (read before it is removed): the bytes
    written, the file that hit the file-size limit or the free space left, and ``needs`` (the output's size) when
    the caller knows it."""
    sizes = _sizes(tmp) if os.path.lexists(tmp) else {}
    written = sum(sizes.values())
    need = f"; the output needs at least {needs:,} bytes" if needs else ""
    done = f"nothing was written under {final} and the temporary {tmp.name} is removed"
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        biggest = max(sizes, key=sizes.get, default=tmp)
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit:,} bytes"
        return WCTError(f"{what}: the file-size limit (ulimit -f: {shown}) stopped the write of {biggest.name} at "
                        f"{sizes.get(biggest, 0):,} bytes ({written:,} bytes of the output written{need}); {done}. "
                        "Raise the limit (ulimit -f unlimited) and run again")
    free = shutil.disk_usage(final.parent).free
    cause = "the disk quota is exhausted" if code == errno.EDQUOT else "the disk is full"
    return WCTError(f"{what}: {cause} ({free:,} bytes free in {final.parent}) after {written:,} bytes of the output "
                    f"were written{need}; {done}. Free disk space or choose another output path")


def umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sibling_prefix(final: Path, what: str = "tmp") -> str:
    """Name prefix of ``final``'s temporary siblings (``tmp``: being written, ``old``: being replaced) made by
    this process; :func:`remove_stale_temps` recognizes exactly these."""
    return f".{final.name}.{what}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary siblings of ``final`` that killed writes of this host left (their process is gone);
    returns them. Only names of wct's own pattern are touched, never a running writer's."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(tmp|old)-{_HOST}-(\d+)-[A-Za-z0-9_]+$")
    removed = []
    for p in final.parent.glob(f".{glob_escape(final.name)}.*-{_HOST}-*"):
        m = pattern.match(p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not os.path.lexists(final):
            p.rename(final)  # killed between the two renames of the fallback swap: the old output goes back
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters ``*?[`` matched literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def output_kind(path: Path) -> str | None:
    """The kind recorded in ``path``'s :data:`MARKER` (a folder wct wrote), else None."""
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_target(final: Path, kind: str, overwrite: bool, key: str = "out") -> None:
    """Refuse ``final`` (OutputExistsError, one line naming it and the way out) unless it is absent, an empty
    folder, or a wct ``kind`` output with ``overwrite``."""
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise OutputExistsError(f"{key}={final} is an existing file or link; wct never replaces it with a folder: "
                                "choose another output path")
    if not any(final.iterdir()):
        return
    found = output_kind(final)
    if found != kind:
        what = (f"holds a wct {found} output, which this command ({kind} outputs) does not replace" if found
                else "was not written by wct; wct never replaces what it did not write")
        raise OutputExistsError(f"{key}={final} exists and {what}: choose another output path (or remove that "
                                "folder yourself)")
    if not overwrite:
        raise OutputExistsError(f"{key}={final} already holds a wct {kind} output; pass overwrite=true to replace "
                                "it, or choose another output path")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put folder ``tmp`` at ``final``, which may hold an output that check_target allowed to replace."""
    try:
        os.rename(tmp, final)  # succeeds when final is absent or an empty folder, never over a file or contents
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = final.with_name(_sibling_prefix(final, "old") + secrets.token_hex(4))
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def make_parent(final: Path, key: str = "out") -> None:
    """Create ``final``'s parent folder; WCTError naming ``key`` when it cannot be (a file on the way, no
    permission)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(final.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except (FileExistsError, NotADirectoryError):
        raise WCTError(f"{key}={final}: a file is in the way of its folder {final.parent}; choose another "
                       "output path") from None
    except PermissionError:
        raise WCTError(f"{key}={final}: no permission to write into {final.parent}; choose another output "
                       "path") from None


def _temp_dir(final: Path, key: str) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=_sibling_prefix(final), dir=final.parent))
    except OSError as e:
        raise WCTError(f"{key}={final}: cannot write into {final.parent} ({e.strerror}); choose another output "
                       "path") from None


def check_output(path: str | os.PathLike, kind: str, overwrite: bool = False, key: str = "out") -> None:
    """Everything :func:`atomic_dir` checks before writing (the target may be written, its folder can be), for a
    command to fail before its work rather than after it."""
    final = Path(path)
    make_parent(final, key)
    check_target(final, kind, overwrite, key)
    _temp_dir(final, key).rmdir()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str, overwrite: bool = False, key: str = "out",
               needs: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; when the block succeeds it becomes ``path`` (module docstring),
    marked as a wct ``kind`` output; when it fails it is removed. ``key`` names the setting in error messages,
    ``needs`` (bytes, when known) the output's size in the one for a full disk."""
    final = Path(path)
    make_parent(final, key)
    remove_stale_temps(final)
    check_target(final, kind, overwrite, key)
    tmp = _temp_dir(final, key)
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
        check_target(final, kind, overwrite, key)  # again: another process may have written it meanwhile
        _replace_dir(tmp, final)
    except BaseException as e:
        code = None if isinstance(e, WCTError) else no_room(e)
        error = no_room_error(final, tmp, code, f"{key}={final}", needs) if code else None
        shutil.rmtree(tmp, ignore_errors=True)
        if error:
            raise error from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling file for writing; it is renamed over ``path`` when the block succeeds. For files
    of wct's own run and cache folders (checkpoints, results, logs): an existing file there is replaced."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=_sibling_prefix(final), dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, final)
    except BaseException as e:
        code = None if isinstance(e, WCTError) else no_room(e)
        error = no_room_error(final, Path(tmp), code, f"writing {final}") if code else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if error:
            raise error from None
        raise


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns the path."""
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=2)
    return Path(path)
