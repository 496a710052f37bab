"""Checks before a run exists or a launch starts: data, files, the world size, the checkpoint a run
would start from. Each raises UserError naming the option; none writes anything, except that
refuse_if_done marks a checkpoint that does not load as corrupt."""

import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gptctl import launch
from gptctl.errors import UserError
from gptctl.registry import open_registry, queries
from gptctl.resume import check_compatible
from gptctl.settings import DataSettings, LaunchSettings, TrainSettings, describe


# Shard hashes computed by check_data, recorded only once the command goes ahead (remember_verified):
# a refused command writes nothing.
_VERIFIED: list[list] = []


def refuse_unfinished_prepare(root: Path) -> None:
    """Shards of a prepare that has not finished are not a dataset yet (its last shards and its manifest
    are still to come): training on them would be training on other data than the finished one."""
    from gptctl.data.resume import STATE_FILE

    if (root / STATE_FILE).exists():
        raise UserError(f"--data-root: a `gptctl data prepare` into {root} is unfinished (or still running); "
                        "run the same command again to finish it, then train")


def default_data_root() -> Path:
    """--data-root left out: the documented default, once something is prepared there."""
    from gptctl.data.shards import MANIFEST
    from gptctl.paths import DATA_ROOT_ENV, default_data_root as root_of

    root = root_of()
    refuse_unfinished_prepare(root)
    if not (root / MANIFEST).is_file() and not any(root.glob("*_train_*.npy")):
        raise UserError(f"--data-root: nothing is prepared in {root.resolve()} (the default; {DATA_ROOT_ENV} names another): "
                        "`gptctl data prepare fineweb-edu` streams FineWeb-Edu's sample-10BT into it from the Hugging "
                        "Face hub (about 10B tokens: 20 GB of shards), or give --data-root DIR with prepared shards")
    return root


def check_data(settings: TrainSettings, home: Path) -> str:
    """The data root holds shards enough for a micro-batch, each still what its manifest says (size, and
    sha256 unless unchanged since checked: cached in `home`'s registry); returns its fingerprint."""
    from gptctl.data.shards import check_split_size, fingerprint, shard_problem
    from gptctl.digest import sha256_of

    if settings.data_root is None:
        raise UserError("--data-root is required: a directory prepared by `gptctl data prepare`")
    refuse_unfinished_prepare(settings.data_root)
    db = open_registry(home, create=False)

    def content(path: Path) -> str:
        known, row = queries.known_sha256(db, path)
        if known is None:
            known = sha256_of(path)
            _VERIFIED.append(row + [known])
        return known

    # Each shard's size before its sha256, and both before numpy reads a shard (a truncated one fails
    # there in numpy's words)
    if settings.data_root.is_dir() and (problem := shard_problem(settings.data_root, content)):
        raise UserError(f"--data-root: in {settings.data_root}, {problem}; restore it, or prepare the data again "
                        "(`gptctl data prepare --force`)")
    for split in ("train", "val"):
        check_split_size(settings.data_root, split, settings.batch_size, settings.seq_len)
    return fingerprint(settings.data_root)


def remember_verified(home: Path) -> None:
    """Record the shard hashes check_data computed, now that the command goes ahead."""
    if _VERIFIED:
        queries.remember_sha256(open_registry(home, check_home=False), _VERIFIED)
        _VERIFIED.clear()


def check_dataset(settings: DataSettings) -> None:
    path = settings.dataset_path
    if path is not None and not path.is_file():
        raise UserError(f"--dataset-path: {path} does not exist; give a JSONL file in Dolly's schema "
                        "(instruction, context, response, category)")


def check_extras(settings: TrainSettings) -> None:
    """Optional packages and files the workers will need, checked before anything is written."""
    from importlib.util import find_spec

    for wanted, option, package in ((settings.wandb_log, "--wandb-log", "wandb"), (settings.tensorboard, "--tensorboard", "tensorboard")):
        if wanted and find_spec(package) is None:
            raise UserError(f"{option}: the {package} package is not installed; pip install 'gptctl[{package}]'")
    if settings.hellaswag_file is not None and not settings.hellaswag_file.is_file():
        raise UserError(f"--hellaswag-file: {settings.hellaswag_file} does not exist")
    if settings.log_dir is not None and settings.log_dir.exists() and not settings.log_dir.is_dir():
        raise UserError(f"--log-dir: {settings.log_dir} is not a directory")


def prepare_dataset(settings: TrainSettings):
    """A finetune's tokenized instruction set (None for pretraining, which reads shards in place)."""
    if settings.kind != "finetune":
        return None
    from gptctl.data import dolly

    return dolly.build(settings.dataset_path, settings.seq_len, settings.val_fraction, settings.seed)


