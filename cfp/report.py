"""Reports of a plan: rich tables for the terminal and a matplotlib figure."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from cfp.placements import short, to_strs
from cfp.plan import Plan
from cfp.report_util import human_bytes


def human_time(s: float) -> str:
    """0.0123 -> '12.3 ms'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def tables(plan: Plan) -> list[Table]:
    """Summary, per-block and parameter-placement tables."""
    mem = plan.memory_per_device_bytes
    limit = mem.get("limit")
    summary = Table(
        show_header=False, title=f"plan for {plan.model.get('spec', {}).get('describe', plan.model.get('spec'))}"
    )
    summary.add_row("mesh", " x ".join(f"{n}={s}" for n, s in zip(plan.mesh["names"], plan.mesh["shape"])))
    summary.add_row("fingerprint", plan.fingerprint)
    summary.add_row("predicted step time", human_time(plan.predicted_step_time_s))
    for k, v in plan.time_breakdown_s.items():
        summary.add_row(f"  {k}", human_time(v))
    for name, base in plan.baselines.items():
        summary.add_row(
            f"{name} baseline",
            f"{human_time(base['predicted_step_time_s'])}, {human_bytes(base['memory_per_device_bytes'])}"
            f"{'' if base.get('fits', True) else ' (does not fit)'}",
        )
    used = f" ({100 * mem['total'] / limit:.1f}% of the limit)" if limit else ""
    summary.add_row(
        "memory per device", f"{human_bytes(mem['total'])} / {human_bytes(limit) if limit else 'no limit'}{used}"
    )
    if mem.get("backward") is not None:
        summary.add_row(
            "",
            "at the step's peak: params + optimizer + the larger of transient + grads (with the bucket being "
            "reduced) and backward (the most held while one block runs its backward: the activations it and "
            "the blocks before it saved, its gradients in flight and transient, the gradients made after it)",
        )
    elif "transient" in mem:
        summary.add_row(
            "",
            "at the step's peak: params + optimizer + transient + the larger of grads (with the bucket being "
            "reduced) and activations (with the gradients in flight as backward starts)",
        )
    for k in ("params", "grads", "bucket", "optimizer", "activations", "in_flight", "transient", "backward"):
        if mem.get(k) is not None:
            summary.add_row(f"  {k}", human_bytes(mem[k]))
    layout = plan.layout_counts()
    if layout:
        summary.add_row("storage, recomputation", ", ".join(f"{k}: {n} blocks" for k, n in layout.items()))
    s = plan.solve
    summary.add_row("solve", f"{s.get('status')}, gap {s.get('gap', 0) * 100:.2f}%, {s.get('seconds', 0):.2f} s")
    summary.add_row("provenance", ", ".join(f"{k}={v}" for k, v in plan.provenance.items()))

    scale, unit = (1e3, "ms") if plan.predicted_step_time_s >= 1e-3 else (1e6, "us")

    def t(v):
        return f"{v * scale:.3g}" if v else ""

    blocks = Table(title=f"blocks along the model (times in {unit})")
    for col, just in (
        ("id", "right"),
        ("op", "left"),
        ("config", "left"),
        ("storage", "left"),
        ("time", "right"),
        ("comm", "right"),
        ("trans in", "right"),
        ("entry", "left"),
        ("params", "right"),
    ):
        blocks.add_column(col, justify=just)
    for b in plan.blocks:
        act = next((i for i in b["inputs"] if i["role"] == "activation"), None)
        blocks.add_row(
            str(b["id"]),
            b["op"].removeprefix("aten."),
            b["config"],
            " ".join(
                [b["storage"]] * (b.get("storage", "replicate") != "replicate")
                + ["recompute"] * bool(b.get("recompute"))
            ),
            t(b["time_s"]),
            t(b.get("communication_s")),
            t(b["transition_in_s"]),
            short(act["placements"] or ()) if act else "",
            str(len(b["params"])),
        )
    params = Table(title="parameter placements")
    params.add_column("parameter")
    params.add_column("placements")
    params.add_column("stored")
    for fqn, pl in plan.parameters.items():
        stored = plan.storage.get(fqn)
        stored_as = f"{stored['level']}: {', '.join(to_strs(stored['placements']))}" if stored else ""
        params.add_row(fqn, ", ".join(to_strs(pl)), stored_as)
    return [summary, blocks, params]


