"""Resuming: what state saved under some settings may continue under others (check_compatible, for every
resume), what a resume of a run may change in its settings (resume_changes), and what it does to them
(the LR schedule's end). Which settings may change is each field's own rule (settings.MAY_CHANGE_ON_RESUME)."""

from dataclasses import fields
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gptctl.errors import UserError
from gptctl.presets import ModelShape
from gptctl.settings import CHANGEABLE_ON_RESUME, TrainSettings, describe, option_name, refuse_unused

OVERRIDE = "--override-settings"


def check_compatible(stored: TrainSettings, wanted: TrainSettings, *, run: dict[str, Any] | None = None,
                     path: Path | None = None, override: bool = False) -> bool:
    """Whether training with `wanted` may continue from a checkpoint saved with `stored`; the one check of
    every resume: `gptctl resume`, `--auto-resume` of an existing run (both of `run`), and `--resume
    --checkpoint-path` (of the file `path`). The checkpoint's weights load only into a model of their shape,
    its optimizer state only into its optimizer (not even --override-settings changes either); its data
    is the run's, so other data only with `override`. UserError naming the option (worded for where the
    stored settings come from), else whether the data differs (and `override` lets it)."""
    was = f"run {run['id']} ({run['name']}) was started with" if run is not None else None
    if wanted.shape != stored.shape:
        if was is not None:
            name = _shape_option(stored, wanted)
            value = getattr(stored.shape, name, None) or getattr(stored, name)  # n_layer None: the preset's
            raise UserError(f"{option_name(name)}: {was} {value!r}, and its checkpoints hold weights of that shape; "
                            "drop the option, or start a new run (--init-from RUN takes its weights)")
        differs = [f"{f.name} {getattr(stored.shape, f.name)} vs {getattr(wanted.shape, f.name)}"
                   for f in fields(ModelShape) if getattr(stored.shape, f.name) != getattr(wanted.shape, f.name)]
        raise UserError(f"--checkpoint-path: {path} holds another model than these settings make ({', '.join(differs)});"
                        f" give the checkpoint's own --model/--n-*/--seq-len")
    if wanted.optimizer != stored.optimizer:  # its optimizer state would not load into the other optimizer
        if was is not None:
            raise UserError(f"--optimizer: {was} {stored.optimizer!r}, and its checkpoints hold that optimizer's "
                            "state; drop the option, or start a new run from its weights (--init-from RUN)")
        raise UserError(f"--optimizer: {path} holds the state of --optimizer {stored.optimizer}; pass --optimizer "
                        f"{stored.optimizer} to resume it, or start from its weights alone with --init-from")
    then, now = stored.data_fingerprint, wanted.data_fingerprint  # None: recorded before fingerprints, or a finetune
    other_data = then is not None and now is not None and then != now
    if other_data and not override:
        if was is not None:
            raise UserError(f"--data-root: {wanted.data_root} holds other data than run {run['id']} ({run['name']}) "
                            f"trained on (fingerprint {_short(then)} then, {_short(now)} now: prepared again, or "
                            f"other data); give the run's own data, or add {OVERRIDE} to train on this data "
                            "(recorded with the step)")
        raise UserError(f"--data-root: {wanted.data_root} holds other data than {path} was trained on (fingerprint "
                        f"{then} then, {now} now); give its data, or add {OVERRIDE} to continue on this data "
                        "(recorded)")
    return other_data


def _shape_option(stored: TrainSettings, wanted: TrainSettings) -> str:
    """The first option (as --help lists them) whose new value alone gives the model another shape: one of
    SHAPE_OPTIONS, or --seq-len, the context of a model without its own (block_size). TrainSettings.shape
    says which, rather than a list of names."""
    changed = [name for name in TrainSettings.model_fields if getattr(wanted, name) != getattr(stored, name)]
    alone = (name for name in changed if stored.model_copy(update={name: getattr(wanted, name)}).shape != stored.shape)
    return next(alone, changed[0])


def resume_changes(run: dict[str, Any], given: dict[str, Any], override: bool = False) -> dict[str, Any]:
    """The options given for a resume of `run` that differ from its stored settings (values as the run's
    settings hold them). Those that may change on resume (settings.CHANGEABLE_ON_RESUME), any other only
    with `override`; UserError naming the first that may not change (check_compatible: never the
    checkpoint's shape or optimizer)."""
    stored = TrainSettings.model_validate_json(run["settings"])
    given = {k: v for k, v in given.items()
             if v is not None and k in TrainSettings.model_fields and k not in ("max_steps", "run_name")}
    try:
        wanted = TrainSettings(**{**stored.model_dump(), **given})
    except ValidationError as exc:
        raise UserError(describe(exc)) from None
    changes = {name: getattr(wanted, name) for name in sorted(given) if getattr(wanted, name) != getattr(stored, name)}
    # The checkpoint's shape and optimizer first; the data last (below), as every resume refused them
    check_compatible(stored, wanted.model_copy(update={"data_fingerprint": stored.data_fingerprint}), run=run)
    was = f"run {run['id']} ({run['name']}) was started with"
    if "recipe" in changes:  # it chose the run's starting values: another name would relabel them, not change them
        raise UserError(f"--recipe: {was} recipe {stored.recipe!r}; a recipe is chosen when a run starts (it sets the "
                        f"starting values), so a resume cannot change it, not even with {OVERRIDE}. Drop it, and "
                        f"change the settings themselves (--max-lr, --muon-lr, --lr-scheduler, ... with {OVERRIDE}; "
                        "never --arch or --optimizer)")
    refuse_unused(wanted, given, fixed=TrainSettings.model_fields, origin=f"{was} {{}}")
    check_compatible(stored, wanted, run=run, override=override)  # now only the data can differ
    refused = [name for name in changes if name not in CHANGEABLE_ON_RESUME
               and not (name == "data_fingerprint" and stored.data_fingerprint is None)]  # an older run: recorded now
    if refused and not override:
        name = refused[0]
        raise UserError(f"{option_name(name)}: {was} {getattr(stored, name)!r}; resuming cannot change it without "
                        f"making another run. Drop the option, add {OVERRIDE} to change it all the same (recorded "
                        "with the step), or start a new run with another --run-name")
    return changes


