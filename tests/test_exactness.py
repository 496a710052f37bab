"""Exactness under load (issue 27): the same computation gives the same bits while other processes
keep every core busy. Two fresh processes, started as gptctl's worker starts (thread pools and MKL's
CNR mode pinned before torch loads, then `pin_numerics`), each build the real Trainer four times and
train 2 steps with the default thread count (what users get), half of them with prefetch threads;
meanwhile the other process and two busy-looping ones compete for the cores. Every one of the eight
gives the same losses, grad norms and gradients to the bit, and MKL says it ran every call in CNR mode
with dynamic threads off. benchmarks/exactness.py is the longer
version (more repetitions, more conditions, whole `gptctl pretrain` runs)."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY_SETTINGS

pytestmark = pytest.mark.slow

REPS = 4  # per process: two processes, 8 repetitions (a 1-in-3 fault leaves all 8 alike with probability (2/3)^8 + (1/3)^8 < 5%)
BUSY_S = 90  # a busy process ends by itself after this, should the test's cleanup never run

# The worker's start-up, then REPS Trainers in a row: each a fresh model, fresh loaders, fresh allocations.
PROBE = """
import hashlib, json, sys
from gptctl.engine.startup import pin_thread_pools
pin_thread_pools()  # as the worker does before torch loads
import torch
from gptctl.engine.distributed import Dist
from gptctl.engine.trainer import Trainer
from gptctl.engine.worker import pin_numerics
from gptctl.settings import TrainSettings
pin_numerics(deterministic=False)
settings, reps = json.loads(sys.argv[1]), int(sys.argv[2])
out = []
for rep in range(reps):
    s = TrainSettings(**{**settings, "num_workers": 2 * (rep % 2)})  # odd ones read through prefetch threads
    trainer = Trainer(s, Dist(0, 0, 1, torch.device("cpu")))
    rows = []
    for _ in range(2):
        row, _ = trainer.train_step()
        digest = hashlib.sha256()
        for p in trainer.raw_model.parameters():
            digest.update(p.grad.numpy().tobytes())
        rows.append([row["loss"].hex(), row["grad_norm"].hex(), digest.hexdigest()])
    out.append(rows)
print(json.dumps({"threads": torch.get_num_threads(), "runs": out}))
"""


def test_identical_steps_are_bit_identical_under_load(shakespeare):
    settings = {**TINY_SETTINGS, "data_root": str(shakespeare), "max_steps": 4}
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")}
    busy = [subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {BUSY_S}\nwhile time.time() < end: pass"])
            for _ in range(2)]
    probes = []
    try:
        time.sleep(0.5)  # the load is on before the probes start
        # The first one also has MKL say how it ran each call (one line per call on stdout).
        probes = [subprocess.Popen([sys.executable, "-c", PROBE, json.dumps(settings), str(REPS)], cwd=REPO,
                                   env={**env, **({"MKL_VERBOSE": "1"} if i == 0 else {})},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        results, outputs = [], []
        for proc in probes:
            out, err = proc.communicate(timeout=300)  # a hang, not slowness: 30 s is usual
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
            outputs.append(out)
    finally:
        for proc in busy + probes:
            proc.kill()
            proc.wait()
    assert len({r["threads"] for r in results}) == 1, results  # the same environment: the same thread count
    # Every MKL call ran in CNR mode with dynamic threads off, on the thread count torch uses.
    calls = [line for line in outputs[0].splitlines() if line.startswith("MKL_VERBOSE") and "NThr:" in line]
    assert calls, "MKL_VERBOSE printed no calls: is torch's BLAS MKL?"
    assert all(" CNR:AUTO " in c and " Dyn:0 " in c and c.endswith(f"NThr:{results[0]['threads']}") for c in calls), \
        {" ".join(w for w in c.split() if w.startswith(("CNR:", "Dyn:", "NThr:"))) for c in calls}
    runs = [run for r in results for run in r["runs"]]
    assert len(runs) == 2 * REPS
    first = runs[0]
    different = [(i, run) for i, run in enumerate(runs) if run != first]
    assert not different, (f"{len(different)} of {len(runs)} repetitions differ from the first "
                           f"([loss, grad norm, gradients sha256] per step): first {first}, others {different}")
