"""The KV-cache generation engine against the cache-free forward, for both architectures: greedy
tokens (one sample and several, past the context), logits, seeds, top-k/top-p, stop sequences,
incremental decoding, rows that end early; and `gptctl sample`'s --top-p and --stop."""

import json
import random

import pytest
import torch

from helpers import save_tiny_checkpoint
from gptctl.cli import app
from gptctl.cli.sample import SEPARATOR
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
from gptctl.engine import generate
from gptctl.engine.generate import Generation, KVCache, Sampling, TextStream, sample_next
from gptctl.engine.model import GPT, GPTConfig
from gptctl.presets import GPT2_VOCAB_SIZE

BLOCK = 16  # small, so that 30 new tokens run past the context
ARCHS = ("gpt2", "modern")
GREEDY = Sampling(temperature=0)
PROMPT = "ROMEO: But soft, what light"  # 6 tokens


def tiny_model(arch: str) -> GPT:
    """A 2-layer model with large random weights: at init (modern's zero projections and head) the
    output hardly depends on the input, and greedy ties would make token equality a matter of rounding."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, arch=arch)).eval()
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.5)
    return model


def last_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    """The cache-free forward's logits for the token after `tokens`, as nanoGPT sees it: the last BLOCK tokens."""
    with torch.no_grad():
        return model(torch.tensor([tokens[-BLOCK:]]))[0][0, -1, :GPT2_VOCAB_SIZE]


def cache_free_greedy(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        token = int(last_logits(model, tokens).argmax())
        if token == EOT_TOKEN:
            break
        tokens.append(token)
    return tokens[len(prompt):]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_samples", [1, 4])
@pytest.mark.parametrize("prompt", [PROMPT, PROMPT * 4], ids=["short", "longer-than-the-context"])
def test_greedy_is_the_cache_free_forwards_tokens_past_the_context(arch, num_samples, prompt):
    enc, model = get_encoding(), tiny_model(arch)
    prompt_tokens = enc.encode_ordinary(prompt)
    expected = cache_free_greedy(model, prompt_tokens, 30)
    assert len(expected) == 30 and len(prompt_tokens) + 30 > 2 * BLOCK  # slides for more than a whole window
    generation = Generation(model, enc, prompt_tokens, 30, GREEDY, num_samples)
    assert generation.run() == [expected] * num_samples


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_logits_equal_the_uncached_last_position(arch):
    model = tiny_model(arch)
    config = model.config
    prompt = [464, 3290, 318, 257, 922]
    # Two rows from one batch-1 prefill, then each its own tokens. fp32 sums in another order than the
    # full forward's: about 1e-6 apart here, 1.2e-5 once an earlier in-process run has changed the
    # thread settings of the test process; 1e-4 is export parity's bar too.
    rows = [prompt + [11, 290, 340], prompt + [13, 198, 40]]
    cache = KVCache(config, batch=2, max_len=BLOCK, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache)[0]
        assert logits.shape == (1, 1, config.vocab_size) and cache.length == len(prompt)
        torch.testing.assert_close(logits[0, -1, :GPT2_VOCAB_SIZE], last_logits(model, prompt), atol=1e-4, rtol=0)
        for i in range(len(prompt), len(rows[0])):
            logits = model(torch.tensor([[row[i]] for row in rows]), cache=cache)[0]
            for r, row in enumerate(rows):
                torch.testing.assert_close(logits[r, -1, :GPT2_VOCAB_SIZE], last_logits(model, row[:i + 1]),
                                           atol=1e-4, rtol=0)
    assert cache.length == len(rows[0])


def test_the_cache_takes_a_prefill_into_an_empty_cache_then_one_position_at_a_time():
    model = tiny_model("gpt2")
    cache = KVCache(model.config, batch=1, max_len=BLOCK, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="one position at a time"):
            model(torch.tensor([[4, 5]]), cache=cache)
        for token in range(4, BLOCK + 1):
            model(torch.tensor([[token]]), cache=cache)
        assert cache.length == BLOCK and cache.full
        with pytest.raises(ValueError, match="exceeds block size"):
            model(torch.tensor([[0]]), cache=cache)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_same_seed_gives_the_same_samples(arch):
    enc, model = get_encoding(), tiny_model(arch)
    prompt = enc.encode_ordinary(PROMPT)

    def draw(seed: int) -> list[list[int]]:
        sampling = Sampling(temperature=1.0, top_k=50, top_p=0.9)
        return Generation(model, enc, prompt, 20, sampling, 3, torch.Generator().manual_seed(seed)).run()

    first = draw(1)
    assert first == draw(1) and first != draw(2)
    assert len({tuple(row) for row in first}) == 3  # the samples of one generation differ from each other


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    probs = torch.tensor([0.05, 0.45, 0.02, 0.3, 0.18])  # by likelihood: 1, 3, 4, 0, 2
    logits = probs.log().expand(4000, -1)
    generator = torch.Generator().manual_seed(0)

    def drawn(**sampling) -> set[int]:
        return set(sample_next(logits, Sampling(**sampling), generator).tolist())

    assert drawn(temperature=1.0) == {0, 1, 2, 3, 4}
    assert drawn(temperature=1.0, top_k=2) == {1, 3}
    assert drawn(temperature=1.0, top_p=0.7) == {1, 3}  # 0.45 + 0.3 holds 0.7
    assert drawn(temperature=1.0, top_p=0.76) == {1, 3, 4}  # 0.75 does not
    assert drawn(temperature=1.0, top_p=0.01) == {1}  # the likeliest always stays
    assert drawn(temperature=1.0, top_k=3, top_p=0.9) == {1, 3, 4}  # top_k first: 1, 3, 4 renormalised
    assert drawn(temperature=0, top_k=3, top_p=0.5) == {1}
    counts = torch.bincount(sample_next(logits, Sampling(temperature=1.0, top_p=0.7), generator), minlength=5)
    assert abs(counts[1] / counts.sum() - 0.45 / 0.75) < 0.03  # the kept tokens keep their odds


def stream_pieces(enc, tokens: list[int], stop: tuple[str, ...] = ()) -> list[str]:
    stream = TextStream(enc, stop)
    pieces = [stream.push(t) for t in tokens] + [stream.close()]
    return [p for p in pieces if p]


@pytest.mark.parametrize("text", ["naïve café 😀 €", "日本語のテキスト", "😀😀 🎉"])
def test_incremental_decoding_equals_the_whole_decode(text):
    enc = get_encoding()
    tokens = enc.encode_ordinary(text)
    assert any(enc.decode([t]).endswith("\ufffd") for t in tokens)  # some token splits a character
    pieces = stream_pieces(enc, tokens)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces) and len(pieces) > 3


