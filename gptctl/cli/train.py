"""`gptctl pretrain`, `gptctl finetune` and `gptctl resume`: each parses its options into one TrainRequest,
and prints the Outcome of training.train (which does the rest)."""

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from gptctl.cli import app
from gptctl.cli.settings_options import with_settings_options
from gptctl.detach import detached, start_detached
from gptctl.errors import UserError
from gptctl.paths import home_dir
from gptctl.resume import OVERRIDE
from gptctl.settings import FINETUNE_DEFAULTS, FINETUNE_FROM_PARENT, TrainSettings
from gptctl.training import Outcome, TrainRequest, train

CONFIG = typer.Option(None, "--config", help="TOML file of settings; command-line options override it.")
SAVE_CONFIG = typer.Option(False, "--save-config", help="Also write the resolved settings as config.toml in the run directory.")
AUTO_RESUME = typer.Option(False, "--auto-resume", help="Continue the run with this --run-name (a completed one only "
                           "to a higher --max-steps), or start it.")
NEW_RUN = typer.Option(False, "--new-run", help="Start a second run under a --run-name that a run already has "
                       "(RUN then means the newest of them).")
RESUME = typer.Option(False, "--resume", help="Start from the checkpoint given by --checkpoint-path.")
CHECKPOINT_PATH = typer.Option(None, "--checkpoint-path", help="Checkpoint file for --resume (its weights, optimizer and step).")
JSON = typer.Option(False, "--json", help="Print a machine-readable summary at the end.")
OVERRIDE_SETTINGS = typer.Option(False, OVERRIDE, help="When resuming, let the options given change "
                                 "settings that make the run (data, batch, optimizer settings, schedule, seed, "
                                 "dtype); each change is recorded with its step. The model's shape and --optimizer "
                                 "never change: the checkpoints hold them.")
DETACH = typer.Option(False, "--detach", help="Train in the background, free of this terminal: return once the "
                      "workers start (checks and refusals print here first); `gptctl runs logs RUN --follow` "
                      "follows it, `gptctl runs stop RUN` stops it.")
PRINT_COMMAND = typer.Option(False, "--print-command", help="Create the run (status queued) and print the torchrun "
                             "command that trains it, for a job script; train nothing now.")


@app.command()
@with_settings_options("pretrain")
def pretrain(
    values: dict[str, Any],
    config: Optional[Path] = CONFIG,
    save_config: bool = SAVE_CONFIG,
    auto_resume: bool = AUTO_RESUME,
    resume: bool = RESUME,
    checkpoint_path: Optional[Path] = CHECKPOINT_PATH,
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="Start from these weights (a file, RUN, RUN:STEP or hf:DIR_OR_NAME) with a fresh "
        "optimizer at step 0; the model shape comes from them."),
    print_command: bool = PRINT_COMMAND,
    override_settings: bool = OVERRIDE_SETTINGS,
    new_run: bool = NEW_RUN,
    detach: bool = DETACH,
    as_json: bool = JSON,
):
    """Train GPT-2 on prepared token shards, from scratch or --init-from weights (torchrun workers; DDP or FSDP)."""
    _maybe_detach(detach, print_command, as_json)
    _train(TrainRequest("pretrain", "auto-resume" if auto_resume else "new", values, command_line(), config=config,
                        parent=init_from, resume_from_file=resume, checkpoint_path=checkpoint_path,
                        save_config=save_config, override_settings=override_settings, new_run=new_run,
                        print_command=print_command), as_json)


@app.command()
@with_settings_options("finetune", defaults={**FINETUNE_DEFAULTS, "total_batch_size": "batch-size × seq-len × processes × grad-accumulation-steps",
                                            "seq_len": "the pretrained model's"}, refused=FINETUNE_FROM_PARENT)
def finetune(
    values: dict[str, Any],
    pretrained_checkpoint: str = typer.Option(
        ..., "--pretrained-checkpoint", help="Checkpoint to start from: a file, RUN (its newest valid checkpoint), "
        "RUN:STEP, or hf:DIR_OR_NAME for Hugging Face GPT-2 weights (a local directory or the local HF cache)."),
    config: Optional[Path] = CONFIG,
    save_config: bool = SAVE_CONFIG,
    auto_resume: bool = AUTO_RESUME,
    resume: bool = RESUME,
    checkpoint_path: Optional[Path] = CHECKPOINT_PATH,
    print_command: bool = PRINT_COMMAND,
    override_settings: bool = OVERRIDE_SETTINGS,
    new_run: bool = NEW_RUN,
    detach: bool = DETACH,
    as_json: bool = JSON,
):
    """Instruction-tune a pretrained model on databricks-dolly-15k (or a local file in its schema).

    The loss counts only response tokens; the model's shape comes from the checkpoint.
    """
    _maybe_detach(detach, print_command, as_json)
    _train(TrainRequest("finetune", "auto-resume" if auto_resume else "new", values, command_line(), config=config,
                        parent=pretrained_checkpoint, resume_from_file=resume, checkpoint_path=checkpoint_path,
                        save_config=save_config, override_settings=override_settings, new_run=new_run,
                        print_command=print_command), as_json)


