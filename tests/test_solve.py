"""The ILP (cfp.solve) and the analytic cost model (cfp.analytic)."""

import hashlib
import importlib
import itertools
import math

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

import cfp
from cfp import baselines
from cfp.analytic import AnalyticCosts, redistribute_collectives
from cfp.analyze import analyze
from cfp.baselines import dp as dp_choice
from cfp.cluster import AlphaBeta, ClusterModel
from cfp.costs import TransitionKey, edge_transitions, shared_parameters
from cfp.mesh import parse_mesh
from cfp.placements import to_strs
from cfp.plan import parameter_placements
from cfp.solve import MemoryTable, best_plans, evaluate, min_memory, solve
from cfp.storage import StorageTable

solve_module = importlib.import_module("cfp.solve")  # cfp.solve is also the function

GiB = 2**30


def h100(memory=80 * GiB, alpha=10e-6):
    """An H100-like cluster: NVLink within 8-GPU nodes, InfiniBand across."""
    intra = {
        k: AlphaBeta(alpha, 1 / 360e9)
        for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
    }
    inter = {k: AlphaBeta(2 * alpha, 1 / 45e9) for k in intra}
    return ClusterModel("test-h100", "H100", {"float32": 60e12, "bfloat16": 990e12}, 3.35e12, memory, 8, intra, inter)


def graph_of(spec, mesh, **args):
    traced = cfp.capture(cfp.build(cfp.ModelSpec(spec, device="meta", args=args)))
    return analyze(traced, parse_mesh(mesh))


@pytest.fixture(scope="module")
def tiny1():
    """gpt:tiny with one layer on a 2-device mesh: 7 blocks, small enough to enumerate."""
    return graph_of("gpt:tiny", "2", n_layer=1)


@pytest.fixture(scope="module")
def tiny2():
    return graph_of("gpt:tiny", "2")


class HashCosts:
    """Arbitrary but fixed costs, so the ILP is checked independently of any cost model."""

    name = "hash"

    def __init__(self, seed=0):
        self.seed = seed

    def _u(self, *parts) -> float:
        h = hashlib.sha256(repr((self.seed,) + parts).encode()).digest()
        return int.from_bytes(h[:4], "little") / 2**32

    def block_time(self, class_id, config):
        return 1e-3 * (0.1 + self._u(class_id, config))

    def transition_time(self, key: TransitionKey):
        return 0.0 if key.is_noop else 1e-3 * self._u(key) * 0.8


def brute_force(graph, costs, memory_limit=None):
    """The optimum by enumeration, from edge_transitions (an independent path to the objective)."""
    blocks = graph.blocks
    block_cost = [
        [costs.block_time(graph.class_of(b), p.config.name) for p in graph.block_strategies(b)] for b in blocks
    ]
    trans = {}
    for t in edge_transitions(graph):
        k = (t.producer, t.consumer)
        trans.setdefault(k, {}).setdefault((t.producer_config, t.consumer_config), 0.0)
        trans[k][(t.producer_config, t.consumer_config)] += costs.transition_time(t.key)
    readers = {}
    for b in blocks:
        for pos, i in enumerate(b.inputs):
            if i.name in graph.traced.params:
                readers.setdefault(i.name, []).append((b.id, pos))
    tied = [r for r in readers.values() if len(r) > 1]
    mem = MemoryTable(graph)
    best, best_choice = math.inf, None
    for choice in itertools.product(*[range(len(c)) for c in block_cost]):
        if any(
            len({tuple(to_strs(graph.block_strategies(b)[choice[b]].input_placements[p])) for b, p in r}) > 1
            for r in tied
        ):
            continue
        if memory_limit is not None and mem.of(list(choice)).total > memory_limit:
            continue
        total = sum(block_cost[b][c] for b, c in enumerate(choice))
        total += sum(m.get((choice[p], choice[c]), 0.0) for (p, c), m in trans.items())
        if total < best:
            best, best_choice = total, choice
    return best, best_choice


