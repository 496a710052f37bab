"""Tokenize batches of documents in worker processes and hand the results back in input order.

Each worker loads the encoding once and runs `encode_ordinary` per document. That is faster than
`encode_ordinary_batch`, whose thread pool only adds overhead here: converting tokens to Python ints
holds the GIL, so the parallelism has to come from processes (benchmarks/prepare_throughput.py).

Results are consumed strictly in submission order, so the token stream does not depend on the
number of workers, and at most `2 × workers` batches are in flight, so memory stays flat however
long the input is. Workers come from a fork server, never forked from the parent itself, which may hold
threads (datasets, torch): a server started once per process with this module preloaded forks them in
milliseconds, where spawning would start each one from scratch, console script imports and all.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

from gptctl.data.tokenizer import EOT_TOKEN, get_encoding

Meta = TypeVar("Meta")

_encoding = None  # the worker's tiktoken Encoding, loaded by its first task


def encode_documents(enc, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens, each followed by EOT, as one uint16 array; plus each document's token count
    (0 for an empty document, which gets no EOT either)."""
    tokens: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if text:
            start = len(tokens)
            tokens.extend(enc.encode_ordinary(text))
            tokens.append(EOT_TOKEN)
            lengths[i] = len(tokens) - start
    return np.array(tokens, dtype=np.uint16), lengths  # GPT-2's 50257 ids all fit in uint16


def _encode_in_worker(tokenizer: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    # Loaded on first use, not in a Pool initializer: an initializer that raises makes the Pool respawn
    # workers forever, while an error here reaches the parent through result.get().
    global _encoding
    if _encoding is None:
        # Ctrl-C reaches the whole process group; only the parent should react (it terminates the pool).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _encoding = get_encoding(tokenizer)
    return encode_documents(_encoding, texts)


def encode_in_order(
    batches: Iterable[tuple[Meta, list[str]]], tokenizer: str, workers: int
) -> Iterator[tuple[Meta, np.ndarray, np.ndarray]]:
    """Yield (meta, tokens, lengths) for each (meta, texts) of `batches`, in order, encoded by `workers` processes."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # workers fork from a server that has imported numpy and tiktoken
    with context.Pool(workers) as pool:
        in_flight: deque = deque()
        for meta, texts in batches:
            in_flight.append((meta, pool.apply_async(_encode_in_worker, (tokenizer, texts))))
            if len(in_flight) >= 2 * workers:
                meta, result = in_flight.popleft()
                yield meta, *result.get()
        while in_flight:
            meta, result = in_flight.popleft()
            yield meta, *result.get()
