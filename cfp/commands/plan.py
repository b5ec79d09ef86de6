"""``cfp plan MODEL --mesh M``: capture, analyse, cost, solve, write plan.json."""

from __future__ import annotations

import argparse
import time

from rich.table import Table

from cfp.baselines import BASELINES
from cfp.commands.common import add_json_arg, add_model_args, console, model_spec
from cfp.costs import COST_MODELS
from cfp.pipeline import PlanOptions, make_plan
from cfp.profile.backends import BACKENDS
from cfp.report import human_time, print_validation
from cfp.report_util import human_bytes, write_json


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="find a tensor-parallel plan (ILP over profiled or analytic costs)",
        description=(
            "Capture the model, cut it into ParallelBlocks, cost every block config and transition "
            "(profiled, or analytic: FLOPs + alpha-beta), and solve the ILP for the fastest plan that fits in memory. "
            "Writes the plan as JSON and prints a summary against the data-parallel baseline."
        ),
    )
    defaults = PlanOptions()
    add_model_args(p)
    p.add_argument("--mesh", required=True, help="device mesh: 8, 2x4 or dp=2,tp=4")
    p.add_argument(
        "--memory", metavar="SIZE", help="per-device memory limit, e.g. 40GiB (default: the cluster device's memory)"
    )
    p.add_argument(
        "--cost", choices=list(COST_MODELS), default=defaults.cost, help=f"cost model (default: {defaults.cost})"
    )
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=defaults.backend,
        help=f"profiling backend for --cost profiled (default: {defaults.backend})",
    )
    p.add_argument(
        "--cluster",
        metavar="NAME|FILE",
        help="cluster model (profiles/clusters/NAME.json or a file); "
        "default h100-nvlink-8 (h100-ib-2x8 above 8 devices)",
    )
    p.add_argument(
        "--tie-segments",
        action="store_true",
        help="give every instance of a repeated block the same config (faster on deep models)",
    )
    p.add_argument(
        "--baseline",
        choices=list(BASELINES),
        help="write this hand-made layout instead of solving (data parallel, Megatron tensor parallel, "
        "expert parallel, FSDP/ZeRO-3, FSDP with Megatron on the last mesh dimension), costed the same way",
    )
    p.add_argument(
        "--no-storage-sharding",
        action="store_true",
        help="store every parameter where it computes (no ZeRO-1/2/3 choices in the ILP)",
    )
    p.add_argument(
        "--no-recompute", action="store_true", help="save every block's activations (no activation recomputation)"
    )
    p.add_argument(
        "--validate",
        type=int,
        metavar="K",
        default=defaults.validate,
        help="run the K best ILP plans and every baseline that fits for a few real training steps and "
        "write the fastest (default: 3 with --cost profiled --backend real on a mesh this machine "
        "holds, else 0: off)",
    )
    p.add_argument(
        "--validate-steps",
        type=int,
        default=defaults.validate_steps,
        metavar="N",
        help=f"timed steps per validated plan (default {defaults.validate_steps}, after 2 warm-up)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="profile and validate the programs compiled by inductor (needs --backend real); the plan records it, "
        "and cfp.parallelize then compiles by default",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=defaults.time_limit_s,
        metavar="S",
        help=f"ILP time limit in seconds (default: {defaults.time_limit_s:g})",
    )
    p.add_argument(
        "-o", "--output", default="plan.json", metavar="FILE", help="where to write the plan (default: plan.json)"
    )
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    with console.status(f"Planning {args.model} on mesh {args.mesh} ({args.cost} costs)...") as status:

        def progress(done, cached, total, job):
            status.update(f"Profiling {args.model}: {done}/{total} jobs ({cached} reused)...")

        analysis_start = time.perf_counter()

        def on_analysis(done, total):
            elapsed = time.perf_counter() - analysis_start
            eta = f", about {elapsed / done * (total - done):.0f} s left" if done else ""
            status.update(f"Analysing {args.model}: {done}/{total} configs propagated{eta}...")

        def on_validate_step(done, total):
            status.update(f"Validating the best plans in real training steps: {done}/{total}...")

        options = PlanOptions(
            cost=args.cost,
            backend=args.backend,
            cluster=args.cluster,
            memory=args.memory,
            tie_segments=args.tie_segments,
            time_limit_s=args.time_limit,
            baseline=args.baseline,
            storage=not args.no_storage_sharding,
            recompute=not args.no_recompute,
            validate=args.validate,
            validate_steps=args.validate_steps,
            compile=args.compile,
            output=args.output,
        )
        plan, graph, solution = make_plan(
            model_spec(args),
            args.mesh,
            options,
            progress=progress,
            on_analysis=on_analysis,
            on_validate_step=on_validate_step,
        )
    elapsed = time.perf_counter() - start
    print_summary(plan, graph)
    replicated = sorted(
        {op for b, entry in zip(graph.blocks, plan.blocks) for op in _fallbacks(graph, b, entry["config"])}
    )
    if replicated:
        console.print(
            "[yellow]Run replicated under this plan (no DTensor rule, or its fake kernel fails): "
            f"{', '.join(replicated)}[/]"
        )
    console.print(
        f"Plan written to [bold]{args.output}[/] ({elapsed:.1f} s in all). See it with `cfp report {args.output}`."
    )
    write_json(args.json, {**plan.to_json(), "output": args.output, "wall_s": round(elapsed, 2)})


