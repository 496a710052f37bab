"""Rank 0's progress lines follow --log-level."""

from gptctl.engine.progress import TrainingProgress


def row(step, val=None):
    return {"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "val_loss": val}


def test_warning_level_prints_nothing_not_even_evals_or_the_last_step(capsys, tmp_path):
    """`--log-level warning` still printed every eval: `a and b or c` binds as `(a and b) or c`."""
    progress = TrainingProgress(0, 20, tmp_path / "train.log", enabled=True, log_level="warning")
    for step in range(1, 21):
        progress.update(row(step, val=2.0 if step % 5 == 0 else None))
    progress.close()
    assert capsys.readouterr().out == ""
    assert len((tmp_path / "train.log").read_text().splitlines()) == 20  # the log file keeps every step


def test_info_level_prints_every_tenth_step_evals_and_the_last(capsys):
    progress = TrainingProgress(0, 23, None, enabled=True, log_level="info")
    for step in range(1, 24):
        progress.update(row(step, val=2.0 if step == 5 else None))
    printed = [line.split("|")[0].strip() for line in capsys.readouterr().out.splitlines()]
    assert printed == ["step 5/23", "step 10/23", "step 20/23", "step 23/23"]


def test_a_muon_run_shows_muons_lr_beside_adamws(capsys):
    """The row's LR is AdamW's (embeddings, 1-D parameters); the block matrices train at Muon's."""
    progress = TrainingProgress(0, 1, None, enabled=True, log_level="info", muon_lr_scale=0.02 / 6e-4)
    progress.update({**row(1), "lr": 6e-4})
    assert "| lr 6.000e-04 (muon 2.000e-02) |" in capsys.readouterr().out
