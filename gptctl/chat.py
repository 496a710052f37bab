"""A chat with a model, as `gptctl chat` holds it: the conversation so far, the prompt each reply continues,
and what each typed line asks for. No terminal here (the CLI reads lines and prints what this returns) and
no torch (the model is an engine.sample.Sampler, passed in)."""

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from gptctl.errors import UserError
from gptctl.prompt import Turn, fit_conversation, format_conversation

# How prompt.py's template starts an exchange: a finetuned model that goes on past its reply writes the
# user's next instruction, so a reply ends before it.
NEXT_TURN = "### Instruction:"
COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation",
    "/exit": "leave the chat (so do Ctrl-D, and Ctrl-C at the prompt)",
}
_COMMAND_LIKE = re.compile(r"^/\w+$")


class MessageTooLong(Exception):
    """The newest message alone, in the template, takes more than the prompt's budget."""

    def __init__(self, tokens: int):
        super().__init__(tokens)
        self.tokens = tokens


class Conversation:
    """The exchanges so far of a chat with a finetuned model, and the prompt that asks for the next reply.

    The prompt is prompt.py's multi-turn template. Earlier exchanges stay in it while it fits `budget`
    tokens; the oldest are dropped first, for good (the model does not see them again).
    """

    def __init__(self, encode: Callable[[str], list[int]], budget: int, system: str | None = None):
        self.encode, self.budget, self.system = encode, budget, system
        self.turns: list[Turn] = []

    def prompt(self, message: str) -> tuple[list[int], int]:
        """The tokens a reply to `message` continues, and how many of the oldest exchanges were dropped for them.
        Raises MessageTooLong, the conversation unchanged, when the message alone does not fit."""
        kept, dropped = fit_conversation([*self.turns, Turn(message)], self.system, self.encode, self.budget)
        tokens = self.encode(format_conversation(kept, self.system))
        if len(tokens) > self.budget:
            raise MessageTooLong(len(tokens))
        self.turns = kept[:-1]
        return tokens, dropped

    def add(self, message: str, reply: str) -> None:
        self.turns.append(Turn(message, reply))

    def reset(self) -> None:
        self.turns = []


class Reply:
    """The model's reply as it streams: iterate for its text. Once it ends, or is stopped early (finish()),
    `record` gets what was said so far."""

    def __init__(self, pieces: Iterable[str], record: Callable[[str], None], notice: str | None = None):
        self._pieces, self._record, self.notice = pieces, record, notice
        self._said: list[str] = []
        self._finished = False

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._pieces:
                self._said.append(piece)
                yield piece
        finally:
            self.finish()

    @property
    def text(self) -> str:
        return "".join(self._said)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._record(self.text)


class Chat:
    """A chat with the model of a Sampler: a conversation in the finetuning template for a finetuned model,
    each message a text to continue for a pretrained one. Every reply is drawn with `seed`, so the same
    conversation gets the same replies, and a first reply is what `gptctl sample` gives for the message."""

    def __init__(self, sampler, max_new_tokens: int, sampling, seed: int, system: str | None = None):
        self.sampler, self.max_new_tokens, self.seed = sampler, max_new_tokens, seed
        self.finetuned = sampler.finetuned
        self.block_size = sampler.block_size
        if not self.finetuned:
            if system is not None:
                raise UserError("--system: only for a finetuned model; this one is pretrained and continues text; "
                                "leave out --system")
            self.sampling, self.conversation = sampling, None
            return
        self.sampling = replace(sampling, stop=(*sampling.stop, NEXT_TURN))
        # Room for the reply beside the prompt: its --max-new-tokens, but at most half the context (a longer
        # reply slides the context along, as any generation past it does).
        self.reply_room = min(max_new_tokens, self.block_size // 2)
        self.conversation = Conversation(sampler.enc.encode_ordinary, self.block_size - self.reply_room, system)
        try:
            self.conversation.prompt("")
        except MessageTooLong as exc:
            option, fix = ("--system", "shorten --system or ") if system else ("--max-new-tokens", "")
            raise UserError(f"{option}: the template takes {exc.tokens} tokens with no message, and {self._room()}; "
                            f"{fix}lower --max-new-tokens") from None

    def intro(self) -> str:
        if self.finetuned:
            what = (f"a finetuned model: each message is an instruction; the conversation is kept while it fits the "
                    f"{self.block_size}-token context")
        else:
            what = "a pretrained model: each message is a text to continue (no conversation is kept)"
        return f"{what}. Commands: {', '.join(COMMANDS)}; Ctrl-C stops a reply."

    @staticmethod
    def help() -> str:
        return "\n".join(f"{command:<8}{what}" for command, what in COMMANDS.items()) + "\nCtrl-C  stop a reply"

    def handle(self, line: str) -> "Reply | str | None":
        """What a typed line asks for: a Reply to stream, a line to show the user ("" for none), or None to leave."""
        command = line.strip()
        if command == "/exit":
            return None
        if command == "/help":
            return self.help()
        if command == "/reset":
            self.reset()
            return "forgot the conversation"
        if _COMMAND_LIKE.match(command):
            return f"unknown command {command}; /help lists the commands"
        if not command:
            return ""
        return self.reply(line)

    def reset(self) -> None:
        if self.conversation is not None:
            self.conversation.reset()

    def reply(self, message: str) -> "Reply | str":
        """The model's reply to `message`, or why there is none (the chat goes on)."""
        if not self.finetuned:
            tokens = self.sampler.encode(prompt=message)
            return Reply(self._generate(tokens), lambda text: None, self.sampler.cropped(tokens))
        try:
            tokens, dropped = self.conversation.prompt(message)
        except MessageTooLong as exc:
            return (f"that message does not fit: it takes {exc.tokens} tokens in the template, and {self._room()}; "
                    "shorten it, or lower --max-new-tokens")
        notice = None
        if dropped:
            exchanges = "oldest exchange" if dropped == 1 else f"{dropped} oldest exchanges"
            notice = f"dropped the {exchanges} to fit the {self.block_size}-token context"
        return Reply(self._generate(tokens), lambda text: self.conversation.add(message, text), notice)

    def _room(self) -> str:
        return (f"the {self.block_size}-token context holds {self.conversation.budget} beside the reply's "
                f"{self.reply_room}")

    def _generate(self, tokens: list[int]) -> Iterator[str]:
        (completion,) = self.sampler.samples(tokens, 1, self.max_new_tokens, self.sampling, self.seed)
        return iter(completion)
