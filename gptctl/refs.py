"""Resolve what users type to name a checkpoint: a file path, RUN (its newest valid checkpoint), RUN:STEP,
or hf:DIR_OR_NAME (a Hugging Face GPT-2, converted once into a gptctl checkpoint under the home)."""

import re
import sys
from pathlib import Path

from gptctl.errors import UserError


def resolve_checkpoint(ref: str, option: str) -> Path:
    """The checkpoint file `ref` names; `option` is the option or argument name for error messages.

    An existing file wins, so paths that contain a colon still work. A registered checkpoint must
    match its size and sha256; RUN alone skips (and marks) bad ones for the newest good one.
    """
    if ref.startswith("hf:"):
        return _import_hf(ref.removeprefix("hf:"), option)
    path = Path(ref).expanduser()
    if path.is_file():
        return path.resolve()
    from gptctl.paths import home_dir
    from gptctl.registry import files, open_registry, queries

    run_ref, _, step = ref.partition(":")
    if not run_ref or (step and not step.isdigit()):
        raise UserError(f"{option}: {ref!r} is neither a file nor RUN[:STEP]")
    try:
        db = open_registry(home_dir(), create=False)
        run = queries.resolve_run(db, run_ref)
    except UserError:
        raise UserError(f"{option}: {ref!r} is neither an existing file nor a run in the registry "
                        "(`gptctl runs list` shows the runs)") from None
    files.reconcile(db, run)
    if step:
        try:
            row = queries.checkpoint_at(db, run["id"], int(step))
        except UserError as exc:
            raise UserError(f"{option}: {exc}") from None
        state = files.check_file(row, full=True) if row["state"] == "valid" else row["state"]
        if state != "valid":
            queries.mark_checkpoint(db, row["id"], state, only_if=row["state"])
            raise UserError(f"{option}: checkpoint step {step} of run {run['id']} is {state}")
        return Path(row["path"])
    row = files.newest_verified_checkpoint(db, run["id"], warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    if row is None:
        raise UserError(f"{option}: run {run['id']} has no valid checkpoint")
    return Path(row["path"])


def _import_hf(dir_or_name: str, option: str) -> Path:
    """Convert once into `HOME/imports/NAME-SHA.pt`, named by its content.

    Runs record the file as their parent and retention protects it, so an import never overwrites a
    file: the same weights give the same name (and the file is reused), different weights or sources
    (`hf:a/b` and `hf:a_b`) different names.
    """
    import os

    from gptctl.engine.hf import write_checkpoint
    from gptctl.paths import home_dir
    from gptctl.registry.files import TMP_PREFIX, sha256_of

    imports = (home_dir() / "imports").resolve()
    imports.mkdir(parents=True, exist_ok=True)
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
    import os

    for leftover in imports.glob(f"{prefix}import-*.pt"):
        pid = leftover.stem.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
