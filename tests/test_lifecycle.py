"""A run managed from any terminal: --detach, runs logs, runs stop, runs rm, runs compare, the default data root."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_RUN, add_run, cli, gptctl, losses, only_run_id, Terminal, train_in_process, wait_until


def _status(home: Path, run_id: str) -> str:
    with sqlite3.connect(home / "gptctl.db") as conn:
        return conn.execute("select status from runs where id = ?", [run_id]).fetchone()[0]


def _one_line_refusal(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_detached_run_outlives_its_terminal_stops_from_another_and_resumes_bit_exact(shakespeare, gptctl_home,
                                                                                      tmp_path):
    """`pretrain --detach` in an ssh-like terminal returns at once with the run's name and the two
    commands; the terminal then hangs up and its process group gets a SIGHUP, and the run trains on.
    `runs logs --follow` from a second process and `runs stop` from a third stop it at a saved step;
    the follower ends with the run's exit status; resumed, it matches an undisturbed run to the bit."""
    layout = ["--max-steps", "400", "--lr-decay-steps", "400", "--checkpoint-interval", "1000"]
    command = [sys.executable, "-m", "gptctl", "pretrain", *TINY_RUN, "--data-root", str(shakespeare), *layout,
               "--run-name", "bg", "--detach"]
    env = {**os.environ, "GPTCTL_HOME": str(gptctl_home)}
    # The terminal's session lives on after the command returns, as a login shell's would.
    terminal = Terminal(["/bin/sh", "-c", f"{subprocess.list2cmdline(command)}; echo returned $?; sleep 600"], env)
    wait_until(lambda: b"returned" in terminal.shown, "--detach to return", timeout=180)
    shown = terminal.shown.decode(errors="replace")
    assert "returned 0" in shown and "gptctl runs logs bg --follow" in shown and "gptctl runs stop bg" in shown, shown
    run_id = only_run_id(gptctl_home, "bg")
    assert _status(gptctl_home, run_id) == "running"  # it returned once the workers train, not before
    train_log = next(gptctl_home.glob("bg-*/train.log"))

    session = os.getpgid(terminal.proc.pid)
    terminal.hang_up()
    os.killpg(session, signal.SIGHUP)  # and the whole old terminal's process group, for good measure
    terminal.proc.wait(timeout=30)
    steps_then = train_log.read_text().count("\nstep ")
    wait_until(lambda: train_log.read_text().count("\nstep ") >= steps_then + 3, "the run to train on after the hangup")
    assert _status(gptctl_home, run_id) == "running"

    follower = subprocess.Popen([sys.executable, "-m", "gptctl", "runs", "logs", "bg", "--follow"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = gptctl("runs", "stop", "bg", "--json", home=gptctl_home)
    report = json.loads(stopped.stdout)
    stopped_at = report["last_step"]
    assert report["status"] == "interrupted" and report["checkpoint_step"] == stopped_at > 0, report
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 128 + signal.SIGTERM, (out, err)
    assert f"stopped at step {stopped_at}, checkpoint saved" in out, out
    assert f"run {run_id} (bg) interrupted at step {stopped_at}" in err, err
    events = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)["events"]
    assert any(e["kind"] == "stop" for e in events), events

    cli("resume", run_id, "--max-steps", str(stopped_at + 2), home=gptctl_home)
    reference, _ = train_in_process(shakespeare, tmp_path / "reference", max_steps=stopped_at + 2, lr_decay_steps=400,
                                    checkpoint_interval=1000)
    assert losses(gptctl_home, run_id) == reference  # every step's loss and val loss, to the last bit


@pytest.mark.slow
def test_detach_says_every_refusal_on_the_terminal_before_returning(shakespeare, gptctl_home, tmp_path):
    """What would be refused without --detach is refused the same way, one line, exit 2, nothing written."""
    _one_line_refusal(gptctl("pretrain", *TINY_RUN, "--data-root", str(tmp_path / "nothing"), "--detach",
                             home=gptctl_home, check=False), "--data-root")
    _one_line_refusal(gptctl("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--print-command", "--detach",
                             home=gptctl_home, check=False), "--detach", "--print-command")
    assert not (gptctl_home / "gptctl.db").exists() or not list(gptctl_home.glob("*-*"))
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "taken",
        home=gptctl_home)
    _one_line_refusal(gptctl("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--run-name", "taken",
                             "--detach", home=gptctl_home, check=False), "--run-name taken")
    assert len(list(gptctl_home.glob("taken-*"))) == 1


