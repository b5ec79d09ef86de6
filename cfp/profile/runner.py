"""Profiling a BlockGraph: jobs, backends, the store, and the resulting ProfileTable.

Backends (``backend.name`` is recorded in every row):

- ``real``: a ``WorkerPool`` of one process per mesh rank. Each rank
  rebuilds the model on its own device from the ModelSpec, captures and
  analyses it (deterministic; the parent checks fingerprints), then times
  the jobs it is sent. Per-iteration times are the max over ranks.
- ``real`` under ``torchrun``: when the command itself runs as one rank of
  a ``torchrun`` job (one host or many), ``TorchrunBackend`` uses that job's
  process group instead of a pool: every rank analyses the model, rank 0's
  store decides which jobs to run, every rank runs each job, and results are
  all-gathered so every rank builds the same table; rank 0 writes the store.
- ``emulated``: one process, the fake process group of the mesh size, the
  real local-shard computation on the local device; the collectives move
  no data and are priced by a ``ClusterModel`` from what ``CommRecorder``
  saw. It is a model of the target cluster, not a measurement of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.distributed as dist

from cfp.analyze import BlockGraph, analyze
from cfp.capture import capture
from cfp.cluster import ClusterModel
from cfp.costs import unique_transitions
from cfp.errors import CFPError, CFPWarning
from cfp.mesh import MeshSpec, device_mesh, fake_mesh, launched_rank, launched_world
from cfp.placements import to_strs
from cfp.profile.jobs import Job, RankContext, combine, execute
from cfp.profile.program import RUNTIMES
from cfp.profile.real import WorkerPool, cpu_cores, quiet_gloo_alltoall, rank_device
from cfp.profile.store import (
    NOISY_SPREAD,
    SCHEMA,
    ProfileStore,
    ProfileTable,
    transition_config,
)
from cfp.spec import ModelSpec, build

BACKENDS = ("real", "emulated")
DEFAULT_BACKEND = "real"  # `cfp profile` and profile(): measure this machine unless told to emulate one


def mesh_key(mesh: MeshSpec) -> str:
    return "x".join(str(s) for s in mesh.shape)


def device_kind(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(0)
    return "cpu"


def cluster_key(cluster: ClusterModel | None) -> str:
    if cluster is None:
        return ""
    digest = hashlib.sha256(json.dumps(cluster.to_json(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{cluster.name}@{digest}"


def block_jobs(graph: BlockGraph, runtime: str = "lowered") -> list[Job]:
    return [
        Job("block", class_id, p.config.name, runtime=runtime)
        for class_id in graph.classes
        for p in graph.configs[class_id]
    ]


def transition_jobs(graph: BlockGraph, runtime: str = "lowered") -> list[Job]:
    from cfp.storage import StorageTable  # parameters stored sharded are gathered and reduce-scattered

    keys = unique_transitions(graph) | StorageTable(graph).transition_keys()
    keys = sorted(keys, key=lambda k: (k.shape, k.dtype, to_strs(k.src), to_strs(k.dst)))
    return [Job("transition", transition=k, runtime=runtime) for k in keys]


def job_key(
    job: Job, graph: BlockGraph, mesh: MeshSpec, backend: str, device: str, cluster: ClusterModel | None
) -> dict:
    common = {
        "kind": job.kind,
        "mesh": mesh_key(mesh),
        "device_kind": device,
        "backend": backend,
        "cluster": cluster_key(cluster) if backend == "emulated" else "",
        "runtime": job.runtime,
        "torch_version": torch.__version__,
        "schema": SCHEMA,
    }
    if job.kind == "block":
        block = graph.blocks[graph.classes[job.class_id][0]]
        shapes = []
        for i in block.inputs:
            val = graph.traced.nodes[i.name].meta.get("val")
            shapes.append(
                [list(val.shape), str(val.dtype).removeprefix("torch.")] if isinstance(val, torch.Tensor) else None
            )
        dtype = str(graph.traced.nodes[block.anchor].meta["val"].dtype).removeprefix("torch.")
        return {
            **common,
            "class_id": job.class_id,
            "config": job.config,
            "shape_key": json.dumps(shapes),
            "dtype": dtype,
        }
    k = job.transition
    return {
        **common,
        "class_id": "transition",
        "config": transition_config(k),
        "shape_key": json.dumps(list(k.shape)),
        "dtype": k.dtype,
    }


# -- rank side -----------------------------------------------------------------


def profile_rank_init(rank: int, world: int, spec: ModelSpec, mesh: MeshSpec, device_type: str):
    """Rebuild the model on this rank's device, capture and analyse it (before the real PG exists)."""
    device = rank_device(device_type)
    traced = capture(build(dataclasses.replace(spec, device=device)))
    graph = analyze(traced, mesh)
    info = {
        "fingerprint": traced.fingerprint(),
        "configs": {c: [p.config.name for p in ps] for c, ps in graph.configs.items()},
    }
    return RankContext(graph=graph, mesh=None, device=device), info


