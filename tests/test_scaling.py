"""Beyond one process: SLURM defaults, --print-command for job scripts, elastic restarts, two nodes."""

import json
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from helpers import TINY_RUN, cli, losses, only_run_id, wait_until
from gptctl.cli import app
from gptctl.slurm import expand_nodelist, launch_defaults


def test_expand_slurm_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]


def test_slurm_allocation_sets_launch_defaults(runner, shakespeare, monkeypatch):
    env = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[11-12]"}
    assert launch_defaults(env) == {"nnodes": 2, "node_rank": 0, "master_addr": "gpu11"}
    assert launch_defaults({"SLURM_JOB_ID": "42", "SLURM_NNODES": "1"}) == {}  # one node: nothing to derive
    monkeypatch.setattr(os, "environ", {**os.environ, **env})
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4",
                                 "--print-command"])
    assert result.exit_code == 0, result.output
    command = result.stdout.strip().splitlines()[-1]
    assert "--nnodes=2 --node-rank=0 --master-addr=gpu11" in command
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4",
                                 "--print-command", "--nnodes", "1"])  # the command line still wins
    assert "--standalone" in result.stdout


@pytest.mark.slow
def test_print_command_queues_a_run_that_the_bare_command_trains(shakespeare, gptctl_home):
    proc = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4", "--run-name", "job",
               "--print-command", home=gptctl_home)
    run_id = only_run_id(gptctl_home, "job")
    listed = json.loads(cli("runs", "list", "--json", home=gptctl_home).stdout)
    assert listed[0]["status"] == "queued"
    command = shlex.split(proc.stdout.strip())
    assert command[-2:] == ["--run-id", run_id]
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in command  # SLURM's USR1 must not kill torchrun
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "GPTCTL_HOME": str(gptctl_home)})
    shown = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    assert shown["status"] == "completed" and [r["reason"] for r in shown["launches"]] == ["completed"]
    assert sorted(losses(gptctl_home, run_id)) == [1, 2, 3, 4]


def _running_worker_pid(home, run_id, min_step):
    try:
        with sqlite3.connect(f"file:{home / 'gptctl.db'}?mode=ro", uri=True) as conn:
            row = conn.execute("select status, pid, last_step from runs where id = ?", [run_id]).fetchone()
    except sqlite3.OperationalError:
        return None
    return row[1] if row and row[0] == "running" and (row[2] or 0) >= min_step else None


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_untouched(shakespeare, gptctl_home):
    # 32 steps: the kill lands at step 8 to 12 (last_step moves at checkpoints) with steps to spare.
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "32", "--checkpoint-interval", "4"]
    cli("pretrain", *args, "--run-name", "reference", home=gptctl_home)
    reference = losses(gptctl_home, only_run_id(gptctl_home, "reference"))

    launcher = subprocess.Popen([sys.executable, "-m", "gptctl", "pretrain", *args, "--run-name", "elastic",
                                 "--max-restarts", "2"], env={**os.environ, "GPTCTL_HOME": str(gptctl_home)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = wait_until(lambda: _only_id(gptctl_home, "elastic"), "the run's row", interval=0.2)
    pid = wait_until(lambda: _running_worker_pid(gptctl_home, run_id, min_step=6), "a worker past step 6", interval=0.2)
    os.kill(pid, signal.SIGKILL)  # one worker dies; torchrun starts a new one from the newest checkpoint
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    assert "resuming from step" in err
    assert losses(gptctl_home, run_id) == reference
    starts = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)["launches"]
    assert [r["reason"] for r in starts] == ["crash", "completed"]  # torchrun's restart: a start of its own


def _only_id(home, name):
    try:
        return only_run_id(home, name)
    except (sqlite3.OperationalError, IndexError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_together_like_one_node(shakespeare, gptctl_home):
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "6", "--checkpoint-interval", "6"]
    # One process with the same tokens per step (2 micro-steps; two processes match it: test_train_e2e).
    cli("pretrain", *args, "--run-name", "one-node", home=gptctl_home)
    one_node = losses(gptctl_home, only_run_id(gptctl_home, "one-node"))

    port = str(_free_port())
    multi = ["pretrain", *args, "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port,
             "--run-name", "two-nodes"]
    env = {**os.environ, "GPTCTL_HOME": str(gptctl_home)}
    nodes = [subprocess.Popen([sys.executable, "-m", "gptctl", *multi, "--node-rank", str(rank)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        names = sorted(r[0] for r in conn.execute("select name from runs"))
    assert names == ["one-node", "two-nodes"]  # node 1's launcher wrote nothing
    two_nodes = losses(gptctl_home, only_run_id(gptctl_home, "two-nodes"))
    assert sorted(two_nodes) == sorted(one_node)
    for step, (loss, val) in one_node.items():
        assert two_nodes[step][0] == pytest.approx(loss, rel=1e-5, abs=1e-5)
        assert (val is None) == (two_nodes[step][1] is None)


@pytest.mark.slow
def test_c10d_rendezvous_nodes_join_in_any_order(shakespeare, gptctl_home):
    """With c10d, ranks follow arrival order: node 1 starts first, so its worker likely gets rank 0, yet
    node 0's worker (the one whose launcher created the run) writes the registry and checkpoints."""
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4", "--checkpoint-interval", "4"]
    # One process with the same tokens per step (2 micro-steps; two processes match it: test_train_e2e).
    cli("pretrain", *args, "--run-name", "one-node", home=gptctl_home)
    one_node = losses(gptctl_home, only_run_id(gptctl_home, "one-node"))

    multi = ["pretrain", *args, "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "job1",
             "--run-name", "c10d"]
    env = {**os.environ, "GPTCTL_HOME": str(gptctl_home)}
    follower = subprocess.Popen([sys.executable, "-m", "gptctl", *multi, "--node-rank", "1"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    leader = subprocess.Popen([sys.executable, "-m", "gptctl", *multi, "--node-rank", "0", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=300) for p in (leader, follower)]
    assert [leader.returncode, follower.returncode] == [0, 0], outputs
    summary = json.loads(outputs[0][0])
    assert summary["status"] == "completed" and len(summary["checkpoints"]) == 1
    import torch

    state = torch.load(summary["checkpoints"][0], weights_only=True)  # whoever got rank 0 wrote a full state
    assert "transformer.wte.weight" in state["model"] and state["optimizer"]["state"]
    c10d = losses(gptctl_home, summary["run_id"])
    assert all(c10d[s][0] == pytest.approx(one_node[s][0], rel=1e-5, abs=1e-5) for s in one_node)
