"""Bad input: one line naming the option, exit code 2, and nothing written."""

import json
import subprocess
import sys

import pytest

from helpers import add_run
from gptctl.cli import app
from gptctl.cli import COMMANDS, kebab_args


def base(data_root) -> list[str]:
    return ["pretrain", "--model", "tiny", "--data-root", str(data_root), "--seq-len", "32", "--batch-size", "4",
            "--total-batch-size", "256", "--max-steps", "10", "--warmup-steps", "2"]


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--max-lr", "-1"], "--max-lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--min-lr", "1"], "--min-lr"),
        (["--warmup-steps", "10"], "--warmup-steps"),
        (["--total-batch-size", "1000"], "--total-batch-size"),
        (["--grad-accumulation-steps", "3"], "--grad-accumulation-steps"),
        (["--n-head", "3"], "--n-head"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "int8"], "--dtype"),
        (["--run-name", "../escape"], "--run-name"),
        (["--run-name", "a/b"], "--run-name"),
        (["--permanent-checkpoints", "10,x"], "--permanent-checkpoints"),
        (["--model", "gpt5"], "--model"),
        (["--resume"], "--resume"),
        (["--resume", "--checkpoint-path", "/nonexistent/model_00010.pt"], "--checkpoint-path"),
        (["--nproc-per-node", "zero"], "--nproc-per-node"),
        (["--lr-scheduler", "step"], "--lr-scheduler"),
        (["--lr-restarts", "2"], "--lr-restarts"),
        (["--dynamic-seq-length", "--min-seq-length", "12"], "--min-seq-length"),
        (["--max-seq-length", "0"], "--seq-len"),
    ],
)
def test_invalid_settings_exit_2_and_write_nothing(runner, shakespeare, gptctl_home, extra, option):
    result = runner.invoke(app, base(shakespeare) + extra)
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and option in lines[0], result.output
    assert "Traceback" not in result.output
    assert not gptctl_home.exists(), "a rejected command must not create the registry or a run directory"


@pytest.mark.parametrize("root", ["missing", "empty"])
def test_missing_or_empty_data_root(runner, tmp_path, gptctl_home, root):
    data = tmp_path / root
    if root == "empty":
        data.mkdir()
    result = runner.invoke(app, base(data))
    assert result.exit_code == 2 and "--data-root" in result.output
    assert not gptctl_home.exists()


def test_config_file_then_cli_overrides(runner, shakespeare, tmp_path, gptctl_home):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('max-lr = -3.0\nmodel = "tiny"\n')
    result = runner.invoke(app, base(shakespeare) + ["--config", str(cfg)])
    assert result.exit_code == 2 and "--max-lr" in result.output  # the file's value was used...
    result = runner.invoke(app, base(shakespeare) + ["--config", str(cfg), "--max-lr", "1e-3", "--min-lr", "1"])
    assert result.exit_code == 2 and "--min-lr (1.0) must not exceed --max-lr (0.001)" in result.output  # ...and overridden
    cfg.write_text("not_a_setting = 1\n")
    result = runner.invoke(app, base(shakespeare) + ["--config", str(cfg)])
    assert result.exit_code == 2 and "not_a_setting" in result.output
    assert not gptctl_home.exists()


def test_snake_case_aliases(runner, shakespeare, gptctl_home):
    args = ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in base(shakespeare)]
    assert "--max_steps" in args
    result = runner.invoke(app, args + ["--max_lr=-1"])
    assert result.exit_code == 2 and "--max-lr" in result.output


def test_kebab_args_leaves_values_alone():
    assert kebab_args(["--data_root", "my_dir", "--run_name=a_b", "--", "--x_y"]) == [
        "--data-root", "my_dir", "--run-name=a_b", "--", "--x_y"]


