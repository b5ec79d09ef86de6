"""``cfp calibrate --mesh M``: measure collectives on the real backend, fit alpha-beta, write a cluster model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from cfp.cluster import CLUSTERS_DIR, COLLECTIVES
from cfp.commands.common import add_json_arg, console
from cfp.errors import CFPError
from cfp.mesh import parse_mesh
from cfp.report_util import write_json


def register(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure collectives on this host and fit a cluster model",
        description=(
            "Measure all_reduce, all_gather, reduce_scatter, all_to_all and broadcast across message sizes on the real "
            "backend (one process per rank; gloo on CPU, NCCL on CUDA), fit t = alpha + beta * traffic * bytes per "
            "collective, and write a cluster JSON for `cfp profile --backend emulated --cluster`."
        ),
    )
    p.add_argument(
        "--mesh", default="2", help="ranks to measure on, e.g. 2 (default) or 8; the product of a mesh shape"
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help=f"cluster JSON to write (default: {CLUSTERS_DIR}/cpu-gloo-local.json, or cuda-nccl-local.json)",
    )
    p.add_argument("--name", help="cluster model name (default: the output file's stem)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="measure on CPU (gloo) or CUDA (NCCL)")
    p.add_argument("--max-bytes", type=int, default=2**24, help="largest message, bytes per rank (default 16 MiB)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per size (default 10)")
    p.add_argument("--plot", metavar="PNG", help="also plot measurements and fits to PNG")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a rank counts as hung")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from cfp.profile.calibrate import calibrate, plot
    from cfp.profile.real import WorkerPool, no_context

    mesh = parse_mesh(args.mesh)
    if mesh.size < 2:
        raise CFPError("Calibration needs at least 2 ranks (--mesh 2).")
    default = "cuda-nccl-local" if args.device == "cuda" else "cpu-gloo-local"
    out = Path(args.output) if args.output else CLUSTERS_DIR / f"{default}.json"
    name = args.name or out.stem
    sizes = [2**k for k in range(10, max(11, args.max_bytes.bit_length()), 2)]
    start = time.perf_counter()
    with console.status(f"Measuring collectives on {mesh.size} ranks ({args.device})..."):
        with WorkerPool(parse_mesh(str(mesh.size)), no_context, (args.device,), args.device) as pool:
            cluster, data = calibrate(pool, name, sizes=sizes, iters=args.iters, timeout_s=args.timeout)
    cluster.save(out)
    table = Table(title=f"alpha-beta fit on {mesh.size} ranks ({args.device}) -> {out}")
    for col in ("collective", "alpha (µs)", "bus bandwidth", "median rel. error", "max rel. error", "points"):
        table.add_column(col, justify="left" if col == "collective" else "right")
    for kind in COLLECTIVES:
        f = data["fits"][kind]
        table.add_row(
            kind,
            f"{f['alpha'] * 1e6:.1f}",
            f"{f['bus_bandwidth'] / 1e9:.2f} GB/s",
            f"{f['median_rel_error']:.1%}",
            f"{f['max_rel_error']:.1%}",
            str(len(data["points"][kind])),
        )
    console.print(table)
    console.print(f"all_to_all measured as: {data['how']['all_to_all']}")
    console.print(
        f"device: {data['device']['gemm_flops'] / 1e9:.1f} GFLOP/s float32 GEMM, "
        f"{data['device']['copy_bandwidth'] / 1e9:.1f} GB/s copy, per rank"
    )
    if args.plot:
        plot(data, args.plot)
        console.print(f"plot: {args.plot}")
    data["cluster_file"] = str(out)
    data["wall_s"] = time.perf_counter() - start
    write_json(args.json, data)
