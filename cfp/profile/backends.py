"""Profiling backends: where a profile job's programs run and are timed.

A backend is a ``Backend``: a context manager with a ``name`` (recorded in
every row the job makes, so rows of different backends never mix) and
``run(job, warmup, iters, seed, timeout_s) -> row``, which runs ``jobs.execute``
on every rank and returns ``jobs.combine`` of their results. ``BACKENDS``
maps each name to the factory that makes it for a profiling run
(``register_backend``); ``runner.profile`` and the ``--backend`` choices read
it.

- ``real``: a ``PoolBackend`` of spawned processes, one per mesh rank, on
  this host (``cfp.profile.real.WorkerPool``); or, when the command itself
  runs as one rank of a ``torchrun`` job, a ``TorchrunBackend`` over that
  job's ranks. Both form their process group as a ``ProcessGroupSpec``
  says: gloo on CPU and NCCL on CUDA by default, meeting over a
  ``FileStore`` (a pool) or torchrun's environment.
- ``emulated``: an ``EmulatedBackend``, one process over the fake process
  group of the mesh size; the local-shard computation is real, the
  collectives move no data and are priced by a ``ClusterModel``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from cfp.analyze import BlockGraph, analyze
from cfp.capture import capture
from cfp.cluster import ClusterModel
from cfp.errors import CFPError
from cfp.mesh import MeshSpec, device_mesh, fake_mesh, launched_rank, launched_world
from cfp.profile.jobs import Job, RankContext, combine, combine_ranks, execute
from cfp.profile.program import RUNTIMES
from cfp.profile.real import ProcessGroupSpec, WorkerPool, cpu_cores, prepare_rank, rank_device
from cfp.spec import ModelSpec, build


class Backend(Protocol):
    """Where profile jobs run. Entering it makes it ready to run jobs; leaving it stops what it started.

    A backend may start lazily, on its first job (a pool of processes costs a
    model rebuild per rank, which a run whose rows are all stored does not
    need). One whose ranks are this process and its peers (a ``torchrun``
    job) joins them on entry instead, so that they agree on which jobs to run.
    """

    name: str  # recorded in every row (runner.job_key): rows of different backends never mix
    runtimes: tuple[str, ...]  # the runtimes it can time (RUNTIMES); another request times the first
    writes: bool  # whether this process stores rows and reports: every process but a torchrun job's ranks past 0

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc) -> None: ...

    def broadcast(self, value: Any) -> Any:
        """The writing rank's ``value``, on every rank: each runs the same jobs."""
        ...

    def run(self, job: Job, warmup: int, iters: int, seed: int, timeout_s: float) -> dict:
        """One job's row measurements (``jobs.combine`` of every rank's ``jobs.execute``)."""
        ...


@dataclass(frozen=True)
class BackendSetup:
    """What a profiling run gives a backend factory."""

    spec: ModelSpec  # the model, for ranks that rebuild it
    graph: BlockGraph  # its analysis in this process
    cluster: ClusterModel | None  # the target cluster, for backends that price communication
    device_type: str  # "cpu" or "cuda"
    timeout_s: float  # how long a job (or a start-up) may take before its ranks count as hung


BACKENDS: dict[str, Callable[[BackendSetup], Backend]] = {}


def register_backend(name: str) -> Callable:
    """Register a backend factory ``(BackendSetup) -> Backend`` under ``name`` (a ``--backend`` choice)."""

    def register(factory: Callable[[BackendSetup], Backend]) -> Callable[[BackendSetup], Backend]:
        BACKENDS[name] = factory
        return factory

    return register


def make_backend(name: str, setup: BackendSetup) -> Backend:
    if name not in BACKENDS:
        raise CFPError(f"Unknown backend {name!r}; use one of {', '.join(BACKENDS)}.")
    return BACKENDS[name](setup)


# -- rank side (module level, so spawn can pickle them) ---------------------------


def profile_rank_init(rank: int, world: int, spec: ModelSpec, mesh: MeshSpec, device_type: str):
    """Rebuild the model on this rank's device, capture and analyse it (before the real PG exists)."""
    device = rank_device(device_type)
    traced = capture(build(dataclasses.replace(spec, device=device)))
    graph = analyze(traced, mesh)
    info = {
        "fingerprint": traced.fingerprint(),
        "configs": {c: [p.config.name for p in ps] for c, ps in graph.strategies.items()},
    }
    return RankContext(graph=graph, mesh=None, device=device), info


