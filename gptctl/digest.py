"""The one way gptctl hashes a file: what checkpoints, shards and imports are, whatever their path."""

import hashlib
from pathlib import Path


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()
