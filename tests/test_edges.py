"""Faults at the edges of a run: what a requeue onto other hardware, a full disk or a busy machine does."""

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import TINY_RUN, cli, losses, only_run_id

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
    # the same tokens per step, and the same val tokens per eval (--eval-steps counts micro-batches)
    assert (settings["batch_size"], settings["total_batch_size"], settings["eval_steps"]) == (1, 128, 4)
    resumed = losses(home, run_id)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    assert {s: resumed[s] for s in range(1, 5)} == {s: reference[s] for s in range(1, 5)}  # before: bit for bit
    for step in range(5, 9):  # after: the same tokens summed in another order, equal within float rounding
        assert resumed[step][0] == pytest.approx(reference[step][0], rel=1e-5), step
    assert resumed[8][1] == pytest.approx(reference[8][1], rel=1e-5)  # val loss over the same val tokens


# --- the registry's faults, said as what they are -------------------------------------------------

@contextmanager
def mounted(path: Path, *options: str, source: str = "tmpfs"):
    """A real mount for the test's lifetime (a small tmpfs to fill, or a read-only bind); skipped, with the
    reason, where this process may not mount."""
    if not path.exists():  # a directory to mount on (a bind mount may also cover one file)
        path.mkdir(parents=True)
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
    from gptctl.registry import storage

    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    monkeypatch.setattr(storage, "BUSY_TIMEOUT_MS", 300)
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
    from helpers import SHAKESPEARE

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


def test_a_finetunes_default_total_batch_is_kept_on_a_launch_with_more_processes():
    """A finetune's default total batch is batch × seq × processes: a resume on two processes doubled its
    tokens per step, silently. It is fixed at what the run's last launch computed."""
    from gptctl.resume import resume_settings
    from gptctl.settings import TrainSettings

    settings = TrainSettings(kind="finetune", model="tiny", seq_len=32, batch_size=8, total_batch_size=None,
                             max_steps=8, warmup_steps=1)
    run = {"id": "abc123", "name": "ft", "settings": settings.model_dump_json(), "last_step": 4, "world_size": 1}
    resumed, note = resume_settings(run, None, {})
    assert (resumed.total_batch_size, note) == (256, None)
    with pytest.raises(ValueError, match="must be divisible"):
        resumed.check_world(2)  # 8×32 on each of 2 processes is 512 tokens: said, never silently doubled
    resumed, _ = resume_settings(run, None, {"batch_size": 4})
    assert (resumed.tokens_per_step(2), resumed.resolved_accumulation(2)) == (256, 1)


def test_the_registry_file_alone_read_only_refuses_writes_in_one_line(shakespeare, tmp_path):
    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    registry = home / "gptctl.db"
    with mounted(registry, "-o", "ro", source=str(registry)):  # the file, read-only; its directory writable
        assert json.loads(cli("runs", "list", "--json", home=home).stdout)[0]["name"] == "base"
        for command in (["ckpt", "pin", "3"], ["ckpt", "prune", "--yes"], ["resume", "base", "--max-steps", "6"],
                        ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "x"]):
            one_line(cli(*command, home=home, check=False), "is not writable")
        assert not list(home.glob("x-*"))


def test_damage_anywhere_in_the_registry_is_moved_aside_by_rebuild(shakespeare, tmp_path):
    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    clean = tmp_path / "clean.db"
    with sqlite3.connect(home / "gptctl.db") as conn:  # one file, no journal beside it
        conn.execute(f"vacuum into '{clean}'")
    for suffix in ("", "-wal", "-shm"):
        (home / f"gptctl.db{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(clean) as conn:
        page = conn.execute("select rootpage from sqlite_master where name = 'metrics'").fetchone()[0]
    raw = bytearray(clean.read_bytes())
    raw[(page - 1) * 4096:page * 4096] = bytes(range(256)) * 16  # the metrics table's root page, garbage
    (home / "gptctl.db").write_bytes(bytes(raw))
    one_line(cli("runs", "show", "base", "--json", home=home, check=False), "is damaged", "registry rebuild")
    rebuilt = cli("registry", "rebuild", home=home)
    assert "damaged registry was moved" in rebuilt.stderr and list(home.glob("gptctl.db.damaged-*"))
    assert json.loads(cli("runs", "show", "base", "--json", home=home).stdout)["last_step"] == 3


def test_a_home_path_too_long_is_one_line(tmp_path):
    one_line(cli("runs", "list", home=tmp_path / ("a" * 300), check=False), "too long")


def test_a_full_disk_without_journal_files_is_still_said_as_a_full_disk(shakespeare, tmp_path):
    """After a clean exit no -wal/-shm is left; SQLite then fails to make its shared-memory file on a full
    disk (SQLITE_IOERR_SHMSIZE), which read as "no working locks"."""
    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    with mounted(tmp_path / "disk", "-o", "size=64m") as disk:
        copy = disk / "home"
        shutil.copytree(home, copy, ignore=shutil.ignore_patterns("gptctl.db*", "*.pt"))
        with sqlite3.connect(home / "gptctl.db") as conn:
            conn.execute(f"vacuum into '{copy / 'gptctl.db'}'")
        fill(disk)
        said = cli("runs", "list", home=copy, check=False)
        assert "working locks" not in said.stderr and "Traceback" not in said.stderr
        assert said.returncode == 0 or "no space left" in said.stderr, said.stderr


def test_a_write_that_fails_names_the_file_meant_not_its_temporary(tmp_path):
    from gptctl.atomic import write_text_atomic

    with mounted(tmp_path / "disk", "-o", "size=64k") as disk:
        fill(disk)
        with pytest.raises(OSError) as failed:
            write_text_atomic(disk / "config.json", "x" * 100_000)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(disk / "config.json")


KILLED_MID_TRANSACTION = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("pragma journal_mode = delete")  # as on a network filesystem
conn.execute("pragma cache_size = 2")  # spill: pages of the open transaction reach the file itself
conn.execute("begin immediate")
conn.execute("update runs set name = 'HALF'")
for i in range(3000):
    conn.execute("insert into events (run_id, kind, detail) select id, 'x', ? from runs", ["x" * 200])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_read_only_home_with_a_hot_rollback_journal_reads_what_was_committed(shakespeare, tmp_path):
    home = tmp_path / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "base", home=home)
    clean = tmp_path / "clean.db"
    with sqlite3.connect(home / "gptctl.db") as conn:
        conn.execute(f"vacuum into '{clean}'")
    for suffix in ("", "-wal", "-shm"):
        (home / f"gptctl.db{suffix}").unlink(missing_ok=True)
    shutil.copy(clean, home / "gptctl.db")
    subprocess.run([sys.executable, "-c", KILLED_MID_TRANSACTION, str(home / "gptctl.db")])
    assert (home / "gptctl.db-journal").exists()
    with mounted(tmp_path / "ro", "-o", "ro", source=str(home)) as ro:
        assert [r["name"] for r in json.loads(cli("runs", "list", "--json", home=ro).stdout)] == ["base"]
