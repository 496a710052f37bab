"""OpenAI's request and response shapes for completions and chat completions, and the checks that
turn a bad request into a 400 naming its field (ApiError) before anything reaches the model."""

import math
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from gptctl.data.tokenizer import EOT_TOKEN
from gptctl.presets import GPT2_VOCAB_SIZE
from gptctl.prompt import Turn, fit_conversation, format_conversation
from gptctl.settings import SEED_MAX

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 256  # for a chat reply without max_tokens (at most the context)
MAX_STOPS = 4  # as OpenAI
MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error said as OpenAI says it: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code=code)


@dataclass(frozen=True)
class ModelInfo:
    """What the server serves: `id` is the model name clients send (RUN:STEP), `aliases` other names it answers to."""

    id: str
    block_size: int
    step: int
    kind: str
    created: int
    aliases: frozenset[str] = field(default_factory=frozenset)

    def card(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "gptctl",
                "max_model_len": self.block_size, "step": self.step, "kind": self.kind}

    def check(self, name: str | None) -> None:
        if name is not None and name != self.id and name not in self.aliases:
            raise ApiError(400, f"model: unknown model {name!r}; this server serves {self.id!r} (GET /v1/models)",
                           "model", code="model_not_found")


# --- requests -------------------------------------------------------------------------------------------

NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Number = StrictFloat  # 1 and 0.7 (strict floats take ints), not true or "0.7"


class _Sampled(BaseModel):
    """The fields both endpoints take. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: NonNegativeInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: StrictInt | None = None  # not OpenAI's: vLLM's; None, 0 or -1 = off
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: Any = None
    seed: Annotated[StrictInt, Field(ge=0, le=SEED_MAX)] | None = None
    stream: StrictBool = False


class CompletionRequest(_Sampled):
    prompt: Any
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: StrictBool = False


class ChatRequest(_Sampled):
    messages: Any
    max_completion_tokens: NonNegativeInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None


@dataclass(frozen=True)
class Decoding:
    """What a request asks of the batcher, checked."""

    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    stop: tuple[str, ...]
    n: int
    seed: int


def decoding(req: _Sampled, max_tokens: int, model: ModelInfo, max_rows: int, least: int = 0,
             param: str = "max_tokens") -> Decoding:
    model.check(req.model)
    if not least <= max_tokens <= model.block_size:
        raise bad(param, f"must be {'at least 1 and ' if least else ''}at most the model's context of "
                         f"{model.block_size} tokens, got {max_tokens}", code="context_length_exceeded")
    if req.n > max_rows:
        raise bad("n", f"at most {max_rows} (the server's --max-batch), got {req.n}")
    top_k = req.top_k if req.top_k not in (None, 0, -1) else None
    if top_k is not None and top_k < 1:
        raise bad("top_k", f"must be at least 1 (or 0 or -1 for off), got {top_k}")
    return Decoding(max_tokens, 1.0 if req.temperature is None else req.temperature, top_k,
                    1.0 if req.top_p is None else req.top_p, stops(req.stop), req.n,
                    secrets.randbelow(SEED_MAX + 1) if req.seed is None else req.seed)


def stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) for s in values):
        raise bad("stop", "must be a string or a list of strings")
    if len(values) > MAX_STOPS:
        raise bad("stop", f"at most {MAX_STOPS} sequences, got {len(values)}")
    if "" in values:
        raise bad("stop", "a stop sequence must not be empty")
    return tuple(values)


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def prompts(value: Any, enc) -> list[list[int]]:
    """The token lists of `prompt`: text, token ids, or a list of either (a batch). Text is encoded as
    `gptctl sample --prompt` encodes it (<|endoftext|> starts a new document; empty = a new document)."""
    shape = "must be a string, a list of token ids, or a list of strings or of token-id lists (a batch)"
    if isinstance(value, str) or (_is_tokens(value) and value):
        items, batch = [value], False
    elif isinstance(value, list) and value and all(isinstance(p, str) or _is_tokens(p) for p in value):
        items, batch = value, True
    elif value is None:
        raise bad("prompt", "missing; " + shape)
    elif value == []:
        raise bad("prompt", "empty; " + shape)
    else:
        raise bad("prompt", shape)
    out = []
    for i, item in enumerate(items):
        param = f"prompt[{i}]" if batch else "prompt"
        if isinstance(item, str):
            out.append(enc.encode(item, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN])
            continue
        if not item:
            raise bad(param, "an empty list of token ids")
        if not all(0 <= t < GPT2_VOCAB_SIZE for t in item):
            raise bad(param, f"token ids must be between 0 and {GPT2_VOCAB_SIZE - 1}")
        out.append(list(item))
    return out


def conversation(value: Any) -> tuple[list[Turn], str | None]:
    """`messages` as the turns of prompt.format_conversation and its system prompt (system and developer
    messages, joined). Consecutive user messages are one turn; an assistant message answers the user's before it."""
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    turns: list[Turn] = []
    system: list[str] = []
    pending: list[str] = []  # the user's words not yet answered
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}]", "must be an object with role and content")
        role, text = message.get("role"), _content(message.get("content"), f"messages[{i}].content")
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            pending.append(text)
        elif role == "assistant":
            if not pending:
                raise bad(f"messages[{i}]", "an assistant message must follow a user message")
            turns.append(Turn("\n\n".join(pending), text))
            pending = []
        else:
            raise bad(f"messages[{i}].role", f"must be system, developer, user or assistant, got {role!r}")
    if not pending:
        raise bad("messages", "the last message must be the user's: the one the model answers")
    turns.append(Turn("\n\n".join(pending)))
    return turns, "\n\n".join(system) or None


def _content(value: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "".join(p["text"] for p in value)
    raise bad(param, "must be a string or a list of {type: text, text} parts")


def chat_prompt(turns: list[Turn], system: str | None, enc, budget: int) -> tuple[list[int], int]:
    """The conversation's tokens, encoded as finetuning encodes its prompts, the oldest exchanges dropped
    to leave room for the reply; and how many were dropped."""
    kept, dropped = fit_conversation(turns, system, enc.encode_ordinary, max(budget, 1))
    prompt = enc.encode_ordinary(format_conversation(kept, system))
    if len(prompt) > budget:  # the newest message alone: cropped, the model would lose the template
        raise bad("messages", f"the last message needs {len(prompt)} tokens in the template, and only {max(budget, 0)} "
                              "of the model's context are left beside max_tokens; shorten it or ask for fewer "
                              "max_tokens", code="context_length_exceeded")
    return prompt, dropped


# --- responses ------------------------------------------------------------------------------------------

def token_str(enc, token: int) -> str:
    """A token as OpenAI writes it in logprobs: its text, or `bytes:\\xNN…` when its bytes are not UTF-8 alone."""
    raw = enc.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

