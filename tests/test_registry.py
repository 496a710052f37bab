"""The registry on real SQLite files: migrations, run lookup, staleness, retention, verification."""

import json
import sqlite3
import time
from datetime import datetime, timezone

import pytest

from helpers import add_run
from gptctl.errors import UserError
from gptctl.checkpoints import directory, retention, store
from gptctl.checkpoints.retention import deletable
from gptctl.digest import sha256_of
from gptctl.registry import open_registry, queries
from gptctl.registry.locks import DirectoryLock


def make_run(db, run_dir, run_id=None, name="r", status="created"):
    run_id = run_id or queries.new_run_id(db)
    run_dir.mkdir(parents=True, exist_ok=True)
    add_run(db, run_id, name=name, run_dir=str(run_dir), status=status)
    return run_id


def test_migrations_are_recorded_and_idempotent(gptctl_home):
    open_registry()
    open_registry()
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        applied = conn.execute("select name from _sqlite_migrations").fetchall()
        assert applied == [("0001_initial",), ("0002_val_loss_steps_index",), ("0003_watching",),
                           ("0004_checkpoint_integrity",), ("0005_health",), ("0006_launches",),
                          ("0007_home_relative_paths",), ("0008_verified_files",), ("0009_parent_kind",)]
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


def test_a_reference_means_one_run_exactly(gptctl_home):
    """Exact id, then exact name, then a unique prefix of the hex id: never a LIKE pattern, never case-folded."""
    db = open_registry()
    make_run(db, gptctl_home / "a", "643a273d", name="alpha")
    make_run(db, gptctl_home / "b", "9f00aa11", name="643")  # a name that is a prefix of another run's id
    make_run(db, gptctl_home / "c", "12ab34cd", name="9f00aa11")  # a name equal to another run's id
    make_run(db, gptctl_home / "d", "77777777", name="a_b%")
    assert queries.resolve_run(db, "643")["id"] == "9f00aa11"  # the exact name beats the id prefix
    assert queries.resolve_run(db, "9f00aa11")["id"] == "9f00aa11"  # the exact id beats the name
    assert queries.resolve_run(db, "643a")["id"] == "643a273d"
    assert queries.resolve_run(db, "a_b%")["id"] == "77777777"
    for pattern in ("%", "_", "6_3", "643A", "ALPHA", "a_b", "a%", "7777777%", "__"):
        with pytest.raises(UserError, match="no run"):
            queries.resolve_run(db, pattern)
    make_run(db, gptctl_home / "e", "643b0000", name="other")
    with pytest.raises(UserError, match="643a273d.*643b0000|643b0000.*643a273d"):
        queries.resolve_run(db, "64")


def test_a_run_whose_process_vanished_is_stale(gptctl_home):
    db = open_registry()
    held = make_run(db, gptctl_home / "held", name="held", status="running")
    gone = make_run(db, gptctl_home / "gone", name="gone", status="running")
    lock = DirectoryLock(gptctl_home / "held")
    assert lock.acquire()
    assert not DirectoryLock(gptctl_home / "held").acquire()  # a second trainer is refused
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
        queries.register_checkpoint(db, run, step, p, 100, sha256_of(p), pinned=False)
    (tmp_path / "model_00003.pt").unlink()
    (tmp_path / "model_00002.pt").write_bytes(b"\0" * 100)  # same size, wrong bytes
    warnings = []
    row = store.newest_good(db, run, warn=warnings.append)
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
    lock = DirectoryLock(run_dir)
    assert lock.acquire()
    store.reconcile(db, queries.get_run(db, run))
    assert (ckpts / ".tmp-model_00004.pt.123").exists()  # a live trainer may be writing it
    lock.release()
    changes = store.reconcile(db, queries.get_run(db, run), inspect=lambda path: 3)  # it loads as step 3's
    assert any("removed leftover" in c for c in changes)
    assert [p.name for p in ckpts.iterdir()] == ["model_00003.pt"]
    rows = {c["step"]: c for c in queries.checkpoints_of(db, run)}
    assert rows[1]["state"] == "missing"
    assert rows[3]["state"] == "valid" and rows[3]["pinned"] == 1 and rows[3]["sha256"] == sha256_of(orphan)
    assert store.reconcile(db, queries.get_run(db, run)) == []  # idempotent


