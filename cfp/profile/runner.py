"""Profiling a BlockGraph: jobs, the store, and the resulting ProfileTable.

``profile`` lists the jobs (one per valid block class and config, one per
unique transition, and on the real backend one per mesh dimension timing the
ranks' skew at a sync point, ``cfp.profile.sync``), looks each up in the
store, and runs the missing ones on a backend from the registry
``BACKENDS`` (``cfp.profile.backends``: ``real``, a pool of processes or a
``torchrun`` job's ranks, and ``emulated``); ``backend.name`` is recorded in
every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch

from cfp.analyze import BlockGraph, analyze
from cfp.buckets import bucket_keys, reduced_bytes
from cfp.capture import capture
from cfp.cluster import ClusterModel
from cfp.costs import unique_transitions
from cfp.errors import CFPError, CFPWarning
from cfp.mesh import MeshSpec
from cfp.placements import to_strs
from cfp.profile.backends import Backend, BackendSetup, make_backend
from cfp.profile.jobs import Job
from cfp.profile.program import RUNTIMES
from cfp.profile.store import (
    NOISY_SPREAD,
    SCHEMA,
    ProfileStore,
    ProfileTable,
    transition_config,
)
from cfp.spec import ModelSpec, build

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
        for p in graph.strategies[class_id]
    ]


def transition_jobs(graph: BlockGraph, runtime: str = "lowered") -> list[Job]:
    from cfp.storage import StorageTable  # parameters stored sharded are gathered and reduce-scattered

    keys = unique_transitions(graph) | StorageTable(graph).transition_keys() | bucket_keys(graph)
    keys = sorted(keys, key=lambda k: (k.shape, k.dtype, to_strs(k.src), to_strs(k.dst)))
    return [Job("transition", transition=k, runtime=runtime) for k in keys]


def sync_jobs(mesh: MeshSpec, runtime: str = "lowered") -> list[Job]:
    return [Job("sync", mesh_dim=d, runtime=runtime) for d, n in enumerate(mesh.shape) if n > 1]


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
    if job.kind == "sync":
        return {**common, "class_id": "sync", "config": f"mesh dim {job.mesh_dim}", "shape_key": "", "dtype": ""}
    k = job.transition
    return {
        **common,
        "class_id": "transition",
        "config": transition_config(k),
        "shape_key": json.dumps(list(k.shape)),
        "dtype": k.dtype,
    }


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
    backend: str | Backend = DEFAULT_BACKEND,
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

    ``backend`` names one of ``BACKENDS`` (made for this run with
    ``spec``, ``cluster`` and ``timeout_s``), or is a ``Backend`` made by
    hand (a ``PoolBackend`` with its own ``ProcessGroupSpec``, say).
    ``runtime`` is how the programs run, as ``cfp.parallelize`` trains:
    ``lowered`` (default), ``compiled`` or ``interpreted`` (always, on the
    emulated backend); it is part of every row's key. ``on_progress(done, cached, total, job)`` is called
    after each job.
    """
    if runtime not in RUNTIMES:
        raise CFPError(f"Unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    start = time.perf_counter()
    store = store if isinstance(store, ProfileStore) else ProfileStore(store)
    mesh = graph.mesh
    device_type = "cuda" if str(spec.device).startswith("cuda") else "cpu"
    dev = device_kind(device_type)
    runner = backend
    if isinstance(backend, str):
        runner = make_backend(backend, BackendSetup(spec, graph, cluster, device_type, timeout_s))
    if runtime not in runner.runtimes:
        runtime = runner.runtimes[0]
    jobs = block_jobs(graph, runtime)
    if transitions:  # real transition jobs start from a barrier, so miss the skew; one emulated process has none
        jobs += transition_jobs(graph, runtime) + (sync_jobs(mesh, runtime) if runner.name == "real" else [])
    keys = [job_key(job, graph, mesh, runner.name, dev, cluster) for job in jobs]
    with contextlib.ExitStack() as measuring, runner:
        stored = [store.lookup(key) for key in keys] if runner.writes else None
        if runner.writes and any(row is None for row in stored):
            # One run measures into a store at a time; it rereads the store once it holds the lock.
            measuring.enter_context(store.measuring(sum(row is None for row in stored)))
            stored = [store.lookup(key) for key in keys]
        stored = runner.broadcast(stored)  # the writing rank's store decides, so that every rank runs the same jobs
        rows = [row for row in stored if row is not None]
        todo = [(job, key) for job, key, row in zip(jobs, keys, stored) if row is None]
        cached = len(rows)
        if on_progress:
            on_progress(cached, cached, len(jobs), None)
        try:
            for done, (job, key) in enumerate(todo, start=1):
                row = {**key, **runner.run(job, warmup, iters, seed, timeout_s)}
                if runner.writes:
                    store.add(row)
                rows.append(row)
                if on_progress:
                    on_progress(cached + done, cached, len(jobs), job)
        finally:
            if todo:
                store.flush()
    provenance = {
        "backend": runner.name,
        "device": getattr(cluster, "device_kind", "local") if runner.name == "emulated" else "local",
        "cluster": getattr(cluster, "name", None),
        "profile_store": str(store.dir),
        "profile_jobs": len(jobs),
        "runtime": runtime,
    }
    reduced = {(c, s.config.name): reduced_bytes(s) for c, strategies in graph.strategies.items() for s in strategies}
    table = ProfileTable(
        pd.DataFrame(rows), name=f"profiled-{runner.name}", provenance=provenance, reduced=reduced, mesh=mesh
    )
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
        backend=runner.name,
        store=str(store.dir),
        skipped=dict(store.skipped),
        corrupt=[str(p) for p in store.corrupt],
    )


def analyze_for_profile(spec: ModelSpec, mesh: MeshSpec, progress=None) -> BlockGraph:
    """Build the model on the device profiling runs on (not meta), capture and analyse it."""
    if spec.device == "meta":
        spec = dataclasses.replace(spec, device="cpu")
    return analyze(capture(build(spec)), mesh, progress=progress)