def validation_table(plan: Plan) -> Table | None:
    """The candidates ``--validate`` measured: predicted and measured step time, and why one was chosen."""
    v = plan.validation
    if not v:
        return None
    table = Table(
        title=f"validation: {len(v['candidates'])} candidates, {v['steps']} timed steps each "
        f"(+{v['warmup']} warm-up), {v['wall_s']:.1f} s"
    )
    for col in ("candidate", "predicted", "measured", "IQR", "error", "why"):
        table.add_column(col, justify="left" if col in ("candidate", "why") else "right")
    for c in v["candidates"]:
        measured = c["measured_step_time_s"]
        error = f"{c['predicted_step_time_s'] / measured - 1:+.1%}" if measured else ""
        table.add_row(
            f"[bold]{c['name']}[/]" if c["chosen"] else c["name"],
            human_time(c["predicted_step_time_s"]),
            human_time(measured) if measured else "",
            human_time(c["iqr_step_time_s"]) if measured else "",
            error,
            c["why"],
        )
    return table


def print_validation(plan: Plan, console: Console) -> None:
    table = validation_table(plan)
    if table is None:
        return
    console.print(table)
    for c in plan.validation["candidates"]:
        console.print(f"[dim]{c['name']}: {c['configs']}[/]", highlight=False)
    fit = plan.validation.get("correction")
    if not fit:
        return
    before = fit["error_before"]
    runs = fit.get("runs")
    stored = f"{fit['pairs']} stored pairs" + (f" from {runs} validation run{'s' * (runs != 1)}" if runs else "")
    if fit.get("applied", True):
        after = fit["error_after"]
        kind = "per-config scales" if fit.get("scales") else "one common scale"
        outcome = (
            f"mean {after['mean_abs']:.1%}, max {after['max_abs']:.1%} after the correction refitted on {stored} "
            f"({kind}, scale {fit['scale']:.3f}, overhead {human_time(fit['overhead_s'])} per step)"
        )
    else:
        outcome = (
            f"no correction from the {stored}: a fit must predict another validation run's pairs a tenth "
            "better than the profiles do"
        )
    console.print(
        f"prediction error of the measured candidates: mean {before['mean_abs']:.1%}, "
        f"max {before['max_abs']:.1%} as profiled; {outcome}",
        highlight=False,
    )


def print_report(plan: Plan, console: Console, parameters: bool = False) -> None:
    summary, blocks, params = tables(plan)
    console.print(summary)
    print_validation(plan, console)
    console.print(blocks)
    if parameters:
        console.print(params)