@pytest.mark.parametrize("seed", [0, 1])
def test_ilp_equals_brute_force_on_arbitrary_costs(tiny1, seed):
    costs = HashCosts(seed)
    best, _ = brute_force(tiny1, costs)
    sol = solve(tiny1, costs)
    assert sol.status == "OPTIMAL" and sol.gap == 0
    assert sol.evaluation.total_s == pytest.approx(best, rel=1e-6)
    assert sol.objective_s == pytest.approx(best, rel=1e-4)  # integer units of 0.1 ns


def test_ilp_equals_brute_force_analytic_and_memory(tiny1):
    # A slow device with cheap links makes sharding pay, so the optimum is not trivial.
    slow = h100(alpha=1e-9)
    slow.peak_flops = {"float32": 1e9}
    slow.memory_bandwidth = 1e9
    costs = AnalyticCosts(tiny1, slow)
    best, choice = brute_force(tiny1, costs)
    sol = solve(tiny1, costs)
    assert sol.evaluation.total_s == pytest.approx(best, rel=1e-6)
    assert len({tiny1.block_strategies(b)[c].config.name for b, c in zip(tiny1.blocks, choice)}) > 1
    # With a memory limit between the least and the unconstrained plan's memory.
    # The enumeration covers configs only: the ILP is compared with storage and recomputation choices off.
    least, _ = min_memory(tiny1, costs, storage=False, recompute=False)
    limit = (least.total + sol.evaluation.memory.total) // 2
    if limit < sol.evaluation.memory.total:
        best_m, _ = brute_force(tiny1, costs, memory_limit=limit)
        sol_m = solve(tiny1, costs, memory_limit=limit, storage=False, recompute=False)
        assert sol_m.evaluation.memory.total <= limit
        assert sol_m.evaluation.total_s == pytest.approx(best_m, rel=1e-6)
        more = solve(tiny1, costs, memory_limit=limit)  # more choices: never slower, still within the limit
        assert more.evaluation.total_s <= best_m * (1 + 1e-6) and more.evaluation.memory.total <= limit


@pytest.mark.parametrize("storage,recompute", [(False, False), (True, True)])
def test_ilp_memory_is_evaluates_bound_with_shared_saves(storage, recompute):
    """llama's q, k and v blocks save one normalised input: the ILP gives it back once, as
    ``evaluate(exact=False)`` does on the same plan; the exact count is below it here."""
    graph = graph_of("llama:tiny", "2", batch=8)
    costs = HashCosts(1)
    builder = solve_module._Builder(graph, costs, False, storage, recompute)
    assert builder.n_shared_vars
    builder.minimize_memory()
    solver = solve_module._solver(20, 2)
    assert solver.StatusName(solver.Solve(builder.model)) == "OPTIMAL"
    choice = builder.choice(solver)
    layout = builder.storage_choice(solver, choice)
    bound = evaluate(graph, costs, choice, builder.memory, *layout, builder.storage, exact=False).memory
    exact = evaluate(graph, costs, choice, builder.memory, *layout, builder.storage).memory
    assert solver.ObjectiveValue() == bound.total >= exact.total


def test_a_backward_cut_holds_what_the_exact_count_does():
    """Where the exact count (backward order: a block's saved activations and those before it, what it holds,
    the gradients made after it) breaks the limit, best_plans cuts that block; on gpt (no tensor two blocks
    save) the cut counts exactly that: a limit one byte under a block's count rules its plan out."""
    graph = graph_of("gpt:tiny", "2", batch=8)
    costs = HashCosts(1)
    dp = dp_choice(graph)
    exact = evaluate(graph, costs, dp)
    always = exact.memory.params + exact.memory.optimizer
    assert max(exact.backward_bytes) == exact.memory.backward
    for b in range(len(dp)):
        for slack, fits in ((0, True), (-1, False)):
            builder = solve_module._Builder(graph, costs, False, storage=False, recompute=False)
            for block, c in zip(graph.blocks, dp):
                builder.model.Add(builder.x[builder.group_of[block.id]][c] == 1)
            builder.add_backward_cut(b, always + exact.backward_bytes[b] + slack)
            status = solve_module._solver(10, 1).Solve(builder.model)
            assert (status in (builder.cp_model.OPTIMAL, builder.cp_model.FEASIBLE)) == fits, (b, slack)


