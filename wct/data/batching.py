"""Training batches: the seeded stream of rows, length grouping, packing, collation and padding statistics.

The stream is one seeded shuffle of the training rows per epoch (``random.Random(seed + epoch)``), epochs one after
the other. With length grouping each epoch's order is cut into chunks of ``chunk`` rows (``group_size`` global
micro-batches) and each chunk is sorted by length, longest first (stable), as transformers' ``group_by_length``
does: an epoch is still a permutation of the rows, the order still depends on the seed only, and micro-batches
hold rows of similar length, so little of each forward is padding.

Micro-batches are consecutive slices of the stream (``micro`` rows per rank, ``world`` ranks), or, with packing,
``micro`` sequences per rank filled next-fit with consecutive rows up to ``capacity`` tokens. Either way batch
``k`` is a function of ``k``, the seed and the lengths: a resumed run recomputes the stream up to its position and
continues on the same curve.

Packed sequences carry ``position_ids`` restarting at 0 for every row and no ``attention_mask``: transformers (when
the forward runs without a KV cache, ``use_cache=False``, as training does)
(``masking_utils.find_packed_sequence_indices``) then builds a causal mask that is block-diagonal per row for the
eager and SDPA attentions (flash-attention uses the same position ids), so each row attends to itself only. The
first token of every row is never a label (nothing before it in the row predicts it), so a row's loss terms are
those it has unpacked.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from wct.data.instruct import IGNORE_INDEX

MODEL_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


def epoch_order(n: int, seed: int, epoch: int, lengths: Sequence[int] | None = None, chunk: int = 0) -> list[int]:
    """The rows of one epoch: a seeded shuffle, then (``lengths`` and ``chunk`` > 0) each ``chunk`` of it sorted by
    length, longest first."""
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    if lengths is None or chunk <= 0:
        return order
    return [i for c in range(0, n, chunk) for i in sorted(order[c : c + chunk], key=lambda i: -lengths[i])]


def stream(n: int, seed: int, lengths: Sequence[int] | None = None, chunk: int = 0) -> Iterator[int]:
    """Epoch after epoch of :func:`epoch_order`."""
    epoch = 0
    while True:
        yield from epoch_order(n, seed, epoch, lengths, chunk)
        epoch += 1


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Next-fit packing: positions of ``lengths`` in order, a new sequence whenever the next row does not fit."""
    seqs: list[list[int]] = []
    used = capacity + 1
    for i, n in enumerate(lengths):
        if used + n > capacity:
            seqs.append([])
            used = 0
        seqs[-1].append(i)
        used += n
    return seqs


class StreamSampler(Sampler[list[int]]):
    """Micro-batches ``position() .. total-1`` of the stream (module docstring) for ``rank`` of ``world``. Its
    length is ``total`` even when resumed, so Lightning's restored batch counters (counted from the run's start)
    line up. ``lengths``: row lengths (needed for grouping and packing); ``group``: micro-batches per sorted chunk
    (0: no grouping); ``capacity``: tokens per packed sequence (0: no packing; a batch then lists the rows of its
    ``micro`` sequences in order, and :func:`collate_packed` packs them the same way)."""

    def __init__(self, n: int, micro: int, total: int, position: Callable[[], int] = lambda: 0, seed: int = 0,
                 rank: int = 0, world: int = 1, lengths: Sequence[int] | None = None, group: int = 0,
                 capacity: int = 0):
        self.n, self.micro, self.total, self.position = n, micro, total, position
        self.seed, self.rank, self.world = seed, rank, world
        self.lengths, self.group, self.capacity = lengths, group, capacity

    def global_batches(self) -> Iterator[list[list[int]]]:
        """Every global micro-batch from the start: one list of rows per rank."""
        chunk = self.group * self.micro * self.world
        rows = stream(self.n, self.seed, self.lengths, chunk)
        if not self.capacity:
            while True:
                flat = [next(rows) for _ in range(self.micro * self.world)]
                yield [flat[r * self.micro : (r + 1) * self.micro] for r in range(self.world)]
        pending = next(rows)
        while True:
            ranks = []
            for _ in range(self.world):
                batch, seqs, used = [], 0, self.capacity + 1
                while True:
                    n = self.lengths[pending]
                    if used + n > self.capacity:
                        if seqs == self.micro:
                            break
                        seqs, used = seqs + 1, 0
                    batch.append(pending)
                    used += n
                    pending = next(rows)
                ranks.append(batch)
            yield ranks

    def __iter__(self) -> Iterator[list[int]]:
        batches, start = self.global_batches(), self.position()
        for k in range(self.total):
            ranks = next(batches)
            if k >= start:
                yield ranks[self.rank]

    def __len__(self) -> int:
        return self.total


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids`` with ``pad_id``, ``labels`` with -100, ``attention_mask``."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(batch: list[dict[str, list[int]]], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Rows packed next-fit into sequences of at most ``capacity`` tokens (module docstring), right-padded to the
    longest; ``position_ids`` restart per row (the padding is a segment of its own), no ``attention_mask``;
    ``tokens``: the count of real (non-padding) tokens."""
    seqs = [[batch[i] for i in seq] for seq in pack([len(b["input_ids"]) for b in batch], capacity)]
    width = max(sum(len(r["input_ids"]) for r in seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(seqs), width), dtype=torch.long)
    for s, seq in enumerate(seqs):
        at = 0
        for r in seq:
            n = len(r["input_ids"])
            ids[s, at : at + n] = torch.tensor(r["input_ids"])
            labels[s, at + 1 : at + n] = torch.tensor(r["labels"][1:])
            positions[s, at : at + n] = torch.arange(n)
            at += n
        positions[s, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "tokens": torch.tensor(sum(len(b["input_ids"]) for b in batch))}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch from :func:`collate` or :func:`collate_packed`."""
    return int(batch["tokens"]) if "tokens" in batch else int(batch["attention_mask"].sum())


def padding_fraction(sampler: StreamSampler, lengths: Sequence[int]) -> float:
    """The share of padding in the forwards of ``sampler``'s whole run (all ranks): 1 - tokens / positions,
    positions = sequences × the longest sequence of each micro-batch (packed: of each packed micro-batch)."""
    tokens = positions = 0
    batches = sampler.global_batches()
    for _ in range(sampler.total):
        for rows in next(batches):
            sizes = [lengths[i] for i in rows]
            if sampler.capacity:
                seqs = [sum(sizes[i] for i in seq) for seq in pack(sizes, sampler.capacity)]
            else:
                seqs = sizes
            tokens += sum(seqs)
            positions += len(seqs) * max(seqs)
    return 1 - tokens / positions
