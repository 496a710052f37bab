"""helpers.train_in_processes: what it returns is every rank's success, and any failure is told."""

import os

import pytest

import helpers
from helpers import train_in_processes


@pytest.mark.parametrize("fault, told", [
    ("raise", ["rank 1: Traceback", "ValueError: rank 1 broke"]),
    ("exit", ["rank 1: exited with code 3 without a result"]),
    ("unpicklable", ["rank 0: Traceback", "rank 1: Traceback"]),
])
def test_a_failing_rank_is_told_by_its_number(shakespeare, tmp_path, monkeypatch, fault, told):
    real = helpers._train_as

    def faulty(d, *args):
        if fault == "unpicklable":
            return lambda: None
        if d.rank == 1:
            if fault == "raise":
                raise ValueError("rank 1 broke")
            os._exit(3)
        return real(d, *args)

    monkeypatch.setattr(helpers, "_train_as", faulty)  # the forked ranks inherit it
    with pytest.raises(AssertionError) as failure:
        train_in_processes(2, shakespeare, tmp_path / "x", max_steps=4, checkpoint_interval=4)
    for text in told:
        assert text in str(failure.value), str(failure.value)