def test_the_exact_count_gives_back_what_blocks_save_twice():
    """llama's q, k and v blocks save one tensor: the exact count holds it once, below each block's own count
    on these plans (nothing stored or recomputed)."""
    graph = graph_of("llama:tiny", "2", batch=8)
    table = MemoryTable(graph)
    for name in ("dp", "megatron"):
        choice = baselines.choose(name, graph)
        exact, alone = evaluate(graph, HashCosts(1), choice, table).memory, table.of(choice)
        assert exact.activations < alone.activations  # something was counted twice
        assert exact.total <= alone.total


def test_tied_embedding_and_head_agree(tiny1):
    sol = solve(tiny1, HashCosts(3))
    traced = tiny1.traced
    placements = {}
    for b, c in zip(tiny1.blocks, sol.choice):
        strategy = tiny1.block_strategies(b)[c]
        for pos, i in enumerate(b.inputs):
            if i.name in traced.params:
                placements.setdefault(i.name, set()).add(tuple(to_strs(strategy.input_placements[pos])))
    assert all(len(v) == 1 for v in placements.values())


def test_replicated_memory_counts_each_parameter_once(tiny1):
    rep = [
        next(i for i, p in enumerate(tiny1.block_strategies(b)) if set(p.config.name.split("/")) == {"rep"})
        for b in tiny1.blocks
    ]
    m = MemoryTable(tiny1).of(rep)
    n = tiny1.traced.num_parameters()  # the tied embedding/head counted once
    assert m.params == m.grads == 4 * n
    assert m.optimizer == 8 * n
    assert m.activations == sum(tiny1.block_strategies(b)[c].saved_bytes for b, c in zip(tiny1.blocks, rep))


def test_memory_limit_forces_sharding_and_impossible_limit_explained(tiny2):
    costs = AnalyticCosts(tiny2, h100())
    free = solve(tiny2, costs)
    least, _ = min_memory(tiny2, costs)
    assert least.total < free.evaluation.memory.total
    limit = least.total + (free.evaluation.memory.total - least.total) // 4
    tight = solve(tiny2, costs, memory_limit=limit)
    assert tight.evaluation.memory.total <= limit
    params = parameter_placements(tiny2, tight.choice)
    assert any(any(p.is_shard() for p in pl) for pl in params.values())
    with pytest.raises(
        cfp.CFPError, match=r"least memory any plan needs is .*parameters .*gradients .*optimizer state .*activations"
    ):
        solve(tiny2, costs, memory_limit=least.total - 1)


def test_tie_segments():
    # Three layers: the last layer's last block differs (it feeds only the final
    # norm), so the first two layers form the segment.
    graph = graph_of("gpt:tiny", "2", n_layer=3)
    assert graph.segments
    costs = HashCosts(5)
    free = solve(graph, costs)
    tied = solve(graph, costs, tie_segments=True)
    assert tied.evaluation.total_s >= free.evaluation.total_s - 1e-12
    for seg in graph.segments:
        period = len(seg.classes)
        for k in range(period):
            assert len({tied.choice[i] for i in range(seg.start + k, seg.end, period)}) == 1
    assert tied.stats["decision_groups"] < free.stats["decision_groups"]


