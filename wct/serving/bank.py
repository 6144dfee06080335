"""A bank of weak-column deltas on one packed base, so one batch can mix fine-tunes (docs/serving.md §2).

Every delta of a base (:mod:`wct.delta`) shares the base's packed part deq(W_q) and weak indices ``idx`` and differs
only in the weak columns W_o. With one bank index r[b] per batch row (0: the base's own columns), each OWQLinear
computes

    y[b] = deq(W_q)·x[b] + bias + W_o⁽ʳ⁽ᵇ⁾⁾·x[b][idx]

The layer's own ``weak_weight`` is set to zero, so its ordinary product on any backend (``wct.kernels.owq_linear``)
is the shared part, computed once for the whole batch; a forward hook adds the weak-column product of each row with
its own delta's columns, gathered per row. A delta costs its own columns: one buffer its file's tensors are read
into, nothing mapped from the file and no tensor object per layer; nothing of the base is copied. The model's
packed tensors are untouched, so its :func:`packed_fingerprint` is the same before and after :class:`DeltaBank`
takes the weak columns over.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from wct.delta import (
    WEAK,
    check_fits,
    owq_layers,
    packed_fingerprint,
    read_delta_header,
)
from wct.errors import WCTError
from wct.format.shards import SAFETENSORS_DTYPES


def deltas_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path once it is known to be a folder (WCTError otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WCTError(f"deltas={folder} is not a folder; pass the folder holding the *.safetensors deltas "
                       "written by python -m wct.export format=delta")
    return folder


def delta_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of ``folder``, sorted, without hidden ones (a temp file being written)."""
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))


ALIGN = 16  # bytes: where each layer's columns start in a delta's buffer