def test_the_old_scripts_flags_mean_what_they_meant():
    assert kebab_args(["--log_gradients", "--max_steps", "5"]) == ["--log-gradients", "100", "--max-steps", "5"]
    assert kebab_args(["--log_gradients"]) == ["--log-gradients", "100"]
    assert kebab_args(["--log_gradients", "7"]) == ["--log-gradients", "7"]
    assert kebab_args(["--log-gradients", "-1"]) == ["--log-gradients", "-1"]  # refused by validation, not defaulted
    assert kebab_args(["--decay_lr", "--x"]) == ["--lr-scheduler", "cosine", "--x"]
    assert kebab_args(["--no-decay_lr"]) == kebab_args(["--decay_lr=False"]) == ["--lr-scheduler", "constant"]


def test_unknown_run_is_a_clean_error(runner, gptctl_home):
    result = runner.invoke(app, ["resume", "deadbeef"])
    assert result.exit_code == 2 and "no run 'deadbeef'" in result.output
    result = runner.invoke(app, ["runs", "show", "nope"])
    assert result.exit_code == 2


@pytest.mark.parametrize("argv", [["--help"], ["runs", "list"], ["ckpt", "list"], ["estimate", "--gpu", "rtx3090"],
                                  ["chat", "--help"]])
def test_light_commands_do_not_import_heavy_modules(argv, gptctl_home):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gptctl", *argv], capture_output=True, text=True,
                          env={**__import__("os").environ, "GPTCTL_HOME": str(gptctl_home)})
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "datasets", "tiktoken", "numpy"}, imported & {"torch", "datasets", "tiktoken", "numpy"}


def test_help_lists_every_command_without_importing_their_modules(gptctl_home):
    probe = ("import sys; from gptctl.cli import main; sys.argv = ['gptctl', '--help']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith('gptctl.cli.')), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**__import__("os").environ, "GPTCTL_HOME": str(gptctl_home), "COLUMNS": "200"})
    assert proc.returncode == 0 and proc.stderr.strip() == "[]", proc.stderr
    for name in COMMANDS:
        assert f" {name} " in proc.stdout


def test_the_help_index_says_what_each_command_says_of_itself():
    """gptctl --help lists the commands from gptctl.cli.COMMANDS; each line is the command's own."""
    from typer.main import get_command

    group = get_command(app)
    for name, (_, line) in COMMANDS.items():
        assert group.get_command(None, name).get_short_help_str(limit=1000) == line, name


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["ckpt", "prune", "--help"]])
def test_flags_show_no_value_in_help(runner, argv):
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--help" in result.output
    assert "<bool>" not in result.output


def test_bare_gptctl_prints_the_index_and_help_text_keeps_brackets(runner):
    result = runner.invoke(app, [])
    assert result.exit_code == 2 and "pretrain" in result.stderr and "Commands:" in result.stderr
    shown = runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"}).output
    assert "pip install 'gptctl[wandb]'" in shown and "'gptctl[tensorboard]'" in shown  # not eaten as markup


def test_config_files_of_earlier_versions_and_numbers_for_nproc(runner, shakespeare, gptctl_home, tmp_path):
    config = tmp_path / "old.toml"
    config.write_text('decay_lr = false\nnproc_per_node = 2\nmodel = "tiny"\n')
    result = runner.invoke(app, ["pretrain", "--config", str(config), *base(shakespeare)[3:], "--print-command"])
    assert result.exit_code == 0, result.output
    assert "--nproc-per-node=2" in result.stdout
    run = json.loads(runner.invoke(app, ["runs", "show", "pretrain", "--json"]).stdout)
    assert run["settings"]["lr_scheduler"] == "constant" and run["settings"]["model"] == "tiny"


def test_save_config_writes_toml_that_config_reads_back(runner, shakespeare, gptctl_home):
    """--print-command creates the run (and its config.toml) without training: enough to check the round trip."""
    import json

    args = base(shakespeare) + ["--lr-scheduler", "cosine_with_restarts", "--lr-restarts", "2", "--max-lr", "1e-3",
                                "--permanent-checkpoints", "4,8", "--no-async-checkpoint", "--run-name", "orig"]
    assert runner.invoke(app, args + ["--save-config", "--print-command"]).exit_code == 0
    runs = json.loads(runner.invoke(app, ["runs", "list", "--json"]).stdout)
    original = json.loads(runner.invoke(app, ["runs", "show", runs[0]["id"], "--json"]).stdout)
    toml = f"{original['run_dir']}/config.toml"
    result = runner.invoke(app, ["pretrain", "--config", toml, "--run-name", "copy", "--print-command"])
    assert result.exit_code == 0, result.output
    copy_id = [r["id"] for r in json.loads(runner.invoke(app, ["runs", "list", "--json"]).stdout) if r["name"] == "copy"][0]
    copy = json.loads(runner.invoke(app, ["runs", "show", copy_id, "--json"]).stdout)
    assert {**copy["settings"], "run_name": "orig"} == original["settings"]