def test_incremental_decoding_equals_the_whole_decode_on_broken_bytes():
    """Bytes that never make a character become U+FFFD just as enc.decode makes them."""
    enc, rng = get_encoding(), random.Random(0)
    byte_tokens = enc.encode_ordinary("😀日é€") + list(range(256))  # GPT-2's first 256 tokens are single bytes
    for _ in range(300):
        tokens = [rng.choice(byte_tokens) for _ in range(rng.randint(1, 12))]
        assert "".join(stream_pieces(enc, tokens)) == enc.decode(tokens), tokens


def test_text_ends_before_a_stop_sequence_and_never_shows_its_start():
    enc = get_encoding()
    tokens = enc.encode_ordinary("Hello world. The end. And more.")
    assert "".join(stream_pieces(enc, tokens, ("The end",))) == "Hello world. "
    assert "".join(stream_pieces(enc, tokens, ("lo wo", "more"))) == "Hel"  # spans two tokens; the first found
    assert "".join(stream_pieces(enc, tokens, ("absent",))) == enc.decode(tokens)
    assert "".join(stream_pieces(enc, tokens, ("more. and",))) == enc.decode(tokens)  # a held start that was none
    stream = TextStream(enc, (". The",))
    assert [stream.push(t) for t in tokens[:4]] == ["Hello", " world", "", ""]  # ". The" might be coming
    assert stream.stopped and stream.push(tokens[4]) == "" and stream.close() == ""


