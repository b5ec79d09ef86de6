"""Learning from validation: measured step times correct the profiled predictions.

Every plan ``cfp plan --validate`` measures leaves a row in the profile store,
``<store>/validations/*.parquet``, keyed by model fingerprint, mesh, backend,
device kind and torch version: its measured median step time and its *uncorrected*
prediction split into features: the predicted time of the blocks under each
config name (``config:batch``, ``config:col``, ...), of the ZeRO storage
levels' collectives (``storage:zero3``, ...), of recomputation
(``recompute``) and of the transitions.

Blocks profiled one at a time miss what a whole step adds or hides (the
dispatch between blocks, overlap, cache effects), and not uniformly: the same
model's data-parallel plan can be over-predicted while its tensor-parallel
plan is under-predicted. So the correction is a scale per feature plus a
fixed per-step overhead::

    measured ~= sum_f (g + d_f) * F_f + o

fitted by least squares on relative errors over the stored pairs of this
model, mesh, backend and device. The per-feature deviations ``d_f`` are
pulled toward zero (ridge), so few pairs give one common scale ``g`` and more
pairs earn per-config scales; ``o`` is held more firmly still. A fit is used
only if it predicts another validation run's pairs better than the profiles
do (``Correction.choose``), so it takes two runs at least.
``CorrectedCosts`` applies it to every block (``o`` spread evenly over the
blocks), storage level, recomputation and transition, so the ILP plans with
the corrected times too.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cfp.costs import BlockCost, CostSetup, register_cost_model
from cfp.profile import profile
from cfp.profile.store import SCHEMA, StoreWarning, store_dir

RIDGE = 0.05  # weight of each (d_f)^2 against the squared relative errors
MARGIN = 0.9  # a correction must cut the held-out error by a tenth at least to be used
RIDGE_OVERHEAD = 1.0  # weight of (o / mean measured)^2: all plans of one model take about as long, so o and g are
# nearly collinear, and a weakly held o soaks up whatever the machine's load did during one validation
KEY = ["fingerprint", "mesh", "backend", "device_kind", "torch_version", "schema", "step_runtime", "feature_set"]
# schema: the profile rows' (a correction learnt on predictions from rows that measure differently does not fit
# today's); step_runtime: what a measured step runs, for the same reason on the measured side; feature_set: how a
# prediction is split into features
FEATURE_SET = 3  # bump when ``features`` splits or prices differently; 2: storage levels and recomputation are
# features; 3: transitions and storage levels include the ranks' skew at their collectives (cfp.profile.sync)
STEP_RUNTIME = 5  # bump when the training step runs differently; 2: ZeRO-3 plans and recomputed blocks lowered;
# 3: a block's ZeRO gathers in one all-gather, one recompute region per block; 4: AdamW on the local shards;
# 5: gradients after a mid-backward activation all-reduce bucketed


def features(graph, costs, solution) -> dict[str, float]:
    """A plan's predicted seconds split as the correction scales them: its blocks by config name, their ZeRO
    storage levels' deltas by level, recomputation, and the transitions (``costs`` uncorrected). They sum to
    the plan's predicted step time."""
    from cfp.solve import evaluate

    ev = evaluate(graph, costs, solution.choice, storage=solution.storage, recompute=solution.recompute)
    out: dict[str, float] = {"transitions": ev.transitions_total_s}

    def add(feature: str, t: float) -> None:
        out[feature] = out.get(feature, 0.0) + t

    for block, c, t, stored, recomputed in zip(graph.blocks, solution.choice, ev.block_s, ev.storage_s, ev.recompute_s):
        add(f"config:{graph.block_strategies(block)[c].config.name}", t - stored - recomputed)
        if solution.storage and solution.storage[block.id] != "replicate":
            add(f"storage:{solution.storage[block.id]}", stored)
        if recomputed:
            add("recompute", recomputed)
    return out