def test_settings_stored_by_earlier_versions_still_load():
    from gptctl.settings import TrainSettings

    assert TrainSettings.model_validate_json('{"decay_lr": true}').lr_scheduler == "cosine"
    assert TrainSettings.model_validate({"decay_lr": False}).lr_scheduler == "constant"


def test_a_run_shorter_than_its_warmup_is_told_about_warmup_not_restarts():
    from gptctl.settings import TrainSettings

    with pytest.raises(ValueError, match=r"--warmup-steps \(5\) must be smaller than --max-steps \(3\)"):
        TrainSettings(max_steps=3, warmup_steps=5)
    with pytest.raises(ValueError, match="--lr-restarts"):
        TrainSettings(max_steps=8, warmup_steps=5, lr_scheduler="cosine_with_restarts", lr_restarts=3)


def test_launch_settings_are_not_part_of_the_run():
    """Launch options stay flat on the command line and in config files, but are built apart: the run's
    settings (stored, in checkpoints, read by the workers) hold none of them; runs stored before keep loading."""
    from gptctl.settings import LAUNCH_FIELDS, LaunchSettings, TrainSettings, build_settings

    settings, launch = build_settings({"nproc_per_node": "2", "stop_timeout": 60.0, "max_steps": 10}, warmup_steps=2)
    assert isinstance(launch, LaunchSettings) and launch.nproc_per_node == "2" and launch.stop_timeout == 60
    assert not LAUNCH_FIELDS & settings.model_dump().keys() and settings.max_steps == 10
    old = {**settings.model_dump(mode="json"), "nproc_per_node": "8", "master_addr": "gpu11", "stop_timeout": 5}
    assert TrainSettings.model_validate(old) == settings  # e.g. a run or checkpoint from before the split


def test_the_run_settings_are_groups_joined_and_stay_flat_outside(runner):
    """Each setting belongs to exactly one group, which checks it and derives what it alone can; the
    command line, --help, config files and stored settings see the flat names."""
    from pydantic import ValidationError

    from gptctl.settings import TRAIN_GROUPS, CheckpointSettings, LaunchSettings, ScheduleSettings, TrainSettings
    from gptctl.settings_files import to_toml

    names = [name for group in TRAIN_GROUPS for name in group.model_fields]
    assert len(names) == len(set(names)) and set(names) | {"kind"} == set(TrainSettings.model_fields)
    assert not set(names) & set(LaunchSettings.model_fields)
    with pytest.raises(ValidationError, match=r"--warmup-steps \(10\) must be smaller"):
        ScheduleSettings(max_steps=10, warmup_steps=10)  # a group checks itself alone
    saves = CheckpointSettings(checkpoint_interval=4, permanent_checkpoints="6")
    assert [s for s in range(1, 11) if saves.is_save_step(s, 10)] == [4, 6, 8, 10]
    settings = TrainSettings(max_steps=10, warmup_steps=2, checkpoint_interval=4, permanent_checkpoints=[6])
    assert isinstance(settings, CheckpointSettings) and settings.schedule().max_steps == 10
    assert set(settings.model_dump()) == set(names) | {"kind"}  # stored flat, as before the groups
    assert "max_steps = 10\n" in to_toml(settings)
    shown = runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "100"}).output
    assert all(group.panel in shown for group in TRAIN_GROUPS) and "Launch (this launch only)" in shown


