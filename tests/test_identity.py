"""Identity, not location: a run acts only on its own home, its own data and its own settings.

Each test makes the real fault a user meets: `cp -a` and `mv` of a home, data re-prepared under the same
root, a truncated or rewritten shard, an empty or foreign registry, a rebuild that cannot read a run
directory, a completed run asked for more steps, the same command started several times at once."""

import json
import shutil
import sqlite3
import subprocess
import sys
import os
from pathlib import Path

import pytest

from helpers import SHARED, SHAKESPEARE, TINY_RUN, cli, losses, only_run_id

pytestmark = pytest.mark.slow

OTHER_TEXT = SHARED / "data" / "shakespeare-works" / "hamlet_gut.txt"


def prepare(data_root: Path, text: Path = SHAKESPEARE, *extra: str) -> Path:
    cli("data", "prepare", "--input", str(text), "--data-root", str(data_root), *extra, home=data_root.parent / "unused")
    return data_root


def train(home: Path, data_root: Path, *args: str, check: bool = True):
    return cli("pretrain", *TINY_RUN, "--data-root", str(data_root), *args, home=home, check=check)


def files_under(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file with its size and mtime, and what its registry holds: what must not change. (The
    registry's files themselves change when a connection the test process left open closes.)"""
    files = {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
             for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("gptctl.db")}
    if (directory / "gptctl.db").exists():
        for table in ("runs", "checkpoints", "metrics", "events", "checkpoint_leases"):
            files[table] = rows(directory, f"select * from {table} order by rowid")
    return files


def rows(home: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(home / "gptctl.db") as conn:
        return conn.execute(sql, params).fetchall()


def one_line_refusal(result, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in result.stderr, result.stderr


# --- home ownership ---------------------------------------------------------------------------------

def test_a_copied_home_prunes_and_resumes_only_its_own_files(tmp_path, shakespeare):
    home, copy = tmp_path / "home", tmp_path / "copy"
    train(home, shakespeare, "--max-steps", "6", "--checkpoint-interval", "2", "--keep-last-n-checkpoints", "9",
          "--run-name", "base")
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
    original = files_under(home)

    cli("ckpt", "prune", "--keep-last", "1", "--yes", home=copy)
    assert files_under(home) == original, "pruning the copy changed the original home"
    assert sorted(p.name for p in copy.glob("base-*/checkpoints/*.pt")) == ["model_00006.pt"]

    cli("resume", "base", "--max-steps", "8", home=copy)
    assert files_under(home) == original, "resuming in the copy wrote into the original home"
    assert (next(copy.glob("base-*")) / "checkpoints" / "model_00008.pt").is_file()
    listing = json.loads(cli("ckpt", "list", "--json", home=copy).stdout)
    assert listing and all(Path(c["path"]).is_relative_to(copy.resolve()) for c in listing), listing


def test_a_moved_home_works_where_it_is_now(tmp_path, shakespeare):
    home, moved = tmp_path / "home", tmp_path / "moved"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "base")
    shutil.move(home, moved)
    listing = json.loads(cli("ckpt", "list", "--json", home=moved).stdout)
    assert [c["state"] for c in listing] == ["valid", "valid"], listing
    assert all(Path(c["path"]).is_relative_to(moved.resolve()) for c in listing)
    verify = json.loads(cli("ckpt", "verify", "--json", home=moved).stdout)
    assert {r["state"] for r in verify} == {"valid"}
    cli("resume", "base", "--max-steps", "6", home=moved)
    assert (next(moved.glob("base-*")) / "checkpoints" / "model_00006.pt").is_file()
    assert json.loads(cli("runs", "show", "base", "--json", home=moved).stdout)["run_dir"].startswith(str(moved.resolve()))


def test_a_checkpoint_that_was_missing_and_is_back_is_seen_again(tmp_path, shakespeare):
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "base")
    file = next(home.glob("base-*/checkpoints/model_00002.pt"))
    aside = tmp_path / "aside.pt"
    file.rename(aside)
    states = lambda: {c["step"]: c["state"] for c in json.loads(cli("ckpt", "list", "--json", home=home).stdout)}  # noqa: E731
    assert states() == {2: "missing", 4: "valid"}
    aside.rename(file)
    assert states() == {2: "valid", 4: "valid"}


def test_a_registry_from_an_older_version_with_absolute_paths_is_migrated_by_run_directory(tmp_path, shakespeare):
    """Registries written before paths were home-relative hold absolute paths: a copy of such a home,
    opened first by this version, must adopt its own files, not the original's."""
    home, copy = tmp_path / "home", tmp_path / "copy"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "base")
    run_dir = next(home.glob("base-*")).resolve()
    with sqlite3.connect(home / "gptctl.db") as conn:  # as version 0006 stored them
        conn.execute("update runs set run_dir = ?", [str(run_dir)])
        conn.execute("update checkpoints set path = ? || '/checkpoints/' || substr(path, length(path) - 13)", [str(run_dir)])
        conn.execute("delete from _sqlite_migrations where name = '0007_home_relative_paths'")
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
    original = files_under(home)
    cli("ckpt", "prune", "--keep-last", "1", "--yes", home=copy)
    assert files_under(home) == original
    assert [p.name for p in copy.glob("base-*/checkpoints/*.pt")] == ["model_00004.pt"]


# --- data identity -----------------------------------------------------------------------------------

def test_re_prepared_data_is_refused_on_every_resume_path_unless_overridden(tmp_path):
    home, data = tmp_path / "home", prepare(tmp_path / "data")
    train(home, data, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "base")
    run_id = only_run_id(home, "base")
    prepare(data, OTHER_TEXT, "--force")
    before = files_under(home / f"base-{run_id}"), rows(home, "select settings, status, last_step from runs")

    one_line_refusal(cli("resume", "base", "--max-steps", "6", home=home, check=False), "--data-root", str(data))
    one_line_refusal(train(home, data, "--max-steps", "6", "--run-name", "base", "--auto-resume", check=False),
                     "--data-root")
    checkpoint = next((home / f"base-{run_id}" / "checkpoints").glob("model_00004.pt"))
    one_line_refusal(train(home, data, "--max-steps", "6", "--run-name", "other", "--resume",
                           "--checkpoint-path", str(checkpoint), check=False), "--data-root")
    assert (files_under(home / f"base-{run_id}"), rows(home, "select settings, status, last_step from runs")) == before
    assert len(rows(home, "select id from runs")) == 1

    cli("resume", "base", "--max-steps", "6", "--override-settings", home=home)
    events = [json.loads(json.dumps(e)) for e in rows(home, "select kind, detail from events where run_id = ?", run_id)]
    data_events = [d for k, d in events if "fingerprint" in d]
    assert len(data_events) == 1 and "--override-settings" in data_events[0], events
    old, new = json.loads(rows(home, "select settings from runs")[0][0])["data_fingerprint"], data_events[0]
    assert old in new, (old, new)
    # the override is recorded: the next resume on this data needs none
    cli("resume", "base", "--max-steps", "8", home=home)


def test_a_shard_that_no_longer_matches_its_manifest_is_refused_in_preflight(tmp_path):
    home, data = tmp_path / "home", prepare(tmp_path / "data")
    train(home, data, "--max-steps", "3", "--run-name", "base")
    before = rows(home, "select settings, status, last_step from runs")
    shard = sorted(data.glob("*_train_*.npy"))[0]
    raw = bytearray(shard.read_bytes())

    raw[-2:] = bytes([raw[-2] ^ 0xFF, raw[-1]])  # the same size, other tokens: only a content hash sees it
    shard.write_bytes(bytes(raw))
    for attempt in (cli("resume", "base", "--max-steps", "4", home=home, check=False),
                    train(home, data, "--max-steps", "3", "--run-name", "new", check=False)):
        one_line_refusal(attempt, "--data-root", shard.name)
    shard.write_bytes(bytes(raw[:-100]))  # truncated
    one_line_refusal(cli("resume", "base", "--max-steps", "4", home=home, check=False), "--data-root", shard.name)
    assert rows(home, "select settings, status, last_step from runs") == before


def test_a_run_records_its_data_root_resolved_and_moved_data_is_the_same_data(tmp_path, monkeypatch):
    home, data = tmp_path / "home", prepare(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train(home, Path("data"), "--max-steps", "3", "--run-name", "base", "--log-dir", "logs")
    settings = json.loads(rows(home, "select settings from runs")[0][0])
    assert settings["data_root"] == str(data.resolve()) and settings["data_fingerprint"]
    assert settings["log_dir"] == str((tmp_path / "logs").resolve())
    shutil.move(data, tmp_path / "elsewhere")  # what it is, not where it is: the same data, moved
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")  # run from elsewhere: the same log, not ./logs here
    cli("resume", "base", "--max-steps", "4", "--data-root", "../elsewhere", home=home)
    assert not (tmp_path / "other" / "logs").exists()
    assert "step 4/4" in (tmp_path / "logs" / "train.log").read_text()


# --- a registry that does not know the run directories beside it ----------------------------------

@pytest.mark.parametrize("registry", ["empty", "foreign"])
def test_a_registry_that_does_not_know_its_run_directories_never_starts_them_over(tmp_path, shakespeare, registry):
    home, other = tmp_path / "home", tmp_path / "other"
    train(home, shakespeare, "--max-steps", "3", "--run-name", "base")
    for suffix in ("", "-wal", "-shm"):
        (home / f"gptctl.db{suffix}").unlink(missing_ok=True)
    if registry == "foreign":
        train(other, shakespeare, "--max-steps", "3", "--run-name", "elsewhere")
        shutil.copy(other / "gptctl.db", home / "gptctl.db")
    else:
        sqlite3.connect(home / "gptctl.db").close()  # an empty file: a fresh registry
    listing = lambda: sorted(p.name for p in home.iterdir() if not p.name.endswith(("-wal", "-shm")))  # noqa: E731
    runs_before = listing()
    result = train(home, shakespeare, "--max-steps", "4", "--run-name", "base", "--auto-resume", check=False)
    one_line_refusal(result, "registry rebuild")
    assert listing() == runs_before


def test_rebuild_reports_a_run_directory_it_skips_and_exits_non_zero(tmp_path, shakespeare):
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "3", "--run-name", "base")
    run_dir = next(home.glob("base-*"))
    (home / "gptctl.db").unlink()
    (run_dir / "config.json").write_text("{ not json")  # and no checkpoint holds its settings either
    for file in (run_dir / "checkpoints").iterdir():
        file.unlink()
    result = cli("registry", "rebuild", home=home, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert run_dir.name in result.stderr and "nothing to add" not in result.stdout + result.stderr
    one_line_refusal(train(home, shakespeare, "--max-steps", "4", "--run-name", "base", "--auto-resume", check=False),
                     run_dir.name)


def test_rebuild_keeps_the_settings_of_record_not_a_stale_or_edited_config_json(tmp_path, shakespeare):
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "base")
    cli("resume", "base", "--max-lr", "1e-3", "--max-steps", "6", "--override-settings", home=home)
    run_dir = next(home.glob("base-*"))
    written = json.loads((run_dir / "config.json").read_text())
    assert (written["max_lr"], written["max_steps"]) == (1e-3, 6), "config.json is not kept current"
    edited = {**written, "max_lr": 0.5}
    (run_dir / "config.json").write_text(json.dumps(edited))  # a hand edit
    (home / "gptctl.db").unlink()
    cli("registry", "rebuild", home=home)
    settings = json.loads(rows(home, "select settings from runs")[0][0])
    assert (settings["max_lr"], settings["max_steps"]) == (1e-3, 6)
    assert rows(home, "select status, last_step from runs") == [("completed", 6)]


def test_a_rebuild_interrupted_at_any_moment_is_completed_by_the_next(tmp_path, shakespeare, monkeypatch):
    from gptctl import rebuild
    from gptctl.registry import queries

    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "base")
    expected = rows(home, "select step, loss from metrics order by step")
    (home / "gptctl.db").unlink()
    real = queries.write_metrics

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run's row and checkpoints are in; the rest never comes

    monkeypatch.setattr(queries, "write_metrics", killed)
    with pytest.raises(KeyboardInterrupt):
        rebuild.rebuild(home)
    monkeypatch.setattr(queries, "write_metrics", real)
    cli("registry", "rebuild", home=home)
    assert rows(home, "select step, loss from metrics order by step") == expected
    assert rows(home, "select status, last_step from runs") == [("completed", 4)]
    assert len(rows(home, "select id from checkpoints where state = 'valid'")) == 2