@dataclass
class Correction:
    """``measured ~= sum_f scale_f * F_f + overhead_s``; features never fitted take ``scale``."""

    scale: float = 1.0  # g
    scales: dict[str, float] = field(default_factory=dict)  # g + d_f per fitted feature
    overhead_s: float = 0.0  # o, per step
    pairs: int = 0
    runs: int = 0  # validation runs the pairs came from
    held_out_error: float | None = None  # mean |relative error| on pairs left out of the fit (``choose``)
    uncorrected_error: float | None = None  # the same pairs as profiled

    def scale_of(self, feature: str) -> float:
        return self.scales.get(feature, self.scale)

    def predict(self, feats: dict[str, float]) -> float:
        return sum(self.scale_of(f) * v for f, v in feats.items()) + self.overhead_s

    def to_json(self) -> dict:
        return {
            "pairs": self.pairs,
            "runs": self.runs,
            "scale": self.scale,
            "scales": self.scales,
            "overhead_s": self.overhead_s,
            "held_out_error": self.held_out_error,
            "uncorrected_error": self.uncorrected_error,
        }

    @classmethod
    def choose(cls, rows: pd.DataFrame) -> Correction | None:
        """The correction that predicts another validation run's pairs best: per-config scales, one common scale,
        or none at all (None).

        Each validation's pairs share that run's machine state: on this 2-core
        host one plan's median moves 10-35% between runs minutes apart, as much
        as configs differ from each other. A fit checked on pairs of the run it
        was fitted on learns that state, not the profiles' systematic error.
        Per-config scales fitted on one run re-ranked plans (gpt:small: col
        0.94x, batch 1.20x, and the ILP's new pick measured 1.25x slower than
        dp in the next run); a common scale fitted on one run moved every
        prediction by that run's drift (gpt:small's and llama:small's plans,
        within 2% and 7% as profiled, 10% and 12% off under it in the bench
        that followed). So each fit must predict the pairs of a run it was not
        fitted on (each run held out in turn): one run's pairs give no
        correction. Either fit is used only if it cuts the profiles' own mean
        relative error on the held-out pairs by a tenth (``MARGIN``). Without a
        ``run`` column each pair is its own run.
        """
        runs = rows["run"].to_numpy() if "run" in rows else np.arange(len(rows))
        if len(set(runs)) < 2:
            return None
        feats = [json.loads(f) for f in rows["features"]]
        measured = rows["measured_s"].to_numpy(dtype=float)
        uncorrected = float(np.mean([abs(sum(f.values()) / m - 1) for f, m in zip(feats, measured)]))
        best, best_error = None, uncorrected
        for per_config in (False, True):
            errors = np.zeros(len(rows))
            for run in set(runs):
                out = runs == run
                fit = cls.fit(rows[~out], per_config)
                errors[out] = [abs(fit.predict(feats[i]) / measured[i] - 1) for i in np.flatnonzero(out)]
            if float(errors.mean()) < min(best_error, MARGIN * uncorrected):
                best, best_error = cls.fit(rows, per_config), float(errors.mean())
        if best is not None:
            best.held_out_error, best.uncorrected_error = best_error, uncorrected
        return best

    @classmethod
    def fit(cls, rows: pd.DataFrame, per_config: bool = True) -> Correction | None:
        """Least squares on the stored (features, measured) pairs; None without pairs. ``per_config=False``
        fits the common scale and the overhead only."""
        if rows.empty:
            return None
        feats = [json.loads(f) for f in rows["features"]]
        names = sorted({f for fs in feats for f in fs}) if per_config else []
        measured = rows["measured_s"].to_numpy(dtype=float)
        n, k = len(feats), len(names)
        # unknowns: g, d_1..d_k, o; each pair's row divided by its measured time (relative error)
        a = np.zeros((n + k + 1, k + 2))
        b = np.zeros(n + k + 1)
        for i, fs in enumerate(feats):
            a[i, 0] = sum(fs.values()) / measured[i]
            a[i, 1 : k + 1] = np.array([fs.get(f, 0.0) for f in names]) / measured[i]
            a[i, k + 1] = 1.0 / measured[i]
            b[i] = 1.0
        a[n : n + k, 1 : k + 1] = math.sqrt(RIDGE) * np.eye(k)
        a[n + k, k + 1] = math.sqrt(RIDGE_OVERHEAD) / measured.mean()
        x, *_ = np.linalg.lstsq(a, b, rcond=None)
        g, d, o = float(x[0]), x[1 : k + 1], float(x[k + 1])
        runs = rows["run"].nunique() if "run" in rows else n
        scales = {f: max(g + float(df), 0.05) for f, df in zip(names, d)}
        return cls(scale=g, scales=scales, overhead_s=o, pairs=n, runs=runs)