@app.command("resume")
@with_settings_options("resume", defaults={name: "the run's" for name in TrainSettings.model_fields})
def resume_cmd(
    values: dict[str, Any],
    run_ref: str = typer.Argument(..., metavar="RUN", help="Run id (or unique prefix) or name."),
    override_settings: bool = OVERRIDE_SETTINGS,
    detach: bool = DETACH,
    as_json: bool = JSON,
):
    """Continue a run from its newest valid checkpoint with its stored settings.

    Training settings given here apply from the step it resumes at, and are recorded in its events.

    --max-steps raises the budget (the LR schedule still ends where it did); evaluation, checkpoint, watching and compute settings may change; those that would make another run need --override-settings.

    Launch settings are this launch's own: more processes or other nodes (a SLURM job requeued elsewhere).
    """
    _maybe_detach(detach, False, as_json)
    _train(TrainRequest(None, "resume", values, command_line(), run_ref=run_ref,
                        override_settings=override_settings), as_json)


def _train(request: TrainRequest, as_json: bool) -> None:
    outcome = train(request, say=lambda line: typer.echo(line, err=True))
    if outcome.command is not None:  # --print-command
        typer.echo(outcome.command)
        if outcome.command_note:
            typer.echo(outcome.command_note, err=True)
    if outcome.summary is not None:
        _print_summary(outcome, as_json)
    raise typer.Exit(outcome.exit_code)


def _print_summary(outcome: Outcome, as_json: bool) -> None:
    info = outcome.summary
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        loss = f"{info['loss']:.4f}" if info["loss"] is not None else "-"
        val = f"{info['val_loss']:.4f}" if info["val_loss"] is not None else "-"
        typer.echo(f"run {info['run_id']} {info['status']} at step {info['last_step']}/{info['max_steps']}: "
                   f"loss {loss}, val loss {val}; {len(info['checkpoints'])} checkpoint(s) in {info['run_dir']}", err=True)
        # why it failed or diverged: the workers' own "error:" line, just above (runs show keeps it)


def _maybe_detach(wanted: bool, print_command: bool, as_json: bool) -> None:
    """--detach: run this command again in the background and return once its workers start."""
    if not wanted or detached():
        return
    if print_command:
        raise UserError("--detach: not with --print-command, which trains nothing now; the printed command runs "
                        "under your scheduler")
    code, run = start_detached(command_line()[1:], waiting=lambda run: typer.echo(
        "waiting for its workers to start (Ctrl-C stops waiting; the run goes on)", err=True))
    if run is None:
        raise typer.Exit(code)  # it said why, on this terminal, before it would have detached
    # Commands that find the run from any directory: with the home they were given, should it be --home
    given_home = any(a == "--home" or a.startswith("--home=") for a in command_line())
    gptctl = f"gptctl --home {shlex.quote(str(home_dir().resolve()))}" if given_home else "gptctl"
    if code != 0:
        from gptctl.run_log import last_lines

        lines, _ = last_lines(Path(run["console_log"]), 5)
        what = (f"run {run['run_id']} ({run['name']}) was stopped before its workers started (exit code {code}); "
                f"`{gptctl} resume {run['run_id']}` continues it" if run["status"] == "interrupted" else
                f"Error: run {run['run_id']} ({run['name']}) failed to start (exit code {code})")
        typer.echo(f"{what}; the end of {run['console_log']}:\n" + "\n".join(lines), err=True)
        raise typer.Exit(code)
    run = {**run, "follow": f"{gptctl} runs logs {shlex.quote(run['name'])} --follow",
           "stop": f"{gptctl} runs stop {shlex.quote(run['name'])}"}
    if as_json:
        typer.echo(json.dumps(run, indent=2))
    else:
        typer.echo(f"run {run['run_id']} ({run['name']}) trains in the background "
                   f"(pid {run['pid']}, console in {run['console_log']})\n"
                   f"  follow it: {run['follow']}\n  stop it:   {run['stop']}")
    raise typer.Exit(0)


def command_line() -> list[str]:
    return ["gptctl", *sys.argv[1:]]