# --- one name, one run ------------------------------------------------------------------------------

def test_auto_resume_extends_a_completed_run_instead_of_starting_a_second(tmp_path, shakespeare):
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "grow")
    run_id = only_run_id(home, "grow")
    first = losses(home, run_id)
    done = train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "grow",
                 "--auto-resume", check=False)
    assert done.returncode == 0 and "already complete" in done.stderr, done.stderr
    train(home, shakespeare, "--max-steps", "6", "--checkpoint-interval", "2", "--run-name", "grow", "--auto-resume")
    assert rows(home, "select id, status, last_step from runs") == [(run_id, "completed", 6)]
    assert {s: v for s, v in losses(home, run_id).items() if s <= 4} == first


def test_a_used_name_starts_a_second_run_only_when_asked(tmp_path, shakespeare):
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "3", "--run-name", "grow")
    one_line_refusal(train(home, shakespeare, "--max-steps", "3", "--run-name", "grow", check=False),
                     "--run-name", "--auto-resume")
    assert len(rows(home, "select id from runs")) == 1
    train(home, shakespeare, "--max-steps", "3", "--run-name", "grow", "--new-run")
    assert len(rows(home, "select id from runs where name = 'grow'")) == 2
    train(home, shakespeare, "--max-steps", "3")
    train(home, shakespeare, "--max-steps", "3")
    assert sorted(r[0] for r in rows(home, "select name from runs where name like 'pretrain%'")) == ["pretrain", "pretrain-2"]


