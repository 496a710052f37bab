"""Named corpora for `gptctl data prepare SOURCE`: FineWeb-Edu (streamed with `datasets`) and tiny Shakespeare.

A source has `batches(state)`, yielding (state, texts, nbytes) per batch of records: `state` is a JSON-able
point to resume from *before* the batch (None for sources that resume by counting records from the start),
`nbytes` the input bytes the batch consumed (0 when unknown). See gptctl/data/local_files.py for --input.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from gptctl.data.local_files import BATCH_DOCS, check_files, file_fingerprint
from gptctl.errors import UserError

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
DEFAULT_SUBSET = "sample-10BT"
# --data-files suffix -> the `datasets` packaged loader that reads it
DATA_FILE_LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_URL_ENV = "GPTCTL_TINYSHAKESPEARE_URL"  # a mirror, e.g. inside a firewall


class FineWebEdu:
    """HuggingFaceFW/fineweb-edu streamed from the Hub, or local files with its schema (--data-files).

    Both go through the same `load_dataset(..., split="train", streaming=True)` and the same iteration, so
    the local files exercise exactly the code that streams the Hub. Resuming uses the IterableDataset's
    own state_dict(), which reopens the right Parquet file at the right row instead of re-streaming
    everything before it as `.skip(n)` would.
    """

    def __init__(self, subset: str | None, data_files: list[Path]):
        self.data_files = data_files
        self.subset = None if data_files else (subset or DEFAULT_SUBSET)
        if data_files:
            check_files(data_files, "--data-files")
            loaders = {DATA_FILE_LOADERS.get(p.suffix.lower()) for p in data_files}
            if None in loaders:
                bad = next(p for p in data_files if p.suffix.lower() not in DATA_FILE_LOADERS)
                raise UserError(f"--data-files: {bad} is not .parquet, .jsonl or .json")
            if len(loaders) > 1:
                raise UserError("--data-files: mix of Parquet and JSON files; give files of one format")
            self.loader = loaders.pop()
        self.dataset = None

    def open(self) -> None:
        """Load the stream and read its first row: after every cheap check has passed, since a Parquet
        scanner once started can abort an exiting process (see `_close`)."""
        dataset = self._load()
        if dataset.column_names is not None and "text" not in dataset.column_names:
            raise UserError(
                f"--data-files: {self._where()} has no column 'text' (columns: {', '.join(dataset.column_names)})"
            )
        self.dataset = dataset.select_columns(["text"])  # decoding FineWeb's 10 other columns costs 5x the time
        self._check_readable()

    def _where(self) -> str:
        if self.data_files:
            return ", ".join(str(p) for p in self.data_files[:3]) + (" …" if len(self.data_files) > 3 else "")
        return f"{FINEWEB_EDU} (subset {self.subset})"

    def _load(self):
        datasets = _import_datasets_without_torch()
        datasets.disable_progress_bars()  # ours is on screen
        try:
            if self.data_files:
                return datasets.load_dataset(
                    self.loader, data_files=[str(p) for p in self.data_files], split="train", streaming=True
                )
            return datasets.load_dataset(FINEWEB_EDU, name=self.subset, split="train", streaming=True)
        except ValueError as exc:  # e.g. an unknown config name
            option = "--data-files" if self.data_files else "--subset"
            raise UserError(f"{option}: cannot load {self._where()}: {exc}") from None
        except OSError as exc:  # ConnectionError, offline mode, missing files
            raise UserError(
                f"fineweb-edu: cannot load {self._where()}: {exc}; connect to the Hugging Face Hub "
                "or pass local FineWeb-Edu files with --data-files FILE"
            ) from None

    def _check_readable(self) -> None:
        rows = iter(self.dataset)
        try:
            first = next(rows, None)
        except (OSError, ValueError) as exc:
            raise UserError(f"--data-files: cannot read {self._where()}: {exc}") from None
        finally:
            _close(rows)
        if first is None:
            raise UserError(f"--data-files: {self._where()} holds no rows")
        if not isinstance(first.get("text"), str):
            raise UserError(f"--data-files: {self._where()} has no string column 'text' (columns: {', '.join(first)})")

    def fingerprint(self) -> dict:
        return {"--subset": self.subset, "--data-files": [file_fingerprint(p) for p in self.data_files]}

    def describe(self) -> dict:
        if self.data_files:
            return {"kind": "fineweb-edu", "data_files": [str(p.resolve()) for p in self.data_files], "format": self.loader}
        return {"kind": "fineweb-edu", "dataset": FINEWEB_EDU, "subset": self.subset}

    def total_bytes(self) -> None:
        return None  # rows, not bytes, come out of `datasets`

    def batches(self, state: dict | None) -> Iterator[tuple[dict, list[str], int]]:
        dataset = self.dataset
        if state is not None:
            dataset.load_state_dict(state)
        rows = dataset.iter(batch_size=BATCH_DOCS)  # columnar batches: 4x faster than row dicts
        read = 0
        before = state  # the generator has not started yet, so dataset.state_dict() would be stale
        try:
            for batch in rows:
                texts = [text or "" for text in batch["text"]]
                read += len(texts)
                yield before, texts, 0
                before = dataset.state_dict()  # the state after the last row handed out
        except OSError as exc:
            raise UserError(
                f"fineweb-edu: reading {self._where()} failed after {read:,} more documents ({exc}); "
                "rerun the same command to resume from the last finished shard"
            ) from None
        finally:
            _close(rows)


def _import_datasets_without_torch():
    """`datasets` imports torch (3-4 s) for every IterableDataset when torch is installed, to make it a
    torch IterableDataset; streaming text needs none of that. Its USE_TORCH switch is read at import."""
    if "datasets" not in sys.modules:
        saved = os.environ.get("USE_TORCH")
        os.environ["USE_TORCH"] = "0"
        try:
            import datasets  # noqa: F401
        finally:
            if saved is None:
                del os.environ["USE_TORCH"]
            else:
                os.environ["USE_TORCH"] = saved
    return sys.modules["datasets"]


def _close(rows) -> None:
    """End a datasets stream now: a Parquet scanner left to interpreter shutdown can print errors or even
    abort the process ("terminate called without an active exception", huggingface/datasets#7566)."""
    import gc

    rows.close()
    gc.collect()


class TinyShakespeare:
    """Karpathy's char-rnn tiny Shakespeare (1.1 MB), downloaded on every run: one document."""

    def __init__(self):
        import urllib.request

        self.url = os.environ.get(TINYSHAKESPEARE_URL_ENV) or TINYSHAKESPEARE_URL
        try:
            with urllib.request.urlopen(self.url, timeout=30) as response:
                raw = response.read()
        except OSError as exc:  # URLError, timeouts, HTTP errors
            reason = getattr(exc, "reason", exc)
            raise UserError(
                f"tinyshakespeare: cannot download {self.url} ({reason}); "
                "without network pass a local copy instead: --input FILE"
            ) from None
        try:
            self.text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"tinyshakespeare: {self.url} did not return UTF-8 text") from None
        self.nbytes = len(raw)
        self.sha256 = hashlib.sha256(raw).hexdigest()

    def open(self) -> None:
        """Nothing to open: downloaded when made (its fingerprint is the download's hash)."""

    def fingerprint(self) -> dict:
        return {"url": self.url, "sha256": self.sha256}

    def describe(self) -> dict:
        return {"kind": "tinyshakespeare", "url": self.url, "sha256": self.sha256}

    def total_bytes(self) -> int:
        return self.nbytes

    def batches(self, state: None) -> Iterator[tuple[None, list[str], int]]:
        yield None, [self.text], self.nbytes
