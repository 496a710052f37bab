"""Numbered, idempotent schema migrations; sqlite-utils records each one with its transaction."""

from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("gptctl")


@migrations(name="0001_initial")
def m0001_initial(db: Database) -> None:
    db["runs"].create(
        {
            "id": str,
            "name": str,
            "kind": str,  # pretrain | finetune
            "status": str,  # created | running | completed | failed | interrupted | stale
            "settings": str,  # JSON of the resolved TrainSettings
            "run_dir": str,
            "command": str,  # the command line that started the run
            "parent_checkpoint": str,  # path of the checkpoint a finetune started from
            "created_at": str,
            "started_at": str,
            "ended_at": str,
            "host": str,
            "pid": int,
            "world_size": int,
            "device": str,  # cuda | cpu | mps, as resolved by the engine
            "device_name": str,  # e.g. "NVIDIA GeForce RTX 3090", "cpu"
            "dtype": str,  # as resolved by the engine
            "last_step": int,
            "max_steps": int,
            "tokens_per_s": float,  # measured mean over the run, all ranks together
            "mfu": float,
            "exit_code": int,
            "error": str,
        },
        pk="id",
        not_null={"name", "kind", "status", "settings", "run_dir", "created_at"},
    )
    db["runs"].create_index(["name", "created_at"])
    db["checkpoints"].create(
        {
            "id": int,
            "run_id": str,
            "step": int,
            "path": str,
            "bytes": int,
            "sha256": str,
            "created_at": str,
            "pinned": int,  # 1 for pinned or permanent steps: they are never deleted
            "state": str,  # valid | missing | corrupt | deleted
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
        not_null={"run_id", "step", "path", "state"},
    )
    db["checkpoints"].create_index(["run_id", "step"], unique=True)
    db["metrics"].create(
        {
            "run_id": str,
            "step": int,
            "loss": float,
            "val_loss": float,
            "lr": float,
            "grad_norm": float,
            "tokens_per_s": float,
            "mfu": float,
            "tokens_seen": int,
            "time": float,
        },
        pk=("run_id", "step"),
        foreign_keys=[("run_id", "runs", "id")],
    )


@migrations(name="0002_val_loss_steps_index")
def m0002_val_loss_steps_index(db: Database) -> None:
    # `runs list` looks up each run's last val loss; evals are every N steps, so without this index
    # it would walk back over up to N metric rows per run.
    db.execute("create index if not exists metrics_val_loss_steps on metrics (run_id, step) where val_loss is not null")


@migrations(name="0003_watching")
def m0003_watching(db: Database) -> None:
    # A run's W&B id, HellaSwag accuracy during pretraining, and --log-gradients' per-parameter rows.
    if "wandb_run_id" not in db["runs"].columns_dict:
        db["runs"].add_column("wandb_run_id", str)
    if "hellaswag_acc" not in db["metrics"].columns_dict:
        db["metrics"].add_column("hellaswag_acc", float)
    db["grad_stats"].create(
        {"run_id": str, "step": int, "name": str, "grad_norm": float, "update_ratio": float},
        pk=("run_id", "step", "name"),
        foreign_keys=[("run_id", "runs", "id")],
        if_not_exists=True,
    )


@migrations(name="0004_checkpoint_integrity")
def m0004_checkpoint_integrity(db: Database) -> None:
    # The (size, mtime_ns, inode) a checkpoint's file had when its sha256 last matched: a later look
    # with the same stat trusts the file without reading it again (files.check_file).
    for column in ("verified_size", "verified_mtime_ns", "verified_inode"):
        if column not in db["checkpoints"].columns_dict:
            db["checkpoints"].add_column(column, int)
    # Readers (sample, export, eval, a finetune choosing its parent) lease the file they read;
    # retention never starts deleting a leased path (queries.mark_deleting).
    db["checkpoint_leases"].create(
        {"id": int, "path": str, "pid": int, "host": str, "expires_at": float, "created_at": str},
        pk="id",
        not_null={"path", "pid", "host", "expires_at"},
        if_not_exists=True,
    )
    db["checkpoint_leases"].create_index(["path"], if_not_exists=True)


@migrations(name="0005_health")
def m0005_health(db: Database) -> None:
    # A checkpoint's health: 'healthy', or 'unhealthy: why' (a run rolled back to it diverged again).
    # NULL: registered before gptctl judged health, counted as healthy.
    if "health" not in db["checkpoints"].columns_dict:
        db["checkpoints"].add_column("health", str)
    # What happened to a run besides its steps: skipped non-finite steps, spikes, rollbacks, divergence.
    db["events"].create(
        {"id": int, "run_id": str, "step": int, "time": str, "kind": str, "detail": str},
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
        not_null={"run_id", "kind"},
        if_not_exists=True,
    )
    db["events"].create_index(["run_id", "step"], if_not_exists=True)


@migrations(name="0006_launches")
def m0006_launches(db: Database) -> None:
    # Every start of a run's workers (a launch, a torchrun restart, a rollback within one): what it trained,
    # what it trained again, where its time went and how it ended. Times are epoch seconds (durations
    # are what matters); reason is NULL while it runs (registry/launches.py).
    db["launches"].create(
        {"id": int, "run_id": str, "started_at": float, "ended_at": float, "updated_at": float, "reason": str,
         "host": str, "world_size": int, "first_step": int, "last_step": int, "redone_steps": int,
         "startup_s": float, "step_s": float, "eval_s": float, "save_s": float, "saves": int, "steps": int,
         "peak_memory": int},
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
        not_null={"run_id", "started_at", "first_step"},
        if_not_exists=True,
    )
    db["launches"].create_index(["run_id"], if_not_exists=True)


@migrations(name="0007_home_relative_paths")
def m0007_home_relative_paths(db: Database) -> None:
    # Paths relative to the home, so that a copied or moved home is its own (registry/homepaths.py).
    # Older rows hold absolute paths, maybe of another home (this one's original, before a `cp -a`):
    # each is recognised by the run directory it lies in, not by where that home was.
    from gptctl.registry.homepaths import adopt, home_of

    home = home_of(db)
    run_dirs = {row["run_dir"]: Path(row["run_dir"]).name
                for row in db.query("select run_dir from runs") if Path(row["run_dir"]).is_absolute()}
    for run in list(db.query("select id, run_dir, parent_checkpoint from runs")):
        db.execute("update runs set run_dir = ?, parent_checkpoint = ? where id = ?",
                   [Path(run["run_dir"]).name, adopt(home, run["parent_checkpoint"], run_dirs), run["id"]])
    for table in ("checkpoints", "checkpoint_leases"):
        for row in list(db.query(f"select id, path from {table}")):
            db.execute(f"update {table} set path = ? where id = ?", [adopt(home, row["path"], run_dirs), row["id"]])


@migrations(name="0008_verified_files")
def m0008_verified_files(db: Database) -> None:
    # Files outside the registry's rows whose sha256 gptctl checked (token shards against their manifest):
    # a later look with the same (size, mtime_ns, inode) trusts the file without reading it again.
    db["verified_files"].create(
        {"path": str, "size": int, "mtime_ns": int, "inode": int, "sha256": str},
        pk="path",
        if_not_exists=True,
    )


@migrations(name="0009_parent_kind")
def m0009_parent_kind(db: Database) -> None:
    # What a run's parent checkpoint gives it: 'weights' (--init-from, a finetune's parent) or 'state' (a
    # --resume --checkpoint-path start: weights, optimizer and step, which a later launch must start from
    # again while the run has no checkpoint of its own). Older rows: a parent that is not the settings'
    # pretrained_checkpoint was a --resume start.
    import json

    from gptctl.registry.homepaths import adopt, home_of

    if "parent_kind" not in db["runs"].columns_dict:
        db["runs"].add_column("parent_kind", str)
    home = home_of(db)
    for run in list(db.query("select id, parent_checkpoint, settings from runs where parent_checkpoint is not null")):
        weights = json.loads(run["settings"] or "{}").get("pretrained_checkpoint")
        kind = "weights" if weights and adopt(home, weights) == run["parent_checkpoint"] else "state"
        db.execute("update runs set parent_kind = ? where id = ?", [kind, run["id"]])
