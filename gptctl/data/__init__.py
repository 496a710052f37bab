"""Tokenized datasets: `prepare` writes uint16 .npy shards plus manifest.json; `shards` finds and memmaps them.

Kept import-light on purpose: the training engine imports `gptctl.data.shards` (numpy only), and
nothing here pulls in tiktoken or pyarrow until `prepare` actually runs.
"""