def run_job(ctx: RankContext, job: Job, warmup: int, iters: int, seed: int) -> dict:
    return execute(ctx, job, warmup, iters, seed)


# -- backends ------------------------------------------------------------------


class EmulatedBackend:
    name = "emulated"

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

    def __enter__(self):
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self._cm = fake_mesh(self.mesh)
        self.ctx = RankContext(graph=self.graph, mesh=self._cm.__enter__(), device=self.device)
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        torch.set_num_threads(self._threads_before)

    def price(self, collectives) -> dict[str, float]:
        out = {"forward": 0.0, "backward": 0.0, "grad": 0.0}
        for kind, dim, nbytes, phase in collectives:
            out[phase] = out.get(phase, 0.0) + self.cluster.collective_time(kind, nbytes, self.mesh, max(dim, 0))
        return out

    def run(self, job: Job, warmup: int, iters: int, seed: int, timeout_s: float) -> dict:
        try:
            result = execute(self.ctx, job, warmup, iters, seed)
        except CFPError:
            raise
        except Exception as exc:
            raise CFPError(
                f"Profiling {job.describe()} failed (emulated): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        priced = self.price(result.get("collectives", [])) if result["status"] == "ok" else None
        return combine([result], priced)


class RealBackend:
    name = "real"

    def __init__(
        self,
        spec: ModelSpec,
        graph: BlockGraph,
        mesh: MeshSpec,
        device_type: str = "cpu",
        start_timeout_s: float = 600.0,
    ):
        self.spec, self.graph, self.mesh, self.device_type = spec, graph, mesh, device_type
        self.start_timeout_s = start_timeout_s
        self.pool: WorkerPool | None = None

    def _start(self) -> None:
        self.pool = WorkerPool(
            self.mesh,
            profile_rank_init,
            (self.spec, self.mesh, self.device_type),
            self.device_type,
            self.start_timeout_s,
        ).start()
        want = self.graph.traced.fingerprint()
        configs = {c: [p.config.name for p in ps] for c, ps in self.graph.configs.items()}
        for rank, info in enumerate(self.pool.infos):
            if info["fingerprint"] != want or info["configs"] != configs:
                self.pool.close()
                raise CFPError(
                    f"Rank {rank} rebuilt a different model or analysis than the parent "
                    f"(fingerprint {info['fingerprint']} vs {want}); is the model factory deterministic?"
                )

    def __enter__(self):
        self._start()
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.close()

    def run(self, job: Job, warmup: int, iters: int, seed: int, timeout_s: float) -> dict:
        if self.pool is None or not self.pool.procs:
            self._start()
        results = self.pool.run(run_job, (job, warmup, iters, seed), f"profiling {job.describe()}", timeout_s)
        statuses = {r["status"] for r in results}
        if "ok" in statuses and len(statuses) > 1:  # some ranks ran out of memory: the others may be stuck
            self.pool.close()
            self.pool = None
        return combine(results)


class TorchrunBackend:
    """The real backend inside a ``torchrun`` job: this process is one mesh rank."""

    name = "real"

    def __init__(self, graph: BlockGraph, mesh: MeshSpec, device_type: str = "cpu", pg_timeout_s: float = 600.0):
        world = launched_world()
        if world != mesh.size:
            raise CFPError(
                f"Mesh {mesh} needs {mesh.size} ranks; this torchrun job has {world}. "
                f"Pass --nproc-per-node and --nnodes that multiply to {mesh.size}."
            )
        self.graph, self.mesh, self.device_type, self.pg_timeout_s = graph, mesh, device_type, pg_timeout_s
        self.own_group = False

    def __enter__(self):
        quiet_gloo_alltoall()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.mesh.size))
        if self.device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            torch.set_num_threads(max(1, cpu_cores() // local_world))
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=self.pg_timeout_s)
            )
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

    def __exit__(self, *exc):
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, value) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run(self, job: Job, warmup: int, iters: int, seed: int, timeout_s: float) -> dict:
        try:
            result = execute(self.ctx, job, warmup, iters, seed)
        except Exception as exc:  # every rank learns of it below and stops alike
            result = {
                "status": "error",
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            }
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
        return combine(results)


# -- the run -------------------------------------------------------------------


class NoisyProfileWarning(CFPWarning):
    """Profile rows whose spread is too large for their median to be trusted."""


@dataclass
class ProfileRun:
    table: ProfileTable
    jobs: int
    measured: int
    cached: int
    wall_s: float
    backend: str
    store: str
    skipped: dict = field(default_factory=dict)
    corrupt: list = field(default_factory=list)


