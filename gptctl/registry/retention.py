"""Which checkpoints may be deleted. One rule set, used by training and by `ckpt prune` alike."""

from typing import Any


def deletable(checkpoints: list[dict[str, Any]], keep_last: int, permanent: set[int], protected_paths: set[str]) -> list[dict[str, Any]]:
    """Checkpoints of one run that retention would delete, oldest first.

    Never deleted: pinned rows, permanent steps, the newest valid checkpoint, the last
    `keep_last` valid checkpoints, and any path another run started from (`protected_paths`).
    """
    valid = sorted((c for c in checkpoints if c["state"] == "valid"), key=lambda c: c["step"])
    kept_by_recency = {c["step"] for c in valid[-max(keep_last, 1):]}
    return [
        c
        for c in valid
        if c["step"] not in kept_by_recency
        and not c["pinned"]
        and c["step"] not in permanent
        and c["path"] not in protected_paths
    ]
