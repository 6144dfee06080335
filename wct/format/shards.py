"""Sharded safetensors folders as transformers writes them: ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json`` ({"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}), or a single
``model.safetensors``. Read lazily tensor by tensor (:class:`ShardReader`), written shard by shard
(:class:`ShardWriter`, tensor by tensor to disk) so that neither needs the whole model in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from wct.errors import WCTError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def weight_map(folder: Path) -> dict[str, Path]:
    """{tensor name: file} of ``folder``: its index when there is one, else its single ``model.safetensors``.
    Checked from the files' headers alone: every shard the index names exists and holds the tensors listed for it."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            names = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WCTError(f"{folder / INDEX} is not a safetensors index ({type(e).__name__}: {e}); re-create it"
                           ) from None
        files = {f: folder / f for f in sorted(set(names.values()))}
    elif (folder / SINGLE).is_file():
        names, files = None, {SINGLE: folder / SINGLE}
    else:
        raise WCTError(f"{folder / SINGLE} is missing and there is no {INDEX}: the folder holds no safetensors "
                       "weights; copy the whole checkpoint folder (.bin / GGUF models: convert them with "
                       "save_pretrained(safe_serialization=True) first)")
    out: dict[str, Path] = {}
    for fname, path in files.items():
        if not path.is_file():
            wanted = [n for n, f in names.items() if f == fname]
            raise WCTError(f"{path} is missing: {folder / INDEX} lists {len(wanted)} tensors in it (e.g. {wanted[0]}); "
                           "copy the whole checkpoint folder")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
        except (SafetensorError, OSError) as e:
            raise WCTError(f"{path} is corrupt: not a readable safetensors file ({e}); re-create the checkpoint") from None
        if names is None:
            out.update(dict.fromkeys(keys, path))
            continue
        absent = sorted(n for n, f in names.items() if f == fname and n not in keys)
        if absent:
            raise WCTError(f"{folder / INDEX} places {len(absent)} tensor(s) in {fname} that it does not hold "
                           f"(e.g. {absent[0]}); the index belongs to other shards, re-create the checkpoint")
        out.update({n: path for n, f in names.items() if f == fname})
    return out


def weights_present(folder: Path) -> bool:
    """Whether ``folder`` has weights: a single ``model.safetensors`` or a shard index."""
    return (Path(folder) / SINGLE).is_file() or (Path(folder) / INDEX).is_file()


def payload_bytes(folder: Path) -> int:
    """Bytes of tensor data in the folder's weights, one file or shards alike: each safetensors file is an 8-byte
    header length N, N bytes of JSON header, then the tensors back to back."""
    total = 0
    for path in set(weight_map(folder).values()):
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        total += path.stat().st_size - 8 - header
    return total


def weights_bytes(folder: Path) -> int:
    """Size on disk of the folder's weights files."""
    return sum(p.stat().st_size for p in set(weight_map(folder).values()))


DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
SAFETENSORS_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}  # safetensors' dtype names -> torch
_CHUNK = 16 * 2**20  # bytes copied or read back at a time


def safetensors_header(path: Path) -> tuple[int, dict] | None:
    """(data start, JSON header with its ``__metadata__``) of the safetensors file at ``path``, from its first
    8 + N bytes (N: the little-endian length the first 8 hold); None when those bytes are not a header."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= path.stat().st_size - 8 else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return (8 + n, header) if isinstance(header, dict) else None


class MappedTensor:
    """A tensor read straight from a file: ``tensor`` is a view of a read-only map of its bytes, so its pages come
    in as they are read, and :meth:`release` hands them back (they stay in the page cache, and the next read maps
    them again). A weight that waits between uses then holds no resident memory (docs/scale.md). Writing into
    ``tensor`` is a fault: only copies of it may be written."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: list[int]):
        numel = math.prod(shape)
        first = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY  # maps start on a page boundary
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), offset - first + numel * dtype.itemsize, offset=first,
                                  access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # torch warns that the buffer is not writable: nothing writes into it
            warnings.simplefilter("ignore", UserWarning)
            self.tensor = torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset - first).view(shape)

    def release(self) -> None:
        """Unmap the pages read so far (a no-op where the platform has no madvise)."""
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


