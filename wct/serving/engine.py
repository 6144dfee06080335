"""The batching engine: a bounded queue of generation jobs and one worker thread decoding them in a continuous batch.

With nothing running, the oldest job and the jobs with its sampling settings that arrive within ``max_wait_s`` (at
most ``max_batch``) start a batch: their prompts in one left-padded forward. At every decoding step boundary queued
jobs with the batch's settings join it (their prompts computed, their KV caches left-padded and stacked with the
batch's), and finished rows leave, so a request never waits for a whole batch to end (docs/serving.md §3). Rows
use any delta (:class:`DeltaBank`). Every row stops on its own (EOS unless ``ignore_eos``, its ``max_tokens``, one
of its stop strings once it has ``min_tokens``, or its client gone; EOS is masked per row until ``min_tokens``);
the worker hands each row's text to its job as it grows, so streaming and non-streaming requests read the same
text. Greedy rows batch with any greedy row; sampling rows with the same temperature and top_p; a row with a
``seed`` runs alone, so the same seed gives the same text whatever else is being served.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from wct.nn.modes import eval_mode
from wct.serving.bank import DeltaBank

log = logging.getLogger("wct.serving")

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes a partial UTF-8 character to


class Busy(Exception):
    """The queue is full (``status`` 429) or the server is draining (503); retry after ``retry_after`` seconds."""

    def __init__(self, message: str, status: int, retry_after: int) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class Job:
    """One request: prompt token ids, bank row, limits and sampling. The worker fills ``tokens``/``text`` and sends
    ``("text", chunk)`` then ``("done", finish_reason)`` (or ``("error", message)``) to ``events``."""

    ids: list[int]
    row: int
    max_tokens: int
    stop: list[str]
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: EOS is an ordinary token (kept, counted), the row runs on
    min_tokens: int = 0  # vLLM's extension: EOS masked and stop strings unchecked before this many tokens
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    started: float = 0.0  # when its prompt was computed (perf_counter)
    floor: int = 0  # where stop strings may start: the text's length while the row had fewer than min_tokens
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> Any:
        """Jobs with equal keys may share a batch."""
        if self.temperature == 0:
            return ("greedy",)
        return ("seed", id(self)) if self.seed is not None else ("sample", self.temperature, self.top_p)

    def emit(self, *event: Any) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def grow(self, token: int, tokenizer, eos: set[int]) -> bool:
        """Take the row's next token; True once the row is finished (EOS unless ignore_eos, a stop string once the
        row has min_tokens, max_tokens, cancelled). Text is sent only as far as it can no longer change: a trailing
        partial character or a possible start of a stop string waits for the next token. A stop string counts
        from the text of the first min_tokens tokens on (less its own length - 1, as vLLM checks the new text)."""
        if self.cancelled.is_set():
            self.finish_reason = "cancelled"
            return True
        if token in eos and not self.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            if len(self.tokens) < self.min_tokens:
                self.floor = len(self.text)
                hits = []
            else:
                hits = [i for i in (self.text.find(s, max(0, self.floor - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.finish_reason = self.text[:min(hits)], "stop"
            elif len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is None:
            stable = len(self.text.rstrip(REPLACEMENT)) - max((len(s) - 1 for s in self.stop), default=0)
        else:
            stable = len(self.text)
        if stable > self.sent:
            self.emit("text", self.text[self.sent:stable])
            self.sent = stable
        if self.finish_reason is not None:
            self.emit("done", self.finish_reason)
        return self.finish_reason is not None


@dataclass
class _Running:
    """The rows decoding now: their jobs, KV cache, attention mask [B, L] (0: left padding) and the token each row
    feeds next [B]."""

    jobs: list[Job]
    cache: DynamicCache
    mask: torch.Tensor
    last: torch.Tensor

    @property
    def key(self) -> Any:
        return self.jobs[0].key

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k, v) for k, v, *_ in self.cache]

    def padded(self, width: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """(keys and values per layer, mask), left-padded with masked zeros to ``width`` positions."""
        n = width - self.mask.shape[1]
        pad = (lambda t: torch.nn.functional.pad(t, (0, 0, n, 0))) if n else (lambda t: t)
        return [(pad(k), pad(v)) for k, v in self.layers()], torch.nn.functional.pad(self.mask, (n, 0))

    def select(self, rows: list[int]) -> _Running:
        """The rows ``rows`` only, without the leading positions none of them attends (padding of rows gone)."""
        mask = self.mask[rows]
        start = int(mask.any(0).long().argmax())
        cache = DynamicCache([(k[rows, :, start:], v[rows, :, start:]) for k, v in self.layers()])
        return _Running([self.jobs[b] for b in rows], cache, mask[:, start:], self.last[rows])


@dataclass
class Stats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    mixed_batches: int = 0  # batches (started, or grown by a join) whose rows used more than one bank entry
    joined: int = 0  # requests that joined a batch already decoding
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0
    tokens: int = 0


class Engine:
    """Bounded job queue + one worker thread decoding the jobs in a continuous batch on ``model`` (module docstring)."""

    def __init__(self, model, tokenizer, bank: DeltaBank, max_batch: int = 8, max_wait_s: float = 0.01,
                 max_queue: int = 64) -> None:
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.device = next(model.parameters()).device
        # the KV cache's keyword: ``cache`` in transformers 5, ``past_key_values`` in 4.x, where an unknown keyword
        # would be swallowed by **kwargs and every step would run without its past
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.stats = Stats()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running = False
        self._draining = False
        self._batch_seconds = 1.0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._work, name="wct-serve-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Refuse new jobs (503); the queued and running ones finish."""
        self._draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then end the worker."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ jobs

    def submit(self, job: Job) -> Job:
        """Queue ``job``; :class:`Busy` when the queue is full or the server is draining."""
        retry = max(1, round(self._batch_seconds))
        with self._cond:
            if self._draining or not self._running:
                self.stats.rejected += 1
                raise Busy("the server is shutting down; retry on another replica or after it restarts", 503, retry)
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise Busy(f"the server is at capacity ({self.max_queue} requests waiting, max_queue); retry after "
                           f"{retry} s", 429, retry)
            self._queue.append(job)
            self.stats.requests += 1
            self._cond.notify_all()
        return job

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and, within ``max_wait_s`` of taking it, every queued job with its key (≤ max_batch)."""
        with self._cond:
            while not self._queue:
                if not self._running:
                    return None
                self._cond.wait(0.5)
            first = self._queue.popleft()
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                for job in [j for j in self._queue if j.key == first.key][: self.max_batch - len(batch)]:
                    self._queue.remove(job)
                    batch.append(job)
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _joiners(self, running: _Running) -> list[Job]:
        """Queued jobs that may join ``running`` at this step boundary: its key, while room is left, and only while
        the oldest queued job has that key (a job of another key waits for the running batch to end, not longer)."""
        with self._cond:
            room = self.max_batch - len(running.jobs)
            if room <= 0 or not self._queue or self._queue[0].key != running.key:
                return []
            jobs = [j for j in self._queue if j.key == running.key][:room]
            for job in jobs:
                self._queue.remove(job)
            return jobs

    def _live(self, jobs: list[Job]) -> list[Job]:
        """``jobs`` less those whose client already left."""
        self.stats.cancelled += sum(j.cancelled.is_set() for j in jobs)
        return [j for j in jobs if not j.cancelled.is_set()]

    def _work(self) -> None:
        running: _Running | None = None
        while True:
            taken: list[Job] = []
            try:
                if running is None:
                    batch = self._next_batch()
                    if batch is None:
                        return
                    taken = self._live(batch)
                    if taken:
                        self.stats.batches += 1
                        self._count(taken)
                        running = self._prefill(taken)
                else:
                    taken = self._live(self._joiners(running))
                    if taken:
                        self.stats.joined += len(taken)
                        running = self._merge(running, self._prefill(taken))
                if running is not None:
                    running = self._step(running)
                if running is None:
                    self.bank.release()
            except Exception as e:  # a failed batch fails its requests, never the server
                jobs = taken + (running.jobs if running is not None else [])
                log.exception("a batch of %d rows failed", len(jobs))
                self.stats.errors += 1
                for job in jobs:
                    if job.finish_reason is None:
                        job.finish_reason = "error"
                        job.emit("error", f"generation failed: {type(e).__name__}: {e}")
                running = None
                self.bank.release()

    @torch.no_grad()
    def _forward(self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """The last position's logits [B, V] of ``ids`` [B, T] after ``cache``, row b on bank entry ``jobs[b].row``;
        positions count the attended tokens (left padding is not a position), as ``generate`` counts them."""
        rows = [j.row for j in jobs]
        position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
        with eval_mode(self.model), self.bank.use(rows):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=position.to(self.device), use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: cache})
        return out.logits[:, -1].float()

    def _prefill(self, jobs: list[Job]) -> _Running | None:
        """The prompts of ``jobs`` (same key) left-padded into one forward, and their first tokens."""
        width = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for b, job in enumerate(jobs):  # left padding: every row's last prompt token is the last column
            ids[b, width - len(job.ids):] = torch.tensor(job.ids)
            mask[b, width - len(job.ids):] = 1
            job.started = time.perf_counter()
        if jobs[0].seed is not None and jobs[0].temperature > 0:
            torch.manual_seed(jobs[0].seed)
        cache = DynamicCache()
        logits = self._forward(jobs, ids, mask, cache)
        return self._advance(_Running(jobs, cache, mask, ids[:, -1]), logits)

    def _step(self, running: _Running) -> _Running | None:
        """One decoding step of every running row."""
        mask = torch.cat([running.mask, torch.ones((len(running.jobs), 1), dtype=torch.long)], dim=1)
        logits = self._forward(running.jobs, running.last[:, None], mask, running.cache)
        running.mask = mask
        return self._advance(running, logits)

    def _advance(self, running: _Running, logits: torch.Tensor) -> _Running | None:
        """Pick each row's next token from ``logits`` [B, V], hand it to its job, drop the finished rows."""
        jobs = running.jobs
        minimum = [b for b, job in enumerate(jobs) if len(job.tokens) < job.min_tokens]
        if minimum and self.eos:  # EOS masked until min_tokens (transformers' min_new_tokens, per row)
            logits[torch.tensor(minimum)[:, None], torch.tensor(sorted(self.eos))[None, :]] = -float("inf")
        first = jobs[0]
        if first.temperature > 0:  # generate's sampling: temperature, top-k 50, top-p, then a draw
            warped = self._warpers(first)(None, logits)
            tokens = torch.multinomial(torch.softmax(warped, dim=-1), 1)[:, 0]
        else:
            tokens = logits.argmax(dim=-1)
        keep = []
        for b, (job, token) in enumerate(zip(jobs, tokens.tolist())):
            if job.grow(token, self.tokenizer, self.eos):
                self.stats.tokens += len(job.tokens)
                self.stats.cancelled += job.finish_reason == "cancelled"
                self._batch_seconds = time.perf_counter() - job.started
            else:
                keep.append(b)
        if not keep:
            return None
        running.last = tokens
        return running.select(keep) if len(keep) < len(jobs) else running

    def _warpers(self, job: Job) -> LogitsProcessorList:
        return LogitsProcessorList([TemperatureLogitsWarper(job.temperature), TopKLogitsWarper(50),
                                    TopPLogitsWarper(job.top_p)])

    def _merge(self, running: _Running, new: _Running | None) -> _Running:
        """``running`` and the newly prefilled rows as one batch: the shorter caches left-padded to a common length
        (masked), then stacked along the batch."""
        if new is None:
            return running
        width = max(running.mask.shape[1], new.mask.shape[1])
        a, b = running.padded(width), new.padded(width)
        cache = DynamicCache([(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a[0], b[0])])
        merged = _Running(running.jobs + new.jobs, cache, torch.cat([a[1], b[1]]), torch.cat([running.last, new.last]))
        self._count(merged.jobs)
        return merged

    def _count(self, jobs: list[Job]) -> None:
        """The batch statistics of a batch of ``jobs`` starting or grown."""
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        self.stats.mixed_batches += len({j.row for j in jobs}) > 1
