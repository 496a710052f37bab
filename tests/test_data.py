"""`gptctl data prepare` and gptctl.data.shards, on the real tiny Shakespeare corpus and FineWeb-shaped files."""

import functools
import http.server
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import SHAKESPEARE, wait_until
from gptctl.cli import app
from gptctl.data.prepare import PrepareOptions, parse_count
from gptctl.data.prepare import prepare as prepare_api
from gptctl.data.resume import STATE_FILE
from gptctl.data.shards import count_tokens, find_shards, load_tokens
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
from gptctl.errors import UserError

FINEWEB_COLUMNS = ["text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count",
                   "score", "int_score"]


def prepare(runner, *args):
    return runner.invoke(app, ["data", "prepare", *map(str, args)])


def paragraphs(copies: int = 1) -> list[str]:
    """Tiny Shakespeare as many documents: its blank-line separated paragraphs."""
    return [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p] * copies


def fineweb_rows(texts: list[str]) -> dict[str, list]:
    """FineWeb-Edu's schema, filled in plausibly around the given texts."""
    n = range(len(texts))
    return {
        "text": texts,
        "id": [f"<urn:uuid:{i:08d}>" for i in n],
        "dump": ["CC-MAIN-2024-10"] * len(texts),
        "url": [f"https://example.org/{i}" for i in n],
        "date": ["2024-02-21T00:00:00Z"] * len(texts),
        "file_path": ["s3://commoncrawl/crawl-data/part.warc.gz"] * len(texts),
        "language": ["en"] * len(texts),
        "language_score": [0.97] * len(texts),
        "token_count": [len(t) // 4 for t in texts],
        "score": [3.1] * len(texts),
        "int_score": [3] * len(texts),
    }


def write_parquet(path: Path, texts: list[str], row_group_size: int = 1000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(fineweb_rows(texts)), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    rows = fineweb_rows(texts)
    with path.open("w", encoding="utf-8") as f:
        for i in range(len(texts)):
            f.write(json.dumps({k: rows[k][i] for k in FINEWEB_COLUMNS}) + "\n")
    return path


def stream(root: Path) -> np.ndarray:
    """The prepared token stream in manifest order."""
    manifest = json.loads((root / "manifest.json").read_text())
    return np.concatenate([load_tokens(root / s["file"]) for s in manifest["shards"]])


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.npy"))}


def expected_stream(enc, texts: list[str]) -> list[int]:
    out = []
    for text in texts:
        if text:
            out += enc.encode_ordinary(text) + [EOT_TOKEN]
    return out


@pytest.fixture(scope="module")
def enc():
    return get_encoding("gpt2")


@pytest.fixture(scope="module")
def sharded_shakespeare(runner, tmp_path_factory):
    """(data root, CLI result) of `gptctl data prepare` on tiny Shakespeare in shards of 200,000 tokens: three
    shards, where conftest's `shakespeare` (the training tests' data) has one of each split."""
    root = tmp_path_factory.mktemp("shakespeare")
    result = prepare(runner, "--input", SHAKESPEARE, "--data-root", root, "--shard-size", 200_000)
    assert result.exit_code == 0, result.output
    return root, result


@pytest.fixture(scope="module")
def fineweb_files(tmp_path_factory):
    """The same 3000 documents as FineWeb-Edu-schema Parquet (two files) and JSONL."""
    d = tmp_path_factory.mktemp("fineweb")
    texts = paragraphs()[:3000]
    texts[5] = ""  # FineWeb has none, but an empty text must not derail anything
    return {
        "texts": texts,
        "parquet": [write_parquet(d / "000_00000.parquet", texts[:1700]), write_parquet(d / "001_00000.parquet", texts[1700:])],
        "jsonl": [write_jsonl(d / "part.jsonl", texts)],
    }


def test_prepare_tinyshakespeare(sharded_shakespeare, enc):
    root, result = sharded_shakespeare
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert manifest["tokenizer"] == "r50k_base"
    assert manifest["eot_token"] == EOT_TOKEN == 50256
    assert manifest["val_position"] == "last" and manifest["documents"] == 1
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
    assert not list(root.glob(".*"))  # no state, lock or temp files left behind


def test_prepare_json_output(runner, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("Hello world, this is a tiny document.")
    result = prepare(runner, "--input", src, "--data-root", tmp_path / "out", "--json", "--name", "tiny")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s["file"] for s in manifest["shards"]} == {"tiny_train_000000.npy", "tiny_val_000000.npy"}


def test_prepare_jsonl_and_parquet(runner, tmp_path, enc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs_a = ["First JSON document.", "Second one, with <|endoftext|> as plain text."]
    docs_b = ["A parquet row.", "Another parquet row!", "Third."]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs_a)) + "\n\n")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": docs_b, "n": [1, 2, 3]}), parquet)

    root = tmp_path / "data"
    result = prepare(runner, "-i", jsonl, "--input", parquet, "--data-root", root, "--val-fraction", "0.25", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["name"] == "a"
    assert manifest["documents"] == 5
    assert [i["format"] for i in manifest["source"]["inputs"]] == ["jsonl", "parquet"]

    expected = expected_stream(enc, docs_a + docs_b)
    stream = np.concatenate([load_tokens(p) for p in find_shards(root, "train") + find_shards(root, "val")])
    assert stream.tolist() == expected
    assert manifest["val_tokens"] == int(len(expected) * 0.25)


def test_workers_do_not_change_the_output(runner, tmp_path, enc):
    """8 batches of documents over 1 or 2 processes, and shards cutting documents: byte-identical results."""
    texts = paragraphs()
    src = write_jsonl(tmp_path / "plays.jsonl", texts)
    roots = {}
    for workers in (1, 2):
        roots[workers] = tmp_path / f"w{workers}"
        result = prepare(runner, "-i", src, "--data-root", roots[workers], "--shard-size", "30k", "--workers", workers)
        assert result.exit_code == 0, result.output
    assert shard_bytes(roots[1]) == shard_bytes(roots[2])
    manifest = json.loads((roots[1] / "manifest.json").read_text())
    assert len(manifest["shards"]) == -(-manifest["train_tokens"] // 30000) + -(-manifest["val_tokens"] // 30000)
    assert stream(roots[2]).tolist() == expected_stream(enc, texts)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_fineweb_edu_from_local_files(runner, tmp_path, enc, fineweb_files, fmt):
    """The Hub's code path (datasets, streaming) on local FineWeb-Edu files: the first --val-tokens are val."""
    root = tmp_path / "fw"
    args = ["fineweb-edu", "--data-root", root, "--shard-size", "20000", "--val-tokens", "25000", "--json"]
    for path in fineweb_files[fmt]:
        args += ["--data-files", path]
    result = prepare(runner, *args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["source"]["format"] == {"parquet": "parquet", "jsonl": "json"}[fmt]
    assert manifest["documents"] == len(fineweb_files["texts"]) - 1  # the empty one adds nothing
    assert manifest["val_position"] == "first" and manifest["val_tokens"] == 25000
    names = [s["file"] for s in manifest["shards"]]
    assert names[:3] == ["edufineweb_val_000000.npy", "edufineweb_val_000001.npy", "edufineweb_train_000000.npy"]
    expected = expected_stream(enc, fineweb_files["texts"])
    assert stream(root).tolist() == expected
    assert np.concatenate([load_tokens(p) for p in find_shards(root, "val")]).tolist() == expected[:25000]


def test_fineweb_edu_default_val_and_max_tokens(runner, tmp_path, enc, fineweb_files):
    root = tmp_path / "fw"
    result = prepare(runner, "fineweb-edu", "--data-files", fineweb_files["parquet"][0], "--max-tokens", "50k",
                     "--data-root", root, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    # the first shard is val, but a 100M-token shard is cut to a tenth of --max-tokens
    assert (manifest["val_tokens"], manifest["train_tokens"]) == (5000, 45000)
    assert stream(root).tolist() == expected_stream(enc, fineweb_files["texts"])[:50000]


def test_fineweb_edu_needs_the_hub_or_data_files(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # this machine has no network: fail fast, not after retries
    root = tmp_path / "fw"
    result = prepare(runner, "fineweb-edu", "--data-root", root)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--data-files" in lines[0] and "sample-10BT" in lines[0]
    assert not root.exists()


def test_fineweb_edu_data_files_without_text_column(runner, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["no text column"]}), bad)
    result = prepare(runner, "fineweb-edu", "--data-files", bad, "--data-root", tmp_path / "fw")
    assert result.exit_code == 2 and "'text'" in result.stderr and "--data-files" in result.stderr
    assert not (tmp_path / "fw").exists()


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on localhost serving tiny Shakespeare as /input.txt."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_tinyshakespeare_download_equals_local_file(runner, tmp_path, monkeypatch, http_server, sharded_shakespeare):
    monkeypatch.setenv("GPTCTL_TINYSHAKESPEARE_URL", f"{http_server}/input.txt")
    root = tmp_path / "ts"
    result = prepare(runner, "tinyshakespeare", "--data-root", root, "--shard-size", 200_000)
    assert result.exit_code == 0, result.output
    assert shard_bytes(root) == shard_bytes(sharded_shakespeare[0])


def test_tinyshakespeare_offline_names_the_fix(runner, tmp_path, monkeypatch, http_server):
    monkeypatch.setenv("GPTCTL_TINYSHAKESPEARE_URL", f"{http_server}/missing.txt")  # like a dead mirror
    root = tmp_path / "ts"
    result = prepare(runner, "tinyshakespeare", "--data-root", root)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: tinyshakespeare:") and "--input FILE" in lines[0]
    assert not root.exists()


def test_refuses_existing_dataset_without_force(runner, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("some words " * 200)
    root = tmp_path / "data"
    assert prepare(runner, "-i", src, "--data-root", root, "--shard-size", 100).exit_code == 0
    many = sorted(p.name for p in root.glob("*.npy"))
    assert len(many) > 3

    refused = prepare(runner, "-i", src, "--data-root", root)
    assert refused.exit_code == 2
    assert "--force" in refused.stderr
    assert sorted(p.name for p in root.glob("*.npy")) == many

    forced = prepare(runner, "-i", src, "--data-root", root, "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in root.glob("*.npy")) == ["in_train_000000.npy", "in_val_000000.npy"]
    assert not list(root.glob(".*"))  # no temp files left behind


def test_refuses_stray_npy_without_force(runner, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello there")
    root = tmp_path / "data"
    root.mkdir()
    np.save(root / "other.npy", np.zeros(3, dtype=np.uint16))
    assert prepare(runner, "-i", src, "--data-root", root).exit_code == 2


def test_one_prepare_at_a_time_per_data_root(runner, tmp_path):
    from gptctl.registry.locks import DirectoryLock

    src = tmp_path / "in.txt"
    src.write_text("hello there")
    root = tmp_path / "data"
    root.mkdir()
    held = DirectoryLock(root)  # a real flock, as a running prepare holds it
    assert held.acquire()
    try:
        result = prepare(runner, "-i", src, "--data-root", root)
        assert result.exit_code == 2 and "another `gptctl data prepare`" in result.stderr
        assert not list(root.glob("*.npy")) and not (root / "manifest.json").exists()
    finally:
        held.release()
    assert prepare(runner, "-i", src, "--data-root", root).exit_code == 0


def test_all_val_is_refused_and_leaves_nothing(runner, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("too short for the val tokens asked for")
    root = tmp_path / "data"
    result = prepare(runner, "-i", src, "--data-root", root, "--val-tokens", "1M", "--shard-size", "5")
    assert result.exit_code == 2 and "--val-tokens" in result.stderr
    assert not root.exists()


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--input", "missing.txt"], "--input"),
        (["--val-fraction", "0"], "--val-fraction"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--val-fraction", "abc"], "--val-fraction"),
        (["--shard-size", "0"], "--shard-size"),
        (["--shard-size", "lots"], "--shard-size"),
        (["--tokenizer", "cl100k_base"], "--tokenizer"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-tokens", "-5"], "--max-tokens"),
        (["--max-tokens", "ten"], "--max-tokens"),
        (["--workers", "0"], "--workers"),
        (["--val-tokens", "100", "--val-fraction", "0.1"], "--val-tokens"),
        (["--val-tokens", "100", "--max-tokens", "100"], "--val-tokens"),
        (["--subset", "sample-10BT"], "--subset"),
        (["--data-files", "in.txt"], "--data-files"),
        (["--name", ".hidden"], "--name"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(runner, tmp_path, monkeypatch, extra, option):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in.txt"
    src.write_text("hello there")
    root = tmp_path / "data"
    result = prepare(runner, "--input", src, "--data-root", root, *extra)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and option in lines[0], result.output
    assert not root.exists()


@pytest.mark.parametrize(
    "args, option",
    [
        (["shakespeare"], "SOURCE"),
        (["fineweb-edu", "--input", "in.txt"], "--input"),
        ([], "--input"),
        (["fineweb-edu", "--data-files", "missing.parquet"], "--data-files"),
        (["fineweb-edu", "--data-files", "in.txt"], "--data-files"),
        (["fineweb-edu", "--data-files", "a.parquet", "--subset", "sample-10BT"], "--subset"),
        (["fineweb-edu", "--subset", "../x"], "--subset"),
        (["fineweb-edu", "--val-fraction", "0.1"], "--val-fraction"),
        (["tinyshakespeare", "--subset", "sample-10BT"], "--subset"),
        (["tinyshakespeare", "--data-root", "in.txt"], "--data-root"),
    ],
)
def test_bad_source_options_exit_2_and_write_nothing(runner, tmp_path, monkeypatch, args, option):
    monkeypatch.chdir(tmp_path)
    Path("in.txt").write_text("hello there")
    Path("a.parquet").write_bytes(b"")
    root_args = [] if "--data-root" in args else ["--data-root", "data"]
    result = prepare(runner, *args, *root_args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and option in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "in.txt"]


def test_bad_jsonl_writes_nothing(runner, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    root = tmp_path / "data"
    result = prepare(runner, "--input", src, "--data-root", root)
    assert result.exit_code == 2
    assert "in.jsonl:2" in result.stderr
    assert not root.exists()


def test_snake_case_options(runner, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("snake case options still work")
    root = tmp_path / "data"
    result = prepare(runner, "--input", src, "--data_root", root, "--val_fraction", "0.5", "--shard_size", "1000")
    assert result.exit_code == 0, result.output
    assert (root / "manifest.json").is_file()


def test_parse_count():
    assert [parse_count(v, "--x") for v in ["100000", "100_000", "100k", "100M", "1.5B", "2g"]] == [
        100_000, 100_000, 100_000, 100_000_000, 1_500_000_000, 2_000_000_000]
    with pytest.raises(UserError, match="--x"):
        parse_count("1e8", "--x")


def test_progress_has_a_total_for_an_eta(tmp_path):
    src = write_jsonl(tmp_path / "plays.jsonl", paragraphs()[:2000])
    calls = []
    prepare_api(PrepareOptions(data_root=tmp_path / "d", inputs=[src], workers=1),
                on_progress=lambda *args: calls.append(args))
    phases = [c[0] for c in calls]
    assert phases[0] == "counting tokens" and phases[-1] == "tokenizing"
    counting = [c for c in calls if c[0] == "counting tokens"]
    assert counting[-1][2] == counting[-1][3] == src.stat().st_size  # input bytes, known up front
    tokenizing = [c for c in calls if c[0] == "tokenizing"]
    total = counting[-1][1]
    assert all(c[3] == total for c in tokenizing) and tokenizing[-1][1:3] == (total, total)  # tokens, counted


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


def test_data_help_lists_prepare(runner):
    result = runner.invoke(app, ["data", "--help"])
    assert result.exit_code == 0
    assert "prepare" in result.stdout


# --- a real interruption -----------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ...: the workers come from a fork server, a child of the prepare."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def recorded_shards(root: Path) -> list[dict]:
    try:
        return json.loads((root / STATE_FILE).read_text())["shards"]
    except FileNotFoundError:
        return []


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptctl", "data", "prepare", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["input-val-fraction", "fineweb-edu-data-files"])
def test_sigkill_then_resume_is_byte_identical(tmp_path, kind):
    texts = paragraphs(copies=3)  # ~1M tokens, 100 shards: seconds of work, so the kill lands mid-way
    if kind == "input-val-fraction":
        args = ["--input", write_jsonl(tmp_path / "plays.jsonl", texts), "--shard-size", "10000"]
    else:
        half = len(texts) // 2
        files = [write_parquet(tmp_path / "a.parquet", texts[:half], 3000),
                 write_parquet(tmp_path / "b.parquet", texts[half:], 3000)]
        args = ["fineweb-edu", "--data-files", files[0], "--data-files", files[1], "--shard-size", "10000",
                "--val-tokens", "15000"]

    reference, root = tmp_path / "reference", tmp_path / "interrupted"
    done = run_cli(*args, "--data-root", reference, "--workers", "1")
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen([sys.executable, "-m", "gptctl", "data", "prepare", *map(str, args), "--data-root",
                             str(root), "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: recorded_shards(root), "the first shard to be finished and recorded", proc=proc, interval=0.005,
               details=lambda: proc.stderr.read().decode())
    workers = descendants(proc.pid)
    assert len(workers) >= 3  # at least the fork server and 2 workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (root / "manifest.json").exists(), "the prepare finished before the kill: nothing was resumed"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("*.npy")}
    assert {s["file"] for s in recorded_shards(root)} <= set(before)
    assert len(before) < len(shard_bytes(reference))
    wait_until(lambda: not any(alive(pid) for pid in workers), "the fork server and workers to go with the prepare",
               30, details=lambda: f"orphaned processes {[p for p in workers if alive(p)]}")

    mismatch = run_cli(*["12000" if a == "10000" else a for a in args], "--data-root", root)
    assert mismatch.returncode == 2
    assert "--shard-size differs" in mismatch.stderr and "--force" in mismatch.stderr
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("*.npy")} == before

    resumed = run_cli(*args, "--data-root", root, "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stderr
    assert shard_bytes(root) == shard_bytes(reference)
    for name, identity in before.items():  # finished shards were not rewritten
        assert ((root / name).stat().st_ino, (root / name).stat().st_mtime_ns) == identity
    ours, theirs = (json.loads((r / "manifest.json").read_text()) for r in (root, reference))
    assert {**ours, "created": None} == {**theirs, "created": None}
    assert not list(root.glob(".*"))