def resume_settings(run: dict[str, Any], max_steps: int | None,
                    changes: dict[str, Any] | None = None) -> tuple[TrainSettings, str | None]:
    """The run's settings for a resume, and what the resume changes, as one line for the run's events
    (None: nothing).

    The LR never jumps: the schedule keeps ending where it did (--lr-decay-steps), so the added steps
    train at the final LR; only a wsd run that has not started decaying moves its decay to the new end."""
    stored = TrainSettings.model_validate_json(run["settings"])
    changed = _describe_changes(changes, stored, run)
    changes = {**_same_tokens_per_step(stored, run, (changes or {}).get("batch_size")), **(changes or {})}
    settings = TrainSettings(**{**stored.model_dump(), **changes}) if changes else stored
    if max_steps is None or max_steps == settings.max_steps:
        return settings, changed
    last = run["last_step"] or 0
    if max_steps <= last:
        raise UserError(f"--max-steps ({max_steps}) must be above the run's last step ({last})")
    update: dict[str, Any] = {"max_steps": max_steps}
    horizon = settings.schedule_steps
    wsd_stable = settings.lr_scheduler == "wsd" and settings.lr_decay_steps is None and last < settings.schedule().decay_start()
    if wsd_stable:
        note = f"--max-steps {settings.max_steps} -> {max_steps} at step {last}: the wsd decay moves to the new end"
    elif settings.lr_scheduler != "constant" and settings.lr_decay_steps is None and max_steps < horizon:
        before, after = settings.schedule().at(last + 1), settings.schedule(max_steps).at(last + 1)
        note = (f"--max-steps {settings.max_steps} -> {max_steps} at step {last}: the LR schedule now ends at step "
                f"{max_steps}; the LR at step {last + 1} goes from {before:.3g} to {after:.3g}")
    elif settings.lr_scheduler == "constant" or horizon >= max_steps:
        note = None
    else:
        update["lr_decay_steps"] = horizon
        note = (f"--max-steps {settings.max_steps} -> {max_steps} at step {last}: the LR schedule still ends at "
                f"step {horizon}; the added steps train at the final LR ({settings.final_lr:.3g})")
    try:
        settings = TrainSettings(**{**settings.model_dump(), **update})
    except ValidationError as exc:  # e.g. warmup >= max_steps
        raise UserError(describe(exc)) from None
    return settings, "; ".join(n for n in (note, changed) if n) or None


def _same_tokens_per_step(stored: TrainSettings, run: dict[str, Any], batch_size: int | None) -> dict[str, Any]:
    """What keeps what a run's steps compute on a launch with another micro-batch (`batch_size`) or number
    of processes: its total batch as its last launch computed it (a finetune's default, None, counts the
    processes, so it is fixed once a launch has run), the micro-steps derived from it again (the launch
    checks that they divide), and the val tokens of an eval (--eval-steps counts micro-batches)."""
    world = run.get("world_size")
    if world is None or (batch_size is None and stored.total_batch_size is not None):
        return {}
    keep = {"total_batch_size": stored.tokens_per_step(world), "grad_accumulation_steps": None}
    if batch_size is not None and stored.eval_steps * stored.batch_size % batch_size == 0:
        keep["eval_steps"] = stored.eval_steps * stored.batch_size // batch_size
    return keep


def _describe_changes(changes: dict[str, Any] | None, stored: TrainSettings, run: dict[str, Any]) -> str | None:
    if not changes:
        return None
    return f"changed at step {run['last_step'] or 0}: " + ", ".join(_describe(k, v, stored) for k, v in changes.items())


def _describe(name: str, value: Any, stored: TrainSettings) -> str:
    if name == "data_fingerprint":
        if stored.data_fingerprint is None:
            return f"data fingerprint {value} recorded (the run predates fingerprints)"
        return f"data fingerprint {value} (was {stored.data_fingerprint}), by {OVERRIDE}"
    return f"{option_name(name)} {value} (was {getattr(stored, name)})" + ("" if name in CHANGEABLE_ON_RESUME
                                                                          else f", by {OVERRIDE}")


def _short(fingerprint: str | None) -> str:
    kind, _, digest = (fingerprint or "none").partition(":")
    return f"{kind}:{digest[:12]}" if digest else kind
