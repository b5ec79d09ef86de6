"""Profiling, emulated backend and the profile store (single process, fast)."""

import json
import math
import warnings

import pandas as pd
import pytest
from torch.distributed.tensor import Replicate, Shard

import cfp
from cfp.buckets import BUCKET_BYTES, bucket_key, bucket_keys
from cfp.cli import main
from cfp.cluster import load_cluster
from cfp.costs import TransitionKey, unique_transitions
from cfp.mesh import parse_mesh
from cfp.profile import ProfileStore, analyze_for_profile, profile
from cfp.profile.calibrate import fit
from cfp.profile.jobs import combine
from cfp.profile.store import ProfileTable, StoreWarning, transition_config
from cfp.profile.sync import combine_sync
from cfp.storage import StorageTable

SPEC = cfp.ModelSpec("gpt:tiny", device="cpu", batch=2, seq=16)
FAST = dict(warmup=1, iters=2)


@pytest.fixture(scope="module")
def graph():
    return analyze_for_profile(SPEC, parse_mesh("2"))


@pytest.fixture(scope="module")
def cluster():
    return load_cluster("h100-nvlink-8")


def test_emulated_profile_is_a_cost_model_and_reused(graph, cluster, tmp_path):
    run = profile(graph, SPEC, "emulated", cluster, tmp_path, **FAST)
    # transitions between blocks, and the all-gathers and reduce-scatters of parameters stored sharded
    storage_keys = StorageTable(graph).transition_keys()
    buckets = bucket_keys(graph)  # data parallelism reduces gradients over the mesh's one dimension
    assert buckets == {bucket_key(1, 0)}
    assert storage_keys and run.jobs == graph.profile_jobs + len(unique_transitions(graph) | storage_keys | buckets)
    assert run.measured == run.jobs and run.cached == 0
    table = run.table
    assert set(table.rows["backend"]) == {"emulated"}
    for class_id, strategies in graph.strategies.items():
        for p in strategies:
            t = table.block_time(class_id, p.config.name)
            assert 0 < t < math.inf
    for key in unique_transitions(graph) | storage_keys:
        assert 0 < table.transition_time(key) < math.inf
        assert 0 < table.transition_phase_s(key, "forward") < math.inf
    # communication is priced by the cluster model, and only where DTensor communicates
    rows = table.rows[table.rows["kind"] == "block"]
    assert (rows.loc[rows["collectives"] == 0, "comm_s"] == 0).all()
    assert (rows.loc[rows["collectives"] > 0, "comm_s"] > 0).all()
    again = profile(graph, SPEC, "emulated", cluster, tmp_path, **FAST)
    assert again.measured == 0 and again.cached == run.jobs
    # another cluster model is another key
    other = load_cluster("h100-ib-2x8")
    third = profile(graph, SPEC, "emulated", other, tmp_path, transitions=False, **FAST)
    assert third.measured == graph.profile_jobs


def test_corrupt_store_is_detected_and_remeasured(graph, cluster, tmp_path):
    first = profile(graph, SPEC, "emulated", cluster, tmp_path, transitions=False, **FAST)
    parts = list((tmp_path / "blocks").glob("*.parquet"))
    assert parts
    for part in parts:
        part.write_bytes(b"this is not parquet")
    with pytest.warns(StoreWarning, match="cannot be read"):
        store = ProfileStore(tmp_path)
    again = profile(graph, SPEC, "emulated", cluster, store, transitions=False, **FAST)
    assert again.measured == first.jobs and again.corrupt


def test_rows_from_another_torch_version_are_not_reused(graph, cluster, tmp_path):
    first = profile(graph, SPEC, "emulated", cluster, tmp_path, transitions=False, **FAST)
    for part in (tmp_path / "blocks").glob("*.parquet"):
        df = pd.read_parquet(part)
        df["torch_version"] = "1.0.0"
        df.to_parquet(part, index=False)
    with pytest.warns(StoreWarning, match="another torch version"):
        store = ProfileStore(tmp_path)
    again = profile(graph, SPEC, "emulated", cluster, store, transitions=False, **FAST)
    assert again.measured == first.jobs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreWarning)
        assert profile(graph, SPEC, "emulated", cluster, tmp_path, transitions=False, **FAST).measured == 0