def test_simultaneous_auto_resumes_make_exactly_one_run(tmp_path, shakespeare):
    home = tmp_path / "home"
    env = {**os.environ, "GPTCTL_HOME": str(home)}
    command = [sys.executable, "-m", "gptctl", "pretrain", *TINY_RUN, "--data-root", str(shakespeare),
               "--max-steps", "4", "--run-name", "race", "--auto-resume"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    assert len(rows(home, "select id from runs")) == 1, results
    assert len(list(home.glob("race-*"))) == 1
    assert sorted(code for code, *_ in results)[0] == 0, results
    for code, out, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            assert err.count("\n") == 1, err


def test_rebuild_never_replays_the_journal_of_a_deleted_registry(tmp_path, shakespeare):
    """`rm gptctl.db` while a process still had it open leaves its -wal and -shm: a journal whose database
    is gone is never applied to the new registry (kept aside), and the rebuild re-creates the whole run."""
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "base")
    expected = rows(home, "select step, loss from metrics order by step")
    holder = sqlite3.connect(home / "gptctl.db")  # a process that still has it open: its journal stays
    holder.execute("pragma journal_mode = wal")
    holder.execute("create table if not exists scratch (x)")
    holder.commit()
    assert (home / "gptctl.db-wal").exists()
    (home / "gptctl.db").unlink()
    result = cli("registry", "rebuild", home=home)
    assert "journal of a deleted registry" in result.stderr and list(home.glob("gptctl.db.orphan-journal-*-wal"))
    holder.close()
    assert rows(home, "select step, loss from metrics order by step") == expected
    assert rows(home, "select name from sqlite_master where name = 'scratch'") == []


