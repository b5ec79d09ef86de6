"""The ILP: one config per block, minimising block time plus transitions.

Formulation (OR-Tools CP-SAT):

- ``x[g, c]``: decision group ``g`` (a block, or with ``tie_segments`` every
  instance of one position of a segment) takes config ``c``; exactly one per
  group. Configs the cost model cannot run (``inf``) get no variable.
- Transitions: on each edge the cost depends only on the producer's exit
  placements and the consumer's entry placements, so configs are grouped by
  those; ``y[e, s, d]`` is 1 when the producer leaves ``s`` and the consumer
  wants ``d``. Its rows and columns sum to the producer's and consumer's
  choices (the tight "marginal" linearisation, exact for any graph, residual
  edges included). Edges with the same groups and the same grouping share
  their ``y`` and add their costs.
- Tied parameters (one placeholder read by several blocks) take one
  placement: the chosen configs must agree on it.
- Memory per device at the step's peak: parameters + Adam state (two fp32
  moments) under local shapes, each parameter counted once, plus the larger
  of the gradients (all alive at the end of backward) and every block's
  saved activations (all alive at the end of forward, with the gradients
  one op has in flight as backward starts), at most the limit: two
  constraints, one with each.
- Storage and recomputation (``cfp.storage``): ``s[g, c, level]`` stores the
  group's parameters ZeRO-1/2/3 sharded and ``r[g, c]`` recomputes its
  activations, each at most ``x[g, c]``; both add their seconds to the
  objective and their bytes to the memory sum. One more integer ``t`` is at
  least every group's transient bytes (a gathered ZeRO-3 parameter, the
  activations a recomputed block brings back), since blocks run one at a
  time; it joins the memory sum. An integer ``f`` is at least every group's
  gradients in flight plus its transient bytes; it joins the activations'
  side.

Times are scaled to integers in units of ``TIME_UNIT_S`` (0.1 ns); memory is
in bytes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

from cfp import baselines
from cfp.buckets import BUCKET_BYTES
from cfp.capture import op_name
from cfp.costs import CostModel, TransitionKey, shared_parameters, value_edges
from cfp.errors import CFPError
from cfp.placements import Placements, local_numel, normalize, to_strs
from cfp.report_util import human_bytes
from cfp.shared import counted_twice, shared_values
from cfp.storage import ADAM_STATE_BYTES_PER_PARAM, StorageTable, Variant

TIME_UNIT_S = 1e-10
MAX_CUT_ROUNDS = 20  # solves that best_plans cuts for the exact count's backward order before it gives up
DEFAULT_TIME_LIMIT_S = 60.0

Label = Placements | None  # a value's placements as a config leaves or takes it


def _label_order(label: Label) -> str:
    """Labels sort by their strings: a stable order to build the model in."""
    return repr(None if label is None else tuple(to_strs(label)))


@dataclass(frozen=True, kw_only=True)
class SolveOptions:
    """What the ILP is asked: its constraints, the choices it may make, and how long it may search."""

    memory_limit: int | None = None  # bytes per device
    tie_segments: bool = False  # every instance of one position of a segment takes the same config
    time_limit_s: float = DEFAULT_TIME_LIMIT_S  # per solve
    workers: int = 2  # CP-SAT search workers
    hint_first: bool = True  # hint the untied search with the tied optimum (roughly halves it on deep models)
    storage: bool = True  # offer ZeRO-1/2/3 storage of parameters (cfp.storage)
    recompute: bool = True  # offer activation recomputation


# --------------------------------------------------------------------------
# What a plan costs, computed directly (the ILP's objective, in seconds)
# --------------------------------------------------------------------------


@dataclass
class Memory:
    """Per-device bytes of one plan."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    transient: int = 0  # the largest of one block's gathered parameters and recomputed activations
    # What the activations' side holds beyond ``transient``: the gradients one op has in flight in backward (at the
    # loss, log_softmax's output gradient and the one it makes: 3 GiB of GPT-2's 15 GiB peak).
    in_flight: int = 0
    reduced: int = 0  # gradient bytes collectives reduce (all-reduce, reduce-scatter), bucketed by the lowering
    # The most the activations' side holds while one block runs its backward (``backward_bytes``); None: all the
    # activations with the most in flight, the bound when nothing says in which order blocks free them.
    backward: int | None = None

    @property
    def bucket(self) -> int:
        """A bucket's flat copy, alive beside the gradients while it is reduced (up to ``BUCKET_MB``)."""
        return min(self.reduced, BUCKET_BYTES)

    @property
    def total(self) -> int:
        """The step's peak: gradients fill in as backward frees the saved activations."""
        backward = self.backward if self.backward is not None else self.activations + self.in_flight + self.transient
        return self.params + self.optimizer + max(self.transient + self.grads + self.bucket, backward)

    def to_json(self) -> dict:
        return {
            "total": self.total,
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "transient": self.transient,
            "in_flight": self.in_flight,
            "backward": self.backward,
            "bucket": self.bucket,
        }

    def dominant(self) -> str:
        parts = {
            "parameters": self.params,
            "gradients": self.grads,
            "optimizer state": self.optimizer,
            "activations": self.activations,
        }
        return max(parts, key=parts.get)


@dataclass
class Evaluation:
    """Predicted step time of one choice of configs, with its breakdown."""

    block_s: list[float]  # per block, its storage level's and recomputation's time included
    transition_in_s: list[float]  # per block: transitions on the edges into it
    memory: Memory
    backward_bytes: list[int] = field(default_factory=list)  # per block: what its backward holds (exact count)
    storage_s: list[float] = field(default_factory=list)  # per block: what its storage level adds to block_s
    recompute_s: list[float] = field(default_factory=list)  # per block: what recomputing adds to block_s

    @property
    def blocks_total_s(self) -> float:
        return sum(self.block_s)

    @property
    def transitions_total_s(self) -> float:
        return sum(self.transition_in_s)

    @property
    def total_s(self) -> float:
        return self.blocks_total_s + self.transitions_total_s


