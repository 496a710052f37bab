"""Checkpoints: the file format (format.py), where the files live (directory.py), the store over the
registry (store.py: the newest good checkpoint, verify, register, reconcile) and retention.py.

Importing this package loads no torch: format.py imports it only when a file is written or read.
"""