def test_runs_logs_of_a_finished_run_tail_and_follow(trained_run):
    home, run_id = trained_run
    full = cli("runs", "logs", run_id, home=home).stdout.splitlines()
    assert full[0].startswith(f"run {run_id} (shared): ") and full[1].startswith("step 1/8") and any("checkpoint saved (model_00004.pt" in line for line in full), full
    assert any(line.startswith("step 8/8") and "val" in line for line in full), full
    assert cli("runs", "logs", run_id, "--tail", "2", home=home).stdout.splitlines() == full[-2:]
    followed = cli("runs", "logs", run_id, "-f", "-n", "1", home=home)  # a finished run: ends at once, with 0
    assert followed.returncode == 0 and followed.stdout.splitlines() == full[-1:]
    assert f"run {run_id} (shared) completed at step 8 (exit code 0)" in followed.stderr


def test_runs_stop_and_logs_refuse_in_one_line(trained_run):
    home, run_id = trained_run
    _one_line_refusal(cli("runs", "stop", run_id, home=home, check=False), "completed", run_id)
    _one_line_refusal(cli("runs", "logs", run_id, "--tail", "-1", home=home, check=False), "--tail")
    _one_line_refusal(cli("runs", "logs", "no-such-run", home=home, check=False), "no-such-run")


def test_runs_compare_shows_the_settings_that_differ_and_val_at_equal_tokens(shakespeare, gptctl_home, tmp_path):
    for name, lr, steps in (("low", "1e-3", "8"), ("high", "3e-3", "12")):
        cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", steps, "--max-lr", lr,
            "--run-name", name, home=gptctl_home)
    found = json.loads(cli("runs", "compare", "low", "high", "--json", home=gptctl_home).stdout)
    assert found["differing_settings"] == {"Steps and LR schedule": {"--max-lr": [0.001, 0.003],
                                                                     "--max-steps": [8, 12]}}
    low, high = found["runs"]
    assert (low["name"], high["name"]) == ("low", "high") and low["tokens_seen"] == 8 * 128
    assert found["equal_tokens"] == 8 * 128  # the longest stretch both have: low's end
    high_metrics = {m["tokens_seen"]: m["val_loss"] for m in json.loads(
        cli("runs", "show", "high", "--json", home=gptctl_home).stdout)["metrics"] if m["val_loss"] is not None}
    assert high["val_loss_at_equal_tokens"] == high_metrics[8 * 128]  # an eval there: read off, not interpolated
    assert low["val_loss_at_equal_tokens"] == low["last_val_loss"]
    assert high["best_val_loss"] == min(high_metrics.values())
    shown = cli("runs", "compare", "low", "high", home=gptctl_home, env={"COLUMNS": "80"}).stdout
    assert "--max-lr" in shown and "Steps and LR schedule" in shown and "--run-name" not in shown
    assert max(len(line) for line in shown.splitlines()) <= 80, shown
    _one_line_refusal(cli("runs", "compare", "low", home=gptctl_home, check=False), "two or more")
    _one_line_refusal(cli("runs", "compare", "low", "high", "-o", str(tmp_path / "x.txt"), home=gptctl_home,
                          check=False), "--output", ".png")


