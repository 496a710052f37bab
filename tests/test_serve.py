"""`gptctl serve`: the OpenAI client against a real uvicorn server on a free port (in a thread of this
process, or `gptctl serve` in a process of its own), the batcher against Generation, errors, the key,
the chat page in a headless browser, and a clean stop that releases the checkpoint's lease."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from torch.nn import functional as F

from helpers import save_tiny_checkpoint, wait_until
from gptctl.cli import app
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
from gptctl.engine.batch import Batcher, Failed, Finished, Job, TokenEvent
from gptctl.engine.generate import Generation, Sampling
from gptctl.engine.sample import Sampler
from gptctl.presets import GPT2_VOCAB_SIZE
from gptctl.prompt import Turn, format_conversation

BLOCK = 64
ROMEO = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


# --- servers ------------------------------------------------------------------------------------------

class Gate:
    """The model behind a gate: a forward waits until the gate is open (to hold requests in the queue), and
    `delay` seconds more (a slow model: a reply that takes a while)."""

    def __init__(self, model, delay: float = 0):
        self.model, self.config, self.open, self.delay = model, model.config, threading.Event(), delay
        self.open.set()

    def __call__(self, *args, **kwargs):
        assert self.open.wait(60), "the gate stayed closed"
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


@contextmanager
def server(sampler: Sampler, path: Path, api_key: str | None = None, max_rows: int = 8, max_waiting: int = 32,
           gate: Gate | None = None):
    """A real uvicorn server on a free port, in a thread of this process: its base URL."""
    import uvicorn

    from gptctl.serve.app import create_app
    from gptctl.serve.server import bind, model_info, url_of

    model = model_info(sampler, path, str(path), path.parent / "home")
    batcher = Batcher(gate or sampler.model, sampler.enc, sampler.device, sampler.dtype, max_rows, max_waiting)
    sock = bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(create_app(batcher, model, sampler.enc, api_key), log_level="warning",
                                       lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: uv.started or not thread.is_alive(), "the server to start", 30, interval=0.02)
    assert uv.started, "the server did not start"
    try:
        yield url_of(sock)
    finally:
        if gate is not None:
            gate.open.set()
        uv.should_exit = True
        thread.join(30)
        sock.close()


def client(url: str, api_key: str = "unused"):
    import openai  # here, not at the top: a second or more of import for every test process that collects this file

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"pretrain": save_tiny_checkpoint(root / "model_00007.pt", block=BLOCK),
            "finetune": save_tiny_checkpoint(root / "ft_00007.pt", kind="finetune", block=BLOCK)}


@pytest.fixture(scope="module")
def sampler(checkpoints) -> Sampler:
    return Sampler(checkpoints["pretrain"], "cpu")


@pytest.fixture(scope="module")
def url(sampler, checkpoints):
    with server(sampler, checkpoints["pretrain"]) as url:
        yield url


def sample(runner, *args: str) -> list[dict]:
    result = runner.invoke(app, ["sample", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- the batcher ----------------------------------------------------------------------------------------

def run_jobs(batcher: Batcher, specs: list[tuple[list[int], Sampling, int]], max_new: int) -> list[list[list[int]]]:
    """Each (prompt, sampling, n) as one job, all submitted at once; each sample's tokens (end-of-text dropped)."""
    results = [[[] for _ in range(n)] for _, _, n in specs]
    done = threading.Semaphore(0)

    def emitter(j):
        def emit(event):
            if isinstance(event, TokenEvent) and event.token != EOT_TOKEN:
                results[j][event.sample].append(event.token)
            elif isinstance(event, (Finished, Failed)):
                assert not isinstance(event, Failed), event
                done.release()
        return emit

    batcher.submit([Job(p, max_new, s, emitter(j), n, seed=3) for j, (p, s, n) in enumerate(specs)])
    for _ in range(sum(n for _, _, n in specs)):
        assert done.acquire(timeout=60)
    return results


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_rows_that_join_and_leave_the_batch_decode_as_generation_does(arch):
    """Jobs of different prompt lengths (one past the context: it slides), greedy and seeded, with more
    samples than rows: each job's tokens are Generation's alone, while steps are shared."""
    from test_generate import BLOCK as GEN_BLOCK, tiny_model

    enc, model = get_encoding(), tiny_model(arch)
    prompts = [enc.encode_ordinary(t) for t in ["Hello there", ROMEO, "a", "The quick brown fox"]]
    assert len(prompts[1]) > GEN_BLOCK
    specs = [(p, s, n) for p in prompts for s, n in ((Sampling(0), 1), (Sampling(1.0, top_k=50, stop=("e",)), 3))]
    batcher = Batcher(model, enc, torch.device("cpu"), max_rows=5)
    batcher.start()
    try:
        got = run_jobs(batcher, specs, 24)
    finally:
        batcher.close()
    for (prompt, sampling, n), tokens in zip(specs, got):
        assert tokens == Generation(model, enc, prompt, 24, sampling, n, torch.Generator().manual_seed(3)).run()
    stats = batcher.stats()
    assert stats["shared_steps"] > 0 and 1 < stats["max_rows_per_step"] <= 5 and stats["jobs_done"] == len(specs)


