"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cfp.spec import ModelSpec, parse_args

# Without a terminal (logs, CI, pipes) rich would cut tables and wrap lines at 80 columns; there, lines are as wide
# as their content instead (tables size themselves to it), unless COLUMNS says otherwise.
console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=100_000)


def add_model_args(p: argparse.ArgumentParser, device: str = "meta") -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="path/to/file.py:factory, package.module:factory, or a preset such as gpt:gpt2-xl",
    )
    p.add_argument("--batch", type=int, help="global batch size passed to the factory")
    p.add_argument("--seq", type=int, help="sequence length passed to the factory")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="extra factory keyword argument (repeatable)")
    p.add_argument(
        "--device", default=device, help=f"device the model is built on (default: {device}; meta costs no memory)"
    )


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(spec=args.model, batch=args.batch, seq=args.seq, device=args.device, args=parse_args(args.arg))


@contextlib.contextmanager
def analysis_progress(what: str = "propagating configs"):
    """A bar with an ETA while analysis propagates configs; yields the ``progress(done, total)`` that analyze takes."""
    columns = [
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
