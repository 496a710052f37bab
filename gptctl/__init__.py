"""gptctl: a control plane for nanoGPT-style GPT-2 training runs."""

__version__ = "0.1.0"
