"""``cfp report plan.json``: show a plan as tables, and as a figure with --png."""

from __future__ import annotations

import argparse

from rich.text import Text

from cfp.commands.common import add_json_arg, console
from cfp.report_util import write_json


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="show a plan file as tables (and a PNG figure)",
        description=(
            "Show a plan written by `cfp plan`: time and config per block, placements along the model, "
            "memory against the limit."
        ),
    )
    p.add_argument("plan", metavar="PLAN", help="plan JSON written by `cfp plan`")
    p.add_argument(
        "--png", metavar="FILE", help="also draw time per block, config along the model and memory vs limit to FILE"
    )
    p.add_argument("--parameters", action="store_true", help="also list every parameter's placements")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from cfp.plan import Plan
    from cfp.report import figure, print_report

    plan = Plan.load(args.plan)
    check_against_model(plan)
    print_report(plan, console, parameters=args.parameters)
    if args.png:
        figure(plan, args.png)
        console.print(f"Figure written to [bold]{args.png}[/].")
    write_json(args.json, plan.to_json())


def check_against_model(plan) -> None:
    """Check the plan's placements and configs against its model, built on meta from the plan's spec where it can be."""
    from cfp.capture import capture
    from cfp.errors import CFPError
    from cfp.parallelize import spec_of
    from cfp.spec import build

    try:
        traced = capture(build(spec_of(plan, device="meta")))
    except CFPError as exc:
        console.print(
            Text.assemble(("warning: ", "yellow"), f"the plan could not be checked against its model ({exc})")
        )
        return
    plan.check_matches(traced)
