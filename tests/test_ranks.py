"""The rank harness: a rank killed by a signal fails the test and says where it was."""

from __future__ import annotations

import pytest
from ranks import run_ranks


def _crash_on_rank_one(rank: int, world: int, port: int) -> None:
    if rank == 1:
        import ctypes

        ctypes.string_at(0)  # a segmentation fault


def test_a_crashed_rank_reports_its_python_stack():
    with pytest.raises(AssertionError) as failure:
        run_ranks(_crash_on_rank_one, (), timeout_s=60)
    message = str(failure.value)
    assert "exit codes [0, -11]" in message
    assert "Segmentation fault" in message and "_crash_on_rank_one" in message