@pytest.mark.parametrize("arch", ARCHS)
def test_ended_rows_leave_the_batch_and_the_others_go_on_as_without_cache(arch, monkeypatch):
    """Samples that reach a stop sequence at different steps; every logits row the sampler sees is
    the cache-free forward's for that sample's context (compaction and sliding keep rows apart)."""
    enc, model = get_encoding(), tiny_model(arch)
    prompt = enc.encode_ordinary(PROMPT)
    seen, real_sample_next = [], generate.sample_next
    generation = Generation(model, enc, prompt, 24, Sampling(temperature=1.0, top_k=100, stop=("e",)), 5,
                            torch.Generator().manual_seed(3))

    def recording(logits, sampling, generator):
        seen.append((list(generation.running), [len(generation.tokens[r]) for r in generation.running],
                     logits.clone(), generation.cache.k.size(1)))
        return real_sample_next(logits, sampling, generator)

    monkeypatch.setattr(generate, "sample_next", recording)
    completions = generation.run()
    lengths = [len(tokens) for tokens in completions]
    assert len(set(lengths)) > 2 and min(lengths) < 24, lengths  # rows ended at different steps
    texts = ["".join(generation.take(r)) for r in range(5)]
    for row, (tokens, text) in enumerate(zip(completions, texts)):
        assert "e" not in text and (len(tokens) == 24 or "e" in enc.decode(tokens))
        assert text == enc.decode(tokens).split("e")[0]
    for step, (running, done, logits, cache_rows) in enumerate(seen):
        assert running == [r for r in range(5) if lengths[r] > step] and done == [step] * len(running)
        assert cache_rows == len(running)  # ended rows are not computed any more
        for i, row in enumerate(running):
            context = prompt + completions[row][:step]
            # Logits up to ±12 over 24 steps and a sliding window: a few ulps; a wrong row or position is units off.
            torch.testing.assert_close(logits[i], last_logits(model, context), atol=1e-4, rtol=0)


def test_bf16_autocast_runs_with_a_bf16_cache():
    enc, model = get_encoding(), tiny_model("modern")
    generation = Generation(model, enc, enc.encode_ordinary(PROMPT), 20, GREEDY, 2, dtype=torch.bfloat16)
    tokens = generation.run()
    assert generation.cache.k.dtype == torch.bfloat16 and len(tokens[0]) == 20 and tokens[0] == tokens[1]


# gptctl sample: the options that reach the engine


@pytest.fixture
def ckpt(tmp_path):
    return save_tiny_checkpoint(tmp_path / "model_00007.pt", block=BLOCK)


def sample(runner, *args: str) -> list[dict]:
    result = runner.invoke(app, ["sample", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_sample_stops_before_a_stop_sequence_and_top_p_narrows_to_greedy(runner, ckpt):
    args = [str(ckpt), "--prompt", "Hello", "--max-new-tokens", "20"]
    (greedy,) = sample(runner, *args, "--temperature", "0")
    text = greedy["text"]
    stop = text[7:10]
    assert greedy["tokens"] == 20 and stop.strip() and text.find(stop) == 7
    (stopped,) = sample(runner, *args, "--temperature", "0", "--stop", "never there", "--stop", stop)
    assert stopped["text"] == text[:7] and stopped["tokens"] < 20
    assert sample(runner, *args, "--temperature", "1.5", "--top-p", "0.0001", "--seed", "4") == [greedy]
    assert sample(runner, *args, "--temperature", "1.5", "--top-p", "0.9", "--seed", "4") != [greedy]


def test_streamed_samples_are_the_json_samples_between_separators(runner, ckpt):
    args = [str(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--num-samples", "3", "--top-p", "0.95",
            "--stop", "e"]
    streamed = runner.invoke(app, ["sample", *args])
    assert streamed.exit_code == 0, streamed.output
    texts = [s["text"] for s in sample(runner, *args)]
    assert streamed.stdout == f"\n{SEPARATOR}\n".join(texts) + "\n"
    assert len(set(texts)) > 1 and not any("e" in t for t in texts)


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "--top-p: must be more than 0 and at most 1 (1 = off), got 0.0"),
    (["--top-p", "1.5"], "--top-p: must be more than 0 and at most 1 (1 = off), got 1.5"),
    (["--top-p", "nan"], "--top-p: must be more than 0 and at most 1"),
    (["--stop", "x", "--stop", ""], "--stop: must not be empty"),
])
def test_bad_top_p_or_stop_exits_2_in_one_line(runner, ckpt, args, message):
    result = runner.invoke(app, ["sample", str(ckpt), "--prompt", "a", *args])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"Error: {message}") and result.stderr.count("\n") == 1