def test_the_default_data_root_is_where_prepare_writes_and_pretrain_reads(gptctl_home, tmp_path, monkeypatch):
    """`pretrain` without --data-root on a fresh machine says the two ways forward; `data prepare` writes
    to the default ($GPTCTL_DATA_ROOT here), pretrain reads it and records it resolved."""
    from helpers import SHAKESPEARE

    monkeypatch.setenv("GPTCTL_DATA_ROOT", str(tmp_path / "corpus"))
    refused = cli("pretrain", "--max-steps", "40000", home=gptctl_home, check=False)
    _one_line_refusal(refused, "--data-root", str(tmp_path / "corpus"), "gptctl data prepare fineweb-edu",
                      "--data-root DIR", "GPTCTL_DATA_ROOT")
    assert not (gptctl_home / "gptctl.db").exists()
    cli("data", "prepare", "--input", str(SHAKESPEARE), home=gptctl_home)
    assert (tmp_path / "corpus" / "manifest.json").is_file()
    cli("pretrain", *TINY_RUN, "--max-steps", "3", "--run-name", "default-data", home=gptctl_home)
    stored = json.loads(cli("runs", "show", "default-data", "--json", home=gptctl_home).stdout)["settings"]
    assert stored["data_root"] == str((tmp_path / "corpus").resolve())


def _queued_run(home: Path, data_root: Path, name: str, files: int = 0) -> dict:
    """A run created for a job script (no training): a row and a directory, `files` extra files in it."""
    cli("pretrain", *TINY_RUN, "--data-root", str(data_root), "--run-name", name, "--print-command", home=home)
    run = json.loads(cli("runs", "show", name, "--json", home=home).stdout)
    for i in range(files):
        (Path(run["run_dir"]) / f"extra-{i:05d}.bin").write_bytes(b"x" * 4096)
    return run


def _rows_and_dirs(home: Path) -> tuple[set[str], set[str]]:
    with sqlite3.connect(home / "gptctl.db") as conn:
        rows = {Path(d).name for (d,) in conn.execute("select run_dir from runs")}
    dirs = {p.name for p in home.iterdir() if p.is_dir()}
    return rows, dirs


def test_runs_rm_lists_refuses_and_deletes_a_run_whole(trained_run, shakespeare, gptctl_home, tmp_path):
    """Without --yes nothing goes; a parent of a finetune, a pinned checkpoint, a queued run and a directory
    outside the home are refused in one line with nothing deleted; with --yes the run's directory and
    every row of it go."""
    import shutil

    src_home, src_id = trained_run
    shutil.copytree(src_home, gptctl_home)  # a home of our own to delete from (the shared run stays)
    cli("runs", "list", home=gptctl_home)  # the copy is recognised as a copy before anything else
    run = json.loads(cli("runs", "show", src_id, "--json", home=gptctl_home).stdout)
    run_dir = Path(run["run_dir"])
    listed = cli("runs", "rm", src_id, home=gptctl_home)
    assert run_dir.is_dir() and "add --yes to delete it" in listed.stderr and "2 checkpoint(s)" in listed.stdout

    cli("ckpt", "pin", "4", "--run", src_id, home=gptctl_home)
    _one_line_refusal(cli("runs", "rm", src_id, "--yes", home=gptctl_home, check=False), "pinned", "--force")
    cli("ckpt", "unpin", "4", "--run", src_id, home=gptctl_home)
    queued = _queued_run(gptctl_home, shakespeare, "queued")
    _one_line_refusal(cli("runs", "rm", "queued", "--yes", home=gptctl_home, check=False), "queued", "--force")
    # A run directory moved elsewhere by hand and replaced by a link: what it points at is not the home's.
    elsewhere = tmp_path / "elsewhere"
    shutil.move(queued["run_dir"], elsewhere)
    Path(queued["run_dir"]).symlink_to(elsewhere)
    _one_line_refusal(cli("runs", "rm", "queued", "--yes", "--force", home=gptctl_home, check=False), "home")
    assert (elsewhere / "config.json").is_file()
    Path(queued["run_dir"]).unlink()
    shutil.move(elsewhere, queued["run_dir"])
    cli("pretrain", *TINY_RUN[2:], "--data-root", str(shakespeare), "--init-from", src_id, "--run-name", "child",
        "--print-command", home=gptctl_home)  # a run that starts from shared's newest checkpoint
    _one_line_refusal(cli("runs", "rm", src_id, "--yes", home=gptctl_home, check=False), "child", "started from")
    assert run_dir.is_dir() and Path(queued["run_dir"]).is_dir()

    deleted = json.loads(cli("runs", "rm", src_id, "queued", "child", "--yes", "--force", "--json",
                             home=gptctl_home).stdout)  # the parent together with its child: allowed
    assert deleted["deleted"] and {r["name"] for r in deleted["runs"]} == {"shared", "queued", "child"}
    assert not run_dir.exists() and not Path(queued["run_dir"]).exists()
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        for table in ("runs", "checkpoints", "metrics", "events", "launches"):
            column = "id" if table == "runs" else "run_id"
            assert conn.execute(f"select count(*) from {table} where {column} in (?, ?)",
                                [src_id, queued["id"]]).fetchone()[0] == 0, table
    assert src_home.joinpath(run_dir.name).is_dir()  # the original home's run is untouched


