"""Continuous batching for `gptctl serve`: one worker thread owns the model; requests wait in a bounded
queue, join the decode batch between two steps and leave it when they end.

Rows join mid-flight rather than in groups (a group decodes until its last row ends while new requests
wait), because a server's requests arrive at any time and end at any length: with groups, one long
reply holds every later request back for its whole length. Joining needs rows of different lengths in
one cache, which engine/generate.py's KVCache (one fill for all rows: the samples of one prompt) does
not hold; RowCache below does, with what it took of the model: model.forward asks the cache for the new
tokens' positions (one per row here) and model.attention takes the cache's mask (each row sees its
own filled positions). A request's prompt is prefilled alone (batch 1, in a KVCache, its n samples
sharing it as Generation's do), then its rows are copied into the RowCache; one decode step is one
forward of every row of every request. A row whose context is full leaves the RowCache and slides as
Generation does (each step re-prefills its last block_size tokens, with the other sliding rows).

Each request draws from its own seeded generator over its own rows in sample order, as Generation
does, so its text does not depend on which other requests share the steps (and equals `gptctl
sample`'s for the same seed, up to float rounding of a different batch).
"""

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from gptctl.engine.distributed import autocast_for
from gptctl.engine.generate import KVCache, SampleText, Sampling, context_window, sample_next
from gptctl.engine.model import GPT
from gptctl.presets import GPT2_VOCAB_SIZE

log = logging.getLogger("gptctl.serve")

TopLogprobs = list[tuple[int, float]]  # (token, logprob), likeliest first


@dataclass
class TokenEvent:
    """A sample's next token: the text it completes (maybe none; none for end-of-text) and, when asked
    for, its logprob and the likeliest tokens' under the model's own distribution (before temperature,
    top-k and top-p)."""

    sample: int
    token: int
    text: str
    logprob: float | None = None
    top: TopLogprobs | None = None


@dataclass
class PromptScores:
    """The logprob of each prompt token given the ones before it (None for the first) and the likeliest
    tokens at each position."""

    logprobs: list[float | None]
    top: list[TopLogprobs | None]


@dataclass
class Finished:
    sample: int
    reason: str  # "stop" (end-of-text or a stop sequence) or "length"
    tokens: int  # new tokens (end-of-text not counted)


@dataclass
class Failed:
    message: str
    status: int = 500  # 503: the server is shutting down


@dataclass
class Job:
    """n samples of one prompt. `emit` receives its events on the worker thread; set `cancelled` (from
    anywhere) when nobody reads them any more and its rows leave the batch at the next step."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    emit: Callable[[object], None]
    n: int = 1
    seed: int = 0
    logprobs: int | None = None  # how many likeliest tokens to report with each token; None: no logprobs
    score_prompt: bool = False  # also the prompt's logprobs (echo)
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return self.n if self.max_new_tokens else 0


class Busy(Exception):
    """The queue is full (or the batcher is shutting down)."""


class RowCache:
    """Keys and values of the rows of a decode batch, each row filled to its own length (rows join with
    a prompt of any length and leave when they end). Room for `capacity` rows of block_size positions."""

    def __init__(self, config, capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, capacity, config.n_head, config.block_size, config.head_dim)
        # Zeros, not empty: a row's unfilled positions are masked out, but the mask's zero weight times a
        # NaN left in reused memory is still NaN. Moved and ended rows leave only finite values behind.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.device, self.lengths = device, []
        self.layers = [_RowLayer(self, i) for i in range(config.n_layer)]
        self._mask = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The longest row's: what model.forward checks against the context."""
        return max(self.lengths, default=0)

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        if length != 1:
            raise ValueError("a RowCache takes one position per row at a time; prefill into a KVCache")
        return torch.tensor(self.lengths, device=device).unsqueeze(1)

    def advance(self, length: int) -> None:
        self.lengths = [n + length for n in self.lengths]
        self._mask = None

    @property
    def mask(self) -> torch.Tensor:
        """(rows, 1, 1, longest + 1): row r attends to its positions 0…lengths[r] (the new one included)."""
        if self._mask is None:
            span = torch.arange(self.length + 1, device=self.device)
            self._mask = (span <= torch.tensor(self.lengths, device=self.device).unsqueeze(1))[:, None, None, :]
        return self._mask

    def add(self, prefill: KVCache) -> None:
        """A new last row: a batch-1 prefill's keys and values."""
        row, length = self.rows, prefill.length
        self.k[:, row, :, :length] = prefill.k[:, 0, :, :length]
        self.v[:, row, :, :length] = prefill.v[:, 0, :, :length]
        self.lengths.append(length)
        self._mask = None

    def keep(self, rows: list[int]) -> None:
        """Keep these rows (ascending), moved to the front in this order; only moved rows are copied."""
        for new, old in enumerate(rows):
            if new != old:  # old > new: the rows before `old` that are still to move were not overwritten
                self.k[:, new, :, :self.lengths[old]] = self.k[:, old, :, :self.lengths[old]]
                self.v[:, new, :, :self.lengths[old]] = self.v[:, old, :, :self.lengths[old]]
        self.lengths = [self.lengths[r] for r in rows]
        self._mask = None


