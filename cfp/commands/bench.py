"""``cfp bench MODEL --mesh M``: CFP's plan against the baselines, in real training steps."""

from __future__ import annotations

import argparse

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cfp.commands.common import add_json_arg, add_model_args, console, model_spec
from cfp.report import human_time
from cfp.report_util import human_bytes, write_json


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run CFP's plan and the baselines side by side in real training steps",
        description=(
            "Profile the model on the real backend (stored profiles are reused), make each plan (cfp: the ILP over the "
            "profiles; analytic: the ILP over FLOPs + alpha-beta; dp, megatron, expert, fsdp, fsdp+tp: hand-made "
            "layouts; or plan files), then run training steps (forward, backward, AdamW) of every plan round-robin on "
            "one process group, so that machine noise hits all alike. Reports each plan's median step time, spread, "
            "peak memory per rank, predicted time (profiled costs), prediction error, ratio to CFP's plan and speedup "
            "over the plain model run in one process with all the ranks' threads (the single row), against the "
            "ideal: the plain model trained on each rank's share of the batch, all ranks at once, with no "
            "communication (the ideal row)."
        ),
    )
    add_model_args(p, device="cpu")
    p.add_argument("--mesh", required=True, help="device mesh, e.g. 2 or 2x2")
    p.add_argument(
        "--plans",
        default=None,
        metavar="LIST",
        help="comma-separated: cfp, analytic, dp, megatron, expert, fsdp, fsdp+tp, or plan files (.json), each "
        "optionally with +interpreted (run on the DTensor interpreter) or +compiled (lowered programs compiled by "
        "inductor) (default: cfp,dp,megatron,expert,fsdp,fsdp+tp,analytic, leaving out baselines that do not apply)",
    )
    p.add_argument(
        "--interpreted",
        action="store_true",
        help="also run the first plan (cfp by default) on the DTensor interpreter (cfp+interpreted)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also run the first plan's lowered programs compiled by inductor (cfp+compiled)",
    )
    p.add_argument("--no-single", dest="single", action="store_false", help="leave out the plain, unparallelised model")
    p.add_argument(
        "--no-ideal",
        dest="ideal",
        action="store_false",
        help="leave out the ideal row (the plain model on each rank's share of the batch, no communication)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed training steps per plan (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per plan first (default 3)")
    p.add_argument(
        "--cluster", metavar="NAME|FILE", help="cluster model for the analytic plan (default: cpu-gloo-local on CPU)"
    )
    p.add_argument(
        "--memory", metavar="SIZE", help="per-device memory limit for the plans CFP makes, e.g. 2MiB (default: none)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one step may take before the ranks count as hung (default 600)",
    )
    p.add_argument("--csv", metavar="FILE", help="write one row per plan as CSV")
    add_json_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from cfp.bench import DEFAULT_PLANS, bench

    plans = [p.strip() for p in args.plans.split(",") if p.strip()] if args.plans else None
    first = (plans or DEFAULT_PLANS)[0]
    variants = [f"{first}+{v}" for v, on in (("interpreted", args.interpreted), ("compiled", args.compile)) if on]
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("profiling (real)", total=None)

        def on_profile(done, cached, total, job):
            bar.update(task, total=total, completed=done, description=f"profiling (real, {cached} reused)")

        def on_step(done, total):
            bar.update(task, total=total, completed=done, description="training steps, plans interleaved")

        result = bench(
            model_spec(args),
            args.mesh,
            plans,
            steps=args.steps,
            warmup=args.warmup,
            cluster=args.cluster,
            lr=args.lr,
            timeout_s=args.timeout,
            progress=on_profile,
            on_step=on_step,
            memory=args.memory,
            single=args.single,
            variants=variants,
            ideal=args.ideal,
        )
    print_table(result)
    if args.csv:
        result.to_csv(args.csv)
        console.print(f"CSV written to [bold]{args.csv}[/]")
    write_json(
        args.json,
        {
            "model": result.model,
            "mesh": list(result.mesh.shape),
            "device": result.device,
            "steps": result.steps,
            "wall_s": round(result.wall_s, 2),
            "skipped": result.skipped,
            "plans": result.table.to_dict("records"),
        },
    )


def raw_error(row: dict) -> str:
    """The uncorrected prediction's error, where a correction learnt by `cfp plan --validate` changed it."""
    if abs(row["raw_predicted_step_s"] - row["predicted_step_s"]) <= 1e-12:
        return ""
    return f" (raw {row['raw_prediction_error'] * 100:+.1f}%)"


def print_table(result) -> None:
    mesh = "x".join(map(str, result.mesh.shape))
    table = Table(
        title=f"{result.model} on mesh {mesh} ({result.device}), median of {result.steps} interleaved steps per plan"
    )
    speedup = f"speedup (ideal {result.ideal_speedup:.2f}x)"
    for col in (
        "plan",
        "step time",
        "spread (IQR)",
        "fwd+bwd",
        "optimizer",
        "predicted",
        "error",
        "peak mem/rank",
        "predicted mem",
        "vs cfp",
        speedup,
        "first loss",
    ):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for row in result.table.to_dict("records"):
        predicted = row["predicted_step_s"] == row["predicted_step_s"]  # NaN for the single and ideal rows
        table.add_row(
            row["plan"],
            human_time(row["median_step_s"]),
            human_time(row["iqr_step_s"]),
            human_time(row["fwd_bwd_s"]),
            human_time(row["optimizer_s"]),
            f"{human_time(row['predicted_step_s'])} (opt {human_time(row['predicted_optimizer_s'])})"
            if predicted
            else "-",
            f"{row['prediction_error'] * 100:+.1f}%" + raw_error(row) if predicted else "-",
            human_bytes(row["peak_mem_bytes"]),
            f"{human_bytes(row['predicted_mem_bytes'])} ({row['mem_error'] * 100:+.0f}%)" if predicted else "-",
            f"{row['ratio_to_cfp']:.2f}x",
            f"{row['speedup']:.2f}x" if row["speedup"] == row["speedup"] else "-",
            f"{row['first_loss']:.4f}" if row["first_loss"] == row["first_loss"] else "-",
        )
    console.print(table)
    for row in result.table.to_dict("records"):
        if row["configs"]:
            layout = f"; {row['layout']}" if row.get("layout") else ""
            console.print(f"[dim]{row['plan']}: {row['configs']}{layout}[/]", highlight=False)
    for name, why in result.skipped.items():
        console.print(f"[dim]{name}: not run, {why}[/]")
    console.print(
        "[dim]step time: the slowest rank, barrier to end of the optimizer step; "
        "predicted: the profiled cost model for every plan; "
        "(opt: its AdamW part), corrected by earlier validations where they exist (raw: uncorrected); "
        "error: predicted / measured - 1; "
        "predicted mem: the per-device peak predicted by the exact count (in brackets: vs the measured peak); "
        "vs cfp: step time / cfp's; speedup: single's step time / the plan's, "
        "single being the plain model in one process with all the ranks' threads (one GPU); "
        "ideal: the plain model on each rank's share of the batch, all ranks at once, no communication "
        "(the best a plan over these ranks can do here; its speedup is the ideal one); "
        "+interpreted: run on the DTensor interpreter, +compiled: lowered programs compiled by inductor. "
        "Equal first losses show every plan computes the same model.[/]"
    )
