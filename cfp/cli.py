"""The ``cfp`` command. Each subcommand lives in ``cfp/commands/<name>.py``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from rich.text import Text

import cfp
from cfp.children import exit_on_sigterm
from cfp.commands.common import console
from cfp.errors import CFPError, CFPWarning

COMMANDS = ["inspect", "analyze", "profile", "calibrate", "plan", "report", "bench"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cfp",
        description="Find fast tensor-parallel plans for PyTorch models by profiling real parallel programs.",
    )
    p.add_argument("--version", action="version", version=f"cfp {cfp.__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cfp.commands.{name}").register(sub)
    return p


def show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """CFP's own warnings as one plain line; others as Python shows them."""
    if issubclass(category, CFPWarning):
        console.print(Text.assemble(("warning: ", "yellow"), str(message)), highlight=False)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    from cfp.mesh import launched_rank

    args = parser().parse_args(argv)
    exit_on_sigterm()
    if not args.debug:
        # torch.export logs the whole partial graph (dozens of lines) before raising on an untraceable model;
        # CFP's own error says what failed, and --debug shows everything.
        logging.getLogger("torch.fx.experimental.symbolic_shapes").setLevel(logging.ERROR)
    warnings.showwarning = show_warning
    console.quiet = launched_rank() != 0  # under torchrun every rank runs the command; rank 0 reports
    try:
        args.run(args)
    except CFPError as exc:
        if args.debug:
            raise
        # Every rank reports its error: torchrun stops the others as soon as one rank exits, so rank 0 may be
        # gone before it prints (seen on a loaded host). The message is plain text: brackets in it (a path, a
        # gloo error, an --arg) are not rich markup.
        rank = launched_rank()
        console.quiet = False
        where = f"rank {rank}: " if rank else ""
        console.print(Text.assemble(("error: ", "bold red"), where, str(exc)), highlight=False)
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