class MemoryTable:
    """Per (block, config) bytes; each parameter is charged to the first block that reads it."""

    def __init__(self, graph):
        traced = graph.traced
        owner: dict[str, int] = {}
        for block in graph.blocks:
            for inp in block.inputs:
                if inp.name in traced.params:
                    owner.setdefault(inp.name, block.id)
        self.owner = owner
        self.shared = shared_values(graph)  # tensors that cross blocks, which several may save
        # Where in backward each block's gradients appear: at the last block that reads one of its parameters
        # (a tied embedding's gradient is made by the head, at the start of backward).
        last_reader = {}
        for block in graph.blocks:
            for inp in block.inputs:
                if inp.name in traced.params:
                    last_reader[inp.name] = block.id
        self.grad_position = [
            max([last_reader[n] for n, o in owner.items() if o == block.id], default=block.id) for block in graph.blocks
        ]
        self.table: dict[tuple[str, tuple[int, ...]], list[Memory]] = {}
        self.rows: list[list[Memory]] = []
        for block in graph.blocks:
            owned = tuple(pos for pos, inp in enumerate(block.inputs) if owner.get(inp.name) == block.id)
            key = (graph.class_of(block), owned)
            if key not in self.table:
                row = []
                for strategy in graph.block_strategies(block):
                    m = Memory(
                        activations=int(strategy.saved_bytes),
                        in_flight=int(strategy.grad_bytes),
                        reduced=strategy.comm_bytes("reduce"),
                    )
                    for pos in owned:
                        val = traced.nodes[block.inputs[pos].name].meta["val"]
                        numel = local_numel(tuple(val.shape), strategy.input_placements[pos], graph.mesh.shape)
                        m.params += numel * val.element_size()
                        m.grads += numel * val.element_size()
                        m.optimizer += numel * ADAM_STATE_BYTES_PER_PARAM
                    row.append(m)
                self.table[key] = row
            self.rows.append(self.table[key])

    def of(self, choice: list[int]) -> Memory:
        total = Memory()
        for row, c in zip(self.rows, choice):
            m = row[c]
            total.params += m.params
            total.grads += m.grads
            total.optimizer += m.optimizer
            total.activations += m.activations
            total.reduced += m.reduced
            total.in_flight = max(total.in_flight, m.in_flight)  # blocks run their backward one at a time
        return total


def backward_bytes(saved: list[int], held: list[int], grads: list[int], grad_position: list[int]) -> list[int]:
    """Per block, what the activations' side holds while it runs its backward (blocks in reverse order): the
    saved activations of it and of every block before it, what it holds in flight (``held``), and the
    gradients that the blocks after it have made (block ``o``'s appear at block ``grad_position[o]``)."""
    made_at = [0] * (len(saved) + 1)
    for o, position in enumerate(grad_position):
        made_at[position] += grads[o]
    later = [0] * (len(saved) + 1)  # gradients made by blocks after b
    for b in range(len(saved) - 1, -1, -1):
        later[b] = later[b + 1] + made_at[b + 1]
    out, alive = [], 0
    for b in range(len(saved)):
        alive += saved[b]
        out.append(alive + held[b] + later[b])
    return out


def evaluate(
    graph,
    costs: CostModel,
    choice: list[int],
    memory: MemoryTable | None = None,
    storage: list[str] | None = None,
    recompute: list[bool] | None = None,
    table: StorageTable | None = None,
    exact: bool = True,
) -> Evaluation:
    """Block times, transition times and memory of a choice (config index per block), with each block's
    storage level and recomputation (default: replicated, activations saved).

    Memory is the exact count: blocks free their activations in backward order and a tensor several blocks
    save is counted once. ``exact=False`` gives the ILP's bound instead: every saved activation alive as
    backward starts, a shared tensor once only among blocks that save (not recompute) theirs."""
    block_s = [
        costs.block_time(graph.class_of(b), graph.block_strategies(b)[c].config.name)
        for b, c in zip(graph.blocks, choice)
    ]
    memory = memory or MemoryTable(graph)
    if storage is not None or recompute is not None:
        table = table or StorageTable(graph, costs, memory.owner)
    mem = Memory()
    saved, held, grads, recomputes = [], [], [], []  # per block
    storage_s, recompute_s = [0.0] * len(choice), [0.0] * len(choice)
    for b, c in enumerate(choice):
        row = memory.rows[b][c]
        deltas = []
        if storage is not None and storage[b] != "replicate":
            deltas.append(table.levels(b, c)[storage[b]])
            storage_s[b] = deltas[-1].time_s
        recomputed = table.recompute(b, c) if recompute is not None and recompute[b] else None
        if recomputed is not None:  # None: the block has nothing to drop
            deltas.append(recomputed)
            recompute_s[b] = recomputed.time_s
        recomputes.append(recomputed is not None)
        block_s[b] += storage_s[b] + recompute_s[b]
        mem.params += row.params + sum(d.params for d in deltas)
        mem.optimizer += row.optimizer + sum(d.optimizer for d in deltas)
        mem.reduced += row.reduced + sum(d.reduced for d in deltas)
        grads.append(row.grads + sum(d.grads for d in deltas))
        saved.append(row.activations + sum(d.activations for d in deltas))
        transient = sum(d.transient for d in deltas)
        mem.transient = max(mem.transient, transient)
        mem.in_flight = max(mem.in_flight, row.in_flight)
        held.append(row.in_flight + transient)
    twice = counted_twice(graph, memory.shared, choice, recomputes, kept_inputs=exact)
    saved = [a - t for a, t in zip(saved, twice)]
    mem.grads, mem.activations = sum(grads), sum(saved)
    by_block = backward_bytes(saved, held, grads, memory.grad_position) if exact else []
    if exact:
        mem.backward = max(by_block, default=0)
    else:  # the ILP's: the most one block holds on top of all the saved activations
        mem.in_flight = max(held) - mem.transient if held else 0
    trans = [0.0] * len(graph.blocks)
    for edge in value_edges(graph):
        src = graph.block_strategies(edge.producer)[choice[edge.producer.id]].exit_placements[edge.exit_pos]
        dst = graph.block_strategies(edge.consumer)[choice[edge.consumer.id]].input_placements[edge.input_pos]
        if src is None or dst is None:
            continue
        key = edge.key(src, dst)
        if not key.is_noop:
            trans[edge.consumer.id] += costs.transition_time(key)
    return Evaluation(block_s, trans, mem, by_block, storage_s, recompute_s)