POISON = 50000  # a token whose forward fails (in Poisoned)


class Poisoned:
    """The model, failing any forward of more than one position that holds POISON (a prompt's prefill or
    scoring, as one that runs out of memory), and the next decode step once `fail_step` is set."""

    def __init__(self, model):
        self.model, self.config, self.fail_step = model, model.config, False

    def __call__(self, idx, *args, **kwargs):
        if idx.size(1) > 1 and bool((idx == POISON).any()):
            raise RuntimeError("poisoned prompt")
        if idx.size(1) == 1 and self.fail_step:
            self.fail_step = False
            raise RuntimeError("poisoned step")
        return self.model(idx, *args, **kwargs)


def test_a_job_whose_own_prompt_fails_fails_alone_and_the_batcher_serves_on():
    """A job whose prefill, scoring or own draw in a step fails gets Failed; the jobs beside it decode on as
    if it had not been there. A failed decode step fails the jobs in it (they shared it), and the next jobs
    are served."""
    from test_generate import tiny_model

    enc, model = get_encoding(), tiny_model("gpt2")
    poisoned, good = Poisoned(model), enc.encode_ordinary("Hello there")
    expected = Generation(model, enc, good, 24, Sampling(0), 1, torch.Generator().manual_seed(3)).run()[0]
    batcher = Batcher(poisoned, enc, torch.device("cpu"), max_rows=4)
    batcher.start()

    def run(jobs: list[tuple[list[int], bool]], breaks: int | None = None) -> list:
        """Each (prompt, score_prompt) as one job, all submitted at once: its tokens, or its Failed. Job
        `breaks` fails at its third token (its emit raises, in a decode step)."""
        results, done = [[] for _ in jobs], threading.Semaphore(0)

        def emitter(j):
            def emit(event):
                if isinstance(event, TokenEvent) and j == breaks and len(results[j]) == 2:
                    raise RuntimeError("broken job")
                if isinstance(event, TokenEvent) and event.token != EOT_TOKEN:
                    results[j].append(event.token)
                elif isinstance(event, Failed):
                    results[j] = event
                if isinstance(event, (Finished, Failed)):
                    done.release()
            return emit

        batcher.submit([Job(p, 24, Sampling(0), emitter(j), seed=3, score_prompt=score)
                        for j, (p, score) in enumerate(jobs)])
        for _ in jobs:
            assert done.acquire(timeout=60)
        return results

    try:
        first, prefill, scoring, last = run([(good, False), ([POISON] * 3, False), ([POISON] * 3, True), (good, False)])
        assert first == expected and last == expected
        for failed in (prefill, scoring):
            assert isinstance(failed, Failed) and failed.status == 500
            assert failed.message == "generation failed: RuntimeError: poisoned prompt"
        first, broken, last = run([(good, False)] * 3, breaks=1)
        assert first == expected and last == expected and broken.message == "generation failed: RuntimeError: broken job"
        poisoned.fail_step = True
        assert all(isinstance(r, Failed) and "poisoned step" in r.message for r in run([(good, False)] * 2))
        assert run([(good, False)]) == [expected]
    finally:
        batcher.close()
    assert batcher.stats()["rows"] == 0


# --- the API through the openai client ------------------------------------------------------------------

