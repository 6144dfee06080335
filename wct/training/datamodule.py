"""LightningDataModule for instruction tuning: rows → Alpaca template → prompt-masked ids → right-padded batches.

The training order is one seeded stream of shuffled passes over the training split, cut into micro-batches. Every
iteration of the loader starts at the micro-batch the run has reached (global step × accumulation), so a resumed
run (mid-epoch, or extended after a shorter one) continues the stream: ``k`` steps + resume gives the same
batches, hence the same loss curve, as one straight run. Each rank takes its slice of
every global micro-batch (no DistributedSampler).
"""

from __future__ import annotations

import math
import random
from functools import partial
from typing import Callable, Iterator

import lightning as L
from torch.utils.data import DataLoader, Sampler

from wct.data.instruct import collate, encode_rows, load_rows, show_example, split_rows
from wct.errors import WCTError
from wct.config import TaskConfig


class StreamSampler(Sampler[list[int]]):
    """Micro-batches ``position() .. total-1`` of the stream (module docstring) for ``rank`` of ``world``. Its
    length is ``total`` even when resumed, so Lightning's restored batch counters (counted from the run's start)
    line up."""

    def __init__(self, n: int, micro: int, total: int, position: Callable[[], int] = lambda: 0, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.micro, self.total, self.position = n, micro, total, position
        self.seed, self.rank, self.world = seed, rank, world

    def _stream(self) -> Iterator[int]:
        epoch = 0
        while True:
            order = list(range(self.n))
            random.Random(self.seed + epoch).shuffle(order)
            yield from order
            epoch += 1

    def __iter__(self) -> Iterator[list[int]]:
        stream, width, start = self._stream(), self.micro * self.world, self.position()
        for _ in range(start * width):
            next(stream)
        for _ in range(start, self.total):
            batch = [next(stream) for _ in range(width)]
            yield batch[self.rank * self.micro : (self.rank + 1) * self.micro]

    def __len__(self) -> int:
        return self.total


def task_rows(task: TaskConfig) -> tuple[list[dict[str, str]], str]:
    """``(rows, origin)`` of ``task.data``: loaded (:func:`wct.data.instruct.load_rows`), cut to ``max_rows``."""
    d = task.data
    rows, origin = load_rows(d.source, d.path, d.split, d.fields, d.fallback)
    return (rows[: d.max_rows] if d.max_rows else rows), origin


class InstructDataModule(L.LightningDataModule):
    """Rows of ``task.data`` (or the ``(rows, origin)`` of :func:`task_rows` when the caller already loaded them)
    split into train / val, encoded once in :meth:`setup`."""

    def __init__(self, task: TaskConfig, tokenizer, max_steps: int | None = None, max_epochs: float | None = None,
                 rows: tuple[list[dict[str, str]], str] | None = None):
        super().__init__()
        self.task, self.tokenizer, self.rows = task, tokenizer, rows
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.origin = ""
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        if tokenizer.pad_token_id is None:  # pad positions are masked (attention 0, label -100): EOS is safe
            tokenizer.pad_token = tokenizer.eos_token

    def load(self) -> None:
        """Load, split and encode the rows (idempotent); prints the first rendered example with its mask."""
        if self.train_set:
            return
        rows, self.origin = self.rows or task_rows(self.task)
        encoded = encode_rows(self.tokenizer, rows, self.task.max_length)  # errors name the row of the source
        self.train_set, self.val_set = split_rows(encoded, self.task.val_fraction, self.task.val_size, self.task.seed)
        print(f"data: {self.origin}: {len(self.train_set)} training / {len(self.val_set)} validation rows")
        print(show_example(self.tokenizer, self.train_set[0]))

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def world(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def accumulation(self, world: int | None = None) -> int:
        """Micro-batches per optimizer step on each device: global / (micro × devices), which must divide."""
        t, world = self.task, world or self.world
        if t.global_batch_size % (t.micro_batch_size * world):
            raise WCTError(
                f"task.global_batch_size={t.global_batch_size} is not a multiple of task.micro_batch_size="
                f"{t.micro_batch_size} x {world} device(s); choose sizes whose product divides the global batch"
            )
        return t.global_batch_size // (t.micro_batch_size * world)

    def total_steps(self) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``max_epochs`` passes over the training split."""
        if self.max_epochs:
            return max(1, math.ceil(self.max_epochs * len(self.train_set) / self.task.global_batch_size))
        if not self.max_steps or self.max_steps < 1:
            raise WCTError("set trainer.max_steps (>= 1) or trainer.max_epochs")
        return self.max_steps

    def train_dataloader(self) -> DataLoader:
        acc, trainer = self.accumulation(), self.trainer
        sampler = StreamSampler(
            len(self.train_set), self.task.micro_batch_size, self.total_steps() * acc,
            (lambda: trainer.global_step * acc) if trainer is not None else (lambda: 0), self.task.seed,
            trainer.global_rank if trainer is not None else 0, self.world,
        )
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        shard = self.val_set[rank :: self.world]
        return DataLoader(shard, batch_size=self.task.micro_batch_size, shuffle=False, collate_fn=self._collate)

    @property
    def _collate(self):
        return partial(collate, pad_id=self.tokenizer.pad_token_id)
