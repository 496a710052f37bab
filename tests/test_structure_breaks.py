"""Behaviour the structural redesign of issue 31 must keep: cases found by trying to break it, each
compared with the code before the move (12912d9)."""

import json
from pathlib import Path

from helpers import add_run
from gptctl.registry import open_registry, queries


def _registry_with_run(home: Path, settings: dict, steps: tuple[int, ...] = ()) -> tuple[object, dict]:
    """A registry in `home` holding one run with these stored settings and a real file per step."""
    from gptctl.digest import sha256_of

    db = open_registry(home)
    run_dir = home / "old-0000abcd"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(settings))
    add_run(db, "0000abcd", name="old", settings=json.dumps(settings), run_dir=str(run_dir),
            max_steps=settings.get("max_steps", 10), last_step=0)
    for step in steps:
        path = run_dir / "checkpoints" / f"model_{step:05d}.pt"
        path.write_bytes(b"x" * step)
        queries.register_checkpoint(db, "0000abcd", step, path, path.stat().st_size, sha256_of(path), pinned=False)
    return db, queries.get_run(db, "0000abcd")


def test_retention_reads_stored_settings_an_older_gptctl_wrote(tmp_path, monkeypatch):
    """`ckpt list` and `ckpt prune` read a run's keep-last and permanent steps from its stored settings as
    they are: a value today's CheckpointSettings refuses (permanent step 0, accepted before steps had to be
    positive) listed and pruned as before, not a pydantic traceback."""
    from gptctl.checkpoints import retention, store

    monkeypatch.setenv("GPTCTL_HOME", str(tmp_path))
    db, run = _registry_with_run(tmp_path, {"max_steps": 10, "keep_last_n_checkpoints": 1,
                                            "permanent_checkpoints": [0, 2]}, steps=(2, 4, 6))
    assert [(r["step"], r["permanent"]) for r in store.listing(db)] == [(2, True), (4, False), (6, False)]
    assert [r["step"] for r in retention.plan(db, run, warn=lambda m: None)] == [4]
    assert store.rules_of(run).keep_last_n_checkpoints == 1


def test_estimate_calibrates_from_runs_whose_other_settings_todays_rules_refuse():
    """A registry run's measured MFU needs only its model's shape and sequence length: a run whose stored
    settings also hold what today's TrainSettings refuses (a setting of a newer gptctl, an old warm-up
    longer than its run, a null preset) calibrates `gptctl estimate` as before the move."""
    from gptctl import estimate as est

    def row(settings: dict) -> dict:
        return {"tokens_per_s": 100_000.0, "device_name": "NVIDIA GeForce RTX 3090", "world_size": 1,
                "dtype": "bfloat16", "settings": json.dumps(settings)}

    plain = est.measured_mfus([row({"model": "gpt2", "seq_len": 1024})], "rtx3090")
    assert len(plain) == 1
    for odd in ({"model": "gpt2", "seq_len": 1024, "a_setting_of_a_newer_gptctl": 1},
                {"model": "gpt2", "seq_len": 1024, "warmup_steps": 50_000, "max_steps": 100},
                {"model": None, "seq_len": 1024}, {"model": "gpt2", "seq_len": None}):
        assert est.measured_mfus([row(odd)], "rtx3090") == plain, odd
    assert est.measured_mfus([row({"model": "no-such-preset"})], "rtx3090") == []


def test_a_resume_names_the_recipe_or_an_unused_option_before_other_data():
    """`gptctl resume RUN` (and --auto-resume) refuse in the order they did before the move: the
    checkpoint's shape and optimizer, then a changed --recipe and an option the run does not use, and
    only then the data root holding other data."""
    import pytest

    from gptctl.errors import UserError
    from gptctl.resume import resume_changes
    from gptctl.settings import TrainSettings

    stored = TrainSettings(model="tiny", max_steps=10, warmup_steps=2, data_fingerprint="sha256:" + "a" * 64)
    run = {"id": "0000abcd", "name": "a", "settings": stored.model_dump_json(), "last_step": 10}
    other_data = {"data_fingerprint": "sha256:" + "b" * 64}
    for given, option in (({"recipe": "speedrun"}, "--recipe"), ({"muon_lr": 0.01}, "--muon-lr"),
                          ({"optimizer": "muon"}, "--optimizer"), ({"n_layer": 3}, "--n-layer"), ({}, "--data-root")):
        with pytest.raises(UserError) as refused:
            resume_changes(run, {**given, **other_data})
        assert str(refused.value).startswith(option + ":"), (given, str(refused.value))


def test_a_resume_verifies_the_newest_checkpoint_before_it_launches(tmp_path, monkeypatch):
    """`gptctl resume RUN --max-steps N` checks, before its workers start, that the run's newest checkpoint
    still matches its sha256, as before the move: a damaged one is marked and said on the terminal (not
    only in the workers' log), also when it is below N and so cannot end the run."""
    from gptctl.checkpoints import store

    monkeypatch.setenv("GPTCTL_HOME", str(tmp_path))
    db, run = _registry_with_run(tmp_path, {"max_steps": 10}, steps=(2, 4))
    newest = Path(queries.checkpoint_at(db, run["id"], 4)["path"])
    newest.write_bytes(b"y" * 4)  # same size, other bytes
    said = []
    assert store.newest_good(db, run["id"], said.append, loads=True, at_least=12) is None
    assert queries.checkpoint_state(db, queries.checkpoint_at(db, run["id"], 4)["id"]) == "corrupt"
    assert said and "step 4" in said[0] and "corrupt" in said[0]
    assert queries.checkpoint_state(db, queries.checkpoint_at(db, run["id"], 2)["id"]) == "valid"


def test_ckpt_list_json_keeps_its_keys_in_their_order(tmp_path, monkeypatch):
    """`gptctl ckpt list --json` prints each checkpoint's keys in the order it did before the move: the
    checkpoint's row, its val loss, whether it is permanent, its age."""
    from gptctl.checkpoints import store

    monkeypatch.setenv("GPTCTL_HOME", str(tmp_path))
    db, _ = _registry_with_run(tmp_path, {"max_steps": 10, "permanent_checkpoints": [2]}, steps=(2,))
    assert list(store.listing(db)[0])[-3:] == ["val_loss", "permanent", "age_s"]