def test_models_and_completions_text_ids_and_batch_equal_sample(runner, url, checkpoints):
    api, enc = client(url), get_encoding()
    (card,) = api.models.list().data
    assert card.id == "model_00007.pt" and card.max_model_len == BLOCK
    path = str(checkpoints["pretrain"])
    texts = {}
    for prompt in ("Hello", ROMEO, "<|endoftext|>"):  # ROMEO's tokens and 24 more pass the context: it slides
        (expected,) = sample(runner, path, "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0")
        response = api.completions.create(model=card.id, prompt=prompt, max_tokens=24, temperature=0)
        assert response.choices[0].text == expected["text"] and expected["text"]
        assert response.usage.completion_tokens == expected["tokens"]
        by_ids = api.completions.create(model=card.id, prompt=enc.encode(prompt, allowed_special="all"), max_tokens=24,
                                        temperature=0)
        assert by_ids.choices[0].text == expected["text"]
        texts[prompt] = expected["text"]
    batch = api.completions.create(model=card.id, prompt=["Hello", enc.encode_ordinary(ROMEO)], max_tokens=24, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [texts["Hello"], texts[ROMEO]]
    assert all(c.finish_reason == "length" for c in batch.choices)


def test_chat_equals_sample_instruction_for_a_finetuned_model(runner, sampler, checkpoints):
    path = checkpoints["finetune"]
    ft = Sampler(path, "cpu")
    with server(ft, path) as url:
        api = client(url)
        (expected,) = sample(runner, str(path), "--instruction", "Name a colour.", "--max-new-tokens", "16", "--temperature", "0")
        reply = api.chat.completions.create(model="ft_00007.pt", messages=[{"role": "user", "content": "Name a colour."}],
                                            max_tokens=16, temperature=0)
        assert reply.choices[0].message.content == expected["text"] and reply.choices[0].message.role == "assistant"
        # A system message and earlier exchanges: the prompt is prompt.format_conversation's, oldest turns dropped to fit.
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
        two = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0})
        enc = get_encoding()
        whole = enc.encode_ordinary(format_conversation([Turn("Hi", "Hello!"), Turn("Name a colour.")], "Be brief."))
        assert len(whole) <= BLOCK - 4 and two.status_code == 200
        assert two.json()["usage"]["prompt_tokens"] == len(whole) and "x-gptctl-dropped-turns" not in two.headers
        long = [{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "ok"}, messages[-1]]
        dropped = httpx.post(f"{url}/v1/chat/completions", json={"messages": long, "max_tokens": 4, "temperature": 0})
        assert dropped.headers["x-gptctl-dropped-turns"] == "1" and dropped.headers["x-gptctl-model"] == "ft_00007.pt"
        assert dropped.json()["usage"]["prompt_tokens"] == len(enc.encode_ordinary(format_conversation([Turn("Name a colour.")])))


def test_streams_reassemble_to_the_whole_text(url):
    api = client(url)
    args = dict(model="model_00007.pt", max_tokens=30, temperature=0.9, seed=11, stop=["\n\n"])
    whole = api.completions.create(prompt=ROMEO, **args).choices[0]
    chunks = list(api.completions.create(prompt=ROMEO, stream=True, **args))
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    messages = [{"role": "user", "content": "Tell me about the sun."}]
    args["max_tokens"] = 20  # the template's 36 tokens and the reply within the 64-token context
    reply = api.chat.completions.create(messages=messages, **args).choices[0]
    stream = list(api.chat.completions.create(messages=messages, stream=True, **args))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.message.content and reply.message.content
    assert stream[-1].choices[0].finish_reason == reply.finish_reason
    # The wire format: server-sent events ending with [DONE].
    raw = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n") and raw.text.startswith("data: {")


def test_echo_logprobs_of_token_ids_as_lm_eval_asks_match_a_forward(url, sampler):
    """lm-evaluation-harness's loglikelihood request (local-completions: token ids, echo, logprobs 1,
    max_tokens 1, temperature 0) and what it reads: token_logprobs[ctxlen:-1] and top_logprobs."""
    enc = get_encoding()
    context, continuation = enc.encode_ordinary("ROMEO: But soft, what light"), enc.encode_ordinary(" through yonder window")
    tokens = context + continuation
    payload = {"model": "model_00007.pt", "prompt": [tokens], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    response = httpx.post(f"{url}/v1/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert len(logprobs["token_logprobs"]) == len(tokens) + 1  # the prompt's, then the one new token's
    assert logprobs["tokens"][:len(tokens)] == [enc.decode([t]) for t in tokens]
    with torch.no_grad():
        direct = F.log_softmax(sampler.model(torch.tensor([tokens]))[0][0, :, :GPT2_VOCAB_SIZE].float(), dim=-1)
    expected = direct[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:len(tokens)]), expected, atol=1e-4, rtol=0)
    for i, top in enumerate(logprobs["top_logprobs"][1:len(tokens)]):
        ((token, value),) = top.items()
        assert abs(value - float(direct[i].max())) < 1e-4 and token == enc.decode([int(direct[i].argmax())])
    # lm-eval's parse_logprobs: the continuation's sum, and whether it is the greedy one.
    ctxlen = len(context)
    total = sum(logprobs["token_logprobs"][ctxlen:-1])
    greedy = all(lp == max(top.values()) for lp, top in zip(logprobs["token_logprobs"][ctxlen:-1],
                                                          logprobs["top_logprobs"][ctxlen:-1]))
    assert abs(total - float(expected[ctxlen - 1:].sum())) < 1e-3
    assert greedy == all(int(direct[i].argmax()) == tokens[i + 1] for i in range(ctxlen - 1, len(tokens) - 1))
    # max_tokens 0: the prompt alone; and the text of an echo is the prompt's.
    only = httpx.post(f"{url}/v1/completions", json={**payload, "max_tokens": 0}).json()["choices"][0]
    assert only["logprobs"]["token_logprobs"] == logprobs["token_logprobs"][:-1] and only["text"] == enc.decode(tokens)
    # lm-eval's remote tokenizer (vLLM's routes) finds the GPT-2 BPE here.
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>"
    assert httpx.post(f"{url}/tokenize", json={"prompt": "<|endoftext|>Hi", "add_special_tokens": False}).json()["tokens"] == [
        EOT_TOKEN, *enc.encode_ordinary("Hi")]
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens}).json()["prompt"] == enc.decode(tokens)