def save_file(db, run, step, data=None):
    """A checkpoint file in the run's directory, registered like the trainer does."""
    directory = gptctl_dir(db, run)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"model_{step:05d}.pt"
    path.write_bytes(data or bytes([step]) * 100)
    queries.register_checkpoint(db, run, step, path, path.stat().st_size, sha256_of(path), pinned=False)
    return path


def gptctl_dir(db, run):
    return directory.checkpoints_dir(queries.get_run(db, run))


def states(db, run):
    return {c["step"]: c["state"] for c in queries.checkpoints_of(db, run)}


def test_a_tampered_row_never_makes_gptctl_delete_a_file_elsewhere(gptctl_home, tmp_path):
    db = open_registry()
    run = make_run(db, gptctl_home / "r")
    db["runs"].update(run, {"settings": json.dumps({"keep_last_n_checkpoints": 1})})
    save_file(db, run, 1)
    precious = tmp_path / "precious.txt"
    precious.write_text("not a checkpoint")
    outside = tmp_path / "model_00002.pt"  # a checkpoint's name, but another directory
    outside.write_text("keep me")
    link = save_file(db, run, 3)
    link.unlink()
    link.symlink_to(precious)  # in the directory, but pointing out of it
    save_file(db, run, 4)
    db.execute("update checkpoints set path = ? where run_id = ? and step = 1", [str(precious), run])
    queries.register_checkpoint(db, run, 2, outside, 7, "x", pinned=False)
    climbing = gptctl_dir(db, run) / ".." / "model_00000.pt"  # the run directory itself, through ".."
    climbing.write_text("config next door")
    queries.register_checkpoint(db, run, 0, climbing, 16, "x", pinned=False)

    warnings = []
    doomed = retention.plan(db, queries.get_run(db, run), warn=warnings.append)
    assert doomed == [] and len(warnings) == 4  # steps 0-3 refused; 4 is the newest
    assert all("not in the run's checkpoints directory" in w for w in warnings)
    # delete() checks again, whatever it is handed
    rows = queries.checkpoints_of(db, run)
    assert retention.delete(db, rows[:4], warn=warnings.append) == 0 and len(warnings) == 8
    db.execute("update checkpoints set state = 'deleting' where run_id = ? and step < 4", [run])
    store.reconcile(db, queries.get_run(db, run))  # an "interrupted deletion" outside is not finished either
    assert precious.read_text() == "not a checkpoint" and outside.read_text() == "keep me" and link.is_symlink()
    assert climbing.read_text() == "config next door"


def test_an_interrupted_deletion_is_finished_and_never_reported_missing(gptctl_home):
    db = open_registry()
    run = make_run(db, gptctl_home / "r")
    one, two = save_file(db, run, 1), save_file(db, run, 2)
    save_file(db, run, 3)
    # killed after marking step 1 deleting (file still there) and after unlinking step 2
    db.execute("update checkpoints set state = 'deleting' where run_id = ? and step in (1, 2)", [run])
    two.unlink()
    changes = store.reconcile(db, queries.get_run(db, run))
    assert sorted(changes) == ["step 1: finished deleting it", "step 2: finished deleting it"]
    assert not one.exists() and states(db, run) == {1: "deleted", 2: "deleted", 3: "valid"}


def test_state_changes_do_not_overwrite_a_concurrent_change(gptctl_home):
    db = open_registry()
    run = make_run(db, gptctl_home / "r")
    path = save_file(db, run, 1)
    row = queries.checkpoints_of(db, run)[0]
    stale_view = dict(row)
    assert directory.remove_checkpoint(db, queries.get_run(db, run), row) == 100  # retention deleted it
    # a reader that looked before the deletion finds the file gone: it must not call it missing
    assert not queries.mark_checkpoint(db, stale_view["id"], "missing", only_if="valid")
    assert directory.remove_checkpoint(db, queries.get_run(db, run), stale_view) is None  # a second deleter backs off
    # nor may it register the file it saw as valid again; a row that was already deleted may be replaced
    assert not queries.register_checkpoint(db, run, 1, path, 100, "x", pinned=False, replacing="valid")
    assert states(db, run) == {1: "deleted"}
    assert not queries.register_checkpoint(db, run, 1, path, 100, "x", pinned=False, replacing=None)
    assert queries.register_checkpoint(db, run, 1, path, 100, "x", pinned=False, replacing="deleted")
    assert states(db, run) == {1: "valid"}