def test_killed_run_resumes(graph, cluster, tmp_path):
    class Kill(Exception):
        pass

    def die_after_five(done, cached, total, job):
        if job is not None and done - cached >= 5:
            raise Kill

    store = ProfileStore(tmp_path, flush_every_s=0.0)
    with pytest.raises(Kill):
        profile(graph, SPEC, "emulated", cluster, store, transitions=False, on_progress=die_after_five, **FAST)
    resumed = profile(graph, SPEC, "emulated", cluster, tmp_path, transitions=False, **FAST)
    assert resumed.cached == 5 and resumed.measured == graph.profile_jobs - 5


def test_store_finds_every_row_added_whenever_its_frame_was_read(tmp_path):
    """Rows a run adds are framed lazily and looked up through an index: reading the frame between an
    add and a lookup must not leave the index without the row."""
    from cfp.profile.store import KEY, SCHEMA

    store = ProfileStore(tmp_path, flush_every_s=1e9)
    key = {**{col: "x" for col in KEY}, "schema": SCHEMA}
    store.add({**key, "config": "a", "status": "ok", "total_s": 1.0})
    assert store.lookup({**key, "config": "a"})["total_s"] == 1.0
    store.add({**key, "config": "b", "status": "ok", "total_s": 2.0})
    assert len(store.frame) == 2
    assert store.lookup({**key, "config": "b"})["total_s"] == 2.0
    assert store.lookup({**key, "config": "c"}) is None


def test_emulated_larger_mesh(cluster, tmp_path):
    # 8 emulated ranks on a 2-core host (a 2-D mesh works too, but DTensor analysis of one takes minutes here)
    spec = cfp.ModelSpec("gpt:tiny", device="cpu", batch=8, seq=16, args={"n_layer": 1})
    graph = analyze_for_profile(spec, parse_mesh("8"))
    run = profile(graph, spec, "emulated", cluster, tmp_path, warmup=1, iters=1, transitions=False)
    assert run.measured == graph.profile_jobs
    assert (run.table.rows["status"] == "ok").all()
    assert set(run.table.rows["mesh"]) == {"8"}


def test_fit_recovers_alpha_beta():
    points = [(b, 20e-6 + 1e-9 * b) for b in (1024, 8192, 65536, 2**20, 2**23)]  # all_reduce on 2: traffic factor 1
    ab, median, worst = fit("all_reduce", 2, points)
    assert ab.alpha == pytest.approx(20e-6, rel=1e-6) and ab.beta == pytest.approx(1e-9, rel=1e-6)
    assert worst < 1e-6


def test_cluster_files_load():
    for name in ("h100-nvlink-8", "h100-ib-2x8"):
        c = load_cluster(name)
        assert c.sources and c.peak_flops["bfloat16"] == 989e12 and c.devices_per_node == 8
    assert (
        load_cluster("h100-ib-2x8").inter_node["all_reduce"].beta
        > load_cluster("h100-nvlink-8").intra_node["all_reduce"].beta
    )


