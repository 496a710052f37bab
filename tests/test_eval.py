"""`gptctl eval`: HellaSwag scoring against a hand computation, the download cache, val loss as training measures it."""

import functools
import http.server
import json
import socket
import threading
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import SHAKESPEARE, cli, losses, save_tiny_checkpoint
from gptctl.cli import app
from gptctl.data import hellaswag
from gptctl.data.shards import find_shards
from gptctl.data.tokenizer import get_encoding
from gptctl.engine.distributed import Dist
from gptctl.engine.model import IGNORE_INDEX as IGNORE
from gptctl.engine.evaluate import ending_batch, ending_losses, hellaswag_accuracy, mean_loss
from gptctl.engine.loader import BatchLoader, TokenStream
from gptctl.engine.model import GPT
from gptctl.engine.sample import Sampler

BLOCK = 16
CPU = torch.device("cpu")

# In HellaSwag's schema, with some of the real file's other fields; the second context is longer than BLOCK tokens.
ITEMS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."]},
    {"ctx": "The chef slices the onions into thin rings, heats oil in a wide pan, adds the rings and stirs until they",
     "label": 0, "endings": ["turn golden and soft.", "sing.", "are a car on the highway going north to the city.",
                             "jump"]},
    {"ctx": "", "label": 1, "endings": ["Hello.", "Good morning, everyone.", "Bye", "Thanks a lot"]},
    {"ctx": "She opens the door and", "label": "2", "endings": ["walks in.", "closes it again.", "smiles.", "leaves."]},
]


def write_items(path: Path, items=ITEMS) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def save_tiny(path: Path, data_root: Path | None = None, edit=None, kind: str = "pretrain") -> Path:
    return save_tiny_checkpoint(path, kind, edit, data_root, batch_size=4, step=3, block=BLOCK)


def load_model(path: Path) -> GPT:
    return Sampler(path, "cpu").model


def encoded(items=ITEMS) -> list[hellaswag.EncodedItem]:
    return hellaswag.encode([hellaswag.Item(i["ctx"], tuple(i["endings"]), int(i["label"])) for i in items], get_encoding())


def run_eval(runner, *args: str, expect: int = 0):
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == expect, result.output
    return result


def hand_losses(model: GPT, item: hellaswag.EncodedItem) -> tuple[list[float], list[float], list[float]]:
    """Per ending, one sequence at a time: (mean over ending tokens, sum over them, mean over every predicted token)."""
    means, sums, whole = [], [], []
    for ending in item.endings:
        tokens = (item.context + ending)[-(BLOCK + 1):]
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]]))[0][0]
        token_losses = [float(-F.log_softmax(logits[j], dim=-1)[tokens[j + 1]]) for j in range(len(tokens) - 1)]
        ending_part = token_losses[-len(ending):]
        means.append(sum(ending_part) / len(ending_part))
        sums.append(sum(ending_part))
        whole.append(sum(token_losses) / len(token_losses))
    return means, sums, whole


def test_batch_holds_each_ending_cropped_from_the_left_and_targets_only_ending_tokens():
    item = encoded()[1]
    assert len(item.context) + min(map(len, item.endings)) > BLOCK + 1  # every row needs cropping
    x, y = ending_batch(item, BLOCK)
    assert x.shape == (4, BLOCK)
    for i, ending in enumerate(item.endings):
        tokens = (item.context + ending)[-(BLOCK + 1):]
        assert x[i].tolist() == tokens[:-1]
        assert y[i].tolist() == [IGNORE] * (BLOCK - len(ending)) + ending
    short = encoded()[3]  # no cropping: rows are right-padded and padding is never a target
    x, y = ending_batch(short, BLOCK)
    width = len(short.context) + max(map(len, short.endings)) - 1
    assert x.shape == (4, width)
    for i, ending in enumerate(short.endings):
        n = len(short.context) + len(ending) - 1
        assert y[i].tolist() == [IGNORE] * (len(short.context) - 1) + ending + [IGNORE] * (width - n)