# --------------------------------------------------------------------------
# The ILP
# --------------------------------------------------------------------------


@dataclass
class Solution:
    choice: list[int]  # config index per block
    evaluation: Evaluation
    status: str  # CP-SAT's "OPTIMAL" or "FEASIBLE"; for a given choice (solution_for), what chose it ("baseline dp")
    objective_s: float  # the solver's objective, in seconds
    best_bound_s: float
    seconds: float  # solve time (building the model included)
    tie_segments: bool = False
    memory_limit: int | None = None
    stats: dict = field(default_factory=dict)
    storage: list[str] | None = None  # per block: a cfp.storage level (None: all replicated)
    recompute: list[bool] | None = None  # per block: its activations are recomputed in backward

    @property
    def gap(self) -> float:
        if self.objective_s <= 0:
            return 0.0
        return max(0.0, (self.objective_s - self.best_bound_s) / self.objective_s)

    def to_json(self) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "status": self.status,
            "gap": self.gap,
            "objective": self.objective_s,
            "best_bound": self.best_bound_s,
            "tie_segments": self.tie_segments,
            "time_unit_s": TIME_UNIT_S,
            **self.stats,
        }


def _groups(graph, tie_segments: bool) -> list[tuple]:
    """The decision group of each block."""
    group = [("b", b.id) for b in graph.blocks]
    if tie_segments:
        for s, seg in enumerate(graph.segments):
            period = len(seg.classes)
            for i in range(seg.start, seg.end):
                group[i] = ("s", s, (i - seg.start) % period)
    return group


def _no_config_runs(graph, block, costs) -> str:
    ops = sorted({op_name(graph.traced.nodes[n]) for n in block.nodes})
    failure = getattr(costs, "block_failure", lambda c, n: "")
    reasons = [
        f"{p.config.name}: {failure(graph.class_of(block), p.config.name) or 'infinite cost'}"
        for p in graph.block_strategies(block)
    ]
    return (
        f"No config of block {block.id} ({block.anchor}; ops {', '.join(ops)}) can run under the {costs.name} "
        f"cost model: {'; '.join(reasons)}."
    )


