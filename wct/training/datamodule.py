"""LightningDataModule for instruction tuning: rows → template → label-masked ids → batches.

``task.format=alpaca``: Alpaca rows, prompt masked (:mod:`wct.data.instruct`); ``task.format=chat``: conversations
rendered with a chat template, loss on the assistant turns (:mod:`wct.data.chat`).

The training order is one seeded stream of shuffled passes over the training split, optionally length-grouped,
cut into micro-batches or packed sequences (:mod:`wct.data.batching`). Every iteration of the loader starts at the
micro-batch the run has reached (global step × accumulation), so a resumed run (mid-epoch, or extended after a
shorter one) continues the stream: ``k`` steps + resume gives the same batches, hence the same loss curve, as one
straight run. Each rank takes its slice of every global micro-batch (no DistributedSampler).
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
from torch.utils.data import DataLoader

from wct.data.batching import StreamSampler, collate, collate_packed, padding_fraction
from wct.data.chat import check_conversations, encode_conversations, resolve_template
from wct.data.instruct import encode_rows, load_rows, show_example, split_rows
from wct.config import TaskConfig
from wct.errors import WCTError

FORMATS = ("alpaca", "chat")


class StreamLoader(DataLoader):
    """The training loader. Resumable without a state of its own: its :class:`StreamSampler` starts at the
    micro-batch the restored global step has reached. The (empty) ``state_dict`` / ``load_state_dict`` say so to
    Lightning, which otherwise warns on every mid-epoch resume that the loader "is not resumable"."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def task_rows(task: TaskConfig) -> tuple[list[dict[str, str]], str]:
    """``(rows, origin)`` of ``task.data``: loaded (:func:`wct.data.instruct.load_rows`; chat rows as
    ``{"messages": turns}``), cut to ``max_rows``."""
    d = task.data
    if task.format not in FORMATS:
        raise WCTError(f"task.format={task.format!r} is unknown; use alpaca (instruction rows) or chat (conversations)")
    check = partial(check_conversations, roles=d.roles) if task.format == "chat" else None
    rows, origin = load_rows(d.source, d.path, d.split, d.fields, d.fallback, check)
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
        self.chat_template: str | None = None
        self.lengths: dict[str, int | str] = {}  # what task.too_long did: rows, rows_dropped, ...
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        if tokenizer.pad_token_id is None:  # pad positions are masked (attention 0, label -100): EOS is safe
            tokenizer.pad_token = tokenizer.eos_token

    def load(self) -> None:
        """Load, split and encode the rows (idempotent); prints the first rendered example with its mask."""
        if self.train_set:
            return
        t = self.task
        rows, self.origin = self.rows or task_rows(t)
        if t.format == "chat":
            self.chat_template = resolve_template(self.tokenizer, t.template)
            self.tokenizer.chat_template = self.chat_template  # the sample generations render with it
            encoded, report = encode_conversations(self.tokenizer, self.chat_template, rows, t.max_length,
                                                   t.truncation, self.origin, t.too_long)
        else:  # errors name the row of the source
            encoded, report = encode_rows(self.tokenizer, rows, t.max_length, t.too_long)
        print(report)
        self.lengths = report.record
        self.train_set, self.val_set = split_rows(encoded, t.val_fraction, t.val_size, t.seed)
        print(f"data: {self.origin}: {len(self.train_set)} training / {len(self.val_set)} validation rows")
        print(show_example(self.tokenizer, self.train_set[0]))

    @property
    def record(self) -> dict:
        """What the run's config records about the data: its origin, the rows kept and dropped (``data_rows``) and,
        for chat, the template trained with."""
        return ({"data_origin": self.origin, "data_rows": self.lengths}
                | ({"chat_template": self.chat_template} if self.chat_template else {}))

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

    def sampler(self, world: int = 1, rank: int = 0, position=lambda: 0) -> StreamSampler:
        """The training run's :class:`StreamSampler` (grouping and packing per ``task``)."""
        t = self.task
        acc = self.accumulation(world)
        return StreamSampler(
            len(self.train_set), t.micro_batch_size, self.total_steps() * acc, position, t.seed, rank, world,
            [len(r["input_ids"]) for r in self.train_set], t.group_size if t.group_by_length else 0,
            t.max_length if t.packing else 0,
        )

    def padding_fraction(self, world: int = 1) -> float:
        """The share of padding in the run's training forwards (:func:`wct.data.batching.padding_fraction`)."""
        return padding_fraction(self.sampler(world), [len(r["input_ids"]) for r in self.train_set])

    def train_dataloader(self) -> DataLoader:
        acc, trainer = self.accumulation(), self.trainer
        sampler = self.sampler(self.world, trainer.global_rank if trainer is not None else 0,
                               (lambda: trainer.global_step * acc) if trainer is not None else (lambda: 0))
        pad = self.tokenizer.pad_token_id
        fn = partial(collate_packed, pad_id=pad, capacity=self.task.max_length) if self.task.packing else self._collate
        return StreamLoader(self.train_set, batch_sampler=sampler, collate_fn=fn)

    def val_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        shard = self.val_set[rank :: self.world]
        return DataLoader(shard, batch_size=self.task.micro_batch_size, shuffle=False, collate_fn=self._collate)

    @property
    def _collate(self):
        return partial(collate, pad_id=self.tokenizer.pad_token_id)
