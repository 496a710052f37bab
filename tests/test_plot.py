"""`gptctl runs plot`: loss curves of several runs in the terminal or as a PNG."""

from helpers import add_run
from gptctl.cli import app
from gptctl.registry import open_registry, queries


def make_run(home, run_id, name, losses):
    db = open_registry(home)
    add_run(db, run_id, name=name, run_dir=str(home / name))
    queries.write_metrics(db, run_id, [
        {"step": s, "loss": loss, "lr": 1e-3, "tokens_seen": 512 * s, "time": 1.7e9 + s, "val_loss": loss + 0.5 if s % 5 == 0 else None}
        for s, loss in enumerate(losses, start=1)
    ])


def test_terminal_plot_overlays_runs(runner, gptctl_home):
    make_run(gptctl_home, "aaaa1111", "first", [10 - 0.3 * s for s in range(20)])
    make_run(gptctl_home, "bbbb2222", "second", [9 - 0.1 * s for s in range(10)])
    result = runner.invoke(app, ["runs", "plot", "first", "bbbb"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "train loss" in out and "val loss" in out
    assert "• first (aaaa1111)" in out and "x second (bbbb2222)" in out
    assert "10.000" in out and "4.300" in out  # the y range: the first run's first and last loss
    assert out.count("•") > 20 and "x" in out


def test_png_plot_against_tokens(runner, gptctl_home, tmp_path):
    make_run(gptctl_home, "aaaa1111", "first", [10 - 0.3 * s for s in range(20)])
    result = runner.invoke(app, ["runs", "plot", "first", "-o", str(tmp_path / "loss.png"), "--x", "tokens"])
    assert result.exit_code == 0, result.output
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_errors(runner, gptctl_home, tmp_path):
    make_run(gptctl_home, "aaaa1111", "first", [10.0])
    for args, option in ((["--x", "time"], "--x"), (["-o", str(tmp_path / "a.jpg")], "--output"), ([], None)):
        ref = ["nosuchrun"] if option is None else ["first"]
        result = runner.invoke(app, ["runs", "plot", *ref, *args])
        assert result.exit_code == 2 and (option or "nosuchrun") in result.output, result.output
    assert not (tmp_path / "a.jpg").exists()