def figure(plan: Plan, path: str | Path) -> Path:
    """A PNG: time per block (compute / communication / transition), the config along the model, memory vs the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    blocks = plan.blocks
    ids = np.arange(len(blocks))
    fig = plt.figure(figsize=(max(10, min(24, 0.12 * len(blocks) + 8)), 8.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 4, height_ratios=[3, 1.2])
    ax_time = fig.add_subplot(grid[0, :3])
    ax_mem = fig.add_subplot(grid[:, 3])
    ax_cfg = fig.add_subplot(grid[1, :3], sharex=ax_time)

    scale, unit = (1e3, "ms") if plan.predicted_step_time_s >= 1e-3 else (1e6, "µs")
    trans = np.array([b["transition_in_s"] for b in blocks]) * scale
    if all("compute_s" in b for b in blocks):
        comp = np.array([b["compute_s"] for b in blocks]) * scale
        comm = np.array([b["communication_s"] for b in blocks]) * scale
        ax_time.bar(ids, comp, width=0.85, label="compute", color="#4C72B0")
        ax_time.bar(ids, comm, width=0.85, bottom=comp, label="communication in block", color="#DD8452")
        bottom = comp + comm
    else:
        bottom = np.array([b["time_s"] for b in blocks]) * scale
        ax_time.bar(ids, bottom, width=0.85, label="block (profiled)", color="#4C72B0")
    ax_time.bar(ids, trans, width=0.85, bottom=bottom, label="transition into block", color="#C44E52")
    ax_time.set_ylim(0, max(float((bottom + trans).max()), 1e-30) * 1.25)
    ax_time.set_ylabel(f"time per step ({unit})")
    base = "".join(f", {k} {v['predicted_step_time_s'] * scale:.3g} {unit}" for k, v in plan.baselines.items())
    ax_time.set_title(f"predicted step time {plan.predicted_step_time_s * scale:.3g} {unit}{base}")
    ax_time.legend(loc="upper left", fontsize=8)
    ax_time.grid(axis="y", alpha=0.3)
    plt.setp(ax_time.get_xticklabels(), visible=False)

    configs = sorted({b["config"] for b in blocks})
    cmap = plt.get_cmap("tab20" if len(configs) > 10 else "tab10")
    colors = {c: cmap(i % cmap.N) for i, c in enumerate(configs)}
    ax_cfg.bar(ids, np.ones(len(blocks)), width=1.0, color=[colors[b["config"]] for b in blocks], edgecolor="none")
    ax_cfg.set_yticks([])
    ax_cfg.set_xlabel("block (along the model)")
    ax_cfg.set_title("chosen config per block", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in configs]
    ax_cfg.legend(
        handles,
        configs,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.45),
        ncol=min(len(configs), 8),
        fontsize=8,
        frameon=False,
    )
    ax_cfg.set_xlim(-0.5, len(blocks) - 0.5)
    if len(blocks) <= 40:
        ax_cfg.set_xticks(ids)
        ax_cfg.set_xticklabels(
            [f"{b['id']} {b['op'].removeprefix('aten.')}" for b in blocks], fontsize=7, rotation=60, ha="right"
        )

    mem = plan.memory_per_device_bytes
    limit = mem.get("limit")
    top = max(mem["total"], limit or 0) if limit and mem["total"] > 0.05 * limit else mem["total"]
    unit, div = next(
        ((u, d) for u, d in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if top >= d), ("B", 1)
    )
    # The step's peak holds the gradients and the bucket being reduced (end of backward) or what one block's
    # backward holds (the exact count's "backward"; before it, the saved activations and the gradients in flight),
    # not both; plans from before the peak was counted so ("transient" absent) draw every part.
    hidden: set[str] = {"backward"}
    if mem.get("backward") is not None:  # the backward-order peak holds the activations, in flight and transient
        grads_side = mem["transient"] + mem["grads"] + mem.get("bucket", 0) >= mem["backward"]
        hidden = {"activations", "in_flight"} | ({"backward"} if grads_side else {"grads", "bucket", "transient"})
    elif "transient" in mem:
        grads_side = mem["grads"] + mem.get("bucket", 0) >= mem["activations"] + mem.get("in_flight", 0)
        hidden = {"activations", "in_flight"} if grads_side else {"grads", "bucket"}
    parts = [
        ("params", "#4C72B0"),
        ("grads", "#55A868"),
        ("bucket", "#8CC28F"),
        ("optimizer", "#8172B2"),
        ("activations", "#DD8452"),
        ("in_flight", "#E8A87C"),
        ("transient", "#937860"),
        ("backward", "#DD8452"),
    ]
    y = 0.0
    for key, color in parts:
        if key not in mem or key in hidden:
            continue
        ax_mem.bar([0], [mem[key] / div], bottom=y, width=0.6, color=color, label=f"{key} {human_bytes(mem[key])}")
        y += mem[key] / div
    if limit and mem["total"] > 0.05 * limit:
        ax_mem.axhline(limit / div, color="black", linestyle="--", label=f"limit {human_bytes(limit)}")
        ax_mem.set_ylim(0, max(y, limit / div) * 1.1)
    elif limit:
        ax_mem.plot(
            [], [], " ", label=f"limit {human_bytes(limit)} (off scale: {100 * mem['total'] / limit:.2g}% used)"
        )
    ax_mem.set_xticks([])
    ax_mem.set_ylabel(f"{unit} per device")
    ax_mem.set_title(f"memory {human_bytes(mem['total'])}", fontsize=10)
    ax_mem.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=8, frameon=False)
    fig.suptitle(
        f"{plan.model.get('spec', {}).get('spec', '')} on mesh {'x'.join(map(str, plan.mesh['shape']))} "
        f"({plan.provenance.get('cost_model')} costs)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
