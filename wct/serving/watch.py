"""The watched deltas folder: a delta file that appears in ``deltas=DIR`` while serving is loaded (docs/serving.md §1).

Every ``watch_s`` seconds one :meth:`DeltaWatch.poll` lists the folder's ``*.safetensors`` (not hidden files: a
``wct.export`` temp file is hidden and has no ``.safetensors`` suffix until its rename):

- a new file is loaded once complete: its size and modification time are the same at two polls in a row (a file
  renamed into the folder, as ``wct.export`` writes, or copied slowly, is loaded one poll after it stops changing);
- a refused file (another base, not a delta, corrupt, a name already served) is logged once with its reason and not
  tried again until its size or modification time changes;
- a served delta whose file is removed or replaced keeps being served as loaded (vLLM and LoRAX keep a loaded
  adapter until it is unloaded, not when its files change); the change is logged once, and a restart serves the
  folder as it is then.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from wct.errors import WCTError
from wct.serving.bank import DeltaBank, delta_files, deltas_folder

log = logging.getLogger("wct.serving")

Signature = tuple[int, int]  # (size in bytes, modification time in ns)


def signature(path: Path) -> Signature | None:
    """(size, mtime_ns) of ``path``, or None when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class DeltaWatch:
    """Polls ``folder`` for new delta files and loads them into ``bank`` (module docstring)."""

    def __init__(self, bank: DeltaBank, folder: str | os.PathLike, interval_s: float,
                 refused: Iterable[str] = ()) -> None:
        """``refused``: the names of the folder's files already refused (at startup), not to be logged again."""
        self.bank, self.folder, self.interval_s = bank, deltas_folder(folder), interval_s
        self.pending: dict[Path, Signature] = {}  # new files: their signature at the last poll
        self.refused: dict[Path, Signature] = {}  # refused files: their signature when refused
        for name in refused:
            if (now := signature(self.folder / name)) is not None:
                self.refused[self.folder / name] = now
        self.loaded = {path: signature(path) for path in bank.paths.values()}  # served files as loaded
        self.changed: set[Path] = set()  # served files already logged as removed or replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> tuple[list[str], dict[str, str]]:
        """One look at the folder: (names loaded now, {file name: reason} for files refused now)."""
        added, refused = [], {}
        for path, loaded_as in self.loaded.items():
            now = signature(path)
            if now != loaded_as and path not in self.changed:
                self.changed.add(path)
                what = "removed" if now is None else "replaced"
                log.warning("delta file %s was %s; still serving the delta loaded at startup or at its first "
                            "appearance (restart the server to serve the folder as it is)", path, what)
        try:
            files = delta_files(self.folder)
        except OSError as e:
            log.warning("cannot list the deltas folder %s (%s); trying again in %g s", self.folder, e, self.interval_s)
            return added, refused
        served = set(self.bank.paths.values())
        for path in files:
            if path in served:
                self.loaded.setdefault(path, signature(path))  # loaded by the reload route
                continue
            now = signature(path)
            if now is None or self.refused.get(path) == now:
                continue
            if self.pending.get(path) != now:  # new or still changing: look again at the next poll
                self.pending[path] = now
                continue
            del self.pending[path]
            try:
                fresh = self.bank.add(path.stem, path)
            except WCTError as e:
                self.refused[path] = now
                refused[path.name] = str(e)
                log.warning("refused %s: %s", path.name, e)
                continue
            self.loaded[path] = now
            if fresh:
                added.append(path.stem)
                log.info("loaded delta %s from %s", path.stem, path.name)
        for path in set(self.pending) - set(files):  # gone before it was complete
            del self.pending[path]
        return added, refused

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wct-serve-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # a failed poll never stops serving nor the next poll
                log.exception("polling the deltas folder %s failed", self.folder)