def test_scores_are_the_mean_ending_loss_computed_by_hand(tmp_path):
    model = load_model(save_tiny(tmp_path / "m.pt"))
    items = encoded()
    expected_correct = expected_sum = 0
    for item in items:
        mean, total = ending_losses(model, item, CPU)
        hand_mean, hand_sum, with_prompt = hand_losses(model, item)
        assert mean.tolist() == pytest.approx(hand_mean, rel=1e-4)
        assert total.tolist() == pytest.approx(hand_sum, rel=1e-4)
        if len(item.context) > 1:  # the context's own tokens are not scored: counting them gives other numbers
            assert all(abs(m - w) > 1e-3 for m, w in zip(hand_mean, with_prompt))
        expected_correct += int(np.argmin(hand_mean)) == item.label
        expected_sum += int(np.argmin(hand_sum)) == item.label
    score = hellaswag_accuracy(model, items, CPU)
    assert (score.correct, score.correct_sum, score.total) == (expected_correct, expected_sum, len(items))


def favour(token: int):
    """Edit a model so that at every position the residual stream points at `token`'s embedding: it predicts it."""
    def edit(model: GPT) -> None:
        with torch.no_grad():
            model.transformer.wpe.weight += 1000 * model.lm_head.weight[token]
    return edit


def test_mean_loss_picks_the_favoured_ending_and_sum_loss_the_short_one(tmp_path):
    enc = get_encoding()
    cat, = enc.encode_ordinary(" cat")
    model = load_model(save_tiny(tmp_path / "cat.pt", edit=favour(cat)))
    # Per token " cat" costs ~0 and " dog" some L: means are 2L/5, L, L, L; sums 2L, L, 2L, 3L.
    endings = ["cat cat cat dog dog", "dog", "dog dog", "dog dog dog"]
    items = [{"ctx": "The pet is a", "endings": endings[i:] + endings[:i], "label": (4 - i) % 4} for i in range(4)]
    items.append({"ctx": "The pet is a", "endings": endings, "label": 1})  # the sum-loss answer
    mean, total = ending_losses(model, encoded(items)[0], CPU)
    assert mean[0] < 0.5 * mean[1:].min() and total[1] < 0.6 * total[[0, 2, 3]].min()
    score = hellaswag_accuracy(model, encoded(items), CPU)
    assert (score.correct, score.correct_sum, score.total) == (4, 1, 5)
    assert score.accuracy == 0.8 and score.accuracy_sum == 0.2
    # Sharded over ranks, every item is scored exactly once (without a process group nothing is summed).
    shards = [hellaswag_accuracy(model, encoded(items), CPU, rank=r, world_size=2) for r in range(2)]
    assert [s.total for s in shards] == [3, 2] and sum(s.correct for s in shards) == 4