def test_n_samples_with_a_seed_are_reproducible_and_equal_sample(runner, url, checkpoints):
    api = client(url)
    args = dict(model="model_00007.pt", prompt="Hello", max_tokens=12, temperature=1.0, n=3, extra_body={"top_k": 200})
    first = [c.text for c in api.completions.create(seed=5, **args).choices]
    assert first == [c.text for c in api.completions.create(seed=5, **args).choices]
    assert len(set(first)) == 3 and first != [c.text for c in api.completions.create(seed=6, **args).choices]
    expected = sample(runner, str(checkpoints["pretrain"]), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "1.0",
                      "--num-samples", "3", "--seed", "5")
    assert first == [s["text"] for s in expected]


# --- concurrency and the queue --------------------------------------------------------------------------

def wait_for(url: str, predicate, timeout: float = 30) -> dict:
    """The batcher's stats from /health, once predicate(stats)."""
    seen = {}

    def stats():
        seen.update(httpx.get(f"{url}/health").json()["batch"])
        return predicate(seen) and dict(seen)

    return wait_until(stats, "the batcher's stats", timeout, interval=0.02, details=lambda: seen)


def test_concurrent_requests_share_decode_steps_and_are_each_answered_right(sampler, checkpoints):
    enc = get_encoding()
    prompts = [f"{word} is" for word in ("Rome", "Juliet", "The sun", "A rose", "Verona", "Night", "Love", "Death")]
    expected = [enc.decode(Generation(sampler.model, enc, enc.encode_ordinary(p), 20, Sampling(0)).run()[0])
                for p in prompts]
    gate = Gate(sampler.model)
    gate.open.clear()
    with server(sampler, checkpoints["pretrain"], gate=gate) as url:
        api, answers = client(url), [None] * len(prompts)

        def ask(i):
            answers[i] = api.completions.create(model="model_00007.pt", prompt=prompts[i], max_tokens=20,
                                                temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        wait_for(url, lambda s: s["submitted"] == len(prompts))  # the first ones in their prefill, behind the gate
        gate.open.set()
        for t in threads:
            t.join(60)
        stats = httpx.get(f"{url}/health").json()["batch"]
    assert answers == expected
    assert stats["max_jobs_per_step"] == len(prompts) and stats["shared_steps"] >= 15, stats


def test_a_full_queue_is_503_in_openais_shape(sampler, checkpoints):
    gate = Gate(sampler.model)
    gate.open.clear()
    with server(sampler, checkpoints["pretrain"], max_rows=1, max_waiting=2, gate=gate) as url:
        body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
        with httpx.Client(timeout=60) as http:
            results = []
            threads = [threading.Thread(target=lambda: results.append(http.post(f"{url}/v1/completions", json=body)))
                       for _ in range(3)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            wait_for(url, lambda s: s["waiting"] == 2)  # one in the (closed) model, two waiting
            full = http.post(f"{url}/v1/completions", json=body)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            error = full.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "server_error" and "queue is full" in error["message"]
            gate.open.set()
            for t in threads:
                t.join(60)
        assert [r.status_code for r in results] == [200] * 3


@pytest.mark.parametrize("route, body", [
    ("completions", {"prompt": "Hello", "max_tokens": BLOCK}),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}),
])
def test_a_whole_response_whose_client_went_away_is_cancelled(sampler, checkpoints, route, body):
    """A request that is not streamed, given up by its client mid-reply, leaves the batch as a stream
    does, rather than decoding to max_tokens in rows that other clients wait for."""
    with server(sampler, checkpoints["pretrain"], gate=Gate(sampler.model, delay=0.1)) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up, and closes its connection
            httpx.post(f"{url}/v1/{route}", json={**body, "temperature": 0}, timeout=0.5)
        stats = wait_for(url, lambda s: s["submitted"] == 1 and s["rows"] == 0 and s["waiting"] == 0)
    assert stats["jobs_cancelled"] == 1 and stats["jobs_done"] == 0, stats
    assert stats["tokens"] < body["max_tokens"] // 2, stats