class _Builder:
    """Builds the CP-SAT model over decision groups."""

    def __init__(self, graph, costs: CostModel, tie_segments: bool, storage: bool = True, recompute: bool = True):
        from ortools.sat.python import cp_model

        self.cp_model = cp_model
        self.graph = graph
        self.costs = costs
        self.model = cp_model.CpModel()
        self.group_of = _groups(graph, tie_segments)
        self.memory = MemoryTable(graph)
        # Block times; configs that cannot run are left out.
        self.x: dict[tuple, dict[int, object]] = {}
        self.block_cost: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        # Memory in three parts: always alive (parameters, optimizer state), gradients, saved activations.
        self.mem_terms: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.grad_terms: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.act_terms: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.reduce_terms: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        # The same per block, as (Boolean, bytes), for the backward-order cuts (``add_backward_cut``).
        n = len(graph.blocks)
        self.block_saved: list[list[tuple[object, int]]] = [[] for _ in range(n)]
        self.block_grads: list[list[tuple[object, int]]] = [[] for _ in range(n)]
        self.block_held: list[list[tuple[object, int]]] = [[] for _ in range(n)]  # in flight and transient
        self.n_cuts = 0
        time_cache: dict[tuple[str, str], float] = {}
        for block in graph.blocks:
            g = self.group_of[block.id]
            strategies = graph.block_strategies(block)
            allowed = self.x.get(g)
            if allowed is None:
                allowed = {}
                for c, strategy in enumerate(strategies):
                    k = (graph.class_of(block), strategy.config.name)
                    if k not in time_cache:
                        time_cache[k] = costs.block_time(*k)
                    if math.isfinite(time_cache[k]):
                        allowed[c] = self.model.NewBoolVar(f"x_{block.id}_{c}")
                if not allowed:
                    raise CFPError(_no_config_runs(graph, block, costs))
                self.model.AddExactlyOne(allowed.values())
                self.x[g] = allowed
            for c in allowed:
                self.block_cost[g][c] += self._units(time_cache[(graph.class_of(block), strategies[c].config.name)])
                m = self.memory.rows[block.id][c]
                self.mem_terms[g][c] += m.params + m.optimizer
                self.grad_terms[g][c] += m.grads
                self.act_terms[g][c] += m.activations
                self.reduce_terms[g][c] += m.reduced
                self.block_saved[block.id].append((self.x[g][c], m.activations))
                self.block_grads[block.id].append((self.x[g][c], m.grads))
                self.block_held[block.id].append((self.x[g][c], m.in_flight))
        self.objective_terms: list = []
        # The most any plan reduces (storage levels only take reductions away).
        most_reduced = sum(max(row.values(), default=0) for row in self.reduce_terms.values())
        self.storage = StorageTable(graph, costs, self.memory.owner)
        self.extra_mem: dict[str, list[tuple[object, int]]] = {
            "always": [],
            "grads": [],
            "activations": [],
            "reduced": [],
        }
        self._storage_choices(storage, recompute)
        self.n_transition_vars = 0
        self.y_edges: list[tuple] = []  # (y, producer group, src labels, consumer group, dst labels), for hints
        self._transitions()
        self._tied_params()
        self._shared_saves()
        # Memory.bucket: the chosen configs' reduced bytes where no plan reduces more than a bucket, else a
        # full bucket for every plan (at most BUCKET_MB too many; a min() constraint stalls CP-SAT's LP on
        # large models).
        self.bucket = self._part(self.reduce_terms, "reduced") if most_reduced <= BUCKET_BYTES else BUCKET_BYTES
        for g, costs_g in self.block_cost.items():
            self.objective_terms += [(v, costs_g[c]) for c, v in self.x[g].items() if costs_g[c]]

    @staticmethod
    def _units(seconds: float) -> int:
        return int(round(seconds / TIME_UNIT_S))

    def _storage_choices(self, storage: bool, recompute: bool) -> None:
        """Per (group, config): one Boolean per storage level and one each for saving and recomputing.

        Each set sums to ``x[g, c]``. The cheapest option's seconds and bytes go
        on ``x`` and every option carries only what it adds to that, so no
        coefficient is negative: CP-SAT's bounds stay tight without the LP.
        """
        self.s: dict[tuple, dict[int, dict[str, object]]] = defaultdict(lambda: defaultdict(dict))  # level -> var
        self.r: dict[tuple, dict[int, object]] = defaultdict(dict)  # recompute
        self.keep: dict[tuple, dict[int, object]] = defaultdict(dict)  # save activations
        transient: dict[tuple, list[tuple[object, int]]] = defaultdict(list)
        seen = set()
        for block in self.graph.blocks:
            g = self.group_of[block.id]
            first = g not in seen
            seen.add(g)
            for c, xv in self.x[g].items():
                levels = self.storage.levels(block.id, c) if storage else {}
                rc = self.storage.recompute(block.id, c) if recompute else None
                # An option whose collectives or forward could not be profiled (infinite time) is not offered.
                levels = {name: d for name, d in levels.items() if math.isfinite(d.time_s)}
                rc = rc if rc is not None and math.isfinite(rc.time_s) else None
                sets = []
                if levels:
                    sets.append((self.s[g][c], {"replicate": Variant(), **levels}))
                if rc is not None:
                    sets.append((None, {"keep": Variant(), "recompute": rc}))
                for target, options in sets:
                    if first:
                        made = {name: self.model.NewBoolVar(f"{name}_{block.id}_{c}") for name in options}
                        self.model.Add(sum(made.values()) == xv)
                        if target is None:
                            self.keep[g][c], self.r[g][c] = made["keep"], made["recompute"]
                        else:
                            target.update(made)
                    chosen = (
                        self.s[g].get(c, {})
                        if target is not None
                        else {"keep": self.keep[g].get(c), "recompute": self.r[g].get(c)}
                    )
                    if any(
                        chosen.get(name) is None for name in options
                    ):  # a group's members share its first block's options
                        continue
                    units = {name: self._units(d.time_s) for name, d in options.items()}
                    base_units = min(units.values())
                    self.block_cost[g][c] += base_units
                    for part, terms in (
                        ("always", self.mem_terms),
                        ("grads", self.grad_terms),
                        ("activations", self.act_terms),
                        ("reduced", self.reduce_terms),
                    ):
                        mem = {
                            name: d.params + d.optimizer if part == "always" else getattr(d, part)
                            for name, d in options.items()
                        }
                        base = min(mem.values())
                        terms[g][c] += base
                        extra = [(chosen[name], mem[name] - base) for name in options if mem[name] > base]
                        self.extra_mem[part] += extra
                        per_block = {"grads": self.block_grads, "activations": self.block_saved}.get(part)
                        if per_block is not None:
                            per_block[block.id] += [(self.x[g][c], base), *extra]
                    for name, d in options.items():
                        if units[name] > base_units:
                            self.objective_terms.append((chosen[name], units[name] - base_units))
                        if d.transient:
                            self.block_held[block.id].append((chosen[name], d.transient))
                            if first:
                                transient[g].append((chosen[name], d.transient))
        self.transient_terms = transient
        self.transient, self.transient_bound = self._at_least_each(transient, "transient")
        # In its backward a group also holds the gradients one of its ops has in flight, on its config's choice.
        backward = defaultdict(list, {g: list(terms) for g, terms in transient.items()})
        for g, block in {self.group_of[b.id]: b for b in reversed(self.graph.blocks)}.items():  # a group's first
            rows = self.memory.rows[block.id]
            backward[g] += [(v, rows[c].in_flight) for c, v in self.x[g].items() if rows[c].in_flight]
        self.backward_terms = backward
        self.backward, self.backward_bound = self._at_least_each(backward, "backward")

    def _at_least_each(self, groups: dict[tuple, list[tuple[object, int]]], name: str) -> tuple[object, int]:
        """An integer at least each group's sum of chosen bytes (0 where none has any), and its upper bound."""
        bound = int(max((sum(b for _, b in terms) for terms in groups.values()), default=0))
        if not bound:
            return 0, 0
        var = self.model.NewIntVar(0, bound, name)
        for terms in groups.values():
            self.model.Add(var >= sum(v * b for v, b in terms))
        return var, bound

    def _part(self, terms, part: str):
        return sum(v * terms[g][c] for g, xs in self.x.items() for c, v in xs.items() if terms[g][c]) + sum(
            v * b for v, b in self.extra_mem[part]
        )

    def memory_exprs(self) -> list:
        """The step's peak is at most each of: the start of backward (activations, a block's gradients in
        flight) and its end (gradients, with the bucket being reduced)."""
        always = self._part(self.mem_terms, "always")
        grads = self._part(self.grad_terms, "grads") + self.bucket
        return [always + self.transient + grads, always + self.backward + self._part(self.act_terms, "activations")]

    def add_backward_cut(self, b: int, limit: int) -> None:
        """Block ``b``'s backward within ``limit`` as the exact count holds it (``backward_bytes``): the
        activations it and the blocks before it saved, what it holds, the gradients made after it. Each block's
        own saves (no tensor given back), so the cut removes no plan that fits. Added only where a solution
        broke it: one per block would leave GPT-3 175B without a plan in 60 s."""
        always = self._part(self.mem_terms, "always")
        saved = [t for terms in self.block_saved[: b + 1] for t in terms]
        later = [t for o, terms in enumerate(self.block_grads) if self.memory.grad_position[o] > b for t in terms]
        held = self.block_held[b]
        self.model.Add(always + sum(v * c for v, c in saved + held + later) <= int(limit))
        self.n_cuts += 1

    def add_memory_limit(self, limit: int) -> None:
        for expr in self.memory_exprs():
            self.model.Add(expr <= int(limit))

    def minimize_memory(self) -> None:
        exprs = self.memory_exprs()
        bound = sum(
            max(0, b)
            for terms in (self.mem_terms, self.grad_terms, self.act_terms)
            for row in terms.values()
            for b in row.values()
        )
        bound += sum(max(0, b) for part in self.extra_mem.values() for _, b in part)
        bound += max(self.transient_bound + BUCKET_BYTES, self.backward_bound)
        peak = self.model.NewIntVar(0, int(bound), "peak")
        for expr in exprs:
            self.model.Add(peak >= expr)
        self.model.Minimize(peak)

    def time_expr(self):
        return sum(coef * v for v, coef in self.objective_terms)

    def _labels(self, cache, block, which: str, pos: int) -> tuple[Label, ...]:
        key = (self.graph.class_of(block), which, pos)
        if key not in cache:
            strategies = self.graph.block_strategies(block)
            if which == "exit":
                cache[key] = tuple(normalize(p.exit_placements[pos]) for p in strategies)
            else:
                cache[key] = tuple(normalize(p.input_placements[pos]) for p in strategies)
        return cache[key]

    def _transitions(self) -> None:
        graph, costs = self.graph, self.costs
        labels: dict = {}
        # (producer group, src labels, consumer group, dst labels) -> {(src, dst): units}
        edges: dict[tuple, dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
        tcache: dict[TransitionKey, float] = {}
        for edge in value_edges(graph):
            gp, gc = self.group_of[edge.producer.id], self.group_of[edge.consumer.id]
            src = self._labels(labels, edge.producer, "exit", edge.exit_pos)
            dst = self._labels(labels, edge.consumer, "input", edge.input_pos)
            src_set = {src[a] for a in self.x[gp]} - {None}
            dst_set = {dst[b] for b in self.x[gc]} - {None}
            entry = edges[(gp, src, gc, dst)]
            for s in src_set:
                for d in dst_set:
                    if s == d:
                        continue
                    k = edge.key(s, d)
                    if k not in tcache:
                        tcache[k] = costs.transition_time(k)
                    t = tcache[k]
                    if not math.isfinite(t):
                        raise CFPError(f"The {costs.name} cost model cannot price the transition {k}.")
                    units = self._units(t)
                    if units:
                        entry[(s, d)] += units
        self.n_edges = len(edges)
        for (gp, src, gc, dst), cost in edges.items():
            if not cost:
                continue
            xp, xc = self.x[gp], self.x[gc]
            if gp == gc:  # both ends decided by one choice
                for a, v in xp.items():
                    units = cost.get((src[a], dst[a]), 0)
                    if units:
                        self.objective_terms.append((v, units))
                continue
            srcs = sorted({src[a] for a in xp}, key=_label_order)
            dsts = sorted({dst[b] for b in xc}, key=_label_order)
            if len(srcs) == 1 or len(dsts) == 1:  # linear in the other end
                for b, v in xc.items() if len(srcs) == 1 else ():
                    units = cost.get((srcs[0], dst[b]), 0)
                    if units:
                        self.objective_terms.append((v, units))
                for a, v in xp.items() if len(srcs) > 1 else ():
                    units = cost.get((src[a], dsts[0]), 0)
                    if units:
                        self.objective_terms.append((v, units))
                continue
            y = {(s, d): self.model.NewBoolVar("") for s in srcs for d in dsts}
            self.y_edges.append((y, gp, src, gc, dst))
            self.n_transition_vars += len(y)
            for s in srcs:
                self.model.Add(sum(y[s, d] for d in dsts) == sum(v for a, v in xp.items() if src[a] == s))
            for d in dsts:
                self.model.Add(sum(y[s, d] for s in srcs) == sum(v for b, v in xc.items() if dst[b] == d))
            self.objective_terms += [(y[k], units) for k, units in cost.items() if units]

    def _shared_saves(self) -> None:
        """A tensor that several blocks save is counted once where no transition copies it (``cfp.shared``).

        For each shared value and each placement ``s`` its producer may leave
        it in: the producer holds it on the options that save it; consumer
        ``k`` holds it (Boolean ``h``) only if it takes ``s`` too and saves it
        on its chosen option; ``held`` is 1 if anyone holds it. The activations
        give back ``bytes(s) * (holders - held)``: each holder beyond the first.
        ``h`` and ``held`` are only bounded the way that keeps the count sound:
        the solver may over-count, never under-count. Only blocks that save
        their activations count as holders here: a recomputed block's kept
        inputs are given back by the exact count alone (``evaluate``), since
        on GPT-3 175B their variables left the ILP without a plan in 60 s.
        """
        graph, mesh_shape = self.graph, tuple(self.graph.mesh.shape)

        def keep_option(g, c):
            """The Boolean for (group, config) saving its activations (not recomputing them)."""
            return self.keep.get(g, {}).get(c, self.x[g][c])

        self.n_shared_vars = 0
        self.shared: list[tuple] = []  # (held, producer's saving options, [(h, consumer's saving options, leaves)])
        for value in self.memory.shared:
            gp = self.group_of[value.producer.id]
            labels = {c: value.exit_label(graph, c) for c in self.x[gp]}
            for s in sorted({lab for lab in labels.values() if lab is not None}, key=_label_order):
                leaves = [self.x[gp][c] for c, lab in labels.items() if lab == s]
                producer = [
                    keep_option(gp, c)
                    for c, lab in labels.items()
                    if lab == s and value.producer_saves(graph, c, False)
                ]
                consumers = []
                for edge in value.edges:
                    gc = self.group_of[edge.consumer.id]
                    saves = []
                    for c in self.x[gc]:
                        if value.input_label(graph, edge, c) != s:
                            continue
                        if value.consumer_saves(graph, edge, c):
                            saves.append(keep_option(gc, c))
                    if saves:
                        consumers.append(saves)
                if bool(producer) + len(consumers) < 2:  # one holder at most
                    continue
                held = self.model.NewBoolVar("")
                if producer:
                    self.model.Add(held >= sum(producer))
                holders = []
                for saves in consumers:
                    h = self.model.NewBoolVar("")
                    self.model.Add(h <= sum(saves))
                    self.model.Add(h <= sum(leaves))
                    self.model.Add(held >= h)
                    self.extra_mem["activations"].append((h, -value.nbytes(s, mesh_shape)))
                    holders.append((h, saves, leaves))
                    self.n_shared_vars += 1
                self.shared.append((held, producer, holders))
                self.extra_mem["activations"] += [(v, -value.nbytes(s, mesh_shape)) for v in producer]
                self.extra_mem["activations"].append((held, value.nbytes(s, mesh_shape)))
                self.n_shared_vars += 1

    def _tied_params(self) -> None:
        """A parameter read by several blocks takes one placement."""
        graph = self.graph
        self.tied = shared_parameters(graph)
        for _param, rs in self.tied.items():
            b0, p0 = rs[0]
            g0 = self.group_of[b0]
            first = {c: normalize(graph.block_strategies(b0)[c].input_placements[p0]) or () for c in self.x[g0]}
            for b1, p1 in rs[1:]:
                g1 = self.group_of[b1]
                if g1 == g0 and p1 == p0:
                    continue
                other = {c: normalize(graph.block_strategies(b1)[c].input_placements[p1]) or () for c in self.x[g1]}
                for label in set(first.values()) | set(other.values()):
                    self.model.Add(
                        sum(self.x[g0][c] for c, lab in first.items() if lab == label)
                        == sum(self.x[g1][c] for c, lab in other.items() if lab == label)
                    )

    def choice(self, solver) -> list[int]:
        out = []
        for block in self.graph.blocks:
            xs = self.x[self.group_of[block.id]]
            out.append(next(c for c, v in xs.items() if solver.BooleanValue(v)))
        return out

    def storage_choice(self, solver, choice: list[int]) -> tuple[list[str], list[bool]]:
        """Per block: the storage level and whether it recomputes, as solved."""
        levels, recompute = [], []
        for block, c in zip(self.graph.blocks, choice):
            g = self.group_of[block.id]
            chosen = [name for name, v in self.s[g].get(c, {}).items() if solver.BooleanValue(v)] if g in self.s else []
            levels.append(chosen[0] if chosen else "replicate")
            r = self.r[g].get(c) if g in self.r else None
            recompute.append(bool(r is not None and solver.BooleanValue(r)))
        return levels, recompute

    def exclude(self, choice: list[int]) -> None:
        """A no-good cut: no later solution may take every decision of ``choice`` again."""
        chosen = {self.group_of[b]: self.x[self.group_of[b]][c] for b, c in enumerate(choice)}
        self.model.Add(sum(chosen.values()) <= len(chosen) - 1)
        self.model.ClearHints()

    def hint(self, choice: list[int], storage: list[str] | None = None, recompute: list[bool] | None = None) -> None:
        done = set()
        for block in self.graph.blocks:
            g = self.group_of[block.id]
            if g in done:
                continue
            done.add(g)
            mine = choice[block.id]
            for c, v in self.x[g].items():
                self.model.AddHint(v, int(c == mine))
            level = storage[block.id] if storage is not None else "replicate"
            rc = bool(recompute is not None and recompute[block.id])
            for c, levels in self.s.get(g, {}).items():
                for name, v in levels.items():
                    self.model.AddHint(v, int(c == mine and level == name))
            for c, v in self.r.get(g, {}).items():
                self.model.AddHint(v, int(c == mine and rc))
                self.model.AddHint(self.keep[g][c], int(c == mine and not rc))
        # A complete hint: CP-SAT starts from it as a solution instead of repairing it under the memory sum.
        picked = {self.group_of[b.id]: choice[b.id] for b in self.graph.blocks}
        for y, gp, src, gc, dst in self.y_edges:
            chosen = (src[picked[gp]], dst[picked[gc]])
            for k, v in y.items():
                self.model.AddHint(v, int(k == chosen))
        on = {  # per group, its first block's storage level and recomputation (reversed: the first writes last)
            self.group_of[b.id]: (storage[b.id] if storage else "replicate", bool(recompute and recompute[b.id]))
            for b in reversed(self.graph.blocks)
        }
        for var, groups in ((self.transient, self.transient_terms), (self.backward, self.backward_terms)):
            if isinstance(var, int):
                continue
            value = 0
            for g, terms in groups.items():
                level, rc = on[g]
                chosen = {
                    self.x[g][picked[g]],
                    self.s[g].get(picked[g], {}).get(level),
                    self.r[g].get(picked[g]) if rc else None,
                } - {None}
                value = max(value, sum(b for v, b in terms if any(v is w for w in chosen)))
            self.model.AddHint(var, value)
        on_vars = set()
        for g, c in picked.items():
            rc = on[g][1] and c in self.r.get(g, {})
            on_vars.add(id(self.x[g][c]))
            on_vars.add(id(self.r[g][c] if rc else self.keep.get(g, {}).get(c, self.x[g][c])))

        def chosen(vs) -> bool:
            return any(id(v) in on_vars for v in vs)

        for held, producer, holders in self.shared:
            hs = [chosen(saves) and chosen(leaves) for _, saves, leaves in holders]
            for (h, _, _), value in zip(holders, hs):
                self.model.AddHint(h, int(value))
            self.model.AddHint(held, int(chosen(producer) or any(hs)))


def _solver(time_limit_s: float, workers: int):
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(workers)
    solver.parameters.linearization_level = 2  # the LP bound is nearly tight here; 2-4x faster on deep models
    # With several workers the portfolio's full-problem worker is default_lp, which lowers the linearization
    # level again; max_lp keeps it. Without it the storage and recomputation choices leave the bound open.
    solver.parameters.subsolvers.append("max_lp")
    return solver


def min_memory(graph, costs: CostModel, options: SolveOptions | None = None, **kwargs) -> tuple[Memory, list[int]]:
    """The least per-device memory any plan needs (tied parameters agreeing) by the ILP's count
    (``evaluate(exact=False)``, which the backward-order cuts of ``best_plans`` may tighten), and that plan.

    ``options`` (or its fields as keywords) as for ``solve``; ``memory_limit`` and ``hint_first`` do not apply,
    and the time limit defaults to 30 s."""
    options = dataclasses.replace(options or SolveOptions(time_limit_s=30.0), **kwargs)
    builder = _Builder(graph, costs, options.tie_segments, options.storage, options.recompute)
    builder.minimize_memory()
    solver = _solver(options.time_limit_s, options.workers)
    status = solver.Solve(builder.model)
    if status not in (builder.cp_model.OPTIMAL, builder.cp_model.FEASIBLE):
        raise CFPError(
            "No plan satisfies the model's constraints (tied parameters cannot agree on a placement); "
            f"solver status {solver.StatusName(status)}."
        )
    choice = builder.choice(solver)
    levels, recomputed = builder.storage_choice(solver, choice)
    return evaluate(
        graph, costs, choice, builder.memory, levels, recomputed, builder.storage, exact=False
    ).memory, choice


def solve(graph, costs: CostModel, options: SolveOptions | None = None, **kwargs) -> Solution:
    """Choose one config per block minimising predicted step time under ``options.memory_limit`` bytes per device.

    ``options`` fields may also be given as keywords (``memory_limit=...``), which override it.
    """
    return best_plans(graph, costs, 1, options, **kwargs)[0]


def best_plans(graph, costs: CostModel, k: int, options: SolveOptions | None = None, **kwargs) -> list[Solution]:
    """The ``k`` best distinct plans (differing in at least one block's config), best first.

    After each solve the found assignment is excluded by a no-good cut (not all
    of its decisions again) and the same model is solved again, so the i-th
    plan is the best one that differs from the i-1 before it. Fewer than ``k``
    come back when fewer plans exist. ``options.time_limit_s`` holds for each solve.
    """
    options = dataclasses.replace(options or SolveOptions(), **kwargs)
    memory_limit, tie_segments, time_limit_s = options.memory_limit, options.tie_segments, options.time_limit_s
    if k < 1:
        raise CFPError(f"Asked for {k} plans; ask for at least one.")
    start = time.perf_counter()
    builder = _Builder(graph, costs, tie_segments, options.storage, options.recompute)
    if memory_limit is not None:
        builder.add_memory_limit(memory_limit)
    builder.model.Minimize(builder.time_expr())
    # A good first solution: the tied-segments optimum (a far smaller ILP), else data parallel.
    hint, hint_from, tied = None, None, None
    if not tie_segments and graph.segments and options.hint_first:
        try:
            tied = solve(
                graph, costs, options, tie_segments=True, time_limit_s=min(10.0, time_limit_s / 4), hint_first=False
            )
            hint, hint_from = tied, "tie_segments"
        except CFPError:
            hint, tied = None, None
    if hint is None:
        hint, hint_from = baselines.dp(graph), "dp"
    if isinstance(hint, Solution):
        builder.hint(hint.choice, hint.storage, hint.recompute)
        hint = hint.choice
    elif all(c in builder.x[builder.group_of[b]] for b, c in enumerate(hint)):
        builder.hint(hint)
    built = time.perf_counter()
    stats = {
        "build_seconds": round(built - start, 3),
        "variables": sum(len(v) for v in builder.x.values()) + builder.n_transition_vars + builder.n_shared_vars,
        "decision_groups": len(builder.x),
        "tied_parameters": len(builder.tied),
        "hint": hint_from,
        "storage_choices": options.storage,
        "recompute_choices": options.recompute,
    }
    solver = _solver(time_limit_s, options.workers)
    cp = builder.cp_model
    found: list[Solution] = []
    rounds = 0  # of backward-order cuts
    while len(found) < k:
        status = solver.Solve(builder.model)
        if status not in (cp.OPTIMAL, cp.FEASIBLE):
            if found:  # no further distinct plan (or none within the time limit)
                break
            if status == cp.INFEASIBLE and builder.n_cuts:
                raise CFPError(
                    f"No plan fits in {human_bytes(memory_limit)} per device on mesh {graph.mesh} once blocks free "
                    f"their activations in backward order: {builder.n_cuts} cuts for the blocks whose backward "
                    "broke the limit left no plan. Use a larger mesh, a smaller batch or sequence, or raise --memory."
                )
            if status == cp.INFEASIBLE:
                _explain_infeasible(graph, costs, options)
            if tied is not None:
                tied.status, tied.stats["untied"] = (
                    f"{tied.status} (segments tied: untied search found no plan in time)",
                    solver.StatusName(status),
                )
                return [tied]
            raise CFPError(
                f"The ILP found no plan within {time_limit_s:.0f} s (solver status {solver.StatusName(status)}). "
                f"Allow more time, or pass --tie-segments to shrink the problem."
            )
        choice = builder.choice(solver)
        levels, recomputed = builder.storage_choice(solver, choice)
        solution = Solution(
            choice=choice,
            evaluation=evaluate(graph, costs, choice, builder.memory, levels, recomputed, builder.storage),
            status=solver.StatusName(status),
            objective_s=solver.ObjectiveValue() * TIME_UNIT_S,
            best_bound_s=solver.BestObjectiveBound() * TIME_UNIT_S,
            seconds=time.perf_counter() - start,
            tie_segments=tie_segments,
            memory_limit=memory_limit,
            stats={**stats, "backward_cuts": builder.n_cuts},
            storage=levels,
            recompute=recomputed,
        )
        start = time.perf_counter()
        if memory_limit is not None and solution.evaluation.memory.total > memory_limit:
            # The ILP bounds the activations all at once, the exact count frees them in backward order, where the
            # gradients made by later blocks join them: cut the blocks whose backward breaks the limit, solve again.
            rounds += 1
            if rounds > MAX_CUT_ROUNDS:
                raise CFPError(
                    f"After {MAX_CUT_ROUNDS} rounds of cuts the ILP's plan is still over the memory limit by the "
                    f"exact count ({human_bytes(solution.evaluation.memory.total)} > {human_bytes(memory_limit)}); "
                    "allow more memory or time."
                )
            always = solution.evaluation.memory.params + solution.evaluation.memory.optimizer
            for b, held in enumerate(solution.evaluation.backward_bytes):
                if always + held > memory_limit:
                    builder.add_backward_cut(b, memory_limit)
            continue
        builder.exclude(choice)
        found.append(solution)
    # A solve cut short by the time limit may come back worse than a later one.
    return sorted(found, key=lambda s: s.objective_s)


def solution_for(
    graph,
    costs: CostModel,
    choice: list[int],
    status: str,
    memory_limit: int | None = None,
    storage: list[str] | None = None,
    recompute: list[bool] | None = None,
) -> Solution:
    """A Solution that was not searched for (a baseline, a plan chosen by hand), evaluated under ``costs``."""
    ev = evaluate(graph, costs, choice, storage=storage, recompute=recompute)
    if memory_limit is not None and ev.memory.total > memory_limit:
        status += " (over the memory limit)"
    return Solution(
        choice=list(choice),
        evaluation=ev,
        status=status,
        objective_s=ev.total_s,
        best_bound_s=ev.total_s,
        seconds=0.0,
        memory_limit=memory_limit,
        storage=storage,
        recompute=recompute,
    )


def _without(storage: bool, recompute: bool) -> str:
    off = [what for what, on in (("storage sharding", storage), ("recomputation", recompute)) if not on]
    return f" with {' and '.join(off)} turned off" if off else ""


def _explain_infeasible(graph, costs, options: SolveOptions) -> None:
    memory_limit = options.memory_limit
    if memory_limit is None:
        raise CFPError(
            "No plan satisfies the model's constraints: tied parameters cannot agree on one placement under any config."
        )
    least, _ = min_memory(graph, costs, options)
    raise CFPError(
        f"No plan fits in {human_bytes(memory_limit)} per device on mesh {graph.mesh}. "
        f"The least memory any plan needs is {human_bytes(least.total)} per device: "
        f"parameters {human_bytes(least.params)}, gradients {human_bytes(least.grads)}, "
        f"optimizer state {human_bytes(least.optimizer)}, activations {human_bytes(least.activations)}, "
        f"transient {human_bytes(least.transient)}; "
        f"gradients and activations peak at different times, the larger counts "
        f"({least.dominant()} dominate){_without(options.storage, options.recompute)}. "
        f"Use a larger mesh, a smaller batch or sequence, or raise --memory."
    )
