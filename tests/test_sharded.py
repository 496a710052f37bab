"""--model-parallel: FSDP2 sharding on CPU (gloo), and checkpoints that move between layouts."""

import json

import pytest

from helpers import TINY_RUN, gptctl, losses, train_in_process, train_in_processes
from gptctl.cli import app


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model-parallel-size", "2"], "--model-parallel-size needs --model-parallel"),
        (["--model-parallel", "--model-parallel-size", "3", "--nproc-per-node", "2", "--total-batch-size", "256",
          "--batch-size", "2"], "must divide the number of processes"),
    ],
)
def test_bad_sharding_is_refused(runner, shakespeare, gptctl_home, extra, message):
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4", *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not gptctl_home.exists()


def run(home, data, name, *extra):
    summary = json.loads(gptctl("pretrain", *TINY_RUN, "--data-root", str(data), "--max-steps", "8",
                                "--checkpoint-interval", "4", "--keep-last-n-checkpoints", "5", "--run-name", name,
                                "--json", *extra, home=home).stdout)
    return summary, losses(home, summary["run_id"])


def close(a, b, tol=1e-4):
    return sorted(a) == sorted(b) and all(abs(a[s][0] - b[s][0]) < tol for s in a)


@pytest.mark.slow
def test_sharded_run_matches_one_process_and_its_checkpoints_move_between_layouts(shakespeare, gptctl_home, tmp_path):
    # The one-process sides run in-process (the same Trainer the worker runs); the sharded ones under torchrun.
    layout = dict(max_steps=8, checkpoint_interval=4)
    single, _ = train_in_process(shakespeare, tmp_path / "single", **layout)
    sharded_run, sharded = run(gptctl_home, shakespeare, "sharded", "--nproc-per-node", "2", "--model-parallel")
    assert close(sharded, single), (sharded, single)

    step4 = next(p for p in sharded_run["checkpoints"] if p.endswith("model_00004.pt"))
    # Same layout (the same Trainer on two forked processes): bit for bit.
    same, _ = train_in_processes(2, shakespeare, tmp_path / "same", resume_from=step4, model_parallel=True, **layout)
    assert same == {s: sharded[s] for s in range(5, 9)}
    # A sharded checkpoint into one unsharded process (and back: test_gpu_paths' FSDP2 run resumes from a
    # one-process checkpoint).
    unsharded, _ = train_in_process(shakespeare, tmp_path / "unsharded", resume_from=step4, **layout)
    assert close(unsharded, {s: sharded[s] for s in range(5, 9)})


@pytest.mark.slow
def test_hybrid_sharding_two_groups_of_two(shakespeare, gptctl_home, tmp_path):
    single, _ = train_in_process(shakespeare, tmp_path / "single", max_steps=4, checkpoint_interval=4)
    hybrid, _ = train_in_processes(4, shakespeare, tmp_path / "hybrid", max_steps=4, checkpoint_interval=4,
                                   model_parallel=True, model_parallel_size=2, batch_size=1)
    assert close(hybrid, single), (hybrid, single)
