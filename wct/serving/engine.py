"""The batching engine: a bounded queue of generation jobs and one worker thread that runs them in batches.

Jobs that arrive within ``max_wait_s`` of the first waiting one and share its sampling settings run as one
``model.generate`` call (at most ``max_batch`` rows, left-padded), whatever delta each uses (:class:`DeltaBank`).
Every row stops on its own (EOS unless ``ignore_eos``, its ``max_tokens``, one of its stop strings once it has
``min_tokens``, or its client gone; EOS is masked per row until ``min_tokens``); the worker hands
each row's text to the job as it grows, so streaming and non-streaming requests read the same text. Greedy rows
batch with any greedy row; sampling rows with the same temperature and top_p; a row with a ``seed`` runs alone, so
the same seed gives the same text whatever else is being served.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from wct.generation import sampling_kwargs
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


class _RowMinTokens(LogitsProcessor):
    """Masks EOS in the rows whose job has fewer than its ``min_tokens`` (HF's MinNewTokensLengthLogitsProcessor,
    per row)."""

    def __init__(self, jobs: list[Job], eos: set[int]) -> None:
        self.jobs, self.eos = jobs, sorted(eos)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = [b for b, job in enumerate(self.jobs) if len(job.tokens) < job.min_tokens]
        if rows and self.eos:
            scores = scores.clone()
            scores[torch.tensor(rows)[:, None], torch.tensor(self.eos)[None, :]] = -float("inf")
        return scores


class _RowStops(StoppingCriteria):
    """Feeds every row's newest token to its job and stops the rows whose job is finished."""

    def __init__(self, jobs: list[Job], prompt_len: int, tokenizer, eos: set[int]) -> None:
        self.jobs, self.prompt_len, self.tokenizer, self.eos = jobs, prompt_len, tokenizer, eos
        self.done = torch.zeros(len(jobs), dtype=torch.bool)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for b, job in enumerate(self.jobs):
            if not self.done[b]:
                self.done[b] = job.grow(last[b], self.tokenizer, self.eos)
        return self.done.to(input_ids.device)


@dataclass
class Stats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    mixed_batches: int = 0  # batches whose rows used more than one bank entry
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0
    tokens: int = 0


class Engine:
    """Bounded job queue + one worker thread running batched ``generate`` on ``model`` (module docstring)."""

    def __init__(self, model, tokenizer, bank: DeltaBank, max_batch: int = 8, max_wait_s: float = 0.01,
                 max_queue: int = 64) -> None:
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.device = next(model.parameters()).device
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

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled.is_set()]
            for job in batch:
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
            if not live:
                continue
            start = time.perf_counter()
            try:
                self.run_batch(live)
            except Exception as e:  # a failed batch fails its requests, never the server
                log.exception("batch of %d failed", len(live))
                self.stats.errors += 1
                for job in live:
                    if job.finish_reason is None:
                        job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            self._batch_seconds = time.perf_counter() - start
            self.stats.cancelled += sum(j.finish_reason == "cancelled" for j in live)

    @torch.no_grad()
    def run_batch(self, jobs: list[Job]) -> None:
        """One ``generate`` call for ``jobs`` (same key), row b on bank entry ``jobs[b].row``. EOS ends a row in
        :class:`_RowStops`, not in ``generate`` (``eos_token_id=None``), so an ``ignore_eos`` row runs on in a batch
        whose other rows stop at EOS."""
        width = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for b, job in enumerate(jobs):  # left padding: every row's last prompt token is the last column
            ids[b, width - len(job.ids):] = torch.tensor(job.ids)
            mask[b, width - len(job.ids):] = 1
        first = jobs[0]
        if first.seed is not None and first.temperature > 0:
            torch.manual_seed(first.seed)
        stops = _RowStops(jobs, width, self.tokenizer, self.eos)
        minimum = [_RowMinTokens(jobs, self.eos)] if any(j.min_tokens for j in jobs) else []
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        self.stats.mixed_batches += len({j.row for j in jobs}) > 1
        with eval_mode(self.model), self.bank.use([j.row for j in jobs]):
            self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max(j.max_tokens for j in jobs),
                eos_token_id=None,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([stops]),
                logits_processor=LogitsProcessorList(minimum),
                **sampling_kwargs(first.temperature > 0, first.temperature, first.top_p),
            )
        for job in jobs:  # max_new_tokens reached on a row whose stop check did not run yet
            if job.finish_reason is None:
                job.finish_reason = "length"
                job.emit("text", job.text[job.sent:])
                job.emit("done", "length")
            self.stats.tokens += len(job.tokens)