class CorrectedCosts:
    """A profiled cost model with a Correction applied; everything else is the table's."""

    def __init__(self, table, correction: Correction, n_blocks: int):
        self.raw = table
        self.correction = correction
        self.per_block_s = correction.overhead_s / max(n_blocks, 1)

    def __getattr__(self, name):  # rows, block_phase_s, block_memory, name, ...
        return getattr(self.raw, name)

    def scale_of(self, feature: str) -> float:  # cfp.storage scales its levels' and recomputation's deltas
        return self.correction.scale_of(feature)

    def block_time(self, class_id: str, config: str) -> float:
        t = self.raw.block_time(class_id, config)
        return t * self.correction.scale_of(f"config:{config}") + self.per_block_s if math.isfinite(t) else t

    def block_cost(self, class_id: str, config: str) -> BlockCost:
        bc = self.raw.block_cost(class_id, config)
        s = self.correction.scale_of(f"config:{config}")
        return BlockCost(bc.compute_s * s + self.per_block_s, bc.communication_s * s)

    def transition_time(self, key) -> float:
        return self.raw.transition_time(key) * self.correction.scale_of("transitions")

    def describe(self) -> dict:
        return {**self.raw.describe(), "correction": self.correction.to_json()}


def uncorrected(costs):
    return costs.raw if isinstance(costs, CorrectedCosts) else costs


class ValidationStore:
    """The measured (predicted, measured) pairs beside the profiles: ``<store>/validations/part-*.parquet``."""

    def __init__(self, path: str | Path | None = None):
        self.dir = store_dir(path) / "validations"

    def rows(self, key: dict) -> pd.DataFrame:
        parts = sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []
        frames = []
        for part in parts:
            try:
                frame = pd.read_parquet(part)
                if set(KEY) <= set(frame.columns):  # pairs from before a key column was recorded are not used
                    frames.append(frame[[*KEY, "features", "measured_s"]].assign(run=part.stem))  # one part a run
            except (
                OSError,
                ValueError,
                KeyError,
            ) as exc:  # only this part's pairs are lost; later validations add more
                warnings.warn(
                    f"validation store file {part} cannot be read ({type(exc).__name__}); its pairs are not used",
                    StoreWarning,
                    stacklevel=2,
                )
        if not frames:
            return pd.DataFrame(columns=[*KEY, "features", "measured_s", "run"])
        df = pd.concat(frames, ignore_index=True)
        mask = np.ones(len(df), dtype=bool)
        for col in KEY:
            mask &= df[col].to_numpy() == key[col]
        return df[mask].reset_index(drop=True)

    def add(self, rows: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns()}-{os.getpid()}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        os.replace(tmp, self.dir / name)


def store_key(graph, backend: str, device: str) -> dict:
    from cfp.profile.runner import device_kind, mesh_key

    return {
        "fingerprint": graph.traced.fingerprint(),
        "mesh": mesh_key(graph.mesh),
        "backend": backend,
        "device_kind": device_kind("cuda" if str(device).startswith("cuda") else "cpu"),
        "torch_version": torch.__version__,
        "schema": SCHEMA,
        "step_runtime": STEP_RUNTIME,
        "feature_set": FEATURE_SET,
    }


def corrected(table, graph, backend: str, device: str, store: str | Path | None = None):
    """``table`` with the correction fitted on this model's stored pairs, or ``table`` itself when there are none
    or no fit predicts held-out pairs better than the profiles (``Correction.choose``)."""
    correction = Correction.choose(ValidationStore(store).rows(store_key(graph, backend, device)))
    return table if correction is None else CorrectedCosts(table, correction, len(graph.blocks))


@register_cost_model("profiled", measures=True)
def profiled_costs(graph, setup: CostSetup):
    """The graph's blocks and transitions profiled (stored rows reused), corrected by stored validations.

    Compiled programs are not corrected: the stored pairs are of lowered steps."""
    spec = setup.spec if setup.spec is not None else graph.traced.spec
    run = profile(
        graph, spec, backend=setup.backend, cluster=setup.cluster, on_progress=setup.progress, runtime=setup.runtime
    )
    if setup.runtime == "compiled":
        return run.table
    return corrected(run.table, graph, setup.backend, spec.device)