@pytest.mark.slow
def test_runs_rm_killed_at_any_moment_leaves_each_run_whole_or_gone(shakespeare, gptctl_home):
    """SIGKILL at random moments of `runs rm` (a directory of 3,000 files, so the removal takes a while):
    after the next command's look, every row has its directory and every directory its row."""
    rng = random.Random(0)
    env = {**os.environ, "GPTCTL_HOME": str(gptctl_home)}
    command = [sys.executable, "-m", "gptctl", "runs", "rm", "--yes", "--force"]
    run = _queued_run(gptctl_home, shakespeare, "timed", files=3000)
    began = time.monotonic()
    subprocess.run([*command, run["id"]], env=env, check=True, capture_output=True)
    took = time.monotonic() - began  # a whole removal, start-up included, on this machine now
    outcomes = set()
    moments = [took * (i + rng.random()) / 10 for i in range(10)]  # one in each tenth of a whole removal
    for i, moment in enumerate(moments):
        run = _queued_run(gptctl_home, shakespeare, f"victim{i}", files=3000)
        proc = subprocess.Popen([*command, run["id"]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(moment)
        proc.kill()
        proc.wait()
        cli("runs", "list", home=gptctl_home)  # the next command's look finishes an interrupted removal
        rows, dirs = _rows_and_dirs(gptctl_home)
        assert rows == dirs, (rows, dirs)
        outcomes.add(Path(run["run_dir"]).name in rows)
    assert outcomes == {True, False}, "the kills should land both before and after the removal's commit"


def test_runs_show_groups_the_settings_non_defaults_first_at_80_columns(trained_run):
    home, run_id = trained_run
    shown = cli("runs", "show", run_id, home=home, env={"COLUMNS": "80"}).stdout
    settings = shown[shown.index("settings: "):]
    assert max(len(line) for line in settings.splitlines()) <= 80 or "--data-fingerprint sha256:" in settings
    for line in settings.splitlines():  # an option and its value are never split over two lines
        assert not line.rstrip().endswith(("--max-steps", "--seq-len")), line
    steps = settings[settings.index("  Steps and LR schedule: "):]
    steps = steps[:steps.index("\n  Hardware")]
    # given on the command line: before the group's defaults
    assert steps.index("--max-steps 8") < steps.index("--max-lr 0.003") < steps.index("defaults: ")
    assert steps.index("defaults: ") < steps.index("--lr-scheduler cosine")
    assert json.loads(cli("runs", "show", run_id, "--json", home=home).stdout)["settings"]["max_steps"] == 8


def test_stop_requests_typed_at_once_are_one_and_a_later_one_or_now_is_a_second(tmp_path, monkeypatch):
    from gptctl import stop_request

    assert stop_request.ask(tmp_path) == 1
    assert stop_request.ask(tmp_path) == 1  # two terminals at the same moment: one SIGTERM, the save kept
    clock = time.time() + stop_request.MERGE_S + 0.1
    monkeypatch.setattr(stop_request.time, "time", lambda: clock)
    assert stop_request.ask(tmp_path) == 2  # asked again later: the second signal, without the save
    stop_request.clear(tmp_path)
    assert stop_request.ask(tmp_path, now=True) == 2


def test_a_stop_read_from_the_file_exits_0_under_a_bare_torchrun(monkeypatch):
    """torchrun restarts (--max-restarts) workers that fail: a `runs stop` must not look like a failure."""
    from gptctl.engine import worker
    from gptctl.engine.startup import StopFlag
    from gptctl.launch import LAUNCHED_ENV

    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    asked = StopFlag(requests=type("Asked", (), {"new": lambda self: 1})())
    assert asked.asked() and worker.stopped_exit_code(asked) == 0
    signalled = StopFlag()
    signalled._handle(signal.SIGTERM, None)
    assert worker.stopped_exit_code(signalled) == 128 + signal.SIGTERM


def test_only_removals_gptctl_began_are_finished(trained_run, gptctl_home):
    """A NAME-ID.removing directory is finished only when its run.json says it is that run and the
    registry has no other directory for it; a user's directory of that shape, or a copy, stays."""
    import shutil

    src_home, run_id = trained_run
    shutil.copytree(src_home, gptctl_home)
    cli("runs", "list", home=gptctl_home)
    run_dir = Path(json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)["run_dir"])
    photos = gptctl_home / "photos.removing"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"x")
    copy = gptctl_home / f"old-{run_id}.removing"  # the run's id in its name, and its run.json: a copy
    shutil.copytree(run_dir, copy)
    cli("runs", "list", home=gptctl_home)
    assert (photos / "a.jpg").is_file() and copy.is_dir() and run_dir.is_dir()
    assert json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)["id"] == run_id