def check_world_size(settings: TrainSettings, launch_settings: LaunchSettings) -> None:
    """The run's batch and sharding split over this launch's processes (with --nproc-per-node gpu they are
    counted here); checked for every launch, since a resume may run on another number of processes."""
    try:
        settings.check_world(launch.world_size(launch_settings))
    except ValueError as exc:
        raise UserError(str(exc)) from None


# What the workers read from a checkpoint they resume from (engine/worker.py), besides its settings.
TRAINING_STATE = ("model", "optimizer", "step", "rng")


def check_checkpoint_path(path: Path | None, resume: bool, settings: TrainSettings, override: bool = False) -> str | None:
    """--resume --checkpoint-path: a gptctl training state of this model, short of --max-steps, trained on
    this data (or `override`: then the line to record), read now, before the run exists (the workers
    would otherwise fail on it after a run was created)."""
    if resume and path is None:
        raise UserError("--resume needs --checkpoint-path PATH (or use --auto-resume, or `gptctl resume RUN`)")
    if path is None:
        return None
    if not resume:
        raise UserError("--checkpoint-path: only used with --resume; add --resume (or start from its weights alone "
                        "with --init-from)")
    if not path.is_file():
        raise UserError(f"--checkpoint-path: {path} does not exist")
    state, stored = read_checkpoint(path, "--checkpoint-path")
    missing = [key for key in TRAINING_STATE if key not in state]
    if missing:
        raise UserError(f"--checkpoint-path: {path} holds no training state ({', '.join(missing)} missing), so a run "
                        "cannot resume from it; start from its weights with --init-from")
    other_data = check_compatible(stored, settings, path=path, override=override)
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"--checkpoint-path: {path} has no valid step number ({step!r}); is it a gptctl checkpoint?")
    if step >= settings.max_steps:
        raise UserError(f"--checkpoint-path: {path} is at step {step}; --max-steps ({settings.max_steps}) must be "
                        "above it to train further")
    if not other_data:
        return None
    return (f"started from {path.resolve()} (step {step}), trained on data fingerprint {stored.data_fingerprint}; "
            f"now {settings.data_fingerprint}, by --override-settings")


def check_run_dir(run: dict[str, Any]) -> None:
    """A run is continued in its directory: one that was deleted cannot be resumed (nor silently re-created)."""
    if not Path(run["run_dir"]).is_dir():
        raise UserError(f"run {run['id']} ({run['name']}): its run directory {run['run_dir']} is gone, with its "
                        "checkpoints; start a new run (--resume --checkpoint-path FILE continues from a copy)")


def read_checkpoint(path: Path, option: str) -> tuple[dict[str, Any], TrainSettings]:
    """(state, its settings) of a checkpoint a run would start from, loaded as plain data only, and checked to
    be gptctl's own: a dict with model weights and the settings that made it. UserError naming `option` otherwise."""
    from gptctl.checkpoints.files import UnsafeCheckpoint, load

    try:
        state = load(path, mmap=True)  # the settings and keys; the tensors are not read
    except UnsafeCheckpoint as exc:
        raise UserError(f"{option}: {exc}") from None
    stored = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(stored, dict) or not isinstance(state.get("model"), dict):
        found = "no settings" if isinstance(state, dict) else f"a {type(state).__name__}, not a dict of state"
        raise UserError(f"{option}: {path} is not a gptctl checkpoint ({found}); gptctl starts only from its own "
                        "checkpoints, or from Hugging Face weights with hf:DIR_OR_NAME")
    try:
        return state, TrainSettings.model_validate(stored)
    except ValidationError as exc:
        raise UserError(f"{option}: {path} holds settings gptctl cannot use ({describe(exc)})") from None


def parent_model(path: Path, option: str) -> dict[str, Any]:
    """The model settings of the checkpoint a run starts from (loaded as plain data only)."""
    parent = read_checkpoint(path, option)[1]
    return {"model": parent.model, **parent.shape.model_settings()}


def refuse_if_done(home: Path, run: dict[str, Any], settings: TrainSettings) -> None:
    """A resume of `run` (locked by the caller) that could train nothing is refused before its status
    changes. Its start is found by the workers' rules: the newest checkpoint that verifies and, when
    it would end the run, loads as plain data (a file that does not is marked corrupt)."""
    from gptctl.checkpoints import files, store

    db = open_registry(home)
    store.reconcile(db, run, inspect=files.stored_step, by_trainer=True)  # the caller holds the run for its workers
    warn = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    if row := store.newest_good(db, run["id"], warn, loads=True, at_least=settings.max_steps):
        raise UserError(f"run {run['id']} is already at step {row['step']}; raise --max-steps above it to continue")