# --- what the break test found ----------------------------------------------------------------------

def test_a_run_started_from_a_checkpoint_file_continues_from_it_until_it_saves_its_own(tmp_path, shakespeare):
    """`--resume --checkpoint-path F --print-command`, then the job script's `--auto-resume`: it trained from
    fresh weights at step 0 (the file was used only by the first launch)."""
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "6", "--checkpoint-interval", "2", "--keep-last-n-checkpoints", "9",
          "--run-name", "base")
    start = next(home.glob("base-*/checkpoints/model_00002.pt"))
    args = ["--max-steps", "6", "--checkpoint-interval", "2", "--run-name", "q"]
    queued = train(home, shakespeare, *args, "--resume", "--checkpoint-path", str(start), "--print-command")
    assert "gptctl.engine.worker" in queued.stdout
    again = train(home, shakespeare, *args, "--resume", "--checkpoint-path", str(start), "--auto-resume", "--print-command")
    assert "queued to continue" in again.stderr and len(rows(home, "select id from runs where name = 'q'")) == 1
    done = train(home, shakespeare, *args, "--resume", "--checkpoint-path", str(start), "--auto-resume")
    assert "resuming from step 2" in done.stderr, done.stderr
    run_id = only_run_id(home, "q")
    assert losses(home, run_id) == {s: v for s, v in losses(home, only_run_id(home, "base")).items() if s > 2}


