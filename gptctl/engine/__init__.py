"""The training engine: the only package that imports torch. Runs inside torchrun workers."""