def test_hellaswag_cli_json(runner, tmp_path):
    ckpt = save_tiny(tmp_path / "m.pt")
    model = load_model(ckpt)
    expected = hellaswag_accuracy(model, encoded(), CPU)
    items_file = write_items(tmp_path / "items.jsonl")
    out = json.loads(run_eval(runner, str(ckpt), "--task", "hellaswag", "--hellaswag-file", str(items_file), "--json",
                              "--device", "cpu").stdout)
    assert out == {"task": "hellaswag", "checkpoint": str(ckpt.resolve()), "accuracy": expected.accuracy,
                   "correct": expected.correct, "total": 4, "accuracy_sum": expected.accuracy_sum,
                   "correct_sum": expected.correct_sum}
    limited = json.loads(run_eval(runner, str(ckpt), "--task", "hellaswag", "--hellaswag-file", str(items_file), "--limit", "2",
                                  "--json").stdout)
    assert limited["total"] == 2
    text = run_eval(runner, str(ckpt), "--task", "hellaswag", "--hellaswag-file", str(items_file)).stdout
    assert text.startswith(f"hellaswag: accuracy {expected.accuracy:.4f} ({expected.correct}/4)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_the_validation_set_is_downloaded_once_into_the_cache(runner, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    write_items(served / "hellaswag_val.jsonl")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTCTL_CACHE", str(cache))
    monkeypatch.setenv("GPTCTL_HELLASWAG_URL", f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl")
    ckpt = str(save_tiny(tmp_path / "m.pt"))
    try:
        first = run_eval(runner, ckpt, "--task", "hellaswag", "--json")
    finally:
        server.shutdown()
        server.server_close()
    assert "downloading http://127.0.0.1" in first.stderr
    cached = cache / "hellaswag" / "hellaswag_val.jsonl"
    assert cached.read_bytes() == (served / "hellaswag_val.jsonl").read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary file left behind
    second = run_eval(runner, ckpt, "--task", "hellaswag", "--json")  # the server is gone: the cache answers
    assert json.loads(second.stdout) == json.loads(first.stdout) and "downloading" not in second.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--task", "mmlu"], "--task: unknown task 'mmlu'; choose one of hellaswag, val-loss"),
    (["--task", "hellaswag", "--data-root", "x"], "--data-root: only goes with --task val-loss"),
    (["--task", "hellaswag", "--batch-size", "8"], "--batch-size: only goes with --task val-loss"),
    (["--task", "val-loss", "--hellaswag-file", "x"], "--hellaswag-file: only goes with --task hellaswag"),
    (["--task", "val-loss", "--limit", "0"], "--limit: must be at least 1, got 0"),
    (["--task", "val-loss", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["--task", "val-loss", "--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--task", "hellaswag", "--hellaswag-file", "missing.jsonl"], "--hellaswag-file: missing.jsonl is not a file"),
    (["--task", "val-loss"], "--data-root: the checkpoint is a finetune model with no data root"),
    (["--task", "val-loss", "--data-root", "nowhere"], "--data-root: nowhere is not a directory"),
])
def test_bad_options_exit_2_with_one_line(runner, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    ckpt = save_tiny(tmp_path / "ft.pt", kind="finetune")
    result = run_eval(runner, str(ckpt), *args, expect=2)
    assert result.stderr.startswith(f"Error: {message}") and len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    (json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}), "line 2: 'endings' must be a list of 4 strings"),
    (json.dumps({"ctx": "a", "endings": list("bcde"), "label": 4}), "line 2: 'label' must be the index of the right ending"),
    (json.dumps({"endings": list("bcde"), "label": 0}), "line 2: 'ctx' must be a string"),
])
def test_a_bad_items_file_names_the_line(runner, tmp_path, line, message):
    items_file = tmp_path / "items.jsonl"
    items_file.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    result = run_eval(runner, str(save_tiny(tmp_path / "m.pt")), "--task", "hellaswag", "--hellaswag-file", str(items_file), expect=2)
    assert result.stderr.startswith(f"Error: --hellaswag-file: {items_file} {message}")
    assert len(result.stderr.splitlines()) == 1


