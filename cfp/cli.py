"""The ``cfp`` command."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

import cfp
from cfp.errors import CFPError
from cfp.report_util import human, human_bytes, write_json
from cfp.spec import ModelSpec, parse_args

console = Console()


def add_model_args(p: argparse.ArgumentParser, device: str = "meta") -> None:
    p.add_argument("model", metavar="MODEL", help="path/to/file.py:factory, package.module:factory, or a preset such as gpt:gpt2-xl")
    p.add_argument("--batch", type=int, help="global batch size passed to the factory")
    p.add_argument("--seq", type=int, help="sequence length passed to the factory")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="extra factory keyword argument (repeatable)")
    p.add_argument("--device", default=device, help=f"device the model is built on (default: {device}; meta costs no memory)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(spec=args.model, batch=args.batch, seq=args.seq, device=args.device, args=parse_args(args.arg))


def cmd_inspect(args: argparse.Namespace) -> None:
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cfp", description="Find fast tensor-parallel plans for PyTorch models by profiling real parallel programs.")
    p.add_argument("--version", action="version", version=f"cfp {cfp.__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = sub.add_parser("inspect", help="capture a model and summarise its graph", description="Capture a model with torch.export and summarise its graph: ops by kind, parameters, FLOPs, activation sizes.")
    add_model_args(inspect)
    inspect.set_defaults(run=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except CFPError as exc:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