def test_resume_takes_launch_options_and_checks_them(runner, tmp_path, monkeypatch):
    result = runner.invoke(app, ["resume", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                   "--rdzv-endpoint", "--max-restarts", "--stop-timeout"):
        assert option in result.output, option
    result = runner.invoke(app, ["resume", "somerun", "--node-rank", "3"])
    assert result.exit_code == 2 and "--node-rank (3) must be smaller than --nnodes (1)" in result.output
    assert not (tmp_path / "home").exists()


def test_auto_resume_refuses_options_that_would_make_another_run(runner, shakespeare, gptctl_home):
    """The issue: `--auto-resume --batch-size 2` on a run started with 4 trained with 4 and said nothing.
    Now an option that would make another run (here the seed) is refused by name, nothing changes; watched
    and kept settings may change, and so may the micro-batch, which keeps the tokens per step."""
    import json

    from gptctl.registry import open_registry, queries
    from gptctl.settings import build_settings

    tiny = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--total-batch-size", "256",
            "--warmup-steps", "2", "--max-steps", "8", "--data-root", str(shakespeare), "--run-name", "r"]
    settings, _ = build_settings({"model": "tiny", "seq_len": 32, "batch_size": 4, "total_batch_size": 256,
                                  "warmup_steps": 2, "max_steps": 8, "data_root": shakespeare, "run_name": "r"})
    db = open_registry(gptctl_home)
    add_run(db, "abc123", status="interrupted", settings=settings.model_dump_json(), run_dir=str(gptctl_home / "r-abc123"),
            created_at=queries.now(), last_step=4)
    before = (gptctl_home / "gptctl.db").read_bytes()
    result = runner.invoke(app, ["pretrain", *tiny, "--auto-resume", "--seed", "7"])
    assert result.exit_code == 2 and "--seed: run abc123 (r) was started with 1337" in result.output
    assert (gptctl_home / "gptctl.db").read_bytes() == before
    # A --config file's settings are given too (they were ignored on auto-resume: the break test found a
    # config's `optimizer = "muon"` resuming an AdamW run with AdamW, silently).
    config = gptctl_home.parent / "muon.toml"
    config.write_text('optimizer = "muon"\nmuon_lr = 0.05\n')
    result = runner.invoke(app, ["pretrain", *tiny, "--auto-resume", "--config", str(config)])
    assert result.exit_code == 2 and "--optimizer: run abc123 (r) was started with 'adamw'" in result.output
    config.write_text("seed = 7\n")
    result = runner.invoke(app, ["pretrain", *tiny, "--auto-resume", "--config", str(config)])
    assert result.exit_code == 2 and "--seed: run abc123 (r) was started with 1337" in result.output
    assert (gptctl_home / "gptctl.db").read_bytes() == before

    from gptctl.resume import resume_changes, resume_settings

    run = queries.get_run(db, "abc123")
    changes = resume_changes(run, {"eval_interval": 2, "batch_size": 4, "max_steps": 12})
    assert changes == {"eval_interval": 2}  # an equal --batch-size is no change
    resumed, note = resume_settings(run, 12, changes)
    assert resumed.eval_interval == 2 and resumed.max_steps == 12 and resumed.lr_decay_steps == 8
    assert "--eval-interval 2 (was 250)" in note and "still ends at step 8" in note
    assert json.loads(run["settings"])["eval_interval"] == settings.eval_interval  # nothing stored by asking

    # `gptctl resume` judges its options the same way; --override-settings lets a run-making one through,
    # said in the run's events; the model's shape never changes.
    for args, said in ((["--seed", "2"], "--seed: run abc123 (r) was started with 1337; resuming cannot "
                        "change it without making another run. Drop the option, add --override-settings"),
                       (["--n-layer", "3", "--override-settings"], "--n-layer: run abc123 (r) was started with 2, "
                        "and its checkpoints hold weights of that shape"),
                       (["--seq-len", "64", "--override-settings"], "--seq-len: run abc123 (r) was started with 32"),
                       (["--run-name", "other"], "--run-name: a resume keeps the run's name"),
                       (["--max-lr", "-1"], "--max-lr: Input should be greater than 0")):
        result = runner.invoke(app, ["resume", "r", *args])
        assert result.exit_code == 2 and said in result.output, (args, result.output)
        assert (gptctl_home / "gptctl.db").read_bytes() == before
    changes = resume_changes(run, {"seed": 2, "max_lr": 1e-3}, override=True)
    assert changes == {"seed": 2, "max_lr": 1e-3}
    _, note = resume_settings(run, None, changes)
    assert note == ("changed at step 4: --max-lr 0.001 (was 0.0006), by --override-settings, "
                    "--seed 2 (was 1337), by --override-settings")
    # The micro-batch changes how a step is computed, not what: no --override-settings, same tokens per step.
    changes = resume_changes(run, {"batch_size": 2})
    resumed, note = resume_settings(run, None, changes)
    assert note == "changed at step 4: --batch-size 2 (was 4)"
    assert (resumed.batch_size, resumed.tokens_per_step(1), resumed.resolved_accumulation(1)) == (2, 256, 4)
    result = runner.invoke(app, ["pretrain", *tiny, "--override-settings"])
    assert result.exit_code == 2 and "--override-settings: only for a resume" in result.output


