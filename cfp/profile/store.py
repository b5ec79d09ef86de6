"""The profile store: measured rows as a pandas DataFrame, persisted as Parquet.

Layout: ``<store>/blocks/part-<time>-<pid>-<n>.parquet``. Rows are written
as jobs finish (every few seconds and at the end of a run), each file
atomically (temporary file, then ``os.replace``), so a killed run keeps what
it measured and the next run resumes. Parts are compacted into one file once
there are many.

A row is keyed by ``KEY`` (block class hash or ``transition``, config,
shape key, mesh, device kind, backend, cluster model for emulated rows,
runtime (lowered, compiled or interpreted programs; rows from before the
runtime was recorded are ``interpreted``), dtype, torch version, store
schema). Rows from another torch version or
schema are never reused (a warning says how many were skipped); a file that
cannot be read is reported, renamed to ``*.corrupt`` and its rows
re-measured.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from cfp.cluster import CLUSTERS_DIR
from cfp.costs import BlockCost, TransitionKey
from cfp.errors import CFPError

SCHEMA = 6  # 2: optimizer_s in total_s, comm_s measured on the real backend; 3: total_s is the slowest rank's whole iteration;
# 4: the upstream gradients are made outside the timed backward, an optimizer call's fixed cost is taken off;
# 5, 6: gradients sent to producing blocks are placed like the inputs (in backward)
KEY = ["kind", "class_id", "config", "shape_key", "mesh", "device_kind", "backend", "cluster", "runtime", "dtype", "torch_version", "schema"]
VALUES = [
    "status", "error", "forward_s", "backward_s", "reduce_s", "optimizer_s", "comm_s", "total_s", "total_min_s", "total_max_s",
    "total_iqr_s", "iters", "memory_bytes", "memory_source", "collectives", "comm_bytes", "measured_at",
]
DEFAULT_DIR = CLUSTERS_DIR.parent
COMPACT_AFTER = 32


class StoreWarning(UserWarning):
    """A stored profile row or file could not be used and will be re-measured."""


def store_dir(path: str | Path | None = None) -> Path:
    """``--store DIR``, else ``$CFP_PROFILE_DIR``, else the repository's ``profiles/``."""
    return Path(path or os.environ.get("CFP_PROFILE_DIR") or DEFAULT_DIR)


def transition_config(key: TransitionKey) -> str:
    return f"{','.join(key.src)}->{','.join(key.dst)}"