def test_run_overviews_aggregate_progress_losses_and_checkpoints(gptctl_home):
    db = open_registry()
    a = make_run(db, gptctl_home / "a", "aaaa0001", name="a", status="completed")
    b = make_run(db, gptctl_home / "b", "bbbb0002", name="b", status="completed")
    db["runs"].update(a, {"max_steps": 10, "started_at": "2026-01-01T00:00:00+00:00",
                          "ended_at": "2026-01-01T01:02:03+00:00", "parent_checkpoint": "/base/model_00100.pt"})
    queries.write_metrics(db, a, [{"step": s, "loss": 10.0 - s, "tokens_seen": 256 * s,
                                   "val_loss": 20.0 - s if s % 4 == 0 else None} for s in range(1, 11)])
    save_file(db, a, 4)
    save_file(db, a, 8, data=b"x" * 50)
    save_file(db, a, 10, data=b"y" * 30)
    db.execute("update checkpoints set state = 'missing' where run_id = ? and step = 10", [a])
    overviews = {r["id"]: r for r in queries.run_overviews(db)}
    ra, rb = overviews[a], overviews[b]
    assert (ra["step"], ra["loss"], ra["val_loss"], ra["val_step"], ra["tokens_seen"]) == (10, 0.0, 12.0, 8, 2560)
    assert (ra["checkpoint_count"], ra["checkpoint_bytes"]) == (2, 150)  # the valid ones
    assert ra["elapsed_s"] == 3723 and ra["parent_checkpoint"] == "/base/model_00100.pt"
    assert (rb["step"], rb["loss"], rb["val_loss"], rb["checkpoint_count"], rb["elapsed_s"]) == (None, None, None, 0, None)
    assert queries.run_overviews(db, b) == [rb]
    # every lookup is an index search, so `runs list` does not slow down with the number of steps
    plan = " | ".join(r["detail"] for r in db.query("explain query plan " + queries._OVERVIEW_SQL.format(where="")))
    assert "SCAN metrics" not in plan and "metrics_val_loss_steps" in plan, plan


def test_a_stale_run_ended_at_its_last_metric(gptctl_home):
    db = open_registry()
    run = make_run(db, gptctl_home / "r", status="running")
    db["runs"].update(run, {"started_at": "2026-01-01T00:00:00+00:00"})
    queries.write_metrics(db, run, [{"step": 1, "loss": 1.0, "time": 1767225600.0 + 90}])  # 2026-01-01 00:01:30
    row = queries.run_overviews(db)[0]
    assert row["status"] == "stale" and row["ended_at"] == "2026-01-01T00:01:30+00:00" and row["elapsed_s"] == 90


def test_checkpoint_listing_has_val_loss_age_and_permanence(gptctl_home):
    db = open_registry()
    run = make_run(db, gptctl_home / "r")
    db["runs"].update(run, {"settings": json.dumps({"permanent_checkpoints": [2]})})
    queries.write_metrics(db, run, [{"step": 2, "loss": 3.0, "val_loss": 2.5}, {"step": 3, "loss": 2.9}])
    began = time.time()
    for step in (2, 3):
        save_file(db, run, step)
    # Step 2 was saved an hour ago (registered as the registry does: whole seconds, UTC); step 3 just now.
    an_hour_ago = datetime.fromtimestamp(time.time() - 3600, timezone.utc).isoformat(timespec="seconds")
    db.execute("update checkpoints set created_at = ? where run_id = ? and step = 2", [an_hour_ago, run])
    rows = {r["step"]: r for r in store.listing(db, run)}
    took = time.time() - began
    assert rows[2]["val_loss"] == 2.5 and rows[3]["val_loss"] is None
    assert rows[2]["permanent"] and not rows[3]["permanent"]
    # An age is now less the time registered (rounded down to the second): not clamped, not reversed.
    assert 3600 <= rows[2]["age_s"] < 3601 + took and 0 <= rows[3]["age_s"] < 1 + took


def test_a_run_whose_settings_lack_keep_last_keeps_the_default_three(gptctl_home):
    db = open_registry()
    run = make_run(db, gptctl_home / "r")
    db["runs"].update(run, {"settings": json.dumps({})})  # stored before the option existed
    for step in range(1, 6):
        save_file(db, run, step)
    doomed = retention.plan(db, queries.get_run(db, run))
    assert [c["step"] for c in doomed] == [1, 2]
