"""The real backend: 2 ranks over gloo on this host."""

import multiprocessing
import os
import time

import pytest

import cfp
from cfp.mesh import parse_mesh
from cfp.profile import analyze_for_profile, profile
from cfp.profile.backends import profile_rank_init
from cfp.profile.jobs import compare_with_reference
from cfp.profile.real import WorkerFailure, WorkerPool, debug_crash, debug_hang, no_context

SPEC = cfp.ModelSpec("gpt:tiny", device="cpu", batch=2, seq=16)
MESH = parse_mesh("2")


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_no_workers(pids):
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), "worker processes left behind"
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("cfp-rank")]


@pytest.fixture(scope="module")
def graph():
    return analyze_for_profile(SPEC, MESH)


def test_block_programs_match_single_device(graph):
    """Forward exits and reduced parameter gradients equal the one-device computation, every config,
    for the lowered block programs (what profiling times) and the DTensor-interpreted ones."""
    qkv, proj, fc = (graph.blocks[graph.classes[c][0]] for c in list(graph.classes)[2:5])
    pairs = [(graph.class_of(b), p.config.name) for b in (qkv, proj, fc) for p in graph.block_strategies(b)]
    assert {"rep", "batch", "col", "row"} <= {c for _, c in pairs}
    with WorkerPool(MESH, profile_rank_init, (SPEC, MESH, "cpu")) as pool:
        results = {
            rt: pool.run(compare_with_reference, (pairs, 0, rt), "comparing with one device", 300)
            for rt in ("lowered", "interpreted")
        }
        pids = pool.pids
    _assert_no_workers(pids)
    for runtime, ranks in results.items():
        for rank_result in ranks:
            for pair, diff in rank_result.items():
                assert diff < 1e-4, (runtime, pair, diff)


@pytest.mark.parametrize("fn, timeout, match", [(debug_crash, 60, "died"), (debug_hang, 3, "did not finish")])
def test_failing_rank_is_reported_and_cleaned_up(fn, timeout, match):
    pool = WorkerPool(MESH, no_context).start()
    pids = pool.pids
    with pytest.raises(WorkerFailure, match=match) as err:
        pool.run(fn, (1,), "profiling block class abc123 config 'row'", timeout)
    assert "block class abc123 config 'row'" in str(err.value)
    _assert_no_workers(pids)


def test_real_profile_then_cached(graph, tmp_path, capfd):
    first = profile(graph, SPEC, "real", None, tmp_path, warmup=1, iters=2)
    assert first.measured == first.jobs and (first.table.rows["status"] == "ok").all()
    assert "does not support alltoall" not in capfd.readouterr().err  # DTensor's per-rank warning, said in the README
    assert set(first.table.rows["backend"]) == {"real"} and set(first.table.rows["runtime"]) == {"lowered"}
    sync = first.table.rows[first.table.rows["kind"] == "sync"]  # the ranks' skew, measured once per mesh dim
    assert list(sync["config"]) == ["mesh dim 0"] and 0 <= sync["total_s"].iloc[0] < 0.1
    assert first.table.sync_s(0) == sync["total_s"].iloc[0]
    again = profile(graph, SPEC, "real", None, tmp_path, warmup=1, iters=2)
    assert again.measured == 0 and again.cached == first.jobs


def _reshard_on_ranks(ctx) -> dict:
    """Shard(i) -> Shard(j) of uneven tensors on this rank: exact, and by which collectives."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from cfp.collectives import use_gloo_all_to_all
    from cfp.mesh import device_mesh

    use_gloo_all_to_all()
    mesh = device_mesh(MESH)
    full = torch.arange(5 * 7 * 3, dtype=torch.float32).reshape(5, 7, 3)
    exact, comm = True, CommDebugMode()
    with comm:
        for src, dst in [(0, 1), (1, 0), (2, 0), (1, 2)]:
            moved = distribute_tensor(full, mesh, [Shard(src)]).redistribute(mesh, [Shard(dst)])
            exact &= moved.placements == (Shard(dst),) and torch.equal(moved.full_tensor(), full)
    return {"exact": exact, "collectives": {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}}


def test_sharded_dim_moves_by_all_to_all_on_gloo():
    """DTensor's CPU fallback all-gathers the whole tensor to move a shard to another dim; on gloo CFP sends
    each rank only its chunk, with the same result."""
    with WorkerPool(MESH, no_context) as pool:
        ranks = pool.run(_reshard_on_ranks, (), "resharding", 120)
    for result in ranks:
        assert result["exact"]
        assert result["collectives"].get("all_to_all_single") == 4  # full_tensor() adds the all-gathers
