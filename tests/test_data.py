"""`gptctl data prepare` and gptctl.data.shards, on the real tiny Shakespeare corpus and small fixtures."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

from typer.testing import CliRunner  # noqa: E402

from gptctl.cli import app  # noqa: E402
from gptctl.data.shards import count_tokens, find_shards, load_tokens  # noqa: E402
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding  # noqa: E402
from gptctl.errors import UserError  # noqa: E402

runner = CliRunner()


def prepare(*args):
    return runner.invoke(app, ["data", "prepare", *map(str, args)])


@pytest.fixture(scope="module")
def enc():
    return get_encoding("gpt2")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    root = tmp_path_factory.mktemp("shakespeare")
    result = prepare("--input", SHAKESPEARE, "--data-root", root, "--shard-size", 200_000)
    assert result.exit_code == 0, result.output
    return root, result


def test_prepare_tinyshakespeare(shakespeare, enc):
    root, result = shakespeare
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert manifest["tokenizer"] == "r50k_base"
    assert manifest["eot_token"] == EOT_TOKEN == 50256
    assert "train tokens" in result.stdout and "val tokens" in result.stdout

    for shard in manifest["shards"]:
        tokens = np.load(root / shard["file"], mmap_mode="r")
        assert tokens.dtype == np.uint16
        assert len(tokens) == shard["tokens"] <= 200_000
    for split in ("train", "val"):
        listed = sum(s["tokens"] for s in manifest["shards"] if s["split"] == split)
        assert listed == manifest[f"{split}_tokens"] == count_tokens(root, split) > 0
    train = find_shards(root, "train")
    assert [p.name for p in train] == ["tinyshakespeare_train_000000.npy", "tinyshakespeare_train_000001.npy"]
    assert [p.name for p in find_shards(root, "val")] == ["tinyshakespeare_val_000000.npy"]

    text = SHAKESPEARE.read_text(encoding="utf-8")
    total = manifest["train_tokens"] + manifest["val_tokens"]
    assert total == len(enc.encode_ordinary(text)) + 1  # one document, EOT after it
    assert manifest["val_tokens"] == int(total * 0.1)
    first = load_tokens(train[0])[:100]
    assert text.startswith(enc.decode(first.tolist()))
    last_val = load_tokens(find_shards(root, "val")[-1])
    assert int(last_val[-1]) == EOT_TOKEN


def test_prepare_json_output(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("Hello world, this is a tiny document.")
    result = prepare("--input", src, "--data-root", tmp_path / "out", "--json", "--name", "tiny")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s["file"] for s in manifest["shards"]} == {"tiny_train_000000.npy", "tiny_val_000000.npy"}


def test_prepare_jsonl_and_parquet(tmp_path, enc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs_a = ["First JSON document.", "Second one, with <|endoftext|> as plain text."]
    docs_b = ["A parquet row.", "Another parquet row!", "Third."]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs_a)) + "\n\n")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": docs_b, "n": [1, 2, 3]}), parquet)

    root = tmp_path / "data"
    result = prepare("-i", jsonl, "--input", parquet, "--data-root", root, "--val-fraction", "0.25", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["name"] == "a"
    assert [s["documents"] for s in manifest["sources"]] == [2, 3]
    assert [s["format"] for s in manifest["sources"]] == ["jsonl", "parquet"]

    expected = []
    for doc in docs_a + docs_b:
        expected += enc.encode_ordinary(doc) + [EOT_TOKEN]
    stream = np.concatenate([load_tokens(p) for p in find_shards(root, "train") + find_shards(root, "val")])
    assert stream.tolist() == expected
    assert manifest["val_tokens"] == int(len(expected) * 0.25)


def test_refuses_existing_dataset_without_force(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("some words " * 200)
    root = tmp_path / "data"
    assert prepare("-i", src, "--data-root", root, "--shard-size", 100).exit_code == 0
    many = sorted(p.name for p in root.glob("*.npy"))
    assert len(many) > 3

    refused = prepare("-i", src, "--data-root", root)
    assert refused.exit_code == 2
    assert "--force" in refused.stderr
    assert sorted(p.name for p in root.glob("*.npy")) == many

    forced = prepare("-i", src, "--data-root", root, "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in root.glob("*.npy")) == ["in_train_000000.npy", "in_val_000000.npy"]
    assert not list(root.glob(".*"))  # no temp files left behind


def test_refuses_stray_npy_without_force(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello there")
    root = tmp_path / "data"
    root.mkdir()
    np.save(root / "other.npy", np.zeros(3, dtype=np.uint16))
    assert prepare("-i", src, "--data-root", root).exit_code == 2


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--input", "missing.txt"], "--input"),
        (["--val-fraction", "0"], "--val-fraction"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--shard-size", "0"], "--shard-size"),
        (["--tokenizer", "cl100k_base"], "--tokenizer"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, extra, option):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in.txt"
    src.write_text("hello there")
    root = tmp_path / "data"
    result = prepare("--input", src, "--data-root", root, *extra)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and option in lines[0]
    assert not root.exists()


def test_bad_jsonl_writes_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    root = tmp_path / "data"
    result = prepare("--input", src, "--data-root", root)
    assert result.exit_code == 2
    assert "in.jsonl:2" in result.stderr
    assert not root.exists()


def test_snake_case_options(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("snake case options still work")
    root = tmp_path / "data"
    result = prepare("--input", src, "--data_root", root, "--val_fraction", "0.5", "--shard_size", "1000")
    assert result.exit_code == 0, result.output
    assert (root / "manifest.json").is_file()


def test_find_shards_build_nanogpt_layout(tmp_path):
    root = tmp_path / "edu_fineweb10B"
    root.mkdir()
    for index, n in [(2, 7), (0, 5), (1, 6)]:  # build-nanogpt: shard 0 is val, the rest train
        split = "val" if index == 0 else "train"
        np.save(root / f"edufineweb_{split}_{index:06d}.npy", np.arange(n, dtype=np.uint16))
    assert [p.name for p in find_shards(root, "train")] == [
        "edufineweb_train_000001.npy",
        "edufineweb_train_000002.npy",
    ]
    assert [p.name for p in find_shards(root, "val")] == ["edufineweb_val_000000.npy"]
    assert count_tokens(root, "train") == 13 and count_tokens(root, "val") == 5
    tokens = load_tokens(root / "edufineweb_train_000002.npy")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16

    np.save(root / "bad_test_000000.npy", np.zeros(4, dtype=np.int64))
    with pytest.raises(UserError, match="uint16"):
        load_tokens(root / "bad_test_000000.npy")
    with pytest.raises(UserError, match="--data-root"):
        find_shards(root, "test2")
    with pytest.raises(UserError, match="--data-root"):
        find_shards(tmp_path / "nope", "train")


def test_data_help_lists_prepare():
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    assert "prepare" in result.stdout
