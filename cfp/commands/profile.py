"""``cfp profile MODEL --mesh M``: time every (block class, config) and transition."""

from __future__ import annotations

import argparse
import math
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cfp.commands.common import add_json_arg, add_model_args, analysis_progress, console, model_spec
from cfp.mesh import parse_mesh
from cfp.profile.backends import BACKENDS
from cfp.profile.runner import DEFAULT_BACKEND
from cfp.report_util import human_bytes, write_json


def register(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="profile each block class under each config, and each transition",
        description=(
            "Analyse the model, then time each (block class, config) program (forward, backward, gradient reduction, "
            "AdamW step) and each unique transition, on the real backend (one process per mesh rank) or emulated (one "
            "process, fake process group, communication priced by a cluster model). Rows are stored as Parquet and "
            "reused."
        ),
    )
    add_model_args(p, device="cpu")
    p.add_argument("--mesh", required=True, help="device mesh, e.g. 2, 2x4 or dp=2,tp=4")
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=DEFAULT_BACKEND,
        help=f"real process group or emulated (fake PG + cluster model); default {DEFAULT_BACKEND}",
    )
    p.add_argument(
        "--cluster", help="cluster model NAME (profiles/clusters/NAME.json) or FILE; needed by --backend emulated"
    )
    p.add_argument("--store", metavar="DIR", help="profile store directory (default: $CFP_PROFILE_DIR or profiles/)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up iterations per job (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per job (default 5)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a job may take before its ranks count as hung (default 300)",
    )
    p.add_argument("--no-transitions", action="store_true", help="profile blocks only")
    p.add_argument(
        "--compile",
        action="store_true",
        help="time the programs compiled by inductor, as parallelize(compile=True) runs (real backend only)",
    )
    add_json_arg(p)
    p.set_defaults(run=run)


def _ms(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x * 1e3:.3f}"


def run(args: argparse.Namespace) -> None:
    import warnings

    from cfp.cluster import load_cluster
    from cfp.profile import ProfileStore, analyze_for_profile, profile
    from cfp.profile.store import StoreWarning

    start = time.perf_counter()
    spec = model_spec(args)
    mesh = parse_mesh(args.mesh)
    cluster = load_cluster(args.cluster) if args.cluster else None
    from cfp.errors import CFPError

    if args.backend == "emulated" and cluster is None:
        raise CFPError(
            "--backend emulated needs --cluster NAME|FILE to price communication (e.g. --cluster cpu-gloo-local)."
        )
    if args.compile and args.backend != "real":
        raise CFPError("--compile times programs compiled by inductor on this machine: it needs --backend real.")
    with analysis_progress(f"analysing {args.model} on mesh {mesh}") as progress:
        graph = analyze_for_profile(spec, mesh, progress)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreWarning)
        store = ProfileStore(args.store)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cached {task.fields[cached]}"),
        TextColumn("left {task.fields[left]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"profiling ({args.backend})", total=None, cached=0, left="?")

        def on_progress(done, cached, total, job):
            bar.update(
                task,
                total=total,
                completed=done,
                cached=cached,
                left=total - done,
                description=f"profiling ({args.backend})" if job is None else f"{args.backend}: {job.describe()[:48]}",
            )

        result = profile(
            graph,
            spec,
            args.backend,
            cluster,
            store,
            warmup=args.warmup,
            iters=args.iters,
            timeout_s=args.timeout,
            transitions=not args.no_transitions,
            on_progress=on_progress,
            runtime="compiled" if args.compile else "lowered",
        )
    rows = result.table.rows
    blocks = rows[rows["kind"] == "block"]
    for class_id, members in graph.classes.items():
        sub = blocks[blocks["class_id"] == class_id]
        if sub.empty:
            continue
        anchor = graph.blocks[members[0]].anchor
        table = Table(title=f"class {class_id} ({anchor}, x{len(members)})", title_justify="left")
        for col in (
            "config",
            "fwd ms",
            "bwd ms",
            "grad-reduce ms",
            "optimizer ms",
            "comm ms",
            "total ms",
            "spread (IQR) ms",
            "memory",
            "status",
        ):
            table.add_column(col, justify="left" if col in ("config", "status") else "right")
        ok = sub[sub["status"] == "ok"]
        best = ok.loc[ok["total_s"].idxmin(), "config"] if not ok.empty else None
        flagged = result.table.noisy()
        noisy = set(flagged.loc[flagged["class_id"] == class_id, "config"])
        for row in sub.to_dict("records"):
            status = f"{row['status']} (noisy)" if row["config"] in noisy else row["status"]
            mark = " [bold green]*fastest[/]" if row["config"] == best else ""
            table.add_row(
                f"{row['config']}{mark}",
                _ms(row.get("forward_s")),
                _ms(row.get("backward_s")),
                _ms(row.get("reduce_s")),
                _ms(row.get("optimizer_s")),
                _ms(row.get("comm_s")),
                _ms(row["total_s"]),
                _ms(row.get("total_iqr_s")),
                human_bytes(row.get("memory_bytes") or 0),
                status,
            )
        console.print(table)
    trans = rows[rows["kind"] == "transition"]
    skew = result.table.sync_skew_s
    console.print(
        f"{result.jobs} jobs: {result.measured} measured, {result.cached} reused from {result.store}; "
        f"{len(trans)} transitions; "
        + "".join(f"skew at a sync point on mesh dim {d}: {_ms(s)} ms; " for d, s in sorted(skew.items()))
        + f"backend {args.backend}"
        + (
            f" (communication priced by cluster model {cluster.name}; an emulation, not a measurement)"
            if args.backend == "emulated"
            else ""
        )
        + f"; {time.perf_counter() - start:.1f} s"
    )
    if args.backend == "real":
        console.print(
            "[dim]real backend: comm is the time collectives took (issue to result, waiting for other ranks included), "
            "measured in one more iteration after the timed ones; it is part of fwd, bwd and grad-reduce, and total "
            "minus comm is compute.[/]"
        )
    write_json(
        args.json,
        {
            "model": args.model,
            "mesh": list(mesh.shape),
            "backend": args.backend,
            "cluster": cluster.name if cluster else None,
            "jobs": result.jobs,
            "measured": result.measured,
            "cached": result.cached,
            "sync_skew_s": skew,
            "wall_s": time.perf_counter() - start,
            "profile_s": result.wall_s,
            "store": result.store,
            "skipped_rows": result.skipped,
            "corrupt_files": result.corrupt,
            "rows": rows.drop(columns=["error"], errors="ignore").to_dict("records"),
        },
    )
