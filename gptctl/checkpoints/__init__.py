"""Checkpoints: the file format (files.py), where the files live (directory.py), the store over the
registry (store.py: the newest good checkpoint, verify, register, reconcile) and retention.py.

Importing this package loads no torch: files.py imports it only when a file is written or read.
"""

# Before any module here imports sqlite-utils: the registry's import of it leaves pandas and numpy out.
import gptctl.registry  # noqa: E402,F401
