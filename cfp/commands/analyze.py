"""``cfp analyze MODEL --mesh M``: ParallelBlocks, segments and configs."""

from __future__ import annotations

import argparse
from collections import Counter

from rich.table import Table

import cfp
from cfp.analyze import BlockGraph, analyze
from cfp.capture import op_name
from cfp.commands.common import add_json_arg, add_model_args, analysis_progress, console, model_spec
from cfp.mesh import parse_mesh
from cfp.placements import from_strs, short, to_strs
from cfp.propagate import BlockStrategy
from cfp.report_util import human, human_bytes, write_json


def register(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="cut a model into ParallelBlocks and propagate each config",
        description=(
            "Cut the model into ParallelBlocks, group identical blocks into classes and segments, "
            "and propagate every candidate entry config of each class with DTensor on a fake "
            "process group of the mesh's size. Needs no devices."
        ),
    )
    add_model_args(p)
    p.add_argument("--mesh", required=True, help="device mesh: 4, 2x4 or dp=2,tp=4")
    p.add_argument("--rejected", action="store_true", help="also list the configs DTensor refused, and why")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    mesh = parse_mesh(args.mesh)
    with console.status(f"Building and exporting {args.model}..."):
        traced = cfp.capture(cfp.build(model_spec(args)))
    graph = analyze_with_progress(traced, mesh)
    summary = summarize(graph)
    print_summary(graph, summary, args.model, show_rejected=args.rejected)
    console.print(
        "exits: S<d> = Shard(d), R = Replicate, P = Partial; "
        "collectives: AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all",
        style="dim",
    )
    write_json(args.json, summary)


def analyze_with_progress(traced, mesh) -> BlockGraph:
    with analysis_progress() as progress:
        return analyze(traced, mesh, progress=progress)


def _collectives(strategy: BlockStrategy) -> dict[str, int]:
    counts = Counter(f"{c.phase}:{c.kind}" for c in strategy.collectives)
    return dict(sorted(counts.items()))


def _config_json(strategy: BlockStrategy) -> dict:
    return {
        "name": strategy.config.name,
        "exit_placements": [to_strs(p) for p in strategy.exit_placements],
        "communication_free": strategy.comm_free,
        "collectives": _collectives(strategy),
        "comm_bytes": {phase: strategy.comm_bytes(phase) for phase in ("forward", "backward", "reduce")},
        "param_bytes_per_device": strategy.param_bytes,
        "activation_bytes_per_device": strategy.activation_bytes,
        "replicated_fallbacks": strategy.fallbacks,
    }


def summarize(graph: BlockGraph) -> dict:
    traced = graph.traced
    classes = []
    for class_id, members in graph.classes.items():
        block = graph.blocks[members[0]]
        classes.append(
            {
                "class": class_id,
                "blocks": len(members),
                "anchor": op_name(traced.nodes[block.anchor]),
                "example": block.anchor,
                "ops": len(block.nodes),
                "parameters": sum(traced.param_shapes()[f].numel() for f in block.params),
                "flops": block.flops,
                "configs": [_config_json(p) for p in graph.strategies[class_id]],
                "rejected": {p.config.name: p.reason for p in graph.rejected.get(class_id, [])},
            }
        )
    return {
        "mesh": graph.mesh.to_json(),
        "blocks": len(graph.blocks),
        "classes": len(graph.classes),
        "segments": [{"classes": list(s.classes), "start": s.start, "repeats": s.repeats} for s in graph.segments],
        "profile_jobs": graph.profile_jobs,
        "search_space": graph.search_space(),
        "analysis_s": round(graph.seconds, 2),
        "cached_classes": graph.cached_classes,
        "prologue_ops": len(graph.prologue),
        "replicated_ops": graph.replicated_ops(),
        "block_classes": classes,
    }


SHORT_KIND = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS", "all_to_all": "A2A", "broadcast": "BC"}
SHORT_PHASE = {"forward": "fwd", "backward": "bwd", "reduce": "reduce"}


def print_summary(graph: BlockGraph, summary: dict, model: str, show_rejected: bool = False) -> None:
    space = summary["search_space"]
    table = Table(title=f"{model} on mesh {graph.mesh}", show_header=False)
    table.add_row("ParallelBlocks", str(summary["blocks"]))
    table.add_row("unique block classes", str(summary["classes"]))
    table.add_row("prologue ops (run once, replicated)", str(summary["prologue_ops"]))
    for s in graph.segments:
        table.add_row("segment", f"{len(s.classes)} blocks x {s.repeats} repeats, from block {s.start}")
    table.add_row("profiling jobs (class, config)", str(summary["profile_jobs"]))
    table.add_row("plans, operator level", f"10^{space['operator_level']:.1f}")
    table.add_row("plans, block level", f"10^{space['block_level']:.1f}")
    table.add_row("plans, after segment dedup", f"10^{space['deduplicated']:.1f}")
    cached = f" ({graph.cached_classes} of {len(graph.classes)} classes from the cache)" if graph.cached_classes else ""
    table.add_row("analysis time", f"{graph.seconds:.1f} s{cached}")
    console.print(table)

    for cls in summary["block_classes"]:
        title = (
            f"class {cls['class']}: {cls['blocks']} block(s) like {cls['example']} ({cls['anchor']}), "
            f"{cls['ops']} ops, {human(cls['parameters'])} params, {human(cls['flops'], 'FLOP')}"
        )
        t = Table(title=title, title_justify="left")
        for col in ("config", "exits", "collectives", "comm-free", "params/dev", "acts/dev"):
            t.add_column(col)
        for cfg in cls["configs"]:
            exits = " ".join(short(from_strs(p)) for p in cfg["exit_placements"] if p)
            comms = (
                " ".join(
                    f"{SHORT_PHASE[k.split(':')[0]]}:{SHORT_KIND.get(k.split(':')[1], k)}x{v}"
                    for k, v in cfg["collectives"].items()
                )
                or "-"
            )
            t.add_row(
                cfg["name"],
                exits,
                comms,
                "yes" if cfg["communication_free"] else "no",
                human_bytes(cfg["param_bytes_per_device"]),
                human_bytes(cfg["activation_bytes_per_device"]),
            )
        console.print(t)
        fallbacks = sorted({f for cfg in cls["configs"] for f in cfg["replicated_fallbacks"]})
        if fallbacks:
            console.print(
                f"  [yellow]run replicated (no DTensor rule, or its fake kernel fails): {', '.join(fallbacks)}[/]"
            )
        if show_rejected and cls["rejected"]:
            for name, reason in cls["rejected"].items():
                console.print(f"  [dim]rejected {name}: {reason}[/]")
        elif cls["rejected"]:
            console.print(f"  [dim]{len(cls['rejected'])} config(s) rejected (--rejected shows why)[/]")