def test_offline_without_a_file_names_hellaswag_file(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTCTL_HELLASWAG_URL", f"http://127.0.0.1:{closed_port()}/hellaswag_val.jsonl")
    result = run_eval(runner, str(save_tiny(tmp_path / "m.pt")), "--task", "hellaswag", expect=2)
    assert result.stderr.splitlines()[-1].startswith("Error: --hellaswag-file: cannot download http://127.0.0.1:")
    assert "--hellaswag-file FILE" in result.stderr
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def several_val_shards(tmp_path_factory) -> Path:
    """A small real data root whose val split spans shards, so "all of it" is quick to check."""
    from gptctl.data.prepare import PrepareOptions, prepare

    directory = tmp_path_factory.mktemp("several")
    excerpt = directory / "excerpt.txt"
    excerpt.write_text(SHAKESPEARE.read_text()[:40_000])
    prepare(PrepareOptions(inputs=[excerpt], data_root=directory / "root", val_tokens=1000, shard_size=400, workers=1))
    assert len(find_shards(directory / "root", "val")) > 1
    return directory / "root"


def numpy_val_loss(model: GPT, data_root: Path, rows: int) -> float:
    """The mean loss over the first `rows` val rows, read straight from the shards."""
    tokens = np.concatenate([np.load(p) for p in find_shards(data_root, "val")]).astype(np.int64)
    windows = torch.from_numpy(np.stack([tokens[i * BLOCK: i * BLOCK + BLOCK + 1] for i in range(rows)]))
    total = 0.0
    for chunk in windows.split(16):  # each row's logits are 16 × 50304 floats
        with torch.no_grad():
            logits = model(chunk[:, :-1])[0]
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    return total / (rows * BLOCK)


def test_val_loss_is_trainings_eval_on_the_same_batches(runner, tmp_path, shakespeare):
    ckpt = save_tiny(tmp_path / "m.pt", data_root=shakespeare)
    model = load_model(ckpt)
    out = json.loads(run_eval(runner, str(ckpt), "--task", "val-loss", "--limit", "3", "--json").stdout)
    assert out["tokens"] == 3 * 4 * BLOCK and out["batches"] == 3 and out["data_root"] == str(shakespeare)
    # The loader training builds for its evals (batch 4 from the settings, eval_steps=3), and mean_loss.
    loader = BatchLoader(TokenStream(shakespeare, "val"), 4, BLOCK, 3, 0, 1, CPU)
    assert out["val_loss"] == pytest.approx(mean_loss(model, loader, 3, nullcontext(), Dist(0, 0, 1, CPU)), rel=1e-6)
    assert out["val_loss"] == pytest.approx(numpy_val_loss(model, shakespeare, 12), rel=1e-5)


def test_val_loss_reads_every_complete_batch_once(runner, tmp_path, several_val_shards):
    root = several_val_shards
    ckpt = save_tiny(tmp_path / "m.pt")  # no data root in the settings: --data-root gives it
    rows = (1000 - 1) // BLOCK // 16 * 16  # 62 rows: 3 batches of 16, and 14 rows that fill none
    out = json.loads(run_eval(runner, str(ckpt), "--task", "val-loss", "--data-root", str(root), "--batch-size", "16",
                              "--json").stdout)
    assert (out["tokens"], out["batches"]) == (rows * BLOCK, rows // 16)
    assert out["val_loss"] == pytest.approx(numpy_val_loss(load_model(ckpt), root, rows), rel=1e-5)
    too_big = run_eval(runner, str(ckpt), "--task", "val-loss", "--data-root", str(root), "--batch-size", "63", expect=2)
    assert too_big.stderr.startswith("Error: --batch-size: the val split of") and "lower --batch-size" in too_big.stderr


@pytest.mark.slow
def test_eval_after_a_real_pretrain(tmp_path, trained_run):
    home, run_id = trained_run
    items_file = write_items(tmp_path / "items.jsonl")
    scored = json.loads(cli("eval", run_id, "--task", "hellaswag", "--hellaswag-file", str(items_file), "--json",
                            home=home).stdout)
    assert scored["task"] == "hellaswag" and scored["total"] == 4 and 0 <= scored["correct"] <= 4
    assert scored["checkpoint"].endswith("model_00008.pt") and scored["accuracy"] == scored["correct"] / 4
    # Training's eval at step 4 (--eval-steps 2) read the same rows of the same model.
    measured = json.loads(cli("eval", f"{run_id}:4", "--task", "val-loss", "--limit", "2", "--json",
                              home=home).stdout)
    assert measured["val_loss"] == pytest.approx(losses(home, run_id)[4][1], rel=1e-5)
