"""Sharded safetensors folders as transformers writes them: ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json`` ({"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}), or a single
``model.safetensors``. Read lazily tensor by tensor (:class:`ShardReader`), written shard by shard
(:class:`ShardWriter`) so that neither needs the whole model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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


class ShardReader:
    """Reads single tensors of a (sharded) safetensors folder on demand. Each read opens its shard anew: a shard
    left open stays memory-mapped, and the pages read through the map count in the resident size until it closes
    (a whole model's worth by the last block)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.map = weight_map(self.folder)

    def __contains__(self, name: str) -> bool:
        return name in self.map

    def get(self, name: str) -> torch.Tensor:
        path = self.map.get(name)
        if path is None:
            raise WCTError(f"{self.folder} has no tensor {name}; the checkpoint does not match its config.json")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def load_all(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.map}


class ShardWriter:
    """Writes tensors into shards of at most ``max_bytes`` (a bigger tensor gets a shard of its own) inside
    ``folder`` (a temporary folder that the caller renames into place). Each shard is read back and compared before
    its tensors are dropped; :meth:`close` gives the shards their final names and writes the index (one shard:
    plain ``model.safetensors``, no index)."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict[str, str] | None = None):
        self.folder, self.max_bytes, self.metadata = Path(folder), max_bytes, metadata or {"format": "pt"}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + size > self.max_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().cpu().contiguous()
        self._buffered += size
        self.total += size

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._buffer, str(path), metadata=self.metadata)
        with safe_open(str(path), framework="pt") as f:
            for name, t in self._buffer.items():
                if not torch.equal(f.get_tensor(name), t):
                    raise OSError(f"{path}: tensor {name} reads back different from what was written")
        self._written.append((path, list(self._buffer)))
        self._buffer, self._buffered = {}, 0

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
