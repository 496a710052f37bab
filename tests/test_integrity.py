"""Checkpoint integrity with real faults: damaged and foreign files, readers racing retention, refusals.

Retention decides on verified facts, only real gptctl checkpoints are ever registered, a file being
read is never deleted under its reader, and every refusal is one line in gptctl's words.
"""

import json
import os
import pickle
import subprocess
import socket
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN, add_run, cli, only_run_id, save_tiny_checkpoint, wait_until
from gptctl.cli import app
from gptctl.checkpoints.files import UnsafeCheckpoint, load
from gptctl.errors import UserError
from gptctl.checkpoints import directory, files, retention, store
from gptctl.digest import sha256_of
from gptctl.registry import open_registry, queries


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _non_checkpoints(directory: Path) -> dict[str, Path]:
    """Files with a checkpoint's name that are not checkpoints, as users really meet them."""
    made = {}

    def put(name: str, data: bytes) -> None:
        made[name] = directory / f"{name}" / "model_00004.pt"
        made[name].parent.mkdir(parents=True)
        made[name].write_bytes(data)

    put("random", os.urandom(5000))
    put("lfs", b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 497764237\n")
    put("empty", b"")
    put("text", b"hello world\n")
    put("pickle", pickle.dumps({"model": {}, "step": 4}))
    put("zip", b"")
    with zipfile.ZipFile(made["zip"], "w") as z:
        z.writestr("notes.txt", "not torch")
    put("evil", b"")
    torch.save({"model": {}, "step": 4, "x": Evil()}, made["evil"])
    good = save_tiny_checkpoint(directory / "good.pt", step=4).read_bytes()
    put("truncated", good[:1000])
    return made


def test_load_refuses_every_non_checkpoint_in_gptctls_words(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = _non_checkpoints(tmp_path)
    messages = {}
    for name, path in made.items():
        with pytest.raises(UnsafeCheckpoint) as refused:
            load(path)
        messages[name] = str(refused.value)
    assert "holds pickled code: posix.system; gptctl loads checkpoints as data only" in messages["evil"]
    assert "git-lfs pointer" in messages["lfs"] and "empty" in messages["empty"]
    for message in messages.values():
        assert "weights_only" not in message and "Re-running" not in message and len(message.splitlines()) == 1
    for _ in range(100):  # random bytes trip the unpickler in many ways (KeyError, IndexError, UnicodeDecodeError…)
        made["random"].write_bytes(os.urandom(3000))
        with pytest.raises(UnsafeCheckpoint):
            load(made["random"])
    assert not (tmp_path / "pwned").exists()


def test_sample_and_verify_of_a_non_checkpoint_are_one_line(runner, tmp_path, gptctl_home):
    made = _non_checkpoints(tmp_path)
    for name in ("evil", "random", "lfs", "zip"):
        result = runner.invoke(app, ["sample", str(made[name]), "--prompt", "hi", "--device", "cpu"])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (name, result.output)
        assert "weights_only" not in result.output and str(made[name]) in result.output.replace("\n", "")

    # The same bytes registered as a run's checkpoint (as reconcile once registered any model_*.pt):
    # verify reports each in one line and marks it, without a traceback.
    db = open_registry(gptctl_home)
    run_dir = make_run(db, gptctl_home / "r-r1")
    for step, name in enumerate(("evil", "random", "lfs"), start=1):
        path = directory.checkpoints_dir(queries.get_run(db, "r1")) / f"model_{step:05d}.pt"
        path.write_bytes(made[name].read_bytes())
        queries.register_checkpoint(db, "r1", step, path, path.stat().st_size, sha256_of(path), pinned=False)
    result = runner.invoke(app, ["ckpt", "verify", "--run", "r1"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "holds pickled code: posix.system" in result.output and "git-lfs pointer" in result.output
    assert set(states(db, "r1").values()) == {"corrupt"} and run_dir.is_dir()


def make_run(db, run_dir: Path, run_id: str = "r1", **settings) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    add_run(db, run_id, settings=json.dumps(settings), run_dir=str(run_dir))
    return run_dir


def save(db, run_id: str, step: int, **stat) -> Path:
    """A real tiny gptctl checkpoint in the run's directory, registered as the trainer does."""
    path = directory.checkpoints_dir(queries.get_run(db, run_id)) / f"model_{step:05d}.pt"
    save_tiny_checkpoint(path, step=step)
    queries.register_checkpoint(db, run_id, step, path, path.stat().st_size, sha256_of(path), pinned=False,
                                verified=store.stat_key(path))
    return path


def states(db, run_id: str) -> dict[int, str]:
    return {c["step"]: c["state"] for c in queries.checkpoints_of(db, run_id)}


def test_retention_keeps_the_newest_verified_when_the_newest_is_damaged(gptctl_home, monkeypatch):
    db = open_registry(gptctl_home)
    make_run(db, gptctl_home / "r-r1", keep_last_n_checkpoints=1)
    paths = {step: save(db, "r1", step) for step in (10, 20, 30)}
    os.truncate(paths[30], 1000)  # `truncate -s 1000`: a cheap look (stat) already sees it
    [change] = store.reconcile(db, queries.get_run(db, "r1"))
    assert change.startswith("step 30: file size changed") and change.endswith("marked corrupt")
    warnings = []
    doomed = retention.plan(db, queries.get_run(db, "r1"), warn=warnings.append)
    assert [r["step"] for r in doomed] == [10]  # 20, the newest that verifies, stays
    retention.delete(db, doomed)
    assert states(db, "r1") == {10: "deleted", 20: "valid", 30: "corrupt"} and paths[20].exists()

    # Same size, one flipped byte: only the sha256 can tell, and retention checks it before deleting.
    paths[40], paths[50] = save(db, "r1", 40), save(db, "r1", 50)
    data = bytearray(paths[50].read_bytes())
    data[len(data) // 2] ^= 0xFF
    paths[50].write_bytes(bytes(data))
    assert store.reconcile(db, queries.get_run(db, "r1")) == []  # the size is right
    doomed = retention.plan(db, queries.get_run(db, "r1"), warn=warnings.append)
    assert [r["step"] for r in doomed] == [20] and "checkpoint step 50" in warnings[-1] and "corrupt" in warnings[-1]
    assert states(db, "r1")[50] == "corrupt"

    # Verification is cached by (size, mtime, inode): an unchanged file is not read again.
    def no_reading(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(store, "sha256_of", no_reading)
    assert [r["step"] for r in retention.plan(db, queries.get_run(db, "r1"), warn=warnings.append)] == [20]


def test_orphans_are_registered_only_when_they_load_as_their_step(runner, gptctl_home, tmp_path):
    db = open_registry(gptctl_home)
    run_dir = make_run(db, gptctl_home / "r-r1", permanent_checkpoints=[7])
    ckpts = run_dir / "checkpoints"
    save(db, "r1", 2)
    real = save_tiny_checkpoint(ckpts / "model_00007.pt", step=7)  # killed between rename and insert
    (ckpts / "model_00009.pt").write_bytes(real.read_bytes()[: real.stat().st_size // 2])  # a partial manual copy
    outside = save_tiny_checkpoint(tmp_path / "elsewhere.pt", step=11)
    (ckpts / "model_00011.pt").symlink_to(outside)  # a symlink to a file outside the run
    save_tiny_checkpoint(ckpts / "model_00013.pt", step=5)  # a checkpoint under another step's name
    (ckpts / "model_00015.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")

    # Torch-free looks (ckpt list) register none of them, and say so.
    changes = store.reconcile(db, queries.get_run(db, "r1"))
    assert sorted(states(db, "r1")) == [2] and len(changes) == 5 and all("not registered" in c for c in changes)
    listed = json.loads(runner.invoke(app, ["ckpt", "list", "--json"]).stdout)
    assert [r["step"] for r in listed] == [2]

    changes = store.reconcile(db, queries.get_run(db, "r1"), inspect=files.stored_step)
    assert states(db, "r1") == {2: "valid", 7: "valid"}
    row = queries.checkpoint_at(db, "r1", 7)
    assert row["pinned"] and row["sha256"] == sha256_of(real) and row["verified_inode"] == real.stat().st_ino
    why = {c.split(":")[0]: c for c in changes}
    assert "symlink" in why["step 11"] and "holds step 5" in why["step 13"]
    assert "does not load" in why["step 9"] and "does not load" in why["step 15"]
    # Retention never treats them as checkpoints, and deletes none of them.
    retention.delete(db, retention.plan(db, queries.get_run(db, "r1"), keep_last=1))
    assert sorted(p.name for p in ckpts.iterdir()) == ["model_00007.pt", "model_00009.pt", "model_00011.pt",
                                                       "model_00013.pt", "model_00015.pt"]
    assert outside.exists()


def test_a_reader_lease_keeps_its_checkpoint_from_retention(gptctl_home, monkeypatch):
    from gptctl.refs import checkpoint_for_reading

    db = open_registry(gptctl_home)
    make_run(db, gptctl_home / "r-r1", keep_last_n_checkpoints=1)
    paths = {step: save(db, "r1", step) for step in (2, 4)}

    warnings = []

    def trainer_saves(step: int) -> None:
        """What the trainer does after each save: register the new file, then apply retention."""
        paths[step] = save(db, "r1", step)
        retention.delete(db, retention.plan(db, queries.get_run(db, "r1")), warn=warnings.append)

    with checkpoint_for_reading("r", "--pretrained-checkpoint", gptctl_home) as path:
        assert path == paths[4]
        trainer_saves(6)
        trainer_saves(8)
        assert path.exists() and states(db, "r1")[4] == "valid"  # leased: retention passed it over
        assert warnings == ["kept step 4 of run r1: a reader is loading it, or a run now starts from it"] * 2
        assert states(db, "r1")[6] == "deleted"
    trainer_saves(10)
    assert states(db, "r1") == {2: "deleted", 4: "deleted", 6: "deleted", 8: "deleted", 10: "valid"}

    # Deleted between the reader's look and its lease: the reader takes the next newest, never a vanished file.
    real_acquire, interleaved = queries.acquire_lease, []

    def acquire_after_a_save(db_, path, require_valid):
        if not interleaved:
            interleaved.append(path)
            trainer_saves(12)  # saves 12 and deletes 10, the file the reader just chose
        return real_acquire(db_, path, require_valid)

    monkeypatch.setattr(queries, "acquire_lease", acquire_after_a_save)
    with checkpoint_for_reading("r", "--opt", gptctl_home) as path:
        assert interleaved == [paths[10]] and path == paths[12] and path.exists()
    monkeypatch.setattr(queries, "acquire_lease", real_acquire)

    # RUN:STEP and plain paths are leased too; a step already gone is a clean error.
    with checkpoint_for_reading("r1:12", "--opt", gptctl_home), checkpoint_for_reading(str(paths[12]), "--opt", gptctl_home):
        assert len(list(db.query("select * from checkpoint_leases"))) == 2
    assert list(db.query("select * from checkpoint_leases")) == []
    with pytest.raises(UserError, match="--opt: checkpoint step 10 of run r1 is deleted|--opt: run r1 has no checkpoint at step 10"):
        with checkpoint_for_reading("r1:10", "--opt", gptctl_home):
            pass

    # A lease left by a reader that was killed does not protect anything.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    db.execute("insert into checkpoint_leases (path, pid, host, expires_at) values (?, ?, ?, ?)",
               [str(paths[12]), dead.pid, socket.gethostname(), 4e9])
    trainer_saves(14)
    assert states(db, "r1")[12] == "deleted" and list(db.query("select * from checkpoint_leases")) == []

    # Expiry bounds only what cannot be checked: another host's lease. This host's live reader keeps its
    # lease past it (gptctl serve, for days), and renews it for the other hosts.
    db.execute("insert into checkpoint_leases (path, pid, host, expires_at) values (?, ?, ?, ?)",
               [str(paths[14]), os.getpid(), socket.gethostname(), 1.0])
    db.execute("insert into checkpoint_leases (path, pid, host, expires_at) values (?, ?, ?, ?)",
               [str(paths[14]), 1, "another-host", 1.0])
    queries.purge_stale_leases(db)
    assert [(r["pid"], r["host"]) for r in db.query("select * from checkpoint_leases")] == [(os.getpid(), socket.gethostname())]
    queries.renew_leases(db)
    assert db.execute("select expires_at from checkpoint_leases").fetchone()[0] > time.time() + queries.LEASE_SECONDS - 60
    db.execute("delete from checkpoint_leases")

    # A finetune's parent: once a run row records it, deletion is refused in the same statement.
    add_run(db, "ft", name="ft", kind="finetune", parent_checkpoint=str(paths[14]))
    row = queries.checkpoint_at(db, "r1", 14)
    assert not queries.mark_deleting(db, row["id"], only_if="valid")


ARGS = [*TINY_RUN, "--checkpoint-interval", "2"]


@pytest.mark.slow
def test_prune_with_a_truncated_newest_keeps_the_good_ones_and_resume_says_what_happened(shakespeare, gptctl_home):
    cli("pretrain", *ARGS, "--data-root", str(shakespeare), "--max-steps", "6", "--keep-last-n-checkpoints", "10",
        "--run-name", "t1", home=gptctl_home)
    run_id = only_run_id(gptctl_home, "t1")
    listing = {r["step"]: r for r in json.loads(cli("ckpt", "list", "--json", home=gptctl_home).stdout)}
    newest = Path(listing[6]["path"])
    os.truncate(newest, 1000)
    listing = {r["step"]: r for r in json.loads(cli("ckpt", "list", "--json", home=gptctl_home).stdout)}
    assert listing[6]["state"] == "corrupt"  # not "valid at its old size"

    proc = cli("ckpt", "prune", "--run", "t1", "--keep-last", "1", "--yes", home=gptctl_home)
    assert "step 2" in proc.stdout and "step 4" not in proc.stdout
    listing = {r["step"]: r["state"] for r in json.loads(cli("ckpt", "list", "--json", home=gptctl_home).stdout)}
    assert listing == {4: "valid", 6: "corrupt"}

    proc = cli("resume", run_id, "--max-steps", "8", home=gptctl_home)
    assert "resuming from step 4 (step 6 is corrupt)" in proc.stderr, proc.stderr
    listing = {r["step"]: r["state"] for r in json.loads(cli("ckpt", "list", "--json", home=gptctl_home).stdout)}
    assert listing[6] == listing[8] == "valid"  # step 6 trained again and rewritten


@pytest.mark.slow
def test_resume_falls_back_past_a_file_that_does_not_load_and_a_done_run_is_refused(shakespeare, gptctl_home):
    cli("pretrain", *ARGS, "--data-root", str(shakespeare), "--max-steps", "4", "--keep-last-n-checkpoints", "10",
        "--run-name", "t2", home=gptctl_home)
    run_id = only_run_id(gptctl_home, "t2")
    db = open_registry(gptctl_home)

    def stray(step: int) -> None:
        """A registered file that matches its sha256 but is no checkpoint: what the old reconcile
        registered for any stray model_*.pt (here one holding pickled code)."""
        path = directory.checkpoints_dir(queries.get_run(db, run_id)) / f"model_{step:05d}.pt"
        torch.save({"model": {}, "step": step, "x": Evil()}, path)
        queries.register_checkpoint(db, run_id, step, path, path.stat().st_size, sha256_of(path), pinned=False)
        db.execute("update runs set status = 'interrupted', last_step = ? where id = ?", [step, run_id])

    stray(6)
    proc = cli("resume", run_id, "--max-steps", "8", home=gptctl_home)
    assert "resuming from step 4 (step 6 is corrupt)" in proc.stderr, proc.stderr  # not "from step 6"
    assert "step 6 does not load" in proc.stderr and "holds pickled code: posix.system" in proc.stderr
    assert "weights_only" not in proc.stderr
    assert {c["step"]: c["state"] for c in queries.checkpoints_of(db, run_id)} == {
        2: "valid", 4: "valid", 6: "valid", 8: "valid"}  # 6 trained again and saved over the stray file

    # At its --max-steps by its newest real checkpoint: refused before anything changes, in one line.
    stray(10)
    proc = cli("resume", run_id, home=gptctl_home, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert proc.returncode == 2 and lines == [f"Error: run {run_id} is already at step 8; raise --max-steps above it "
                                              "to continue"], proc.stderr
    assert "checkpoint step 10" in proc.stderr and "does not load" in proc.stderr
    run = queries.get_run(db, run_id)
    assert (run["status"], run["error"]) == ("interrupted", None)

    # A new run from a file already at its --max-steps: refused, and never a failure without a reason.
    step8 = queries.checkpoint_at(db, run_id, 8)["path"]
    proc = cli("pretrain", *ARGS, "--data-root", str(shakespeare), "--max-steps", "8", "--resume",
               "--checkpoint-path", step8, "--run-name", "t3", home=gptctl_home, check=False)
    assert proc.returncode == 2 and "is at step 8; --max-steps (8) must be above it" in proc.stderr, proc.stderr
    assert not list(db.query("select id from runs where status = 'failed' and error is null"))


@pytest.mark.slow
def test_readers_keep_their_checkpoint_while_the_run_prunes(shakespeare, gptctl_home, tmp_path):
    """The issue's reproduction: a finetune and a sample choosing RUN's newest checkpoint while the run
    saves every 2 steps and keeps only the last one."""
    from test_finetune import write_dolly

    data = tmp_path / "dolly.jsonl"
    write_dolly(data, n=50)
    log = open(tmp_path / "train.log", "wb")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "gptctl", "pretrain", *ARGS, "--data-root", str(shakespeare), "--max-steps", "5000",
         "--keep-last-n-checkpoints", "1", "--no-async-checkpoint", "--eval-interval", "1000", "--run-name", "busy"],
        env={**os.environ, "GPTCTL_HOME": str(gptctl_home)}, stdout=log, stderr=log)
    try:
        db = open_registry(gptctl_home)
        wait_until(lambda: list(db.query("select 1 from checkpoints where state = 'valid'")), "a first checkpoint",
                   proc=trainer, interval=0.2, details=(tmp_path / "train.log").read_text)
        parents = set()
        for _ in range(3):
            proc = cli("finetune", "--pretrained-checkpoint", "busy", "--dataset-path", str(data), "--max-steps",
                       "4", "--warmup-steps", "1", "--print-command", home=gptctl_home, check=False)
            assert proc.returncode == 0, proc.stderr
            parents.add(list(db.query("select parent_checkpoint from runs where kind = 'finetune' "
                                      "order by rowid desc limit 1"))[0]["parent_checkpoint"])
            proc = cli("sample", "busy", "--prompt", "To be", "--max-new-tokens", "3", "--device", "cpu",
                       home=gptctl_home, check=False)
            assert proc.returncode == 0, proc.stderr
        assert trainer.poll() is None, "the run ended before the readers were done; raise --max-steps"
        newest = max(r["step"] for r in db.query("select step from checkpoints where state = 'valid'"))
        assert newest > 2
    finally:
        trainer.terminate()
        trainer.wait()
        log.close()
    # Every finetune's parent is still there: chosen under a lease, then protected by its run row.
    assert all((gptctl_home / p).is_file() for p in parents), parents  # stored relative to the home
    assert list(db.query("select * from checkpoint_leases")) == []
