"""Several runs side by side: the settings that differ and what each run reached.

Runs of different batch sizes or lengths are compared at equal tokens, not equal steps: each run's
val loss is read off its curve at the largest token count every run has reached (linear between
evals), which is the comparison a recipe or LR sweep needs.
"""

import json
from typing import Any

from pydantic import ValidationError
from sqlite_utils import Database

from gptctl.registry import launches, queries
from gptctl.settings import TrainSettings, is_option, option_name, panel_of


def _val_curve(metrics: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(m["tokens_seen"], m["val_loss"]) for m in metrics
            if m["val_loss"] is not None and m["tokens_seen"] is not None]


def value_at(curve: list[tuple[int, float]], tokens: int) -> float | None:
    """The curve's value at `tokens`, linear between its points; None outside them."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= tokens <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    return curve[0][1] if len(curve) == 1 and curve[0][0] == tokens else None


NOT_COMPARED = {"run_name", "kind"}  # differ by definition, or shown above (status, the run's kind)


def as_trained(settings: dict[str, Any]) -> dict[str, Any]:
    """The stored settings with the model's shape as it was trained: `--model tiny` stores no --n-layer, and
    a run given `--n-layer 2` of the same preset has the same model, which a comparison must not call a
    difference. The shape is TrainSettings.shape's, of the settings this version knows (a run may have
    stored one it does not); settings that do not validate even so are compared as stored."""
    known = {name: value for name, value in settings.items() if name in TrainSettings.model_fields}
    try:
        shape = TrainSettings.model_validate(known).shape
    except ValidationError:
        return settings
    return {**settings, "n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.n_embd,
            "block_size": shape.block_size}


def differing_settings(settings: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """{panel: {--option: [value of each run]}} for the settings whose values are not all the same,
    grouped as in `pretrain --help`; what no panel holds (kind, recipe) comes under "Run"."""
    out: dict[str, dict[str, list[Any]]] = {}
    names = {key for s in settings for key in s} - NOT_COMPARED
    for name in sorted(names, key=lambda n: (panel_of(n) != "Run", n)):
        values = [s.get(name) for s in settings]
        if any(v != values[0] for v in values[1:]):
            label = option_name(name) if is_option(name, "resume") else name.replace("_", " ")
            out.setdefault(panel_of(name), {})[label] = values
    return out


def compare(db: Database, run_ids: list[str]) -> dict[str, Any]:
    """What `runs compare` shows, as data (its --json)."""
    rows, curves = [], []
    for run_id in run_ids:
        run = queries.run_overviews(db, run_id)[0]
        metrics = queries.metrics_of(db, run_id)
        curve = _val_curve(metrics)
        best = min(curve, key=lambda point: point[1], default=None)
        usage = launches.goodput(launches.of_run(db, run_id))
        speeds = [m["tokens_per_s"] for m in metrics if m["tokens_per_s"]]
        rows.append({
            "id": run["id"], "name": run["name"], "kind": run["kind"], "status": run["status"],
            "step": run["step"], "max_steps": run["max_steps"], "tokens_seen": run["tokens_seen"],
            "last_val_loss": curve[-1][1] if curve else None,
            "best_val_loss": best[1] if best else None, "best_val_tokens": best[0] if best else None,
            "tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,  # median: warm-up steps aside
            "goodput": usage["goodput"] if usage else None, "wall_s": usage["wall_s"] if usage else None,
        })
        curves.append(curve)
    ends = [curve[-1][0] for curve in curves if curve]
    equal = min(ends) if len(ends) == len(curves) and ends else None
    for row, curve in zip(rows, curves):
        row["val_loss_at_equal_tokens"] = value_at(curve, equal) if equal is not None else None
    settings = [as_trained(json.loads(queries.get_run(db, run_id)["settings"])) for run_id in run_ids]
    return {"runs": rows, "equal_tokens": equal, "differing_settings": differing_settings(settings)}