def run_job(ctx: RankContext, job: Job, warmup: int, iters: int, seed: int) -> dict:
    return execute(ctx, job, warmup, iters, seed)


# -- the backends ------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class EmulatedBackend:
    """One process over the fake process group; collectives priced by a cluster model."""

    name = "emulated"
    # Lowering over the fake process group fails in AOTAutograd's partitioner for some blocks
    # (a tangent classified as a forward output), so the emulated backend times the interpreter.
    runtimes = ("interpreted",)
    writes = True

    def __init__(
        self, graph: BlockGraph, mesh: MeshSpec, cluster: ClusterModel, device: str = "cpu", threads: int | None = None
    ):
        if cluster is None:
            raise CFPError(
                "The emulated backend needs a cluster model (--cluster NAME or FILE) to price communication."
            )
        self.graph, self.mesh, self.cluster, self.device = graph, mesh, cluster, device
        # One rank's share of the host, as the real backend gives each rank.
        self.threads = threads or max(1, cpu_cores() // min(mesh.size, cpu_cores()))
        self.ctx: RankContext | None = None

    def _start(self) -> None:
        self._cm = fake_mesh(self.mesh)
        mesh = self._cm.__enter__()
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.ctx = RankContext(graph=self.graph, mesh=mesh, device=self.device)

    def __enter__(self) -> EmulatedBackend:
        return self  # the fake process group is joined on the first job

    def __exit__(self, *exc) -> None:
        if self.ctx is not None:
            self._cm.__exit__(*exc)
            torch.set_num_threads(self._threads_before)
            self.ctx = None

    def broadcast(self, value: Any) -> Any:
        return value

    def price(self, collectives) -> dict[str, float]:
        out = {"forward": 0.0, "backward": 0.0, "reduce": 0.0}
        for kind, dim, nbytes, phase in collectives:
            out[phase] = out.get(phase, 0.0) + self.cluster.collective_time(kind, nbytes, self.mesh, max(dim, 0))
        return out

    def run(self, job: Job, warmup: int, iters: int, seed: int, timeout_s: float) -> dict:
        if self.ctx is None:
            self._start()
        try:
            result = execute(self.ctx, job, warmup, iters, seed)
        except CFPError:
            raise
        except Exception as exc:
            raise CFPError(f"Profiling {job.describe()} failed (emulated): {_first_line(exc)}") from exc
        priced = self.price(result.get("collectives", [])) if result["status"] == "ok" else None
        return combine([result], priced)


class PoolBackend:
    """One spawned process per mesh rank on this host (a ``WorkerPool``), started on the first job."""

    name = "real"
    runtimes = RUNTIMES
    writes = True

    def __init__(
        self,
        spec: ModelSpec,
        graph: BlockGraph,
        mesh: MeshSpec,
        device_type: str = "cpu",
        start_timeout_s: float = 600.0,
        group: ProcessGroupSpec | None = None,
    ):
        self.spec, self.graph, self.mesh, self.device_type = spec, graph, mesh, device_type
        self.start_timeout_s = start_timeout_s
        self.group = group or ProcessGroupSpec()
        self.pool: WorkerPool | None = None

    def _start(self) -> None:
        self.pool = WorkerPool(
            self.mesh,
            profile_rank_init,
            (self.spec, self.mesh, self.device_type),
            self.device_type,
            self.start_timeout_s,
            group=self.group,
        ).start()
        want = self.graph.traced.fingerprint()
        configs = {c: [p.config.name for p in ps] for c, ps in self.graph.strategies.items()}
        for rank, info in enumerate(self.pool.infos):
            if info["fingerprint"] != want or info["configs"] != configs:
                self.pool.close()
                raise CFPError(
                    f"Rank {rank} rebuilt a different model or analysis than the parent "
                    f"(fingerprint {info['fingerprint']} vs {want}); is the model factory deterministic?"
                )

    def __enter__(self) -> PoolBackend:
        return self  # the pool starts on the first job

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()

    def broadcast(self, value: Any) -> Any:
        return value

    def run(self, job: Job, warmup: int, iters: int, seed: int, timeout_s: float) -> dict:
        if self.pool is None or not self.pool.procs:
            self._start()
        results = self.pool.run(run_job, (job, warmup, iters, seed), f"profiling {job.describe()}", timeout_s)
        statuses = {r["status"] for r in results}
        if "ok" in statuses and len(statuses) > 1:  # some ranks ran out of memory: the others may be stuck
            self.pool.close()
            self.pool = None
        return combine_ranks(job, results)


class TorchrunBackend:
    """The real backend inside a ``torchrun`` job: this process is one mesh rank.

    Every rank runs every job, results are all-gathered so every rank builds
    the same table, and rank 0's store decides which jobs run (``broadcast``);
    only rank 0 writes.
    """

    name = "real"
    runtimes = RUNTIMES

    def __init__(
        self,
        graph: BlockGraph,
        mesh: MeshSpec,
        device_type: str = "cpu",
        pg_timeout_s: float = 600.0,
        group: ProcessGroupSpec | None = None,
    ):
        world = launched_world()
        if world != mesh.size:
            raise CFPError(
                f"Mesh {mesh} needs {mesh.size} ranks; this torchrun job has {world}. "
                f"Pass --nproc-per-node and --nnodes that multiply to {mesh.size}."
            )
        self.graph, self.mesh, self.device_type, self.pg_timeout_s = graph, mesh, device_type, pg_timeout_s
        self.group = group or ProcessGroupSpec()
        self.writes = launched_rank() == 0
        self.own_group = False

    def __enter__(self) -> TorchrunBackend:
        prepare_rank(self.device_type)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.mesh.size))
        if self.device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            torch.set_num_threads(max(1, cpu_cores() // local_world))
        if not dist.is_initialized():
            self.group.init(self.device_type, self.pg_timeout_s)
            self.own_group = True
        self.ctx = RankContext(
            graph=self.graph,
            mesh=device_mesh(self.mesh, self.device_type),
            device=rank_device(self.device_type),
            rank=dist.get_rank(),
        )
        prints = self.gather(self.graph.traced.fingerprint())
        if len(set(prints)) > 1:
            raise CFPError(
                f"The ranks built different models (fingerprints {sorted(set(prints))}); "
                "is the model factory deterministic, and the same code on every host?"
            )
        return self

    def __exit__(self, *exc) -> None:
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, value) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run(self, job: Job, warmup: int, iters: int, seed: int, timeout_s: float) -> dict:
        try:
            result = execute(self.ctx, job, warmup, iters, seed)
        except Exception as exc:  # every rank learns of it below and stops alike
            result = {"status": "error", "error": _first_line(exc)}
        try:
            results = self.gather(result)
        except Exception as exc:
            raise CFPError(
                f"The ranks lost each other while profiling {job.describe()} ({type(exc).__name__}: {exc}); "
                "a rank crashed or hung."
            ) from exc
        failed = [(r, res["error"]) for r, res in enumerate(results) if res["status"] == "error"]
        if failed:
            raise CFPError(f"Rank {failed[0][0]} failed while profiling {job.describe()}: {failed[0][1]}")
        return combine_ranks(job, results)


# -- the registry ------------------------------------------------------------------


@register_backend("real")
def real_backend(setup: BackendSetup) -> Backend:
    """Real devices, one process per mesh rank: this torchrun job's ranks when launched so, else a spawned pool."""
    if launched_world() > 1:
        return TorchrunBackend(setup.graph, setup.graph.mesh, setup.device_type, setup.timeout_s)
    return PoolBackend(setup.spec, setup.graph, setup.graph.mesh, setup.device_type, start_timeout_s=setup.timeout_s)


@register_backend("emulated")
def emulated_backend(setup: BackendSetup) -> Backend:
    """One process, the fake process group, communication priced by ``setup.cluster``."""
    device = "cpu" if setup.device_type == "cpu" else "cuda:0"
    return EmulatedBackend(setup.graph, setup.graph.mesh, setup.cluster, device=device)
