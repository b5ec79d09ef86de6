"""``cfp inspect MODEL``: capture a model and summarise its graph."""

from __future__ import annotations

import argparse
import time

from rich.table import Table

import cfp
from cfp.commands.common import add_json_arg, add_model_args, console, model_spec
from cfp.report_util import human, human_bytes, write_json


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="capture a model and summarise its graph",
        description=(
            "Capture a model with torch.export and summarise its graph: "
            "ops by kind, parameters, FLOPs, activation sizes."
        ),
    )
    add_model_args(p)
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    with console.status(f"Building and exporting {args.model}..."):
        traced = cfp.capture(cfp.build(model_spec(args)))
    elapsed = time.perf_counter() - start
    ops = traced.op_counts()
    fwd = traced.forward_flops()
    summary = {
        "model": args.model,
        "nodes": len(traced.ops()),
        "parameters": traced.num_parameters(),
        "parameter_tensors": len(traced.params),
        "flops": 3 * fwd,
        "forward_flops": fwd,
        "activation_bytes": traced.activation_bytes(),
        "ops": dict(ops.most_common()),
        "fingerprint": traced.fingerprint(),
        "capture_s": round(elapsed, 2),
    }
    table = Table(title=f"{args.model}", show_header=False)
    table.add_row("graph nodes (ops)", f"{summary['nodes']:,}")
    table.add_row("parameters", f"{summary['parameters']:,} ({human(summary['parameters'])})")
    table.add_row("parameter tensors", str(summary["parameter_tensors"]))
    table.add_row("forward FLOPs", human(fwd, "FLOP"))
    table.add_row("FLOPs per training step (3x forward)", human(3 * fwd, "FLOP"))
    table.add_row("activations (all op outputs)", human_bytes(summary["activation_bytes"]))
    table.add_row("fingerprint", summary["fingerprint"])
    table.add_row("capture time", f"{elapsed:.1f} s")
    console.print(table)
    op_table = Table(title="ops by kind")
    op_table.add_column("op")
    op_table.add_column("count", justify="right")
    for name, count in ops.most_common():
        op_table.add_row(name, str(count))
    console.print(op_table)
    write_json(args.json, summary)
