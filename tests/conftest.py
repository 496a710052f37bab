"""Fixtures only; the helpers the tests share are plain functions in helpers.py."""
import os
import signal

import pytest

from helpers import SHAKESPEARE, SHARED, TINY_RUN, cli, only_run_id

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread per process: on a 2-core machine the test's processes otherwise fight over the cores
# (a 30-step tiny run took 80 s with the default threads and 33 s with one, measured under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Inductor's CPU kernels without SIMD: the compiled tests check how compile meets DDP, FSDP2, activation
# checkpointing and checkpoints, not inductor's vectorizer, and scalar kernels compile in about a quarter
# less time (the two compiled tests: 83 s with a cold inductor cache, 60 s without SIMD). Training keeps SIMD.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
# A suite started in the background by a shell without job control inherits SIGINT ignored, and so
# would every process a test starts: Ctrl-C tests (chat, serve, the launcher) then see nothing. A caught
# signal is reset to the default across exec, an ignored one is not: catch it here.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def gptctl_home(tmp_path, monkeypatch):
    """Every test gets its own registry and run directories."""
    home = tmp_path / "home"
    monkeypatch.setenv("GPTCTL_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def runner():
    """Typer's CliRunner for `runner.invoke(app, [...])`: the CLI in this process, against the test's own
    GPTCTL_HOME (gptctl_home sets it in the environment, which each invoke reads). It keeps no state between
    invokes, so one serves the session, module fixtures included."""
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """Tiny Shakespeare, tokenized for real once per test session."""
    from gptctl.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare(PrepareOptions(inputs=[SHAKESPEARE], data_root=root))
    return root


@pytest.fixture(scope="session")
def trained_run(shakespeare, tmp_path_factory):
    """(home, run id) of one real `gptctl pretrain` (its worker in-process) of 8 steps with checkpoints at 4 and 8
    and val losses at 4 and 8, shared by the tests that only read a trained run (eval, sample, export).
    They may take reader leases, never change it."""
    home = tmp_path_factory.mktemp("trained") / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "8", "--checkpoint-interval", "4",
           "--run-name", "shared", home=home)
    return home, only_run_id(home, "shared")
