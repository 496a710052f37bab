"""The instruction prompt template: the one place finetuning and sampling agree on.

Alpaca-style, as most Dolly finetunes use. The model learns to produce the response and then
<|endoftext|>; everything up to and including the "### Response:\n" line is prompt and is masked
out of the loss.
"""

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