def _fallbacks(graph, block, config: str) -> list[str]:
    return next((p.fallbacks for p in graph.block_strategies(block) if p.config.name == config), [])


def label(block: dict) -> str:
    """A block's config, with its storage level and ``+recompute`` where they apply."""
    extra = [block["storage"]] if block.get("storage", "replicate") != "replicate" else []
    return " ".join([block["config"], *extra, *(["+recompute"] if block.get("recompute") else [])])


def segment_rows(plan, graph) -> list[tuple[str, str, str, str]]:
    """(where, blocks, anchor ops, configs) rows: segments by class position, other blocks one by one."""
    rows = []
    in_segment = set()
    for seg in graph.segments:
        period = len(seg.classes)
        for k in range(period):
            ids = list(range(seg.start + k, seg.end, period))
            in_segment.update(ids)
            counts: dict[str, int] = {}
            for i in ids:
                counts[label(plan.blocks[i])] = counts.get(label(plan.blocks[i]), 0) + 1
            configs = ", ".join(f"{c}" if n == len(ids) else f"{c} x{n}" for c, n in counts.items())
            rows.append(
                (
                    f"segment {graph.segments.index(seg)} pos {k}",
                    f"{len(ids)} (from {ids[0]})",
                    plan.blocks[ids[0]]["op"],
                    configs,
                )
            )
    for b in plan.blocks:
        if b["id"] not in in_segment:
            rows.append(("block", str(b["id"]), b["op"], label(b)))
    return rows


def print_summary(plan, graph) -> None:
    table = Table(title=f"chosen configs ({len(plan.blocks)} blocks, mesh {'x'.join(map(str, plan.mesh['shape']))})")
    for col in ("where", "blocks", "anchor op", "config"):
        table.add_column(col)
    layout = plan.layout_counts()
    for row in segment_rows(plan, graph):
        table.add_row(*row)
    console.print(table)
    summary = Table(show_header=False, title="plan")
    t = plan.predicted_step_time_s
    summary.add_row(
        "predicted step time",
        f"{human_time(t)} (blocks {human_time(plan.time_breakdown_s['blocks'])}, "
        f"transitions {human_time(plan.time_breakdown_s['transitions'])})",
    )
    for name, base in plan.baselines.items():
        if plan.solve["status"] == f"baseline {name}":
            continue  # this plan is that baseline
        speedup = base["predicted_step_time_s"] / t if t > 0 else float("inf")
        fits = "" if base["fits"] else ", does not fit in memory"
        summary.add_row(
            f"{name} baseline",
            f"{human_time(base['predicted_step_time_s'])} ({speedup:.2f}x slower than the plan{fits})",
        )
    mem = plan.memory_per_device_bytes
    limit = mem.get("limit")
    summary.add_row(
        "memory per device",
        f"{human_bytes(mem['total'])} of {human_bytes(limit) if limit else 'no limit'} "
        f"(params {human_bytes(mem['params'])}, grads {human_bytes(mem['grads'])}, "
        f"optimizer {human_bytes(mem['optimizer'])}, activations {human_bytes(mem['activations'])}, "
        f"transient {human_bytes(mem.get('transient', 0))})",
    )
    if layout:
        summary.add_row("storage and recomputation", ", ".join(f"{k} x{n} blocks" for k, n in layout.items()))
    s = plan.solve
    if "variables" in s:  # the ILP solved it
        solved = f"{s['status']}, gap {s['gap'] * 100:.2f}%, {s['seconds']:.2f} s ({s['variables']} variables"
        summary.add_row("solve", solved + (", segments tied)" if s.get("tie_segments") else ")"))
    else:  # a baseline: nothing solved
        summary.add_row("solve", s["status"])
    summary.add_row(
        "cost model",
        f"{plan.provenance.get('cost_model')} ({plan.provenance.get('backend')}, "
        f"cluster {plan.provenance.get('cluster')})",
    )
    console.print(summary)
    print_validation(plan, console)