class ProfileStore:
    def __init__(self, path: str | Path | None = None, flush_every_s: float = 2.0):
        self.root = store_dir(path)
        self.dir = self.root / "blocks"
        self.flush_every_s = flush_every_s
        self.pending: list[dict] = []
        self.last_flush = time.monotonic()
        self.skipped: dict[str, int] = {}  # why -> rows not reused
        self.corrupt: list[Path] = []
        self._seq = 0
        self.frame = self._load()

    # -- reading ----------------------------------------------------------------
    def _load(self) -> pd.DataFrame:
        frames = []
        parts = sorted(self.dir.glob("*.parquet")) if self.dir.is_dir() else []
        for part in parts:
            try:
                df = pd.read_parquet(part)
                if "runtime" not in df.columns:  # rows from before lowering timed the DTensor interpreter
                    df["runtime"] = "interpreted"
                missing = [c for c in KEY + VALUES if c not in df.columns]
                if missing:
                    raise ValueError(f"missing columns {missing[:4]}")
            except Exception as exc:
                bad = part.with_suffix(".corrupt")
                os.replace(part, bad)
                self.corrupt.append(bad)
                warnings.warn(
                    f"profile store file {part} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); "
                    f"moved to {bad.name}; its rows will be re-measured",
                    StoreWarning,
                    stacklevel=3,
                )
                continue
            frames.append(df)
        if not frames:
            return pd.DataFrame(columns=KEY + VALUES)
        df = pd.concat(frames, ignore_index=True)
        df = df.sort_values("measured_at").drop_duplicates(KEY, keep="last").reset_index(drop=True)
        current = (df["torch_version"] == torch.__version__) & (df["schema"] == SCHEMA)
        if (~current).any():
            for (tv, sc), n in df[~current].groupby(["torch_version", "schema"]).size().items():
                self.skipped[f"torch {tv}, store schema {sc}"] = int(n)
            warnings.warn(
                f"profile store {self.dir}: {int((~current).sum())} rows from another torch version or store schema "
                f"({', '.join(self.skipped)}) are not reused (now torch {torch.__version__}, schema {SCHEMA})",
                StoreWarning,
                stacklevel=3,
            )
        if len(parts) > COMPACT_AFTER and not self.corrupt:
            self._write(df, "compact")
            for part in parts:
                part.unlink(missing_ok=True)
        return df[current].reset_index(drop=True)

    def lookup(self, key: dict) -> dict | None:
        """The stored row with exactly this key (current torch and schema), or None."""
        if self.frame.empty:
            return None
        mask = pd.Series(True, index=self.frame.index)
        for col in KEY:
            mask &= self.frame[col] == key[col]
        hits = self.frame[mask]
        return None if hits.empty else hits.iloc[-1].to_dict()

    # -- writing ----------------------------------------------------------------
    def add(self, row: dict) -> None:
        row = {**row, "measured_at": time.time()}
        self.pending.append(row)
        self.frame = pd.concat([self.frame, _frame([row])], ignore_index=True)
        if time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self._write(_frame(self.pending), "part")
            self.pending = []
        self.last_flush = time.monotonic()

    def _write(self, df: pd.DataFrame, stem: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{stem}-{time.time_ns()}-{os.getpid()}-{self._seq}.parquet"
        tmp = self.dir / f".{name}.tmp"
        df.to_parquet(tmp, index=False)
        os.replace(tmp, self.dir / name)


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in KEY + VALUES:
        if col not in df.columns:
            df[col] = None
    df = df[KEY + VALUES]
    for col in ("forward_s", "backward_s", "reduce_s", "optimizer_s", "comm_s", "total_s", "total_min_s", "total_max_s", "total_iqr_s", "measured_at"):
        df[col] = df[col].astype("float64")
    for col in ("iters", "memory_bytes", "collectives", "comm_bytes"):
        df[col] = df[col].fillna(0).astype("int64")
    for col in ("error", "memory_source", "cluster", "runtime"):
        df[col] = df[col].fillna("").astype(str)
    df["schema"] = df["schema"].astype("int64")
    return df


class ProfileTable:
    """Profiled costs for one graph on one mesh/backend: the ``CostModel`` the ILP reads.

    ``rows`` is the DataFrame of the rows a profile run used (measured or
    reused). Block times are per block instance (forward + backward +
    gradient reduction + an AdamW step on its parameters); transition times
    are forward + backward.
    """

    def __init__(self, rows: pd.DataFrame, name: str = "profiled"):
        self.rows = rows.reset_index(drop=True)
        self.name = name
        self._blocks: dict[tuple[str, str], dict] = {}
        self._transitions: dict[tuple, dict] = {}
        for row in self.rows.to_dict("records"):
            if row["kind"] == "block":
                self._blocks[(row["class_id"], row["config"])] = row
            else:
                self._transitions[(row["shape_key"], row["dtype"], row["config"])] = row

    def _time(self, row: dict | None, what: str) -> float:
        if row is None:
            raise CFPError(f"No profile for {what}; run `cfp profile` for this model, mesh and backend first.")
        if row["status"] != "ok":
            return math.inf
        return float(row["total_s"])

    def block_time(self, class_id: str, config: str) -> float:
        return self._time(self._blocks.get((class_id, config)), f"block class {class_id} config {config!r}")

    def block_phase_s(self, class_id: str, config: str, phase: str) -> float:
        """One measured phase of a block (``forward``, ``backward``, ``reduce``, ``optimizer``), in seconds."""
        self.block_time(class_id, config)  # a clear error if it was never profiled
        return float(self._blocks[(class_id, config)][f"{phase}_s"])

    def block_cost(self, class_id: str, config: str) -> BlockCost:
        """Measured compute and communication: ``comm_s`` (timed collectives, or priced when emulated) and the rest."""
        total = self.block_time(class_id, config)
        row = self._blocks[(class_id, config)]
        comm = float(row["comm_s"]) if math.isfinite(total) and pd.notna(row["comm_s"]) else 0.0
        return BlockCost(max(total - comm, 0.0), comm)

    def transition_time(self, key: TransitionKey) -> float:
        if key.is_noop:
            return 0.0
        row = self._transitions.get((json.dumps(list(key.shape)), key.dtype, transition_config(key)))
        return self._time(row, f"transition {key}")

    def block_memory(self, class_id: str, config: str) -> int:
        row = self._blocks.get((class_id, config))
        return int(row["memory_bytes"]) if row is not None else 0
