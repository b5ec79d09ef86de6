"""The host allocator setting the ranks run with: a step's freed memory serves the next step."""

import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from cfp.allocator import keep_freed_host_memory
    assert keep_freed_host_memory()
def step():  # ten 8 MB tensors, all freed when it returns, as a training step's activations are
    kept = [torch.ones(2 * 2**20) for _ in range(10)]
    return float(sum(t.sum() for t in kept))
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_host_memory_is_not_paged_in_again_each_step():
    plain, kept = _page_faults("plain"), _page_faults("keep")
    assert kept < plain / 4, (plain, kept)
