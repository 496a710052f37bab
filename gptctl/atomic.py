"""The one way gptctl replaces a file: a crash at any moment leaves the old file or the complete new one."""

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

TMP_PREFIX = ".tmp-"  # temporary files of a write in progress; never a real file's name


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it is fsynced and renamed onto `path`, and the directory fsynced.

    The temporary file is a sibling (same filesystem, so the rename is atomic) named `.tmp-NAME.PID`;
    on any failure it is removed and `path` is untouched.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno and exc.filename in (None, str(tmp)):
            raise OSError(exc.errno, exc.strerror, str(path)) from None  # name the file meant, not the temporary
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