def test_lowering_max_steps_on_resume_says_what_the_lr_does(shakespeare):
    from gptctl.resume import resume_settings
    from gptctl.settings import build_settings

    settings, _ = build_settings({"model": "tiny", "max_steps": 1000, "warmup_steps": 10, "data_root": shakespeare})
    run = {"id": "abc123", "name": "r", "settings": settings.model_dump_json(), "last_step": 100}
    resumed, note = resume_settings(run, 200)
    assert resumed.schedule_steps == 200 and note.startswith("--max-steps 1000 -> 200 at step 100: the LR schedule "
                                                             "now ends at step 200; the LR at step 101 goes from 0.000")


def test_settings_rules_are_read_off_the_fields_and_every_resume_checks_the_same():
    """Which settings set the shape and which may change on resume are metadata beside each field; the lists
    are derived. check_compatible is the one check of a checkpoint's shape, optimizer and data, worded for a
    run (gptctl resume, --auto-resume) or a file (--resume --checkpoint-path)."""
    from pathlib import Path

    from gptctl.errors import UserError
    from gptctl.resume import check_compatible
    from gptctl.settings import (CHANGEABLE_ON_RESUME, SHAPE_OPTIONS, CheckpointSettings, EvalSettings,
                                 HealthSettings, LogSettings, TrainSettings)

    assert SHAPE_OPTIONS == ("arch", "model", "n_layer", "n_head", "n_embd")
    whole = {name for group in (CheckpointSettings, EvalSettings, LogSettings, HealthSettings)
             for name in group.model_fields} - {"run_name"}
    assert CHANGEABLE_ON_RESUME == whole | {"num_workers", "compile", "activation_checkpointing", "model_parallel",
                                            "model_parallel_size", "device", "deterministic", "data_root", "batch_size"}
    stored, path = TrainSettings(model="tiny", data_fingerprint="shards:a"), Path("/x/model.pt")
    run = {"id": "abc123", "name": "r"}
    for wanted, as_file, as_run in (
            ({"arch": "modern"}, "holds another model than these settings make (arch gpt2 vs modern)",
             "--arch: run abc123 (r) was started with 'gpt2', and its checkpoints hold weights of that shape"),
            ({"optimizer": "muon"}, "--optimizer: /x/model.pt holds the state of --optimizer adamw",
             "--optimizer: run abc123 (r) was started with 'adamw', and its checkpoints hold that optimizer's"),
            ({"data_fingerprint": "shards:b"}, "--data-root: None holds other data than /x/model.pt",
             "--data-root: None holds other data than run abc123 (r)")):
        other = TrainSettings(**{**stored.model_dump(), **wanted})
        for where, said in (({"path": path}, as_file), ({"run": run}, as_run)):
            with pytest.raises(UserError) as refused:
                check_compatible(stored, other, override="data_fingerprint" not in wanted, **where)
            assert said in str(refused.value)
    other_data = TrainSettings(**{**stored.model_dump(), "data_fingerprint": "shards:b"})
    assert check_compatible(stored, other_data, path=path, override=True) is True
    assert check_compatible(stored, stored.model_copy(update={"max_lr": 1e-3}), run=run) is False
