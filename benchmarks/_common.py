"""What the benchmarks share: the CLI as a subprocess, a prepared data root, the machine, tables.

Light on purpose (no torch, numpy or tiktoken at import): cli_latency.py and registry_metrics.py
use it too, and must not pay for imports they do not measure.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
DATE = time.strftime("%Y-%m-%d")


def cli_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "GPTCTL_HOME": str(home)}
    env.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "tiktoken"))  # offline BPE file
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def gptctl_command() -> list[str]:
    """The installed console script, as a user types `gptctl` (python -m gptctl if there is none)."""
    script = Path(sys.executable).parent / "gptctl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gptctl"]


def gptctl(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*gptctl_command(), *args], env={**cli_env(home), **(env or {})}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gptctl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def scratch_dir(parent: Path | None = None):
    """A temporary directory for registries, data and checkpoints (on `parent`'s disk when given)."""
    with tempfile.TemporaryDirectory(prefix="gptctl-bench-", dir=parent) as path:
        yield Path(path)


def prepare_shakespeare(workdir: Path, data_root: Path | None = None) -> Path:
    """Tiny Shakespeare tokenized by `gptctl data prepare` (or an already prepared `data_root`)."""
    if data_root is not None:
        return data_root
    root = workdir / "shakespeare"
    gptctl("data", "prepare", "--input", str(SHAKESPEARE), "--data-root", str(root), home=workdir / "home")
    return root


def machine() -> str:
    """CPU count and the load average at the start: the machine may be shared with other work."""
    return f"{os.cpu_count()} CPU cores, load average {load_average()} (1/5/15 min) at start"


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def median(values) -> float:
    return statistics.median(values)


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_header(name: str, command: str) -> None:
    print(f"{name} — {DATE} — {machine()}")
    print(f"command: {command}")


def print_footer() -> None:
    print(f"\nload average at end: {load_average()} (1/5/15 min)")
