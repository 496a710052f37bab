"""The instruction prompt template: the one place finetuning and sampling agree on.

Alpaca-style, as most Dolly finetunes use. The model learns to produce the response and then
<|endoftext|>; everything up to and including the "### Response:\n" line is prompt and is masked
out of the loss.
"""

from collections.abc import Callable
from dataclasses import dataclass

HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
HEADER_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


def format_prompt(instruction: str, context: str | None = None) -> str:
    """The text the model sees before its response (ends right where the response starts)."""
    instruction, context = instruction.strip(), (context or "").strip()
    if context:
        return f"{HEADER_WITH_CONTEXT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"{HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation; `reply` is None for the turn the model is to answer."""

    user: str
    reply: str | None = None


def format_conversation(turns: list[Turn], system: str | None = None) -> str:
    """A multi-turn conversation in the finetuning template, ending where the next reply starts.

    The model was finetuned on single exchanges, so a conversation of one turn and no system
    prompt is exactly `format_prompt`'s text; earlier exchanges come before it as further
    instruction/response pairs, and a system prompt takes the header's place.
    """
    if not turns or turns[-1].reply is not None:
        raise ValueError("a conversation ends with the turn to be answered")
    parts = [(system or "").strip() or HEADER]
    for turn in turns:
        parts.append(f"### Instruction:\n{turn.user.strip()}")
        parts.append("### Response:\n" + (turn.reply.strip() if turn.reply is not None else ""))
    return "\n\n".join(parts)


def fit_conversation(
    turns: list[Turn], system: str | None, encode: Callable[[str], list[int]], budget: int
) -> tuple[list[Turn], int]:
    """Drop the oldest exchanges until the prompt takes at most `budget` tokens.

    Returns the turns kept and how many were dropped; the turn to be answered is always kept
    (the caller decides what to do when even it alone does not fit).
    """
    for dropped in range(len(turns)):
        kept = turns[dropped:]
        if len(encode(format_conversation(kept, system))) <= budget or len(kept) == 1:
            return kept, dropped
    raise ValueError("a conversation ends with the turn to be answered")
