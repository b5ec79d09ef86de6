"""The real backend: one process per mesh rank, ``torch.distributed`` on one host.

A persistent ``WorkerPool`` is started with ``torch.multiprocessing``
(spawn), one GPU per rank on CUDA. Each rank first runs an ``init`` function
*before* joining the process group (profiling's init rebuilds the model on
its own device, captures and analyses it, which is deterministic: the parent
checks every rank's graph fingerprint and class ids against its own), then
joins the group its ``ProcessGroupSpec`` describes (by default gloo on CPU,
NCCL on CUDA, meeting over a ``FileStore`` in the pool's temporary
directory) and serves jobs ``(job id, function, args)`` from its queue until
told to stop.

A rank that dies, raises, or does not answer within the job's timeout ends
the pool: every worker is terminated, then killed, then joined, and a
``WorkerFailure`` names the job. Workers die with their parent in every
state (``cfp.children``), and ``--timeout`` bounds start-up too.
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import shutil
import tempfile
import time
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cfp.allocator import keep_freed_host_memory
from cfp.children import die_with_parent
from cfp.collectives import use_gloo_all_to_all
from cfp.errors import CFPError, CFPWarning
from cfp.mesh import MeshSpec, device_mesh


class WorkerFailure(CFPError):
    """A rank crashed, raised or hung; the pool has been shut down."""


class OversubscribedWarning(CFPWarning):
    """More CPU ranks than cores: they take turns, and what is timed is that."""


def check_oversubscription(mesh: MeshSpec, device_type: str) -> None:
    cores = cpu_cores()
    if device_type == "cpu" and mesh.size > cores:
        warnings.warn(
            f"mesh {mesh} runs {mesh.size} CPU ranks on {cores} core(s): the ranks take turns on the cores, so timings "
            f"measure that contention, not {mesh.size} devices, and are noisy; rows whose spread is large are flagged.",
            OversubscribedWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class ProcessGroupSpec:
    """How a backend's ranks form their process group: the ``torch.distributed`` backend and the rendezvous."""

    backend: str | None = None  # "gloo", "nccl", ...; None: gloo on CPU, NCCL on CUDA
    # A torch.distributed init_method URL ("file://...", "tcp://host:port", "env://"); None: the launcher's own,
    # a FileStore in a spawned pool's temporary directory (one host), or the environment torchrun sets.
    init_method: str | None = None

    def backend_for(self, device_type: str) -> str:
        return self.backend or ("nccl" if device_type == "cuda" else "gloo")

    def init(
        self, device_type: str, timeout_s: float, rank: int = -1, world: int = -1, store_path: str | None = None
    ) -> None:
        """Join the group: through ``init_method``, else a ``FileStore`` at ``store_path``, else the environment."""
        options = {"rank": rank, "world_size": world, "timeout": datetime.timedelta(seconds=timeout_s)}
        if self.init_method is None and store_path is not None:
            options["store"] = dist.FileStore(store_path, world)
        else:
            options["init_method"] = self.init_method
        dist.init_process_group(self.backend_for(device_type), **options)


def prepare_rank(device_type: str) -> None:
    """The runtime a rank runs with, as ``cfp.parallelize`` sets it up: all-to-all on gloo, host memory kept."""
    use_gloo_all_to_all()
    if device_type == "cpu":
        keep_freed_host_memory()