def test_memory_counts_the_gradient_bucket_being_reduced(tiny1, monkeypatch):
    """The lowered backward reduces gradients in flat buckets: one bucket's copy sits beside the gradients."""
    dp = MemoryTable(tiny1).of(dp_choice(tiny1))
    assert dp.reduced >= dp.grads > 0  # data parallelism all-reduces every gradient
    assert dp.bucket == dp.reduced  # the tiny model's gradients fit in one bucket
    assert dp.total == dp.params + dp.optimizer + dp.transient + max(
        dp.grads + dp.bucket, dp.activations + dp.in_flight
    )
    rep = [
        next(i for i, p in enumerate(tiny1.block_strategies(b)) if set(p.config.name.split("/")) == {"rep"})
        for b in tiny1.blocks
    ]
    assert MemoryTable(tiny1).of(rep).bucket == 0  # replicated compute: nothing to reduce

    # ZeRO-3 blocks run on the interpreter, which reduces gradient by gradient: none of theirs is in a bucket.
    table = StorageTable(tiny1)
    levels = ["zero3" if "zero3" in table.levels(b, c) else "replicate" for b, c in enumerate(dp_choice(tiny1))]
    zero3 = evaluate(tiny1, HashCosts(), dp_choice(tiny1), storage=levels).memory
    rest = [b for b, level in zip(tiny1.blocks, levels) if level == "replicate"]
    assert "zero3" in levels
    assert zero3.reduced == sum(
        tiny1.block_strategies(b)[c].comm_bytes("reduce") for b, c in zip(tiny1.blocks, dp_choice(tiny1)) if b in rest
    )
    # Costs that make data parallelism the fastest plan; a byte less than its peak rules it out in the ILP too.
    favoured = {
        (tiny1.class_of(b), tiny1.block_strategies(b)[c].config.name) for b, c in zip(tiny1.blocks, dp_choice(tiny1))
    }
    costs = HashCosts()
    costs.block_time = lambda class_id, config: 1e-4 if (class_id, config) in favoured else 1.0
    assert solve(tiny1, costs, storage=False, recompute=False).choice == dp_choice(tiny1)
    for cap in (dp.reduced, dp.reduced // 3):
        monkeypatch.setattr(solve_module, "BUCKET_BYTES", cap)
        peak = MemoryTable(tiny1).of(dp_choice(tiny1))
        assert peak.bucket == cap
        tight = solve(tiny1, costs, memory_limit=peak.total - 1, storage=False, recompute=False)
        assert tight.choice != dp_choice(tiny1) and tight.evaluation.memory.total < peak.total


def test_dp_choice_is_batch(tiny2):
    names = [tiny2.block_strategies(b)[c].config.name for b, c in zip(tiny2.blocks, dp_choice(tiny2))]
    assert names.count("batch") >= len(names) - 1  # the position embedding has no batch dimension
    assert evaluate(tiny2, AnalyticCosts(tiny2, h100()), dp_choice(tiny2)).total_s > 0


def test_dp_follows_the_batch_wherever_a_block_carries_it():
    """Data parallelism is the batch sharded and every parameter replicated, whichever dim carries the batch. An MoE
    expert block reads its buffer [experts, groups, capacity, d] with the groups (the batch) on dim 1; before, dp took
    its ``batch`` config by name, found none there, and all-gathered the buffer to run every expert replicated."""
    graph = graph_of("moe:tiny", "2")
    for block, k in zip(graph.blocks, dp_choice(graph)):
        strategy = graph.block_strategies(block)[k]
        params = [p for i, p in zip(block.inputs, strategy.input_placements) if i.role == "param"]
        assert all(p == (Replicate(),) for p in params), (block.anchor, strategy.config.name)
        if any("expert" in s.config.name for s in graph.block_strategies(block)):
            act = next(p for i, p in zip(block.inputs, strategy.input_placements) if i.role == "activation")
            assert act == (Shard(1),), (block.anchor, strategy.config.name)
    # nn.MultiheadAttention projects [seq, batch, d] even when batch_first: its projections are data parallel on dim 1
    graph = graph_of("examples/zoo.py:encoder", "2")
    names = [graph.block_strategies(b)[k].config.name for b, k in zip(graph.blocks, dp_choice(graph))]
    assert names.count("seq") >= 4, names


def test_redistribute_collectives():
    mesh = parse_mesh("2x4")
    R, P = Replicate(), Partial("sum")

    def key(src, dst):
        return TransitionKey((8, 16), "float32", src, dst)

    assert redistribute_collectives(key((R, Shard(1)), (R, R)), mesh) == [
        ("all_gather", 1, 8 * 4 * 4, "forward"),
        ("reduce_scatter", 1, 8 * 16 * 4, "backward"),
    ]
    assert redistribute_collectives(key((P, R), (R, R)), mesh) == [("all_reduce", 0, 8 * 16 * 4, "forward")]
    # A free forward; the backward gathers the gradient.
    assert [c[0] for c in redistribute_collectives(key((R, R), (Shard(0), R)), mesh)] == ["all_gather"]
    assert [c[0] for c in redistribute_collectives(key((Shard(0), R), (Shard(1), R)), mesh)] == ["all_to_all"] * 2
    assert [c[0] for c in redistribute_collectives(key((P, R), (Shard(0), R)), mesh)] == [
        "reduce_scatter",
        "all_gather",
    ]
    # A strided shard (a reshape of a sharded dimension) is a shard: gathering it is an all-gather.
    assert [c[0] for c in redistribute_collectives(key((_StridedShard(0, split_factor=2), R), (R, R)), mesh)] == [
        "all_gather",
        "reduce_scatter",
    ]


def test_small_model_large_memory_is_data_parallel():
    graph = graph_of("gpt:small", "4", n_layer=1, batch=256)
    sol = solve(graph, AnalyticCosts(graph, h100()), memory_limit=80 * GiB)
    names = [graph.block_strategies(b)[c].config.name for b, c in zip(graph.blocks, sol.choice)]
    linear = [
        n for b, n in zip(graph.blocks, names) if graph.traced.nodes[b.anchor].target.__name__.startswith("linear")
    ]
    # Data parallel: tokens split (batch, or equally cheap here, sequence), every weight replicated.
    assert set(linear) <= {"batch", "seq"}, names
    params = parameter_placements(graph, sol.choice)
    assert all(pl == (Replicate(),) for fqn, pl in params.items() if ".h." in fqn or fqn.startswith("lm_head")), params


def test_long_sequence_big_hidden_tight_memory_is_tensor_parallel():
    graph = graph_of("gpt:small", "4", n_layer=1, batch=4, n_embd=2048, n_head=16, seq=512, block_size=512)
    costs = AnalyticCosts(graph, h100())
    least, _ = min_memory(graph, costs)
    free = solve(graph, costs)
    sol = solve(graph, costs, memory_limit=least.total + (free.evaluation.memory.total - least.total) // 10)
    names = [graph.block_strategies(b)[c].config.name for b, c in zip(graph.blocks, sol.choice)]
    assert sum(n in ("col", "row") for n in names) >= 3, names


def test_k_best_plans_are_distinct_and_ordered(tiny1):
    """The k best plans are the k best of all plans (by enumeration), distinct, best first."""
    costs = HashCosts(7)
    mem = MemoryTable(tiny1)
    readers = list(shared_parameters(tiny1).values())
    totals = []
    for choice in itertools.product(*[range(len(tiny1.block_strategies(b))) for b in tiny1.blocks]):
        strategies = [tiny1.block_strategies(b)[c] for b, c in zip(tiny1.blocks, choice)]
        if any(len({tuple(to_strs(strategies[b].input_placements[p])) for b, p in r}) > 1 for r in readers):
            continue
        totals.append(evaluate(tiny1, costs, list(choice), mem).total_s)
    totals.sort()
    plans = best_plans(tiny1, costs, 4)
    assert len(plans) == 4
    assert len({tuple(p.choice) for p in plans}) == 4
    assert [p.evaluation.total_s for p in plans] == pytest.approx(totals[:4], rel=1e-6)
    with pytest.raises(cfp.CFPError, match="at least one"):
        best_plans(tiny1, costs, 0)