class _RowLayer:
    empty = False  # a RowCache is only decoded into

    def __init__(self, cache: RowCache, index: int):
        self.cache, self.index = cache, index

    @property
    def mask(self) -> torch.Tensor:
        return self.cache.mask

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's one new position (B, H, 1, hd) after its filled ones; every row's keys and
        values up to the longest (the mask hides what a row has not filled)."""
        cache = self.cache
        rows = torch.arange(cache.rows, device=cache.device)
        at = torch.tensor(cache.lengths, device=cache.device)
        cache.k[self.index][rows, :, at] = k[:, :, 0]
        cache.v[self.index][rows, :, at] = v[:, :, 0]
        end = cache.length + 1
        return cache.k[self.index, :cache.rows, :, :end], cache.v[self.index, :cache.rows, :, :end]


@dataclass
class _Sample:
    job: "_Running"
    index: int

    @property
    def text(self) -> SampleText:
        return self.job.samples[self.index]


@dataclass
class _Running:
    job: Job
    prompt: list[int]
    generator: torch.Generator
    samples: list[SampleText]
    live: int = 0  # samples still running
    slots: list[_Sample] = field(default_factory=list)


@dataclass
class Stats:
    submitted: int = 0  # jobs ever queued
    waiting: int = 0  # jobs in the queue
    rows: int = 0  # samples decoding now
    decode_steps: int = 0  # forwards of the decode batch
    shared_steps: int = 0  # of them, steps whose rows came from more than one job
    max_rows_per_step: int = 0
    max_jobs_per_step: int = 0
    jobs_done: int = 0
    jobs_cancelled: int = 0
    tokens: int = 0  # tokens generated


class Batcher:
    """Owns the model on one worker thread. `submit` queues jobs (raises Busy when `max_waiting` jobs
    already wait); the worker admits waiting jobs, first come first served, while their samples fit in
    `max_rows` rows, and decodes every admitted row in one step."""

    def __init__(self, model: GPT, enc, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_rows: int = 8, max_waiting: int = 32):
        self.model, self.enc, self.device, self.dtype = model, enc, device, dtype
        self.block_size = model.config.block_size
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._cache: RowCache | None = None  # allocated at the first row
        self._rows: list[_Sample] = []  # the RowCache's rows, in order
        self._sliding: list[_Sample] = []  # samples past the context
        self._stats = Stats()

    # --- any thread -----------------------------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        with self._cond:
            if self._closing:
                raise Busy("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_waiting:
                raise Busy(f"the queue is full ({self.max_waiting} prompts wait for {self.max_rows} rows); retry later")
            self._waiting.extend(jobs)
            self._stats.submitted += len(jobs)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            self._stats.waiting, self._stats.rows = len(self._waiting), self._busy_rows()
            return dict(vars(self._stats))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptctl-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30) -> None:
        """Stop after the current step; jobs still queued or running get Failed."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the worker thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closing and not self._waiting and not self._busy_rows():
                        self._cond.wait()
                    if self._closing:
                        break
                    admitted = self._admit()
                for job in admitted:
                    try:
                        self._start(job)
                    except Exception as exc:  # its own prompt failed (out of memory, …): it alone fails
                        self._fail(job, exc)
                try:
                    if self._busy_rows():
                        self._step()
                except Exception as exc:  # the step all rows share failed: fail what runs, serve on
                    log.exception("generation failed")
                    self._fail_running(_failure(exc))
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.emit(Failed("the server is shutting down", 503))
        self._fail_running("the server is shutting down", 503)

    def _busy_rows(self) -> int:
        return len(self._rows) + len(self._sliding)

    def _admit(self) -> list[Job]:
        admitted, busy = [], self._busy_rows()
        while self._waiting and (busy + self._waiting[0].rows <= self.max_rows or not busy):
            job = self._waiting.popleft()
            if job.cancelled:
                self._stats.jobs_cancelled += 1
                continue
            admitted.append(job)
            busy += job.rows
        return admitted

    def _forward(self, idx: list[list[int]], cache) -> torch.Tensor:
        """fp32 logits over the real vocabulary (the padded rows are no tokens): the last position's of each
        row with a cache, every position's without."""
        with autocast_for(self.device, self.dtype):
            logits, _ = self.model(torch.tensor(idx, device=self.device), cache=cache)
        return logits[..., :GPT2_VOCAB_SIZE].float()

    def _start(self, job: Job) -> None:
        """Score the prompt if asked, prefill it, draw each sample's first token; samples still running join the batch."""
        if job.score_prompt:
            job.emit(self._score(job))
        if not job.max_new_tokens:
            for index in range(job.n):
                job.emit(Finished(index, "length", 0))
            self._stats.jobs_done += 1
            return
        prompt = job.prompt[-self.block_size:]  # the model sees at most block_size positions
        prefill = KVCache(self.model.config, 1, len(prompt), self.device, self.dtype)
        logits = self._forward([prompt], prefill)[:, -1]
        running = _Running(job, prompt, torch.Generator(device=self.device).manual_seed(job.seed),
                           [SampleText(self.enc, job.sampling.stop, job.max_new_tokens) for _ in range(job.n)])
        running.slots = [_Sample(running, i) for i in range(job.n)]
        running.live = job.n
        self._take(running, running.slots, logits.expand(job.n, -1))
        for slot in running.slots:
            if slot.text.finish is None:
                if len(prompt) == self.block_size:
                    self._sliding.append(slot)
                else:
                    self._row_cache().add(prefill)
                    self._rows.append(slot)

    def _row_cache(self) -> RowCache:
        if self._cache is None:
            self._cache = RowCache(self.model.config, self.max_rows, self.device, self.dtype)
        return self._cache

    def _score(self, job: Job) -> PromptScores:
        """The prompt's own logprobs, from one forward without a cache (all its positions' logits)."""
        logprobs = F.log_softmax(self._forward([job.prompt], None)[0, :-1], dim=-1)
        targets = torch.tensor(job.prompt[1:], device=self.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        top = _top(logprobs, job.logprobs or 0)
        return PromptScores([None, *chosen], [None, *top] if top is not None else [None] * len(job.prompt))

    def _step(self) -> None:
        """One token for every running sample of every job."""
        self._drop_cancelled()
        slots, parts = [], []
        if self._rows:
            parts.append(self._forward([[s.text.tokens[-1]] for s in self._rows], self._cache)[:, -1])
            slots += self._rows
        if self._sliding:  # past the context: each one's last block_size tokens, anew (equal lengths: one batch)
            windows = [context_window(s.job.prompt, s.text.tokens, self.block_size) for s in self._sliding]
            cache = KVCache(self.model.config, len(windows), self.block_size, self.device, self.dtype)
            parts.append(self._forward(windows, cache)[:, -1])
            slots += self._sliding
        if not slots:
            return
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        jobs: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            jobs.setdefault(id(slot.job), []).append(i)
        stats = self._stats
        stats.decode_steps += 1
        stats.shared_steps += len(jobs) > 1
        stats.max_rows_per_step = max(stats.max_rows_per_step, len(slots))
        stats.max_jobs_per_step = max(stats.max_jobs_per_step, len(jobs))
        for indexes in jobs.values():
            indexes.sort(key=lambda i: slots[i].index)  # the job's samples in order, as Generation draws them
            running = slots[indexes[0]].job
            try:
                self._take(running, [slots[i] for i in indexes], logits[indexes])
            except Exception as exc:  # its own draw failed (NaN logits of its rows, …): it alone fails
                self._fail(running.job, exc)
        kept = [i for i, slot in enumerate(self._rows) if slot.text.finish is None]
        if len(kept) < len(self._rows):
            self._cache.keep(kept)
            self._rows = [self._rows[i] for i in kept]
        self._sliding = [slot for slot in self._sliding if slot.text.finish is None]
        full = [i for i, length in enumerate(self._cache.lengths)
                if length == self.block_size] if self._cache is not None else []
        if full:  # their context is full: they slide from the next step on
            self._sliding += [self._rows[i] for i in full]
            kept = [i for i in range(len(self._rows)) if i not in full]
            self._cache.keep(kept)
            self._rows = [self._rows[i] for i in kept]

    def _take(self, running: _Running, slots: list[_Sample], logits: torch.Tensor) -> None:
        """Draw the next token of these samples of one job from their logits (one row each) and emit it."""
        job = running.job
        chosen = sample_next(logits, job.sampling, running.generator)
        logprobs = top = None
        if job.logprobs is not None:
            lp = F.log_softmax(logits, dim=-1)
            logprobs = lp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
            top = _top(lp, job.logprobs)
        for i, (slot, token) in enumerate(zip(slots, chosen.tolist())):
            sample = slot.text
            text = sample.add(token)
            self._stats.tokens += 1
            job.emit(TokenEvent(slot.index, token, text, logprobs[i] if logprobs else None, top[i] if top else None))
            if sample.finish:
                job.emit(Finished(slot.index, sample.finish, len(sample.tokens)))
                running.live -= 1
                if not running.live:
                    self._stats.jobs_done += 1

    def _drop_cancelled(self) -> None:
        gone = {id(s.job.job) for s in self._rows + self._sliding if s.job.job.cancelled}
        if not gone:
            return
        for slot in self._rows + self._sliding:
            if id(slot.job.job) in gone:
                slot.text.finish = "cancelled"
        self._stats.jobs_cancelled += len(gone)
        self._drop(gone)

    def _drop(self, gone: set[int]) -> None:
        """The rows of these jobs (their ids) out of the batch."""
        kept = [i for i, slot in enumerate(self._rows) if id(slot.job.job) not in gone]
        if self._cache is not None and len(kept) < len(self._rows):
            self._cache.keep(kept)
        self._rows = [self._rows[i] for i in kept]
        self._sliding = [slot for slot in self._sliding if id(slot.job.job) not in gone]

    def _fail(self, job: Job, exc: Exception) -> None:
        """One job's own failure: its rows leave (those it added before failing too), the others run on."""
        log.exception("generation failed")
        self._drop({id(job)})
        job.emit(Failed(_failure(exc)))

    def _fail_running(self, message: str, status: int = 500) -> None:
        jobs = {id(s.job.job): s.job.job for s in self._rows + self._sliding}
        for job in jobs.values():
            job.emit(Failed(message, status))
        self._rows, self._sliding = [], []
        if self._cache is not None:
            self._cache.keep([])


def _failure(exc: Exception) -> str:
    return f"generation failed: {type(exc).__name__}: {exc}"


def _top(logprobs: torch.Tensor, k: int) -> list[TopLogprobs] | None:
    """Each row's k likeliest tokens with their logprobs; None for k = 0."""
    if not k:
        return None
    values, tokens = torch.topk(logprobs, k, dim=-1)
    return [list(zip(t, v)) for t, v in zip(tokens.tolist(), values.tolist())]