def rank_device(device_type: str) -> str:
    """This rank's device: its current GPU (set from its rank), or the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else "cpu"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _worker_main(
    rank,
    world,
    mesh_spec,
    device_type,
    group,
    store_path,
    threads,
    init,
    init_args,
    tasks,
    results,
    parent_pid,
    pg_timeout_s,
):
    die_with_parent(parent_pid)
    prepare_rank(device_type)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        ctx, info = init(rank, world, *init_args)
        results.put(("joining", rank, None, None))  # from here on it waits for the others
        group.init(device_type, pg_timeout_s, rank, world, store_path)
        if ctx is not None:
            ctx.mesh = device_mesh(mesh_spec, device_type)
            ctx.rank = rank
        results.put(("ready", rank, None, info))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(("failed", rank, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            continue
        if item is None:
            break
        job_id, fn, args = item
        try:
            results.put(("done", rank, job_id, fn(ctx, *args)))
        except BaseException as exc:  # noqa: BLE001
            results.put(("error", rank, job_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


# A pool's FileStore directory is named after the process that owns it, so that one left by a parent killed
# with -9 (whose cleanup never ran) is removed by the next pool started on this host.
PG_DIR_PREFIX = "cfp-pg-"


def remove_stale_dirs() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{PG_DIR_PREFIX}*-*"):
        owner = path.name[len(PG_DIR_PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


_LIVE: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE):
        pool.close()


class WorkerPool:
    """``world`` persistent rank processes forming one process group (``group``)."""

    def __init__(
        self,
        mesh: MeshSpec,
        init: Callable,
        init_args: tuple = (),
        device_type: str = "cpu",
        start_timeout_s: float = 300.0,
        pg_timeout_s: float = 600.0,
        group: ProcessGroupSpec | None = None,
    ):
        self.mesh, self.world = mesh, mesh.size
        self.init, self.init_args = init, init_args
        self.device_type, self.group = device_type, group or ProcessGroupSpec()
        self.start_timeout_s, self.pg_timeout_s = start_timeout_s, pg_timeout_s
        self.threads = max(1, cpu_cores() // self.world)
        self.procs: list = []
        self.infos: list = []
        self._next = 0

    def start(self) -> WorkerPool:
        if self.device_type == "cuda" and torch.cuda.device_count() < self.world:
            raise CFPError(f"Mesh {self.mesh} needs {self.world} GPUs; {torch.cuda.device_count()} are visible.")
        check_oversubscription(self.mesh, self.device_type)
        ctx = mp.get_context("spawn")
        remove_stale_dirs()
        self.tmp = tempfile.mkdtemp(prefix=f"{PG_DIR_PREFIX}{os.getpid()}-")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        for rank in range(self.world):
            p = ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    self.world,
                    self.mesh,
                    self.device_type,
                    self.group,
                    os.path.join(self.tmp, "store"),
                    self.threads,
                    self.init,
                    self.init_args,
                    self.tasks[rank],
                    self.results,
                    os.getpid(),
                    self.pg_timeout_s,
                ),
                daemon=False,  # model factories and torch.export may start helper processes
                name=f"cfp-rank{rank}",
            )
            p.start()
            self.procs.append(p)
        _LIVE.add(self)
        try:
            replies = self._collect(None, "starting the worker pool", self.start_timeout_s, ready=True)
        except BaseException:
            self.close()
            raise
        self.infos = [replies[r] for r in range(self.world)]
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, fn: Callable, args: tuple, what: str, timeout_s: float) -> list[Any]:
        """Run ``fn(ctx, *args)`` on every rank; their results by rank. Fails (and closes the pool) naming ``what``."""
        self._next += 1
        job_id = self._next
        for q in self.tasks:
            q.put((job_id, fn, args))
        try:
            replies = self._collect(job_id, what, timeout_s)
        except BaseException:
            self.close()
            raise
        return [replies[r] for r in range(self.world)]

    def _collect(self, job_id, what: str, timeout_s: float, ready: bool = False) -> dict[int, Any]:
        deadline = time.monotonic() + timeout_s
        replies: dict[int, Any] = {}
        joining: set[int] = set()  # ranks past their own start-up, waiting for the others to join the group
        while len(replies) < self.world:
            try:
                kind, rank, jid, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive() and r not in replies]
                if dead:
                    r, code = dead[0]
                    raise WorkerFailure(
                        f"Rank {r} died (exit code {code}) while {what}; "
                        f"all {self.world} worker processes were stopped."
                    ) from None
                if time.monotonic() > deadline:
                    missing = set(range(self.world)) - set(replies)
                    waiting = sorted(missing - joining) or sorted(missing)  # not those waiting for the others to join
                    raise WorkerFailure(
                        f"Rank(s) {waiting} did not finish {what} within {timeout_s:.0f} s (hung?); "
                        f"all {self.world} worker processes were stopped."
                    ) from None
                continue
            if kind in ("failed", "error"):
                raise self._failure(rank, payload, what)
            if kind == "joining":
                joining.add(rank)
                continue
            if ready != (kind == "ready") or (not ready and jid != job_id):
                continue  # a stale reply of an earlier job
            replies[rank] = payload
        return replies

    def _failure(self, rank: int, payload: str, what: str, grace_s: float = 1.0) -> WorkerFailure:
        """The error for a rank that reported ``payload``, blaming a rank that died instead where there is one.

        When one rank dies mid-collective its peers raise connection errors, and one of them may report first;
        the dead rank is the cause, so a moment is given for its exit to be seen.
        """
        first = payload.splitlines()[0] if payload else ""
        stopped = f"all {self.world} worker processes were stopped"
        deadline = time.monotonic() + grace_s
        while True:
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if r != rank and p.exitcode is not None]
            if dead:
                r, code = dead[0]
                return WorkerFailure(
                    f"Rank {r} died (exit code {code}) while {what}; rank {rank} then failed ({first}); {stopped}."
                )
            if time.monotonic() > deadline:
                debug = f"\n{payload}" if os.environ.get("CFP_DEBUG") else ""
                return WorkerFailure(f"Rank {rank} failed while {what}: {first}; {stopped}.{debug}")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop every worker: ask, then terminate, then kill; always join."""
        for q in getattr(self, "tasks", []):
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for q in [getattr(self, "results", None), *getattr(self, "tasks", [])]:
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self.procs = []
        self.tasks = []
        _LIVE.discard(self)
        if getattr(self, "tmp", None):
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- functions workers run (module level, so spawn can pickle them) -------------


def no_context(rank: int, world: int, device_type: str = "cpu"):
    """Init for pools that need no model (calibration, tests)."""
    from cfp.profile.jobs import RankContext

    return RankContext(graph=None, mesh=None, device=rank_device(device_type)), {"rank": rank}


def debug_crash(ctx, rank: int) -> int:
    """For tests: rank ``rank`` dies without a word."""
    if ctx.rank == rank:
        os._exit(3)
    return ctx.rank


def debug_hang(ctx, rank: int) -> int:
    """For tests: rank ``rank`` never answers."""
    if ctx.rank == rank:
        time.sleep(3600)
    return ctx.rank
