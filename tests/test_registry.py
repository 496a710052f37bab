"""The registry on real SQLite files: migrations, run lookup, staleness, retention, verification."""

import sqlite3

import pytest

from gptctl.errors import UserError
from gptctl.registry import files, open_registry, queries
from gptctl.registry.locks import RunLock
from gptctl.registry.retention import deletable


def make_run(db, run_dir, run_id=None, name="r", status="created"):
    run_id = run_id or queries.new_run_id(db)
    run_dir.mkdir(parents=True, exist_ok=True)
    queries.insert_run(db, {"id": run_id, "name": name, "kind": "pretrain", "settings": "{}", "run_dir": str(run_dir),
                            "status": status})
    return run_id


def test_migrations_are_recorded_and_idempotent(gptctl_home):
    open_registry()
    open_registry()
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        applied = conn.execute("select name from _sqlite_migrations").fetchall()
        assert applied == [("0001_initial",)]
        assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_resolve_by_id_prefix_and_name(gptctl_home):
    db = open_registry()
    make_run(db, gptctl_home / "a", "abcd1111", name="alpha")
    make_run(db, gptctl_home / "b", "abce2222", name="beta")
    assert queries.resolve_run(db, "abcd")["id"] == "abcd1111"
    assert queries.resolve_run(db, "beta")["id"] == "abce2222"
    with pytest.raises(UserError, match="ambiguous"):
        queries.resolve_run(db, "abc")
    with pytest.raises(UserError, match="no run"):
        queries.resolve_run(db, "zzz")


def test_a_run_whose_process_vanished_is_stale(gptctl_home):
    db = open_registry()
    held = make_run(db, gptctl_home / "held", name="held", status="running")
    gone = make_run(db, gptctl_home / "gone", name="gone", status="running")
    lock = RunLock(gptctl_home / "held")
    assert lock.acquire()
    assert not RunLock(gptctl_home / "held").acquire()  # a second trainer is refused
    statuses = {r["id"]: r["status"] for r in queries.list_runs(db)}
    assert statuses == {held: "running", gone: "stale"}
    lock.release()
    assert queries.resolve_run(db, held)["status"] == "stale"


def ck(step, state="valid", pinned=0, path=None):
    return {"step": step, "state": state, "pinned": pinned, "path": path or f"/c/{step}.pt"}


def test_retention_never_deletes_what_must_stay():
    rows = [ck(1), ck(2, pinned=1), ck(3), ck(4, path="/parent.pt"), ck(5), ck(6, state="missing"), ck(7), ck(8)]
    gone = [c["step"] for c in deletable(rows, keep_last=2, permanent={3}, protected_paths={"/parent.pt"})]
    assert gone == [1, 5]
    # keep_last below 1 still keeps the newest
    assert [c["step"] for c in deletable([ck(1), ck(2)], keep_last=0, permanent=set(), protected_paths=set())] == [1]


def test_newest_verified_checkpoint_skips_corrupt_and_missing(gptctl_home, tmp_path):
    db = open_registry()
    run = make_run(db, gptctl_home / "r")
    for step in (1, 2, 3):
        p = tmp_path / f"model_{step:05d}.pt"
        p.write_bytes(bytes([step]) * 100)
        queries.register_checkpoint(db, run, step, p, 100, files.sha256_of(p), pinned=False)
    (tmp_path / "model_00003.pt").unlink()
    (tmp_path / "model_00002.pt").write_bytes(b"\0" * 100)  # same size, wrong bytes
    warnings = []
    row = files.newest_verified_checkpoint(db, run, warn=warnings.append)
    assert row["step"] == 1 and len(warnings) == 2
    states = {c["step"]: c["state"] for c in queries.checkpoints_of(db, run)}
    assert states == {1: "valid", 2: "corrupt", 3: "missing"}


def test_metrics_batch_upsert_and_truncate_on_resume(gptctl_home):
    db = open_registry()
    run = make_run(db, gptctl_home / "r")
    queries.write_metrics(db, run, [{"step": s, "loss": 10.0 - s} for s in range(1, 6)])
    queries.write_metrics(db, run, [{"step": 5, "val_loss": 4.5}])
    queries.delete_metrics_after(db, run, 4)
    rows = queries.metrics_of(db, run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] == 6.0


def test_reconcile_registers_orphans_marks_vanished_and_removes_temporaries(gptctl_home):
    db = open_registry()
    run_dir = gptctl_home / "r"
    run = make_run(db, run_dir)
    db["runs"].update(run, {"settings": '{"permanent_checkpoints": [3]}'})
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir()
    gone = ckpts / "model_00001.pt"
    queries.register_checkpoint(db, run, 1, gone, 10, "x", pinned=False)  # registered, file never there
    orphan = ckpts / "model_00003.pt"
    orphan.write_bytes(b"complete checkpoint")  # renamed into place, killed before the insert
    (ckpts / ".tmp-model_00004.pt.123").write_bytes(b"half")
    lock = RunLock(run_dir)
    assert lock.acquire()
    files.reconcile(db, queries.get_run(db, run))
    assert (ckpts / ".tmp-model_00004.pt.123").exists()  # a live trainer may be writing it
    lock.release()
    changes = files.reconcile(db, queries.get_run(db, run))
    assert any("removed leftover" in c for c in changes)
    assert [p.name for p in ckpts.iterdir()] == ["model_00003.pt"]
    rows = {c["step"]: c for c in queries.checkpoints_of(db, run)}
    assert rows[1]["state"] == "missing"
    assert rows[3]["state"] == "valid" and rows[3]["pinned"] == 1 and rows[3]["sha256"] == files.sha256_of(orphan)
    assert files.reconcile(db, queries.get_run(db, run)) == []  # idempotent