@pytest.mark.parametrize("route, body, param", [
    ("completions", {"prompt": "a", "model": "nope"}, "model"),
    ("completions", {"prompt": "a", "max_tokens": "x"}, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": BLOCK + 1}, "max_tokens"),
    ("completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "a", "temperature": -0.5}, "temperature"),
    ("completions", {"prompt": "a", "temperature": 3}, "temperature"),
    ("completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "a", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "a", "n": 0}, "n"),
    ("completions", {"prompt": "a", "n": 9}, "n"),
    ("completions", {"prompt": "a", "stop": [""]}, "stop"),
    ("completions", {"prompt": "a", "stop": 5}, "stop"),
    ("completions", {"prompt": "a", "seed": -1}, "seed"),
    ("completions", {"prompt": "a", "logprobs": 50}, "logprobs"),
    ("completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt[1]"),
    ("completions", {"prompt": [GPT2_VOCAB_SIZE]}, "prompt"),
    ("completions", {"prompt": [1] * (BLOCK + 1), "echo": True, "logprobs": 1}, "prompt"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {}, "messages"),
    ("chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "messages[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 999},
     "max_completion_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "a"}], "temperature": -1}, "temperature"),
    # found by the break test
    ("completions", {"prompt": "a", "temperature": True}, "temperature"),
    ("completions", {"prompt": ["a"] * 33, "max_tokens": 1}, "prompt"),  # more than --max-queue: never served
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * (2 * BLOCK)}], "max_tokens": 4},
     "messages"),
])
def test_bad_requests_are_400_naming_the_field(url, route, body, param):
    response = httpx.post(f"{url}/v1/{route}", json=body)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": {"message": response.json()["error"]["message"], "type": "invalid_request_error",
                                         "param": param, "code": response.json()["error"]["code"]}}
    assert response.json()["error"]["message"].startswith(f"{param}: ")


def test_bodies_that_are_no_json_object_and_unknown_routes(url):
    for content in (b"{not json", b"[1, 2]"):
        response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "the request body" in response.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no route GET /v1/nothing"


def test_the_api_key_guards_every_v1_route(sampler, checkpoints):
    import openai

    with server(sampler, checkpoints["pretrain"], api_key="s3cret") as url:
        for method, route in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = httpx.request(method, f"{url}{route}", json={"prompt": "a"}, headers=headers)
                assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", route
        assert httpx.get(f"{url}/health").json()["auth"] is True  # open, as load balancers poll it
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        text = client(url, "s3cret").completions.create(model="model_00007.pt", prompt="Hi", max_tokens=3, temperature=0)
        assert text.choices[0].text