def test_an_unfinished_prepare_is_not_data(shakespeare, gptctl_home, tmp_path):
    import shutil

    from gptctl.data.resume import STATE_FILE

    root = tmp_path / "half"
    shutil.copytree(shakespeare, root)
    (root / "manifest.json").unlink()
    (root / STATE_FILE).write_text("{}")  # a prepare killed after its shards, before its manifest
    refused = cli("pretrain", *TINY_RUN, "--data-root", str(root), "--max-steps", "3", home=gptctl_home, check=False)
    _one_line_refusal(refused, "--data-root", "unfinished", "run the same command again")
    assert not (gptctl_home / "gptctl.db").exists()


@pytest.mark.slow
def test_detach_says_when_the_launch_fails_to_start(trained_run, gptctl_home):
    """Every checkpoint of the run corrupt: the detached resume's workers fail at start; --detach says
    so with the console's last lines and the launcher's exit code, not 'trains in the background'."""
    import shutil

    src_home, run_id = trained_run
    shutil.copytree(src_home, gptctl_home)
    cli("runs", "list", home=gptctl_home)
    for checkpoint in gptctl_home.glob("shared-*/checkpoints/*.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    proc = gptctl("resume", run_id, "--max-steps", "12", "--detach", home=gptctl_home, check=False)
    assert proc.returncode not in (0, 2), (proc.stdout, proc.stderr)
    assert "failed to start" in proc.stderr and "console.log" in proc.stderr, proc.stderr
    assert "trains in the background" not in proc.stdout


def test_detach_says_a_run_stopped_before_its_workers_started_was_stopped(shakespeare, gptctl_home, monkeypatch):
    """`runs stop --now` between the hand-off and the workers' start kills torchrun before any step: the
    detached command says the run was stopped and how to continue it, not that it failed to start."""
    from gptctl import detach
    from gptctl.cli import train as train_cli
    from gptctl.registry import open_registry, queries
    from gptctl.stop_request import stop_run

    def stop_now_while_starting(argv, waiting):
        def stop(run):
            waiting(run)
            db = open_registry(gptctl_home, create=False, check_home=False)
            stop_run(db, queries.get_run(db, run["run_id"]), now=True, wait=False)
        return detach.start_detached(argv, stop)

    monkeypatch.setattr(train_cli, "start_detached", stop_now_while_starting)
    proc = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--run-name", "early", "--detach",
               home=gptctl_home, check=False)
    run_id = only_run_id(gptctl_home, "early")
    assert proc.returncode == 128 + signal.SIGTERM, (proc.stdout, proc.stderr)
    assert f"run {run_id} (early) was stopped before its workers started (exit code 143); `gptctl resume " \
           f"{run_id}` continues it" in proc.stderr, proc.stderr
    assert "asked this run to stop now" in proc.stderr and "failed to start" not in proc.stderr
    assert _status(gptctl_home, run_id) == "interrupted" and "trains in the background" not in proc.stdout