def test_cli_profile_json(tmp_path):
    out = tmp_path / "p.json"
    args = [
        "profile",
        "gpt:tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--mesh",
        "2",
        "--backend",
        "emulated",
        "--cluster",
        "h100-nvlink-8",
        "--store",
        str(tmp_path / "s"),
        "--warmup",
        "1",
        "--iters",
        "2",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["jobs"] == data["measured"] > 0 and data["cached"] == 0 and data["wall_s"] > 0
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["measured"] == 0 and data["cached"] == data["jobs"]


def test_cli_emulated_needs_cluster(tmp_path):
    assert main(["profile", "gpt:tiny", "--mesh", "2", "--backend", "emulated", "--store", str(tmp_path)]) == 1


def _rank(forward, reduce):
    n = len(forward)
    return {
        "status": "ok",
        "forward": forward,
        "backward": [0.0] * n,
        "reduce": reduce,
        "optimizer": [0.0] * n,
        "collectives": [],
        "comm_seconds": 0.0,
        "memory": 0,
        "memory_source": "test",
    }


def test_combine_counts_no_skew_the_step_does_not_pay():
    """Ranks taking turns to be slow (no collective between them) cost their typical time, not the
    per-iteration maximum; the reduction costs what the last rank in waits, not the first one's wait."""
    early = _rank([1.0, 2.0, 1.0, 2.0, 1.0], [5.0] * 5)  # waits in the reduction for the other's backward
    late = _rank([2.0, 1.0, 2.0, 1.0, 2.0], [1.0] * 5)
    row = combine([early, late])
    assert row["reduce_s"] == 1.0
    assert row["total_s"] == 2.0 + 1.0  # the slower rank's median iteration, then the reduction
    assert row["total_max_s"] == 7.0  # the spread still shows the per-iteration maxima (2 + 5)


def test_combine_sync_takes_the_mean_wait_for_the_last_rank():
    """Each iteration the ranks' mean time in the all-reduce minus the least (the last rank's, who waits for no
    one); the mean over iterations, so that the rare long wait counts as often as a step meets it."""
    a = {"status": "ok", "times": [1.0, 5.0, 1.0]}
    b = {"status": "ok", "times": [3.0, 1.0, 1.0]}
    row = combine_sync([a, b])
    assert row["forward_s"] == 1.0  # the all-reduce itself: the last rank's time
    assert row["total_s"] == pytest.approx((1.0 + 2.0 + 0.0) / 3)
    assert combine_sync([a])["total_s"] == 0.0


def _transition_row(key, total_s, forward_s, backward_s):
    return {
        "status": "ok",
        "error": "",
        "kind": "transition",
        "class_id": "transition",
        "config": transition_config(key),
        "runtime": "lowered",
        "shape_key": json.dumps(list(key.shape)),
        "dtype": key.dtype,
        "total_s": total_s,
        "total_min_s": total_s,
        "forward_s": forward_s,
        "backward_s": backward_s,
    }


def test_every_collective_outside_a_block_pays_the_measured_skew():
    """A transition's collectives, the ZeRO gathers among them, and a gradient bucket each wait for the last rank
    in a step; their jobs start from a barrier. A local slice waits for no one."""
    gather = TransitionKey((8, 4), "float32", (Shard(0),), (Replicate(),))  # all-gather; backward reduce-scatter
    slice_ = TransitionKey((8, 4), "float32", (Replicate(),), (Shard(0),))  # local; backward all-gather
    bucket = bucket_key(1, 0)
    rows = [
        _transition_row(gather, 0.010, 0.004, 0.006),
        _transition_row(slice_, 0.005, 0.001, 0.004),
        _transition_row(bucket, 0.020, 0.020, 0.0),
    ]
    sync = {"status": "ok", "error": "", "kind": "sync", "class_id": "sync", "config": "mesh dim 0", "total_s": 0.001}
    mesh = parse_mesh("2")
    measured = ProfileTable(pd.DataFrame(rows), mesh=mesh)
    table = ProfileTable(pd.DataFrame([*rows, sync]), mesh=mesh)
    assert measured.sync_s(0) == 0.0 and table.sync_s(0) == 0.001
    assert measured.transition_time(gather) == pytest.approx(0.010)
    assert table.transition_time(gather) == pytest.approx(0.010 + 2 * 0.001)
    assert table.transition_phase_s(gather, "forward") == pytest.approx(0.004 + 0.001)
    assert table.transition_phase_s(slice_, "forward") == pytest.approx(0.001)
    assert table.transition_phase_s(slice_, "backward") == pytest.approx(0.004 + 0.001)
    assert table._bucket_s(0) == pytest.approx(0.020 + 0.001)


def test_lowered_gradient_reduction_is_priced_as_its_share_of_a_bucket():
    key = bucket_key(1, 0)
    base = {"status": "ok", "error": "", "comm_s": 0.0, "backend": "real"}
    rows = pd.DataFrame(
        [
            {
                **base,
                "kind": "block",
                "class_id": "c",
                "config": "batch",
                "runtime": "lowered",
                "shape_key": "",
                "dtype": "",
                "reduce_s": 0.05,
                "total_s": 0.1,
                "total_min_s": 0.09,
            },
            {
                **base,
                "kind": "block",
                "class_id": "c",
                "config": "slow",
                "runtime": "interpreted",
                "shape_key": "",
                "dtype": "",
                "reduce_s": 0.05,
                "total_s": 0.1,
                "total_min_s": 0.09,
            },
            {
                **base,
                "kind": "transition",
                "class_id": "",
                "config": transition_config(key),
                "runtime": "lowered",
                "shape_key": json.dumps(list(key.shape)),
                "dtype": key.dtype,
                "reduce_s": 0.0,
                "total_s": 0.08,
                "total_min_s": 0.02,
            },
        ]
    )
    reduced = {("c", "batch"): {0: BUCKET_BYTES // 2}, ("c", "slow"): {0: BUCKET_BYTES // 2}}
    table = ProfileTable(rows, reduced=reduced, mesh=parse_mesh("2"))
    # half a bucket, at the bucket's fastest iteration, replaces the block's own reduction
    assert table.block_time("c", "batch") == pytest.approx(0.1 - 0.05 + 0.01)
    assert table.block_phase_s("c", "batch", "reduce") == pytest.approx(0.01)
    # the report's split counts the reduction the same way: 60 ms of timed collectives, 50 of them the reduction
    cost = ProfileTable(rows.assign(comm_s=0.06), reduced=reduced, mesh=parse_mesh("2")).block_cost("c", "batch")
    assert cost.communication_s == pytest.approx(0.06 - 0.05 + 0.01)
    assert cost.compute_s == pytest.approx(0.06 - cost.communication_s)
    assert table.block_time("c", "slow") == pytest.approx(0.1)  # the interpreter reduces parameter by parameter
    assert ProfileTable(rows).block_time("c", "batch") == pytest.approx(0.1)  # without the graph's bytes: as measured


def test_lowered_block_times_leave_out_the_per_call_cost(monkeypatch):
    # A step calls one program for the whole model; profiling calls one per block and must not charge each
    # block the call's fixed cost (on gpt:tiny it was half the predicted step).
    from cfp.mesh import fake_mesh
    from cfp.profile.program import BlockProgram, CallProbe

    one = parse_mesh("1")
    graph = analyze_for_profile(SPEC, one)
    block = next(b for b in graph.blocks if b.anchor.startswith("linear") and b.outputs)
    strategy = graph.block_strategies(block)[0]
    with fake_mesh(one) as mesh:
        program = BlockProgram(graph, block, strategy, mesh, "cpu", runtime="lowered")
        program.iterate()  # lowers the block, and makes its probe
        assert program.runtime == "lowered"
        assert len(program._probe.leaves) == len(program.leaves)
        monkeypatch.setattr(CallProbe, "seconds", lambda self, sync: (10.0, 10.0))
        (forward, backward, _, _), _, _ = program.iterate()
        assert forward == backward == 0.0  # never below zero
        monkeypatch.setattr(CallProbe, "seconds", lambda self, sync: (0.0, 0.0))
        (forward, backward, _, _), _, _ = program.iterate()
        assert forward > 0 and backward > 0
        interpreted = BlockProgram(graph, block, strategy, mesh, "cpu", runtime="interpreted")
        interpreted.iterate()
        assert interpreted._probe is None  # the interpreter's step pays its dispatch per op, not per block


def test_lowered_transition_times_leave_out_the_per_call_cost(monkeypatch):
    # The lowered step runs a redistribution's collectives inside its program, with no call of their own.
    from cfp.mesh import fake_mesh
    from cfp.profile.program import CallProbe, TransitionProgram

    key = TransitionKey((64, 32), "float32", (Shard(0),), (Replicate(),))
    with fake_mesh(parse_mesh("2")) as mesh:
        program = TransitionProgram(key, mesh)
        monkeypatch.setattr(CallProbe, "seconds", lambda self, sync: (10.0, 10.0))
        (forward, backward, _, _), _, _ = program.iterate()
        assert forward == backward == 0.0
        assert TransitionProgram(key, mesh, runtime="interpreted")._probe is None


def test_a_probe_that_cannot_be_traced_leaves_the_times_whole(monkeypatch):
    import torch

    from cfp.mesh import fake_mesh
    from cfp.profile.program import CallProbe

    with fake_mesh(parse_mesh("1")) as mesh:

        def untraceable(self, *args):
            raise AssertionError("Node tangents_2 was invalid, but is output")  # what AOTAutograd said in the suite

        monkeypatch.setattr(CallProbe, "__init__", untraceable)
        assert CallProbe.make(2, 1, mesh, torch.device("cpu")) is None  # the block keeps its whole time
