"""Injected faults for the hardening tests: a tiny model whose one op exits, raises or sleeps on one rank.

``tests/faults.py:build`` is a model spec. ``fault`` picks what the op ``cfp_test::fault`` does on rank
``rank`` once a process group exists (so analysis, which runs on meta tensors, never triggers it):
``exit`` (``os._exit(1)``), ``raise`` (a RuntimeError whose text holds rich markup), ``sleep`` (an hour);
``startup`` makes the factory itself sleep in worker ``cfp-rank<rank>`` (a hang while the pool starts).
``touch`` names a file the faulty rank creates just before the fault, so a test knows it has been reached.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

if not hasattr(torch.ops.cfp_test, "fault"):  # this file may be imported twice (by pytest and as a model spec)

    @torch.library.custom_op("cfp_test::fault", mutates_args=())
    def _fault(x: torch.Tensor, kind: str, rank: int, touch: str) -> torch.Tensor:
        if kind != "none" and dist.is_initialized() and dist.get_rank() == rank:
            if touch:
                open(touch, "w").close()
            if kind == "exit":
                os._exit(1)
            if kind == "raise":
                raise RuntimeError("injected failure [/bar] in the op")
            if kind == "sleep":
                time.sleep(3600)
        return x.clone()

    @_fault.register_fake
    def _(x, kind, rank, touch):
        return torch.empty_like(x)

    _fault.register_autograd(lambda ctx, grad: (grad, None, None, None))


class FaultyMLP(nn.Module):
    def __init__(self, width: int, fault: str, rank: int, touch: str):
        super().__init__()
        self.up, self.down = nn.Linear(width, width), nn.Linear(width, width)
        self.fault, self.rank, self.touch = fault, rank, touch

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        # In the second block, so that the first block's jobs are measured (and must be kept) before the fault.
        return torch.ops.cfp_test.fault(h, self.fault, self.rank, self.touch).pow(2).mean()


def build(batch: int = 4, width: int = 8, fault: str = "none", rank: int = 1, touch: str = "", device: str = "cpu"):
    if fault == "startup" and multiprocessing.current_process().name == f"cfp-rank{rank}":
        if touch:
            open(touch, "w").close()
        time.sleep(3600)
    torch.manual_seed(0)
    with torch.device(device):
        model = FaultyMLP(width, fault if fault != "startup" else "none", rank, touch)
        x = torch.randn(batch, width)
    return model, (x,)


# -- running the command and finding what it left behind -------------------------------------------------------------


def survivors(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``CFP_TEST_MARKER=<marker>`` (a run's descendants inherit it)."""
    found = []
    needle = f"CFP_TEST_MARKER={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as s:
                        if s.read().rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has exited already
                            found.append(int(entry))
        except OSError:
            continue
    return found


def wait_for_no_survivors(marker: str, within_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := survivors(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def cfp_env(marker: str, **extra) -> dict:
    env = {**os.environ, "CFP_TEST_MARKER": marker, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    return env


@contextlib.contextmanager
def read_only(path):
    """``path`` read-only for this process: by permissions, or (as root, whom permissions do not stop)
    a read-only bind mount."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if (
        subprocess.run(
            ["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("cannot make a read-only directory here (root without mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:
            h = h * 2
        return h.mean()


def build_untraceable(batch: int = 2, device: str = "cpu"):
    with torch.device(device):
        return Branchy(), (torch.randn(batch, 4),)