def test_training_is_one_library_call_that_returns_an_outcome(trained_run, monkeypatch):
    """The CLI only parses and prints: training.train takes the request and returns the outcome (here an
    --auto-resume of a complete run, which trains nothing), or raises UserError for a refusal."""
    from gptctl.errors import UserError
    from gptctl.training import TrainRequest, train

    home, run_id = trained_run
    monkeypatch.setenv("GPTCTL_HOME", str(home))
    said = []
    outcome = train(TrainRequest("pretrain", "auto-resume", {"run_name": "shared"}, ["gptctl", "pretrain"]),
                    say=said.append)
    assert outcome.exit_code == 0 and outcome.run["id"] == run_id and outcome.command is None
    assert outcome.summary["status"] == "completed" and outcome.summary["last_step"] == 8
    assert said == [f"run {run_id} (shared) is already complete at step 8; nothing to train "
                    "(a --max-steps above 8 trains it further)"]
    with pytest.raises(UserError, match="--run-name: a resume keeps the run's name"):
        train(TrainRequest(None, "resume", {"run_name": "other"}, ["gptctl", "resume"], run_ref="shared"))


def test_runs_compare_compares_the_model_as_trained_not_as_typed(shakespeare, gptctl_home):
    """`--model tiny` stores no --n-layer; a run given tiny's own `--n-layer 2` trains the same model and
    is not called different; a third of 3 layers is, with every run's layer count resolved."""
    from gptctl.registry import open_registry
    from gptctl.run_compare import compare
    from gptctl.settings import TrainSettings

    db = open_registry(gptctl_home)
    for run_id, extra in (("preset", {}), ("typed", {"n_layer": 2, "block_size": 32}), ("deeper", {"n_layer": 3})):
        settings = TrainSettings(model="tiny", seq_len=32, data_root=str(shakespeare), **extra)
        add_run(db, run_id, name=run_id, settings=settings.model_dump_json())
    assert compare(db, ["preset", "typed"])["differing_settings"] == {}
    assert compare(db, ["preset", "typed", "deeper"])["differing_settings"] == {"Model": {"--n-layer": [2, 2, 3]}}


def test_runs_compare_resolves_the_shape_of_settings_that_no_longer_validate(shakespeare, gptctl_home):
    """A run whose stored settings no longer validate (a setting this version does not know) trains the same
    tiny model as one that does: its preset's shape is resolved all the same, not shown as '-' beside 2."""
    import json

    from gptctl.registry import open_registry
    from gptctl.run_compare import compare
    from gptctl.settings import TrainSettings

    db = open_registry(gptctl_home)
    settings = TrainSettings(model="tiny", seq_len=32, data_root=str(shakespeare)).model_dump(mode="json")
    add_run(db, "valid", name="valid", settings=json.dumps(settings))
    add_run(db, "future", name="future", settings=json.dumps({**settings, "future_option": 1}))
    add_run(db, "unknown", name="unknown", settings=json.dumps({**settings, "model": "gone", "future_option": 1}))
    assert compare(db, ["valid", "future"])["differing_settings"] == {"Run": {"--future-option": [None, 1]}}
    differing = compare(db, ["valid", "unknown"])["differing_settings"]  # a preset it no longer has: as stored
    assert differing["Model"]["--model"] == ["tiny", "gone"] and differing["Model"]["--n-layer"] == [2, None]
    add_run(db, "odd", name="odd", settings=json.dumps({**settings, "model": ["tiny"]}))  # edited by hand
    assert compare(db, ["valid", "odd"])["differing_settings"]["Model"]["--model"] == ["tiny", ["tiny"]]