def test_a_rebuild_from_another_directory_keeps_a_finetunes_parent_protected(tmp_path, shakespeare, monkeypatch):
    from test_finetune import write_dolly

    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--keep-last-n-checkpoints", "9",
          "--run-name", "base")
    write_dolly(tmp_path / "dolly.jsonl", n=40)
    cli("finetune", "--pretrained-checkpoint", "base:2", "--dataset-path", str(tmp_path / "dolly.jsonl"),
        "--max-steps", "3", "--warmup-steps", "1", "--run-name", "ft", "--print-command", home=home)
    for suffix in ("", "-wal", "-shm"):
        (home / f"gptctl.db{suffix}").unlink(missing_ok=True)
    monkeypatch.chdir(tmp_path)  # not the home
    cli("registry", "rebuild", home=home)
    assert rows(home, "select parent_checkpoint, parent_kind from runs where name = 'ft'") == \
        [(f"{next(home.glob('base-*')).name}/checkpoints/model_00002.pt", "weights")]
    cli("ckpt", "prune", "--run", "base", "--keep-last", "1", "--yes", home=home)
    assert next(home.glob("base-*/checkpoints/model_00002.pt")).is_file()


def test_a_queued_command_of_a_moved_home_says_so_and_creates_nothing(tmp_path, shakespeare):
    home, moved = tmp_path / "home", tmp_path / "moved"
    queued = train(home, shakespeare, "--max-steps", "3", "--run-name", "q", "--print-command")
    shutil.move(home, moved)
    result = subprocess.run(queued.stdout.strip(), shell=True, capture_output=True, text=True,
                            env={**os.environ, "GPTCTL_HOME": str(moved)})
    # the worker's line (torchrun, which the printed command is, then reports its worker's exit its own way)
    assert result.returncode != 0 and "was the home moved?" in result.stdout + result.stderr
    assert not home.exists(), "a new registry was made where the home was"


def test_a_rebuilt_run_whose_checkpoints_are_all_bad_is_never_started_over(tmp_path, shakespeare):
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--run-name", "z")
    for file in home.glob("z-*/checkpoints/*.pt"):
        os.truncate(file, 1_000_000)
    for suffix in ("", "-wal", "-shm"):
        (home / f"gptctl.db{suffix}").unlink(missing_ok=True)
    cli("registry", "rebuild", home=home)
    before = files_under(next(home.glob("z-*")))
    result = train(home, shakespeare, "--max-steps", "6", "--run-name", "z", "--auto-resume", check=False)
    assert result.returncode != 0 and "missing or corrupt" in result.stderr, result.stderr
    assert {k: v for k, v in files_under(next(home.glob("z-*"))).items() if k.endswith(".pt")} == \
        {k: v for k, v in before.items() if k.endswith(".pt")}


def test_a_run_that_recorded_a_relative_data_root_needs_it_given(tmp_path, shakespeare):
    home = tmp_path / "home"
    train(home, shakespeare, "--max-steps", "3", "--run-name", "old")
    with sqlite3.connect(home / "gptctl.db") as conn:  # as an older gptctl stored it, with no fingerprint
        settings = json.loads(conn.execute("select settings from runs").fetchone()[0])
        conn.execute("update runs set settings = ?", [json.dumps({**settings, "data_root": "data",
                                                                  "data_fingerprint": None})])
    one_line_refusal(cli("resume", "old", "--max-steps", "4", home=home, check=False), "--data-root", "relative")
    cli("resume", "old", "--max-steps", "4", "--data-root", str(shakespeare), home=home)


def test_another_programs_database_is_not_made_a_registry(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "gptctl.db") as conn:
        conn.execute("create table runs (a, b)")
    before = (home / "gptctl.db").read_bytes()
    for command in (["runs", "list"], ["registry", "rebuild"]):
        one_line_refusal(cli(*command, home=home, check=False), "not a gptctl registry")
    assert (home / "gptctl.db").read_bytes() == before and not list(home.glob("gptctl.db.*"))


def test_retention_deletes_nothing_through_a_symlinked_run_directory(tmp_path, shakespeare):
    """A run directory moved to another disk and symlinked back: `cp -a` of the home copies the link, so
    pruning in the copy would delete the original's files."""
    home, elsewhere, copy = tmp_path / "home", tmp_path / "bigdisk", tmp_path / "copy"
    train(home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "2", "--keep-last-n-checkpoints", "9",
          "--run-name", "base")
    run_dir = next(home.glob("base-*"))
    shutil.move(run_dir, elsewhere)
    run_dir.symlink_to(elsewhere)
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
    result = cli("ckpt", "prune", "--keep-last", "1", "--yes", home=copy)
    assert "is a symlink" in result.stderr
    assert sorted(p.name for p in (elsewhere / "checkpoints").iterdir()) == ["model_00002.pt", "model_00004.pt"]