def profile(
    graph: BlockGraph,
    spec: ModelSpec,
    backend: str = DEFAULT_BACKEND,
    cluster: ClusterModel | None = None,
    store: ProfileStore | str | None = None,
    warmup: int = 2,
    iters: int = 5,
    timeout_s: float = 300.0,
    transitions: bool = True,
    seed: int = 0,
    on_progress=None,
    runtime: str = "lowered",
) -> ProfileRun:
    """Profile every (block class, config) and unique transition of ``graph``; reuse stored rows.

    ``runtime`` is how the programs run, as ``cfp.parallelize`` trains:
    ``lowered`` (default), ``compiled`` or ``interpreted`` (always, on the
    emulated backend); it is part of every row's key. ``on_progress(done, cached, total, job)`` is called
    after each job.
    """
    if backend not in BACKENDS:
        raise CFPError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    if runtime not in RUNTIMES:
        raise CFPError(f"Unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    start = time.perf_counter()
    store = store if isinstance(store, ProfileStore) else ProfileStore(store)
    mesh = graph.mesh
    device_type = "cuda" if str(spec.device).startswith("cuda") else "cpu"
    dev = device_kind(device_type)
    if backend == "emulated":
        # Lowering over the fake process group fails in AOTAutograd's partitioner for some blocks
        # (a tangent classified as a forward output), so the emulated backend times the interpreter.
        runtime = "interpreted"
    jobs = block_jobs(graph, runtime) + (transition_jobs(graph, runtime) if transitions else [])
    keys = [job_key(job, graph, mesh, backend, dev, cluster) for job in jobs]
    spmd = backend == "real" and launched_world() > 1
    writes = not spmd or launched_rank() == 0
    measuring = contextlib.ExitStack()
    with TorchrunBackend(graph, mesh, device_type, timeout_s) if spmd else contextlib.nullcontext() as group, measuring:
        stored = [store.lookup(key) for key in keys] if writes else None
        if writes and any(row is None for row in stored):
            # One run measures into a store at a time; it rereads the store once it holds the lock.
            measuring.enter_context(store.measuring(sum(row is None for row in stored)))
            stored = [store.lookup(key) for key in keys]
        if spmd:
            stored = group.broadcast(stored)  # rank 0's store decides, so that every rank runs the same jobs
        rows = [row for row in stored if row is not None]
        todo = [(job, key) for job, key, row in zip(jobs, keys, stored) if row is None]
        cached = len(rows)
        if on_progress:
            on_progress(cached, cached, len(jobs), None)
        if todo:
            if spmd:
                runner = group
            elif backend == "emulated":
                runner = EmulatedBackend(graph, mesh, cluster, device="cpu" if device_type == "cpu" else "cuda:0")
            else:
                runner = RealBackend(spec, graph, mesh, device_type, start_timeout_s=timeout_s)
            try:
                with contextlib.nullcontext() if spmd else runner:
                    for done, (job, key) in enumerate(todo, start=1):
                        row = {**key, **runner.run(job, warmup, iters, seed, timeout_s)}
                        if writes:
                            store.add(row)
                        rows.append(row)
                        if on_progress:
                            on_progress(cached + done, cached, len(jobs), job)
            finally:
                store.flush()
    provenance = {
        "backend": backend,
        "device": getattr(cluster, "device_kind", "local") if backend == "emulated" else "local",
        "cluster": getattr(cluster, "name", None),
        "profile_store": str(store.dir),
        "profile_jobs": len(jobs),
    }
    table = ProfileTable(pd.DataFrame(rows), name=f"profiled-{backend}", provenance=provenance)
    noisy = table.noisy()
    if len(noisy):
        warnings.warn(
            f"{len(noisy)} of {len(rows)} profile rows are too noisy to trust "
            f"(spread over {NOISY_SPREAD:.0%} of the median), "
            f"e.g. {noisy.iloc[0]['kind']} {noisy.iloc[0]['class_id']} config {noisy.iloc[0]['config']!r}; "
            f"plans built on them may rank configs wrongly. "
            f"Profile on an idle host, with fewer ranks than cores, or with more --iters.",
            NoisyProfileWarning,
            stacklevel=2,
        )
    return ProfileRun(
        table=table,
        jobs=len(jobs),
        measured=len(todo),
        cached=cached,
        wall_s=time.perf_counter() - start,
        backend=backend,
        store=str(store.dir),
        skipped=dict(store.skipped),
        corrupt=[str(p) for p in store.corrupt],
    )


def analyze_for_profile(spec: ModelSpec, mesh: MeshSpec, progress=None) -> BlockGraph:
    """Build the model on the device profiling runs on (not meta), capture and analyse it."""
    if spec.device == "meta":
        spec = dataclasses.replace(spec, device="cpu")
    return analyze(capture(build(spec)), mesh, progress=progress)
