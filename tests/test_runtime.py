"""What the lowered CPU runtime does beside the plan: host memory kept between steps, buckets reduced in place."""

import subprocess
import sys

import pytest
import torch
import torch.distributed._functional_collectives  # noqa: F401 - registers _c10d_functional

from cfp.lower import reduce_in_place

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


def _reduction(extra_reader: bool) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    bucket = graph.call_function(torch.ops.aten.cat.default, ([a, b],))
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (bucket, "sum", "0"))
    done = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
    graph.output((done, bucket) if extra_reader else (done,))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _all_reduces(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if "all_reduce" in str(n.target)]


def test_a_bucket_nothing_else_reads_is_reduced_in_place():
    assert _all_reduces(reduce_in_place(_reduction(False))) == [torch.ops._c10d_functional.all_reduce_.default]
    # a buffer the program also returns keeps its own values: the all-reduce goes to a copy
    assert _all_reduces(reduce_in_place(_reduction(True))) == [torch.ops._c10d_functional.all_reduce.default]
