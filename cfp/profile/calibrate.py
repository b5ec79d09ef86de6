"""Calibration: measure collectives on the real backend and fit an alpha-beta model.

Every rank of a ``WorkerPool`` times each collective at each message size
(barrier, then the call; max over ranks per iteration, median over
iterations). The fit per collective is least squares on
``t = alpha + beta * traffic_factor(kind, n) * bytes`` (``cfp.cluster``);
residuals are relative, so every size counts alike; a negative alpha is
clamped to 0 and beta refitted through the origin.

``all_to_all``: gloo on CPU has no ``all_to_all_single`` in some builds, and
DTensor on a CPU process group then falls back to all-gather + chunk. Where
the native call fails, the all_to_all figure is fitted from what DTensor
actually runs (``redistribute`` Shard(0) -> Shard(1), all-gather based) and
the cluster file says so in its description.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from cfp.cluster import COLLECTIVES, AlphaBeta, ClusterModel, traffic_factor

DEFAULT_SIZES = [2**k for k in range(10, 25, 2)]  # 1 KiB .. 16 MiB


def _one(kind: str, x: torch.Tensor, world: int, mesh, how: dict):
    if kind == "all_reduce":
        dist.all_reduce(x)
    elif kind == "all_gather":
        out = torch.empty(x.numel() * world, dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x)
    elif kind == "reduce_scatter":
        out = torch.empty(x.numel() // world, dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x)
    elif kind == "broadcast":
        dist.broadcast(x, src=0)
    elif kind == "all_to_all":
        if how.get("all_to_all") == "native":
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x)
        else:  # what DTensor runs on this process group
            from torch.distributed.tensor import DTensor, Shard

            n = x.numel()
            dt = DTensor.from_local(x.view(world, n // world), mesh, (Shard(0),), run_check=False)
            dt.redistribute(mesh, (Shard(1),)).to_local()
    else:
        raise ValueError(kind)


def measure_collectives(ctx, sizes: list[int], kinds: list[str], warmup: int, iters: int) -> dict:
    """Rank side: per kind and size (bytes of each rank's input), this rank's per-iteration seconds."""
    import logging

    from torch.distributed.device_mesh import init_device_mesh

    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    world, device = dist.get_world_size(), ctx.device
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    how = {"all_to_all": "native"}
    try:
        _one("all_to_all", torch.ones(world * 4, device=device), world, mesh, how)
    except Exception as exc:  # noqa: BLE001
        how["all_to_all"] = f"dtensor ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    dist.barrier()
    out: dict = {"how": how, "times": {}}
    for kind in kinds:
        for size in sizes:
            numel = max(world, size // 4 // world * world)
            x = torch.ones(numel, dtype=torch.float32, device=device)
            times = []
            for i in range(warmup + iters):
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                _one(kind, x, world, mesh, how)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            out["times"][(kind, numel * 4)] = times
    return out


def measure_device(ctx, seconds: float = 0.5) -> dict:
    """Rank side: float32 GEMM FLOP/s and copy bandwidth on this rank's share of the host."""
    device = ctx.device
    a = torch.randn(512, 512, device=device)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or n < 3:
        a @ a
        n += 1
    gemm = 2 * 512**3 * n / (time.perf_counter() - t0)
    x = torch.empty(16 * 2**20 // 4, device=device)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or n < 3:
        x.clone()
        n += 1
    bw = 2 * x.numel() * 4 * n / (time.perf_counter() - t0)
    return {"gemm_flops": gemm, "copy_bandwidth": bw}


def fit(kind: str, world: int, points: list[tuple[int, float]]) -> tuple[AlphaBeta, float, float]:
    """Least squares on relative residuals ((pred - t) / t, so small messages count as much as
    large ones); returns the model and the median and max relative error."""
    x = np.array([traffic_factor(kind, world) * b for b, _ in points], dtype=float)
    t = np.array([s for _, s in points], dtype=float)
    A = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    if alpha < 0:  # through the origin
        alpha, beta = 0.0, float((x / t).sum() / ((x / t) ** 2).sum())
    if beta <= 0:  # flat: latency only
        alpha, beta = float(len(t) / (1 / t).sum()), 1e-15
    pred = alpha + beta * x
    rel = np.abs(pred - t) / t
    return AlphaBeta(float(alpha), float(beta)), float(np.median(rel)), float(rel.max())


def calibrate(
    pool, name: str, sizes=None, kinds=None, warmup: int = 3, iters: int = 10, timeout_s: float = 600.0
) -> tuple[ClusterModel, dict]:
    """Measure on ``pool`` (a started WorkerPool, no model) and fit; returns the cluster model and the raw data."""
    sizes = sizes or DEFAULT_SIZES
    kinds = kinds or list(COLLECTIVES)
    world = pool.world
    per_rank = pool.run(measure_collectives, (sizes, kinds, warmup, iters), "measuring collectives", timeout_s)
    device = pool.run(measure_device, (), "measuring the device", timeout_s)
    how = per_rank[0]["how"]
    points: dict[str, list[tuple[int, float]]] = {k: [] for k in kinds}
    for (kind, nbytes), _ in per_rank[0]["times"].items():
        its = zip(*(r["times"][(kind, nbytes)] for r in per_rank))
        points[kind].append((nbytes, statistics.median(max(vals) for vals in its)))
    fits = {kind: fit(kind, world, pts) for kind, pts in points.items()}
    device_type = "cuda" if pool.device_type == "cuda" else "cpu"
    desc = (
        f"Measured by `cfp calibrate` on {os.uname().nodename}: {world} ranks, {pool.device_type} "
        f"({'nccl' if device_type == 'cuda' else 'gloo'}), {pool.threads} thread(s) per rank, "
        f"torch {torch.__version__}. "
        f"all_to_all measured as: {how['all_to_all']}."
    )
    mem = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world
        if device_type == "cpu"
        else torch.cuda.get_device_properties(0).total_memory
    )
    cluster = ClusterModel(
        name=name,
        device_kind="cpu" if device_type == "cpu" else torch.cuda.get_device_name(0),
        peak_flops={"float32": min(d["gemm_flops"] for d in device)},
        memory_bandwidth=min(d["copy_bandwidth"] for d in device),
        memory_bytes=int(mem),
        devices_per_node=world,
        intra_node={k: f[0] for k, f in fits.items()},
        inter_node={},
        description=desc,
        sources=["measured: cfp calibrate (median of per-iteration max over ranks, least-squares alpha-beta fit)"],
    )
    data = {
        "world": world,
        "how": how,
        "points": {k: [[b, t] for b, t in v] for k, v in points.items()},
        "fits": {
            k: {
                "alpha": f[0].alpha,
                "beta": f[0].beta,
                "bus_bandwidth": 1 / f[0].beta,
                "median_rel_error": f[1],
                "max_rel_error": f[2],
            }
            for k, f in fits.items()
        },
        "device": device[0],
    }
    return cluster, data


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    world = data["world"]
    for kind, pts in data["points"].items():
        b = np.array([p[0] for p in pts], dtype=float)
        t = np.array([p[1] for p in pts], dtype=float)
        f = data["fits"][kind]
        line = ax.loglog(b, t * 1e6, "o", label=f"{kind} (measured)")[0]
        xs = np.geomspace(b.min(), b.max(), 50)
        ax.loglog(
            xs,
            (f["alpha"] + f["beta"] * traffic_factor(kind, world) * xs) * 1e6,
            "-",
            color=line.get_color(),
            alpha=0.6,
        )
    ax.set_xlabel("input bytes per rank")
    ax.set_ylabel("time (µs)")
    ax.set_title(f"collectives on {world} ranks: measured (dots) and alpha-beta fit (lines)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