def test_listening_beyond_localhost_needs_a_key(runner, checkpoints):
    result = runner.invoke(app, ["serve", str(checkpoints["pretrain"]), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: --api-key: required to listen on 0.0.0.0")
    for args, message in ((["--port", "70000"], "--port: must be between 0"), (["--max-batch", "0"], "--max-batch"),
                          (["--api-key", " "], "--api-key: must not be empty")):
        result = runner.invoke(app, ["serve", str(checkpoints["pretrain"]), *args])
        assert result.exit_code == 2 and result.stderr.startswith(f"Error: {message}"), result.stderr


def test_help_imports_neither_torch_nor_the_web_stack(gptctl_home):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gptctl", "serve", "--help"], capture_output=True,
                          text=True, env={**os.environ, "GPTCTL_HOME": str(gptctl_home)})
    assert proc.returncode == 0 and "--api-key" in proc.stdout, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = {"torch", "numpy", "tiktoken", "fastapi", "uvicorn", "starlette", "openai"}
    assert not imported & heavy, imported & heavy


# --- the chat page --------------------------------------------------------------------------------------

def test_the_page_is_one_self_contained_file(url):
    from importlib.resources import files

    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == files("gptctl.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # the browser loads nothing from elsewhere
    lowered = page.text.lower()
    assert "http://" not in lowered and "https://" not in lowered and 'src="//' not in lowered and "<link" not in lowered
    for control in ("message", "temperature", "max-tokens", "system", "api-key"):
        assert f'<label for="{control}">' in page.text  # every control has a label


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_page_streams_a_reply_and_stops_one_with_the_keyboard(sampler, checkpoints):
    """In headless Chromium: type a message, Shift+Enter for a new line, Enter sends; the reply streams in
    and equals the API's; Escape stops a reply; focus returns to the message box."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium for the page's browser test: scripts/setup.sh installs it (apt-get install chromium)")
        pytest.skip("no chromium on PATH (scripts/setup.sh installs it as root)")
    gate = Gate(sampler.model)
    with server(sampler, checkpoints["pretrain"], gate=gate) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("body[data-state=idle]")
            assert "model_00007.pt" in page.text_content("#model")
            page.click("#settings summary")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.focus("#message")
            page.keyboard.type("Name a colour.")
            page.keyboard.press("Shift+Enter")
            page.keyboard.type("Quickly.")
            page.keyboard.press("Enter")
            page.wait_for_selector("body[data-state=idle]", timeout=30000)
            reply = page.text_content("article.assistant .text")
            expected = client(url).chat.completions.create(
                model="model_00007.pt", messages=[{"role": "user", "content": "Name a colour.\nQuickly."}], max_tokens=12, temperature=0)
            assert reply == expected.choices[0].message.content and reply
            assert page.text_content("article.user .text") == "Name a colour.\nQuickly."
            assert page.text_content("article.assistant .who") == "Model model_00007.pt"
            assert page.evaluate("document.activeElement.id") == "message" and page.input_value("#message") == ""

            gate.open.clear()  # the next reply waits in the model: Escape stops it
            page.keyboard.type("And another?")
            page.keyboard.press("Enter")
            page.wait_for_selector("body[data-state=replying]")
            page.keyboard.press("Escape")
            page.wait_for_selector("body[data-state=idle]")
            assert page.text_content("article.assistant:last-of-type .text").endswith("[stopped]")
            assert page.text_content("#status") == "Stopped." and page.evaluate("document.activeElement.id") == "message"
            gate.open.set()
            wait_for(url, lambda s: s["jobs_cancelled"] == 1 and s["rows"] == 0)  # the server let it go
        finally:
            browser.close()


# --- a real `gptctl serve` ------------------------------------------------------------------------------

def leases(home: Path) -> list:
    with sqlite3.connect(home / "gptctl.db") as conn:
        return conn.execute("select path, pid from checkpoint_leases").fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_gptctl_serve_names_its_run_holds_a_lease_and_stops_cleanly(trained_run, signum):
    home, run_id = trained_run
    proc = subprocess.Popen([sys.executable, "-m", "gptctl", "serve", "shared", "--port", "0"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "GPTCTL_HOME": str(home)})
    try:
        lines = []
        while not lines or not lines[-1].startswith("Ctrl-C"):
            line = proc.stdout.readline()
            assert line, f"gptctl serve ended: {proc.stderr.read()}"
            lines.append(line.strip())
        assert lines[0].startswith("serving shared:8: pretrain model, step 8")
        assert lines[1].startswith("API:  http://127.0.0.1:") and "model 'shared:8'" in lines[1]
        page = lines[2].removeprefix("chat: ")
        api = client(page.rstrip("/"))
        assert [m.id for m in api.models.list().data] == ["shared:8"]
        assert api.completions.create(model="shared", prompt="ROMEO:", max_tokens=5, temperature=0).model == "shared:8"
        assert api.completions.create(model=run_id, prompt="ROMEO:", max_tokens=5).choices[0].text is not None
        assert [pid for _, pid in leases(home)] == [proc.pid]  # the checkpoint is leased while it serves
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"stopped ({signal.Signals(signum).name})" in err and "Traceback" not in err
    assert leases(home) == []


def test_a_stop_signal_while_the_lease_renewal_starts_waits_for_it(tmp_path, monkeypatch):
    """`gptctl serve` starts its lease-renewal thread just after saying "Ctrl-C stops.": a SIGTERM (or
    SIGINT) arriving inside Thread.start() left threading's books half kept, and the exit printed a
    KeyError traceback (8 of 12 tries). The signal is held until the thread has started, then handled
    (here, in a process with other threads, as serve's has: any of them may receive it)."""
    from gptctl.serve.server import keep_leased

    seen = []
    real_start = threading.Thread.start

    def start(thread):
        os.kill(os.getpid(), signal.SIGTERM)  # the signal, in the middle of the start
        time.sleep(0.2)  # time for its handler to run here
        real_start(thread)
        seen.append("started")

    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("handled"))
    try:
        monkeypatch.setattr(threading.Thread, "start", start)
        keep_leased(tmp_path)
        wait_until(lambda: "handled" in seen, "the held SIGTERM to be handled", timeout=10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["started", "handled"]


SLOW_SERVE = """
import time
from gptctl.engine.model import GPT
forward = GPT.forward
GPT.forward = lambda self, *args, **kwargs: time.sleep(0.05) or forward(self, *args, **kwargs)  # a slow device
from gptctl.cli import main
main()
"""


def signalled_while_streaming(checkpoint, *signums: int) -> tuple[list[str], int, str]:
    """A slowed `gptctl serve` sent `signums` (10 ms apart) once a streamed reply has its first token: the
    stream's lines, and the server's exit code and stderr."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "serve", str(checkpoint), "--port", "0"],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = ""
        while not line.startswith("  chat: "):
            line = proc.stdout.readline()
            assert line, f"gptctl serve ended: {proc.stderr.read()}"
        url = line.removeprefix("  chat: ").strip().rstrip("/")
        body = {"prompt": "Hello", "max_tokens": BLOCK, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events = [next(lines)]  # the first token: the reply is being generated
            for i, signum in enumerate(signums):
                time.sleep(0.01 if i else 0)
                proc.send_signal(signum)
            events += list(lines)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return events, proc.returncode, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_gptctl_serve_stops_at_once_failing_the_replies_in_flight(checkpoints, signum):
    """A signal while a reply streams: the reply ends at once with the server's 503, rather than the
    server generating on for up to GRACE seconds before it stops; and it stops cleanly."""
    events, code, err = signalled_while_streaming(checkpoints["pretrain"], signum)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    assert chunks[-1] == {"error": {"message": "the server is shutting down", "type": "server_error", "param": None,
                                    "code": None}}, chunks[-1]
    assert len(chunks) < BLOCK // 2 and [e for e in events if e][-1] == "data: [DONE]"
    assert code == 0, err
    assert f"stopped ({signal.Signals(signum).name})" in err and "Traceback" not in err


def test_gptctl_serve_stops_cleanly_on_two_quick_ctrl_cs(checkpoints):
    """A second Ctrl-C while the server stops is uvicorn's force quit, which skipped the application's
    lifespan end: asyncio cancelled it and uvicorn logged an ERROR traceback. It stops as after one."""
    _, code, err = signalled_while_streaming(checkpoints["pretrain"], signal.SIGINT, signal.SIGINT)
    assert code == 0, err
    assert "stopped (SIGINT)" in err and "Traceback" not in err and "ERROR" not in err, err


def test_break_test_faults_of_the_server(tmp_path):
    """A near-zero temperature is greedy, not a NaN softmax that fails every request in flight; a batch
    larger than the queue is a 400 on prompt, not an endless 503; a chat message that cannot fit beside
    max_tokens is a 400 on messages, not a front-cropped prompt; temperature true is a 400."""
    import torch

    from gptctl.engine.generate import Sampling, sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for temperature in (1e-300, 1e-45):
        assert sample_next(logits, Sampling(temperature=temperature, top_k=None, top_p=1.0), None).tolist() == [1, 0]