class DeltaBank:
    """The base's weak columns (index 0) and each loaded delta's (index 1, 2, ...) for every layer with weak
    columns of ``model``, and the per-row bank indices of the batch being computed (:meth:`use`).

    Each entry is one byte buffer holding every layer's columns at the offsets of ``layout`` (the same for every
    entry): a delta's file is read straight into its buffer (no intermediate tensors, nothing mapped from the file),
    so a delta costs its columns' bytes plus a few bytes of padding and its name."""

    def __init__(self, model: nn.Module, base_name: str) -> None:
        self.model = model
        self.fingerprint = packed_fingerprint(model)
        self.layers = {n: m for n, m in owq_layers(model).items() if m.n_weak}
        self.names = [base_name]
        self.paths: dict[str, Path] = {}
        self.layout: dict[str, tuple[int, torch.dtype, torch.Size]] = {}  # layer -> (byte offset, dtype, shape)
        size = 0
        for name, layer in self.layers.items():
            w = layer.weak_weight
            self.layout[name] = (size, w.dtype, w.shape)
            size += -(-w.numel() * w.element_size() // ALIGN) * ALIGN
        self.nbytes = size
        self.device = next(iter(self.layers.values())).scales.device if self.layers else torch.device("cpu")
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=self.device)]
        for name, layer in self.layers.items():
            self.column(0, name).copy_(layer.weak_weight.detach())
            layer.weak_weight = nn.Parameter(torch.zeros_like(layer.weak_weight), requires_grad=False)
            layer.register_forward_hook(self._hook(name))
        self.delta_bytes = 0
        self.rows: torch.Tensor | None = None
        self.single: int | None = 0  # the one bank index of every row, or None for a mixed batch
        self._gathered: dict[str, torch.Tensor] = {}  # layer -> the columns it multiplies by in this batch
        self._gathered_rows: list[int] | None = None  # the rows they were gathered for
        self._lock = threading.Lock()

    def index(self, name: str) -> int | None:
        """The bank index of model id ``name`` (0 for the base), or None."""
        return self.names.index(name) if name in self.names else None

    def column(self, entry: int, layer: str) -> torch.Tensor:
        """W_o [n_o, N] of bank entry ``entry`` for ``layer``: a view into the entry's buffer."""
        offset, dtype, shape = self.layout[layer]
        nbytes = shape.numel() * dtype.itemsize
        return self.buffers[entry][offset:offset + nbytes].view(dtype).view(shape)

    @contextlib.contextmanager
    def use(self, rows: list[int]) -> Iterator[None]:
        """Run the model with batch row b on bank entry ``rows[b]``. The columns each layer multiplies by are built
        (gathered per row, in the activations' dtype) on the first forward with these rows and reused by the next
        forwards with the same rows (the decoding steps of a batch no row joined or left) until :meth:`release`."""
        if rows != self._gathered_rows:
            self._gathered.clear()
            self._gathered_rows = list(rows)
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.single = rows[0] if len(set(rows)) == 1 else None
        try:
            yield
        finally:
            self.rows, self.single = None, 0

    def release(self) -> None:
        """Drop the gathered columns (the batch ended)."""
        self._gathered.clear()
        self._gathered_rows = None

    def _hook(self, name: str):
        def add_weak(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            x_o = x[..., layer.weak_idx.long()]
            w = self._gathered.get(name) if self.rows is not None else None
            if w is None or w.dtype != x.dtype:
                w = self._gather(name, x.dtype, x.device)
                if self.rows is not None:
                    self._gathered[name] = w
            if w.dim() == 2:  # one delta for the whole batch: one product
                return out + x_o @ w
            if x.shape[0] != w.shape[0]:
                raise RuntimeError(f"{name}: a batch of {x.shape[0]} rows got {w.shape[0]} delta indices")
            y = torch.bmm(x_o.reshape(x.shape[0], -1, x_o.shape[-1]), w)
            return out + y.reshape(out.shape)

        return add_weak

    def _gather(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """W_o [n_o, N] when every row uses one bank entry, else the per-row stack [B, n_o, N]."""
        if self.single is not None:
            return self.column(self.single, name).to(dtype)
        used, inverse = torch.unique(self.rows, return_inverse=True)
        return torch.stack([self.column(i, name) for i in used.tolist()]).to(dtype)[inverse.to(device)]

    def add(self, name: str, path: str | os.PathLike) -> bool:
        """Load the delta file at ``path`` as model id ``name``; False when that file is loaded already (by the
        reload route and the watched folder at once, say). Refused (WCTError naming the file and the reason, the
        bank unchanged) when the name is taken, the file is not a wct delta, it was exported for another base, its
        tensors do not fit this base, or it also trained norms or the output head (those are not per-row: serve its
        merged export instead)."""
        path = Path(path)
        with self._lock:
            if path in self.paths.values():
                return False
            if name in self.names:
                raise WCTError(f"delta {path}: the model id {name!r} is already served; rename the file")
            entries, meta, start = read_delta_header(path)
            if meta.get("base_fingerprint") != self.fingerprint:
                raise WCTError(f"delta {path} was exported for another base (base {meta.get('base')!r}, fingerprint "
                               f"{str(meta.get('base_fingerprint'))[:12]} vs the served base's {self.fingerprint[:12]})")
            shapes = {n: torch.empty(e.get("shape", []), device="meta") for n, e in entries.items()}
            check_fits(self.model, shapes, path)
            other = sorted(n for n in entries if not n.endswith(WEAK))
            if other:
                raise WCTError(f"delta {path} also trained {other[:3]} (norms / output head), which cannot differ per "
                               "request in a shared batch; serve its merged export (python -m wct.export) instead")
            self.buffers.append(self._read(path, entries, start))
            self.delta_bytes += self.nbytes
            self.paths[name] = path
            self.names.append(name)  # last: a request can name the delta only once every layer holds it
            return True

    def _read(self, path: Path, entries: dict[str, dict], start: int) -> torch.Tensor:
        """A new buffer holding the weak columns of the delta at ``path``, read from the file into it in place."""
        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as fh:
            for layer, (offset, dtype, shape) in self.layout.items():
                entry = entries[f"{layer}{WEAK}"]
                if SAFETENSORS_DTYPES.get(entry.get("dtype")) != dtype:
                    raise WCTError(f"delta {path}: {layer}{WEAK} is stored as {entry.get('dtype')}, the base's as "
                                   f"{dtype}; export the delta again from this base")
                begin, end = entry["data_offsets"]
                if end - begin != shape.numel() * dtype.itemsize:
                    raise WCTError(f"delta {path} is corrupt ({layer}{WEAK} holds {end - begin} bytes for shape "
                                   f"{tuple(shape)}); export it again")
                fh.seek(start + begin)
                if fh.readinto(memoryview(buffer[offset:offset + end - begin].numpy())) != end - begin:
                    raise WCTError(f"delta {path} is truncated or corrupt (it ends inside {layer}{WEAK}); export it "
                                   "again")
        return buffer.to(self.device)

    def scan(self, folder: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
        """Load every ``*.safetensors`` in ``folder`` not loaded yet (model id: the file's stem); returns (added
        names, {file name: why it was refused})."""
        folder = deltas_folder(folder)
        added, refused = [], {}
        loaded = set(self.paths.values())
        for path in delta_files(folder):
            if path in loaded:
                continue
            try:
                if self.add(path.stem, path):
                    added.append(path.stem)
            except WCTError as e:
                refused[path.name] = str(e)
        return added, refused
