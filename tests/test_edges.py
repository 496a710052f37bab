"""Faults at the edges of a run: what a requeue onto other hardware, a full disk or a busy machine does."""

import errno
import json
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import TINY_RUN, cli, losses, only_run_id

pytestmark = pytest.mark.slow


def test_a_resume_may_change_the_micro_batch_and_keeps_the_tokens_per_step(shakespeare, tmp_path):
    """A requeue onto a smaller GPU: `resume RUN --batch-size 1` on a run made with 2 (TINY_RUN: 2 micro-steps
    of 2×32 tokens) trains 4 micro-steps of 1×32, the same 128 tokens per step, without --override-settings."""
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "8", "--checkpoint-interval", "4"]
    reference_home, home = tmp_path / "reference", tmp_path / "home"
    cli("pretrain", *args, "--run-name", "ref", home=reference_home)
    reference = losses(reference_home, only_run_id(reference_home))

    # The save at step 8 fails (a full disk): the run ends failed with its step-4 checkpoint.
    failed = cli("pretrain", *args, "--run-name", "small", home=home, check=False,
                 env={"GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES": "1000", "GPTCTL_TEST_FAULT_FROM_STEP": "8"})
    assert failed.returncode != 0
    result = cli("resume", "small", "--batch-size", "1", home=home)
    assert "--batch-size 1 (was 2)" in result.stderr and "4 micro-steps of 1×32" in result.stderr, result.stderr
    run_id = only_run_id(home)
    settings = json.loads(cli("runs", "show", run_id, "--json", home=home).stdout)["settings"]
    assert (settings["batch_size"], settings["total_batch_size"]) == (1, 128)
    resumed = losses(home, run_id)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    assert {s: resumed[s] for s in range(1, 5)} == {s: reference[s] for s in range(1, 5)}  # before: bit for bit
    for step in range(5, 9):  # after: the same tokens summed in another order, equal within float rounding
        assert resumed[step][0] == pytest.approx(reference[step][0], rel=1e-5), step


# --- the registry's faults, said as what they are -------------------------------------------------