class ShardReader:
    """Reads single tensors of a (sharded) safetensors folder on demand. Each read opens its shard anew: a shard
    left open stays memory-mapped, and the pages read through the map count in the resident size until it closes
    (a whole model's worth by the last block). :meth:`mapped` reads one without a copy, its pages handed back
    on request."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.map = weight_map(self.folder)
        self._headers: dict[Path, tuple[int, dict]] = {}  # file -> (offset of its data, its JSON header)

    def __contains__(self, name: str) -> bool:
        return name in self.map

    def _path(self, name: str) -> Path:
        path = self.map.get(name)
        if path is None:
            raise WCTError(f"{self.folder} has no tensor {name}; the checkpoint does not match its config.json")
        return path

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._path(name)), framework="pt") as f:
            return f.get_tensor(name)

    def mapped(self, name: str) -> MappedTensor | None:
        """``name`` as a :class:`MappedTensor` over its shard's bytes, or None for a dtype wct does not map (or an
        empty tensor): read it with :meth:`get` then."""
        path = self._path(name)
        if path not in self._headers:
            self._headers[path] = safetensors_header(path)
            if self._headers[path] is None:
                raise WCTError(f"{path} is corrupt: it has no safetensors header; re-create the checkpoint")
        start, header = self._headers[path]
        info = header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        numel = math.prod(info["shape"])
        if dtype is None or numel == 0:
            return None
        a, b = info["data_offsets"]
        if b - a != numel * dtype.itemsize or start + b > path.stat().st_size:
            raise WCTError(f"{path} is corrupt: tensor {name} does not fit its header; re-create the checkpoint")
        return MappedTensor(path, start + a, dtype, info["shape"])

    def load_all(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.map}


def _raw(t: torch.Tensor):
    """The bytes of the contiguous CPU tensor ``t`` as a numpy uint8 view (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own)
    inside ``folder`` (a temporary folder that the caller renames into place), holding none of them in memory: each
    tensor's bytes go to the current shard's data file as it is added; :meth:`flush` writes the shard (8-byte
    header length, JSON header, the data copied in chunks; the safetensors layout), checks that safetensors reads
    its header back and that every tensor's bytes on disk hash as written. :meth:`close` gives the shards their
    final names and writes the index (one shard: plain ``model.safetensors``, no index)."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict[str, str] | None = None):
        self.folder, self.max_bytes, self.metadata = Path(folder), max_bytes, metadata or {"format": "pt"}
        self._data = None  # the current shard's data file, open for appending
        self._header: dict[str, dict] = {}
        self._digests: dict[str, bytes] = {}
        self._offset = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def _path(self, suffix: str) -> Path:
        return self.folder / f".shard-{len(self._written):05d}.{suffix}"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise WCTError(f"tensor {name} has dtype {t.dtype}, which wct does not write to safetensors")
        size = t.numel() * t.element_size()
        if self._header and self._offset + size > self.max_bytes:
            self.flush()
        if self._data is None:
            self._data = open(self._path("data"), "wb")
        raw = _raw(t)
        self._data.write(raw.data)
        self._header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + size]}
        self._digests[name] = hashlib.blake2b(raw.data).digest()
        self._offset += size
        self.total += size

    def flush(self) -> None:
        if self._data is None:
            return
        self._data.close()
        data, path = self._path("data"), self._path("safetensors")
        header = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(path, "wb") as out, open(data, "rb") as src:
            out.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(src, out, _CHUNK)
        data.unlink()
        self._verify(path, 8 + len(header))
        self._written.append((path, list(self._header)))
        self._data, self._header, self._digests, self._offset = None, {}, {}, 0

    def _verify(self, path: Path, start: int) -> None:
        """safetensors parses the shard's header into the tensors written, and each tensor's bytes hash as written."""
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(self._header):
                raise OSError(f"{path}: safetensors reads other tensor names back than were written")
        with open(path, "rb") as f:
            for name, info in self._header.items():
                a, b = info["data_offsets"]
                f.seek(start + a)
                h = hashlib.blake2b()
                while a < b:
                    chunk = f.read(min(_CHUNK, b - a))
                    if not chunk:
                        break
                    h.update(chunk)
                    a += len(chunk)
                if h.digest() != self._digests[name]:
                    raise OSError(f"{path}: tensor {name} reads back different from what was written")

    def close(self) -> list[Path]:
        self.flush()
        n = len(self._written)
        if n == 1:
            final = self.folder / SINGLE
            self._written[0][0].rename(final)
            return [final]
        files, names = [], {}
        for i, (path, tensors) in enumerate(self._written, start=1):
            final = self.folder / shard_name(i, n)
            path.rename(final)
            files.append(final)
            names.update(dict.fromkeys(tensors, final.name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(names.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
