"""The FastAPI application: OpenAI's /v1/models, /v1/completions and /v1/chat/completions over a
Batcher, /health, vLLM's /tokenizer_info, /tokenize and /detokenize (lm-evaluation-harness finds its
tokenizer there), and the chat page at /.

Requests are checked (protocol.py) before they queue; every error is OpenAI's JSON shape, FastAPI's
422 for a malformed body included (400 here, naming the field). A full queue is 503 with Retry-After
(the server is briefly at capacity; OpenAI's own clients retry 503 and 429 alike).
"""

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptctl.data.tokenizer import EOT_TOKEN
from gptctl.engine.batch import Batcher, Busy, Failed, Finished, Job, PromptScores, TokenEvent
from gptctl.engine.generate import Sampling
from gptctl.serve import protocol
from gptctl.serve.protocol import (CHAT_MAX_TOKENS, COMPLETION_MAX_TOKENS, ApiError, ChatRequest, CompletionRequest,
                                   ModelInfo, bad, error_body, token_str)

log = logging.getLogger("gptctl.serve")
MODEL_HEADER = "x-gptctl-model"  # on every response: which run and step answers
PAGE_POLICY = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:"
GONE_POLL_S = 0.1  # how often a whole (not streamed) response asks whether its client is still there


def create_app(batcher: Batcher, model: ModelInfo, enc, api_key: str | None = None) -> FastAPI:
    """The application over a Batcher that it starts and stops with itself (its lifespan)."""

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)

    app = FastAPI(title="gptctl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Gate, api_key=api_key, model_id=model.id)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return _validation_error(exc.errors())

    @app.exception_handler(_ClientGone)
    async def gone(request, exc: _ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, code=str(exc.status_code)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = files("gptctl.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.id, "auth": api_key is not None, "batch": batcher.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model.card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        model.check(name)
        return model.card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        decoding = protocol.decoding(req, COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
                                     model, batcher.max_rows)
        prompts = protocol.prompts(req.prompt, enc)
        if len(prompts) > batcher.max_waiting:  # would be refused however long one waits
            raise bad("prompt", f"{len(prompts)} prompts are more than the server queues at once "
                      f"({batcher.max_waiting}, its --max-queue); send fewer per request")
        scoring = req.echo and req.logprobs is not None
        for i, prompt in enumerate(prompts):
            if scoring and len(prompt) > model.block_size:
                raise bad("prompt" if len(prompts) == 1 else f"prompt[{i}]",
                          f"{len(prompt)} tokens; echo with logprobs scores at most the model's context of "
                          f"{model.block_size} tokens", code="context_length_exceeded")
        call = _Call(batcher, decoding, prompts, req.logprobs, scoring)
        shape = _Completion(call, enc, model.id, req.echo, req.logprobs)
        if req.stream:
            return _sse(shape.chunks())
        return await _unless_gone(request, shape.whole())

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = min(CHAT_MAX_TOKENS, model.block_size // 2) if asked is None else asked  # room for the prompt
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        decoding = protocol.decoding(req, max_tokens, model, batcher.max_rows, least=1, param=param)
        turns, system = protocol.conversation(req.messages)
        prompt, dropped = protocol.chat_prompt(turns, system, enc, model.block_size - max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        shape = _Chat(_Call(batcher, decoding, [prompt], top, False), enc, model.id)
        headers = {"x-gptctl-dropped-turns": str(dropped)} if dropped else None
        if req.stream:
            return _sse(shape.chunks(), headers)
        return JSONResponse(await _unless_gone(request, shape.whole()), headers=headers)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": "tiktoken:gpt2", "eos_token": "<|endoftext|>", "bos_token": None,
                "pad_token": None, "model_max_length": model.block_size, "max_model_len": model.block_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _object(request)
        if not isinstance(body.get("prompt"), str):
            raise bad("prompt", "must be a string")
        tokens = enc.encode(body["prompt"], allowed_special={"<|endoftext|>"})
        return {"tokens": tokens, "count": len(tokens), "max_model_len": model.block_size}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _object(request)
        tokens = body.get("tokens")
        if not protocol._is_tokens(tokens) or not all(0 <= t < enc.n_vocab for t in tokens):
            raise bad("tokens", f"must be a list of token ids between 0 and {enc.n_vocab - 1}")
        return {"prompt": enc.decode(tokens)}

    return app


async def _object(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _validation_error(errors) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400: the first problem, its field named."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("the request body is not valid JSON"), 400)
    if not loc:
        return JSONResponse(error_body("the request body must be a JSON object"), 400)
    param = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    message = "missing" if first.get("type") == "missing" else first.get("msg", "invalid")
    return JSONResponse(error_body(f"{param}: {message}", param=param), 400)


class _Gate:
    """ASGI middleware: the bearer key on every /v1 route (when the server has one), and the model header."""

    def __init__(self, app, api_key: str | None, model_id: str):
        self.app, self.api_key, self.header = app, api_key, (MODEL_HEADER.encode(), model_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                message = ("missing API key: send the header Authorization: Bearer KEY (the server's --api-key)"
                           if not given else "wrong API key: send the server's --api-key as Authorization: Bearer KEY")
                response = JSONResponse(error_body(message, code="invalid_api_key"), 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)

        async def send_with_model(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_model)


class _ClientGone(Exception):
    """The client of a whole response closed its connection before the answer."""


async def _unless_gone(request: Request, answer: Awaitable[dict]) -> dict:
    """A whole response's answer, cancelled (and its jobs with it) once its client goes away: Starlette
    listens for that beside a stream, but a whole response learns it only by asking; else its jobs would
    hold their rows to max_tokens for nobody."""
    task = asyncio.ensure_future(answer)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=GONE_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise _ClientGone()
        return task.result()
    finally:
        task.cancel()  # its _Call.events ends: the jobs are cancelled


def _sse(chunks: AsyncIterator[dict], headers: dict | None = None) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **(headers or {})})


@dataclass
class _Choice:
    """One sample as it arrives."""

    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list = field(default_factory=list)
    finish: str | None = None
    count: int = 0

    def add(self, event) -> None:
        if isinstance(event, TokenEvent):
            self.text.append(event.text)
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.top.append(event.top)
        elif isinstance(event, Finished):
            self.finish, self.count = event.reason, event.tokens


class _Call:
    """One HTTP request's jobs (one per prompt, n samples each) in the batcher, and their events, which
    the worker thread hands to this request's event loop."""

    def __init__(self, batcher: Batcher, d: protocol.Decoding, prompts: list[list[int]], logprobs: int | None,
                 score: bool):
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.n, self.prompts = d.n, prompts
        sampling = Sampling(d.temperature, d.top_k, d.top_p, d.stop)
        self.jobs = [Job(prompt, d.max_tokens, sampling, self._emitter(j), d.n, d.seed, logprobs, score)
                     for j, prompt in enumerate(prompts)]
        self.choices = [[_Choice() for _ in range(d.n)] for _ in prompts]
        self.scores: list[PromptScores | None] = [None] * len(prompts)
        self.id, self.created = f"{uuid.uuid4().hex}", int(time.time())
        try:
            batcher.submit(self.jobs)
        except Busy as exc:
            raise ApiError(503, str(exc), type="server_error", code="queue_full", headers={"Retry-After": "1"}) from None

    def _emitter(self, j: int):
        def emit(event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (j, event))
            except RuntimeError:  # the event loop is closed: nobody is listening
                pass
        return emit

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    async def events(self) -> AsyncIterator[tuple[int, object]]:
        """(prompt index, event) until every sample has finished; a failure raises ApiError."""
        left = len(self.jobs) * self.n
        try:
            while left:
                j, event = await self.queue.get()
                if isinstance(event, Failed):
                    raise ApiError(event.status, event.message, type="server_error")
                if isinstance(event, PromptScores):
                    self.scores[j] = event
                elif isinstance(event, (TokenEvent, Finished)):
                    self.choices[j][event.sample].add(event)
                    left -= isinstance(event, Finished)
                yield j, event
        finally:  # the client went away, or all is done: either way nothing more is wanted
            self.cancel()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.count for row in self.choices for c in row)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _failed_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """A failure after the 200 went out: said as an error event in the stream."""
    try:
        async for chunk in chunks:
            yield chunk
    except ApiError as exc:
        yield exc.body()


class _Completion:
    """/v1/completions' response, whole or as chunks."""

    def __init__(self, call: _Call, enc, model_id: str, echo: bool, logprobs: int | None):
        self.call, self.enc, self.model_id, self.echo, self.logprobs = call, enc, model_id, echo, logprobs

    def _head(self) -> dict:
        return {"id": f"cmpl-{self.call.id}", "object": "text_completion", "created": self.call.created,
                "model": self.model_id}

    def _logprobs(self, tokens, logprobs, top, offset: int) -> dict:
        strings = [token_str(self.enc, t) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s) if not s.startswith("bytes:") else 1
        return {"tokens": strings, "token_logprobs": logprobs, "text_offset": offsets,
                "top_logprobs": [None if t is None else {token_str(self.enc, tok): lp for tok, lp in t} for t in top]}

    def _echo(self, j: int) -> tuple[str, dict | None]:
        prompt = self.call.prompts[j]
        text = self.enc.decode(prompt)
        if self.logprobs is None:
            return text, None
        scores = self.call.scores[j]
        return text, self._logprobs(prompt, scores.logprobs, scores.top, 0)

    async def whole(self) -> dict:
        async for _ in self.call.events():
            pass
        choices = []
        for j, row in enumerate(self.call.choices):
            for s, c in enumerate(row):
                head, head_lp = self._echo(j) if self.echo else ("", None)
                logprobs = None
                if self.logprobs is not None:
                    offset = len(head) if self.echo else len(self.enc.decode(self.call.prompts[j]))
                    logprobs = self._logprobs(c.tokens, c.logprobs, c.top, offset)
                    if head_lp:
                        logprobs = {k: head_lp[k] + logprobs[k] for k in logprobs}
                choices.append({"index": j * self.call.n + s, "text": head + "".join(c.text), "logprobs": logprobs,
                                "finish_reason": c.finish})
        return {**self._head(), "choices": choices, "usage": self.call.usage()}

    def _chunk(self, index: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {**self._head(), "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                              "finish_reason": finish}]}

    async def chunks(self) -> AsyncIterator[dict]:
        async for chunk in _failed_stream(self._chunks()):
            yield chunk

    async def _chunks(self) -> AsyncIterator[dict]:
        n = self.call.n
        if self.echo and self.logprobs is None:
            for j in range(len(self.call.prompts)):
                for s in range(n):
                    yield self._chunk(j * n + s, self._echo(j)[0])
        async for j, event in self.call.events():
            if isinstance(event, PromptScores) and self.echo:
                text, logprobs = self._echo(j)
                for s in range(n):
                    yield self._chunk(j * n + s, text, logprobs)
            elif isinstance(event, TokenEvent) and (event.text or self.logprobs is not None):
                logprobs = None
                if self.logprobs is not None:
                    logprobs = self._logprobs([event.token], [event.logprob], [event.top], 0)
                yield self._chunk(j * n + event.sample, event.text, logprobs)
            elif isinstance(event, Finished):
                yield self._chunk(j * n + event.sample, "", None, event.reason)


class _Chat:
    """/v1/chat/completions' response, whole or as chunks."""

    def __init__(self, call: _Call, enc, model_id: str):
        self.call, self.enc, self.model_id = call, enc, model_id

    def _head(self, chunk: bool) -> dict:
        return {"id": f"chatcmpl-{self.call.id}", "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": self.call.created, "model": self.model_id}

    def _logprobs(self, tokens, logprobs, top) -> dict | None:
        if self.call.jobs[0].logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            return {"token": token_str(self.enc, token), "logprob": logprob,
                    "bytes": list(self.enc.decode_single_token_bytes(token))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in (alternatives or [])]}
                            for t, lp, alternatives in zip(tokens, logprobs, top) if t != EOT_TOKEN]}

    async def whole(self) -> dict:
        async for _ in self.call.events():
            pass
        choices = [{"index": s, "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": self._logprobs(c.tokens, c.logprobs, c.top), "finish_reason": c.finish}
                   for s, c in enumerate(self.call.choices[0])]
        return {**self._head(False), "choices": choices, "usage": self.call.usage()}

    def _chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        return {**self._head(True), "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": finish}]}

    async def chunks(self) -> AsyncIterator[dict]:
        async for chunk in _failed_stream(self._chunks()):
            yield chunk

    async def _chunks(self) -> AsyncIterator[dict]:
        for s in range(self.call.n):
            yield self._chunk(s, {"role": "assistant", "content": ""})
        async for _, event in self.call.events():
            if isinstance(event, TokenEvent):
                logprobs = self._logprobs([event.token], [event.logprob], [event.top])
                if event.text or (logprobs and logprobs["content"]):
                    yield self._chunk(event.sample, {"content": event.text}, logprobs)
            elif isinstance(event, Finished):
                yield self._chunk(event.sample, {}, None, event.reason)