@contextmanager
def mounted(path: Path, *options: str, source: str = "tmpfs"):
    """A real mount for the test's lifetime (a small tmpfs to fill, or a read-only bind); skipped, with the
    reason, where this process may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    kind = ["-t", "tmpfs"] if source == "tmpfs" else ["--bind"]
    done = subprocess.run(["mount", *kind, *options, source, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()}): the test needs root to fill a disk for real")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; the filler file, to remove to free it again."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def one_line(result, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_a_full_disk_is_said_as_one_and_never_as_damage(shakespeare, tmp_path):
    with mounted(tmp_path / "disk", "-o", "size=128m") as disk:
        home = disk / "home"
        args = [*TINY_RUN, "--data-root", str(shakespeare), "--checkpoint-interval", "3", "--run-name", "base"]
        cli("pretrain", *args, "--max-steps", "3", home=home)
        cli("ckpt", "pin", "3", home=home)
        filler = fill(disk)

        resumed = cli("resume", "base", "--max-steps", "200", "--checkpoint-interval", "100", home=home, check=False)
        assert resumed.returncode != 0
        said = resumed.stdout + resumed.stderr
        assert "Traceback" not in said and "damaged" not in said and "rebuild" not in said, said
        assert "o space left" in said, said
        rebuilt = cli("registry", "rebuild", home=home, check=False)  # nothing to add: it writes nothing
        assert "damaged" not in rebuilt.stdout + rebuilt.stderr and "Traceback" not in rebuilt.stderr
        assert not list(home.glob("gptctl.db.damaged-*")), "a healthy registry was moved aside"

        filler.unlink()
        listed = json.loads(cli("ckpt", "list", "--json", home=home).stdout)
        assert [(c["step"], c["pinned"]) for c in listed] == [(3, 1)], listed  # the pin survived
        cli("resume", "base", "--max-steps", "6", home=home)


def test_a_read_only_home_reads_and_refuses_writes_in_one_line(shakespeare, tmp_path):
    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    def state():  # the files, and what the registry holds (its own files change when the test's connection closes)
        files = sorted((str(p.relative_to(home)), p.stat().st_size) for p in home.rglob("*")
                       if p.is_file() and not p.name.startswith("gptctl.db"))
        with sqlite3.connect(home / "gptctl.db") as conn:
            return files, [conn.execute(f"select * from {t}").fetchall() for t in ("runs", "checkpoints", "metrics")]

    before = state()
    with mounted(tmp_path / "ro", "-o", "ro", source=str(home)) as ro:
        assert json.loads(cli("runs", "list", "--json", home=ro).stdout)[0]["name"] == "base"
        assert json.loads(cli("ckpt", "list", "--json", home=ro).stdout)[0]["step"] == 3
        assert json.loads(cli("runs", "show", "base", "--json", home=ro).stdout)["status"] == "completed"
        cli("sample", "base", "--prompt", "To be", "--max-new-tokens", "2", "--device", "cpu", home=ro)
        for command in (["ckpt", "pin", "3"], ["resume", "base", "--max-steps", "6"], ["registry", "rebuild"],
                        ["ckpt", "prune", "--yes"]):
            one_line(cli(*command, home=ro, check=False), "not writable")
    assert state() == before


def test_a_registry_locked_too_long_is_said_as_a_lock(shakespeare, tmp_path, monkeypatch):
    from gptctl.registry import db as registry_db

    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    monkeypatch.setattr(registry_db, "BUSY_TIMEOUT_MS", 300)
    holder = sqlite3.connect(home / "gptctl.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's long write
    try:
        one_line(cli("ckpt", "pin", "3", "--run", "base", home=home, check=False), "locked by another process for over 0.3 s")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    cli("ckpt", "pin", "3", "--run", "base", home=home)


def test_real_damage_names_rebuild_and_the_rest_does_not(tmp_path):
    from gptctl.registry.diagnose import explain

    path = tmp_path / "gptctl.db"
    conn = sqlite3.connect(path)
    conn.execute("create table t (x)")
    conn.executemany("insert into t values (?)", [(b"x" * 3000,)] * 50)
    conn.commit()
    conn.close()
    full = sqlite3.OperationalError("database or disk is full")
    assert "registry rebuild" not in explain(full, path) and "no space left" in explain(full, path)
    healthy = sqlite3.DatabaseError("database disk image is malformed")  # said, but the file is sound
    assert "registry rebuild" not in explain(healthy, path) and "passes an integrity check" in explain(healthy, path)
    raw = bytearray(path.read_bytes())
    raw[4096 * 2: 4096 * 2 + 200] = b"\xff" * 200  # a page of the table, overwritten
    path.write_bytes(bytes(raw))
    assert "is damaged" in explain(healthy, path) and "registry rebuild" in explain(healthy, path)


def test_data_prepare_on_a_full_disk_is_one_line(tmp_path):
    from conftest import SHAKESPEARE

    with mounted(tmp_path / "disk", "-o", "size=300k") as disk:
        result = cli("data", "prepare", "--input", str(SHAKESPEARE), "--data-root", str(disk / "data"),
                     home=tmp_path / "home", check=False)
        one_line(result, "no space left", "tinyshakespeare_train_000000.npy")
        assert not (disk / "data").exists()  # nothing finished: nothing left behind


# --- cluster storage ------------------------------------------------------------------------------

MOUNTINFO = """\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 22 0:50 / /shared rw,relatime - nfs4 server:/export rw,vers=4.2
41 40 0:51 / /shared/scratch rw,relatime - tmpfs tmpfs rw
42 22 0:52 / /lustre rw,relatime - lustre 10.0.0.1@tcp:/fs rw,flock
"""


def test_network_filesystems_are_told_from_local_ones_by_the_mount_table():
    from gptctl.registry.storage import filesystem_type, is_network

    assert filesystem_type(Path("/shared/team/runs"), MOUNTINFO) == "nfs4"
    assert filesystem_type(Path("/shared/scratch/runs"), MOUNTINFO) == "tmpfs"  # the nearest mount wins
    assert is_network(Path("/lustre/me/runs"), MOUNTINFO) and not is_network(Path("/home/me/runs"), MOUNTINFO)


def test_a_home_on_a_network_filesystem_uses_the_rollback_journal(shakespeare, tmp_path, monkeypatch):
    from gptctl.registry import storage

    home = tmp_path / "home"
    monkeypatch.setattr(storage, "is_network", lambda path, mountinfo=None: Path(path).is_relative_to(tmp_path))
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--checkpoint-interval", "3", "--run-name", "base"]
    cli("pretrain", *args, "--max-steps", "3", home=home)
    cli("resume", "base", "--max-steps", "6", home=home)
    with sqlite3.connect(home / "gptctl.db") as conn:
        assert conn.execute("pragma journal_mode").fetchone()[0] == "delete"
    assert not (home / "gptctl.db-wal").exists()
    assert [c["step"] for c in json.loads(cli("ckpt", "list", "--json", home=home).stdout)] == [3, 6]


HOLDER = """
import fcntl, json, os, sys, time
path, live = sys.argv[1], sys.argv[2] == "live"
fd = os.open(path, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": 4242, "host": "node-17"}).encode())
print("held", flush=True)
while True:
    time.sleep(0.2)
    if live:
        os.utime(fd)
"""


def hold_lock(run_dir: Path, live: bool) -> subprocess.Popen:
    """A lock as a trainer on another node holds it: its flock, its name, and a heartbeat only if `live`
    (a node that died keeps its flock on a network filesystem until the server's lease runs out)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / ".lock"), "live" if live else "dead"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_requeued_job_takes_over_a_lock_whose_heartbeat_stopped(shakespeare, tmp_path, monkeypatch):
    from gptctl import control

    home = tmp_path / "home"
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--checkpoint-interval", "3", "--run-name", "base"]
    cli("pretrain", *args, "--max-steps", "3", home=home)
    run_dir = next(home.glob("base-*"))
    monkeypatch.setattr(control, "TAKEOVER_WAIT_S", 1.5)

    live = hold_lock(run_dir, live=True)
    try:
        refused = cli("resume", "base", "--max-steps", "6", home=home, check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        watched, said = refused.stderr.splitlines()  # what it waits for, then why it gives up
        assert "watching its heartbeat" in watched and "being trained by another process (pid 4242 on node-17)" in said
    finally:
        live.kill()
        live.wait()
    dead = hold_lock(run_dir, live=False)
    try:
        resumed = cli("resume", "base", "--max-steps", "6", home=home)
        assert "took over the lock" in resumed.stderr, resumed.stderr
    finally:
        dead.kill()
        dead.wait()
    assert json.loads(cli("runs", "show", "base", "--json", home=home).stdout)["last_step"] == 6


def test_a_run_whose_heartbeat_stopped_is_stale_from_every_host(shakespeare, tmp_path):
    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    run_dir = next(home.glob("base-*"))
    with sqlite3.connect(home / "gptctl.db") as conn:  # as a trainer on another node leaves its row
        conn.execute("update runs set status = 'running', host = 'node-17', ended_at = null")
    status = lambda: json.loads(cli("runs", "show", "base", "--json", home=home).stdout)["status"]  # noqa: E731
    (run_dir / ".lock").touch()  # beating now: alive, though nobody here holds its flock
    assert status() == "running"
    hour_ago = time.time() - 3600
    os.utime(run_dir / ".lock", (hour_ago, hour_ago))  # silent for an hour
    assert status() == "stale"


def test_the_newest_run_of_a_name_does_not_depend_on_clocks(shakespeare, tmp_path):
    home = tmp_path / "home"
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "twin"]
    cli("pretrain", *args, home=home)
    cli("pretrain", *args, "--new-run", home=home)
    with sqlite3.connect(home / "gptctl.db") as conn:  # the second made on a host whose clock is a day behind
        first, second = [r[0] for r in conn.execute("select id from runs order by rowid")]
        conn.execute("update runs set created_at = '2020-01-01T00:00:00+00:00' where id = ?", [second])
    assert json.loads(cli("runs", "show", "twin", "--json", home=home).stdout)["id"] == second
