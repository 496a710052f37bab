"""Resolve what users type to name a checkpoint: a file path, RUN (its newest valid checkpoint), RUN:STEP,
or hf:DIR_OR_NAME (a Hugging Face GPT-2, converted once into a gptctl checkpoint under the home)."""

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptctl.errors import UserError


def resolve_checkpoint(ref: str, option: str, home: Path) -> Path:
    """The checkpoint file `ref` names, unprotected once this returns: readers use checkpoint_for_reading."""
    with checkpoint_for_reading(ref, option, home) as path:
        return path


@contextmanager
def checkpoint_for_reading(ref: str, option: str, home: Path) -> Iterator[Path]:
    """The checkpoint file `ref` names, which retention cannot delete until the block ends (a reader
    lease in the registry, see queries.mark_deleting). `option` names the option in error messages.

    An existing file wins, so paths that contain a colon still work. A registered checkpoint must
    match its size and sha256; RUN alone skips (and marks) bad ones for the newest good one, and one
    that retention deletes between the look and the lease is passed over for the next newest.
    """
    if ref.startswith("hf:"):
        yield _import_hf(ref.removeprefix("hf:"), option, home)
        return
    from gptctl.registry import open_registry, queries

    db = open_registry(home, create=False)
    path = Path(ref).expanduser()
    if path.is_file():
        path = path.resolve()
        lease = queries.acquire_lease(db, path, require_valid=False)
        if lease is None or not path.is_file():
            raise UserError(f"{option}: {path} is being deleted by checkpoint retention; choose another checkpoint")
    else:
        path, lease = _lease_registered(db, ref, option)
    try:
        yield path
    finally:
        queries.release_lease(db, lease)


def _lease_registered(db, ref: str, option: str) -> tuple[Path, int]:
    """RUN[:STEP]'s verified checkpoint file and a lease on it."""
    from gptctl.checkpoints import files, store
    from gptctl.registry import queries

    run_ref, _, step = ref.partition(":")
    if not run_ref or (step and not step.isdigit()):
        raise UserError(f"{option}: {ref!r} is neither a file nor RUN[:STEP]")
    try:
        run = queries.resolve_run(db, run_ref)
    except UserError:
        raise UserError(f"{option}: {ref!r} is neither an existing file nor a run in the registry "
                        "(`gptctl runs list` shows the runs)") from None
    store.reconcile(db, run, inspect=files.stored_step)
    if step:
        try:
            row = queries.checkpoint_at(db, run["id"], int(step))
        except UserError as exc:
            raise UserError(f"{option}: {exc}") from None
        lease, state = _lease_verified(db, row)
        if lease is None:
            raise UserError(f"{option}: checkpoint step {step} of run {run['id']} is {state}")
        return Path(row["path"]), lease
    # Newest first; the list is read again after each miss, since a trainer may have saved a newer one
    # and deleted the one looked at.
    while rows := queries.checkpoints_of(db, run["id"], states=["valid"]):
        lease, state = _lease_verified(db, rows[-1])
        if lease is not None:
            return Path(rows[-1]["path"]), lease
        if state != "deleted":
            print(f"warning: checkpoint step {rows[-1]['step']} ({rows[-1]['path']}) is {state}; trying the previous one",
                  file=sys.stderr)
    raise UserError(f"{option}: run {run['id']} has no valid checkpoint")


def _lease_verified(db, row: dict) -> tuple[int | None, str]:
    """A lease on a checkpoint row's file once it verifies; else (None, its state), a bad file marked."""
    from gptctl.checkpoints import store
    from gptctl.registry import queries

    lease = queries.acquire_lease(db, Path(row["path"]), require_valid=True)
    if lease is None:  # not valid (any more): deleted by retention meanwhile, or known bad
        return None, queries.checkpoint_state(db, row["id"])
    state = store.check_file(db, row, full=True)
    if state == "valid":
        return lease, state
    queries.release_lease(db, lease)
    queries.mark_checkpoint(db, row["id"], state, only_if="valid", sha256=row["sha256"])
    return None, state


def _import_hf(dir_or_name: str, option: str, home: Path) -> Path:
    """Convert once into `HOME/imports/NAME-SHA.pt`, named by its content.

    Runs record the file as their parent and retention protects it, so an import never overwrites a
    file: the same weights give the same name (and the file is reused), different weights or sources
    (`hf:a/b` and `hf:a_b`) different names.
    """
    import os

    from gptctl.engine.hf import write_checkpoint
    from gptctl.atomic import TMP_PREFIX
    from gptctl.digest import sha256_of

    imports = (home / "imports").resolve()  # made by write_checkpoint once the weights are read: a refusal writes nothing
    _remove_abandoned_imports(imports, TMP_PREFIX)
    staging = imports / f"{TMP_PREFIX}import-{os.getpid()}.pt"
    try:
        write_checkpoint(dir_or_name, staging, option)
        sha = sha256_of(staging)
        path = imports / f"{re.sub(r'[^A-Za-z0-9._-]', '_', dir_or_name.strip('/'))[-80:]}-{sha[:16]}.pt"
        try:
            os.link(staging, path)  # fails if the name exists: never replaces a file a run may point at
        except FileExistsError:
            if sha256_of(path) != sha:
                raise UserError(f"{option}: {path} exists with other contents (damaged?); move it away and retry") from None
    finally:
        staging.unlink(missing_ok=True)
    return path


def _remove_abandoned_imports(imports: Path, prefix: str) -> None:
    """Staging files of conversions whose process died (killed mid-import)."""
    from gptctl.registry.queries import pid_alive

    for leftover in imports.glob(f"{prefix}import-*.pt"):
        pid = leftover.stem.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            leftover.unlink(missing_ok=True)

