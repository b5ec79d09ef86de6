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
re-measured; a row marked ok whose timings are not finite and non-negative
is not reused either.

Concurrent runs on one store: ``blocks/.lock`` is held shared while the
files are read and exclusively while parts are compacted, so a reader never
sees a part vanish; ``blocks/.measure.lock`` is held by the one run that
measures, so two runs never time the same jobs against each other. A run that
finds rows missing checks that the store is writable, takes the measuring
lock (waiting for another run to finish), rereads the store and measures only
what is still missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from cfp.analytic import redistribute_collectives
from cfp.buckets import BUCKET_BYTES, bucket_key
from cfp.cluster import CLUSTERS_DIR
from cfp.costs import BlockCost, TransitionKey
from cfp.errors import CFPError, CFPWarning
from cfp.mesh import MeshSpec, parse_mesh
from cfp.placements import to_strs

SCHEMA = 16  # bump when what a row measures changes (rows of another schema are re-measured); the history is in git
KEY = [
    "kind",
    "class_id",
    "config",
    "shape_key",
    "mesh",
    "device_kind",
    "backend",
    "cluster",
    "runtime",
    "dtype",
    "torch_version",
    "schema",
]
VALUES = [
    "status",
    "error",
    "forward_s",
    "backward_s",
    "reduce_s",
    "optimizer_s",
    "comm_s",
    "total_s",
    "total_min_s",
    "total_max_s",
    "total_iqr_s",
    "iters",
    "memory_bytes",
    "memory_source",
    "collectives",
    "comm_bytes",
    "measured_at",
]
TIMES = [
    "forward_s",
    "backward_s",
    "reduce_s",
    "optimizer_s",
    "comm_s",
    "total_s",
    "total_min_s",
    "total_max_s",
    "total_iqr_s",
]
NOISY_SPREAD = 0.5  # a row whose IQR exceeds this fraction of its median total is too noisy to trust
DEFAULT_DIR = CLUSTERS_DIR.parent
COMPACT_AFTER = 32


class StoreWarning(CFPWarning):
    """A stored profile row or file could not be used and will be re-measured."""


def store_dir(path: str | Path | None = None) -> Path:
    """``--store DIR``, else ``$CFP_PROFILE_DIR``, else the repository's ``profiles/``."""
    return Path(path or os.environ.get("CFP_PROFILE_DIR") or DEFAULT_DIR)


def transition_config(key: TransitionKey) -> str:
    """A transition row's ``config``: ``Shard(0),Replicate()->Replicate(),Replicate()``."""
    return f"{','.join(to_strs(key.src))}->{','.join(to_strs(key.dst))}"


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
        self._reset(self._load())

    # -- locking ----------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, name: str, exclusive: bool):
        """``flock`` on ``blocks/<name>``; without one where the store cannot hold a lock file (read-only, absent)."""
        path = self.dir / name
        fd = None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                fd = os.open(path, flags, 0o666)
                break
            except OSError:
                continue
        if fd is None:  # nothing can write to a store that cannot hold a lock file, so nothing to wait for
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def measuring(self, jobs: int):
        """Hold the store's measuring lock: wait for any other run measuring into it, then reread it.

        On exit the rows are flushed and many parts compacted.
        """
        self.check_writable(jobs)
        fd = os.open(self.dir / ".measure.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                warnings.warn(
                    f"another run is measuring into profile store {self.dir}; waiting for it to finish",
                    StoreWarning,
                    stacklevel=3,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
            with warnings.catch_warnings():  # said at the first read
                warnings.simplefilter("ignore", StoreWarning)
                self._reset(self._load())  # what another run measured meanwhile is not measured again
            try:
                yield self
            finally:
                self.flush()
                self._compact()
        finally:
            os.close(fd)

    def check_writable(self, jobs: int) -> None:
        """Refuse to measure what could not be kept: a store that is a file, or a directory we cannot write."""
        advice = "Pass --store DIR (or set CFP_PROFILE_DIR) to a writable directory."
        for path in (self.root, self.dir):
            if path.exists() and not path.is_dir():
                raise CFPError(
                    f"Profile store {path} is a file, not a directory; {jobs} profiling job(s) need measuring "
                    f"and their rows could not be kept. {advice}"
                )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe-"):
                pass
        except OSError as exc:
            raise CFPError(
                f"Profile store {self.dir} is not writable ({exc.strerror or exc}); {jobs} profiling job(s) need "
                f"measuring and their rows could not be kept, so nothing was measured. {advice}"
            ) from exc

    # -- reading ----------------------------------------------------------------
    def _load(self) -> pd.DataFrame:
        if not self.dir.is_dir():
            return pd.DataFrame(columns=KEY + VALUES)
        with self._locked(".lock", exclusive=False):
            frames = [df for part in sorted(self.dir.glob("*.parquet")) if (df := self._read(part)) is not None]
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
        valid = _valid_timings(df)
        if (~valid & current).any():
            n = int((~valid & current).sum())
            self.skipped["invalid timings (NaN, infinite or negative)"] = n
            warnings.warn(
                f"profile store {self.dir}: {n} rows marked ok have timings that are NaN, infinite or negative; "
                f"they are not reused and will be re-measured",
                StoreWarning,
                stacklevel=3,
            )
        return df[current & valid].reset_index(drop=True)

    def _read(self, part: Path) -> pd.DataFrame | None:
        """One part's rows; None for a part compacted away meanwhile or an unreadable one
        (set aside and warned about)."""
        try:
            df = pd.read_parquet(part)
            if "runtime" not in df.columns:  # rows from before lowering timed the DTensor interpreter
                df["runtime"] = "interpreted"
            missing = [c for c in KEY + VALUES if c not in df.columns]
            if missing:
                raise ValueError(f"missing columns {missing[:4]}")
            return df
        except FileNotFoundError:
            return None
        except Exception as exc:
            bad = part.with_suffix(".corrupt")
            try:
                os.replace(part, bad)
                self.corrupt.append(bad)
                where = f"moved to {bad.name}"
            except FileNotFoundError:
                return None  # another run set it aside first
            except OSError as move:
                where = f"left in place (it cannot be moved: {move.strerror})"
            warnings.warn(
                f"profile store file {part} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); {where}; "
                "its rows will be re-measured",
                StoreWarning,
                stacklevel=4,
            )
            return None

    def _compact(self) -> None:
        """Many parts -> one file, under the exclusive files lock (no reader is between glob and read)."""
        with self._locked(".lock", exclusive=True):
            parts = sorted(self.dir.glob("*.parquet"))
            if len(parts) <= COMPACT_AFTER:
                return
            frames = [df for part in parts if (df := self._read(part)) is not None]
            if frames:
                self._write(pd.concat(frames, ignore_index=True), "compact")
            for part in parts:
                part.unlink(missing_ok=True)

    def _reset(self, frame: pd.DataFrame) -> None:
        self._stored = frame
        self._added: list[dict] = []  # rows added since, framed once when next read (a frame per row is slow)
        self._by_key: dict[tuple, dict] | None = None

    @property
    def frame(self) -> pd.DataFrame:
        """Every row: those read from the store and those added since."""
        if self._added:
            self._stored = pd.concat([self._stored, _frame(self._added)], ignore_index=True)
            self._added = []
            self._by_key = None  # it misses the rows just framed
        return self._stored

    def lookup(self, key: dict) -> dict | None:
        """The stored row with exactly this key (current torch and schema), or None."""
        frame = self.frame
        if self._by_key is None:  # the last row of a key wins, as in _load
            self._by_key = {tuple(row[c] for c in KEY): row for row in frame.to_dict("records")}
        row = self._by_key.get(tuple(key[c] for c in KEY))
        return None if row is None else dict(row)  # the caller's to change

    # -- writing ----------------------------------------------------------------
    def add(self, row: dict) -> None:
        row = {**row, "measured_at": time.time()}
        self.pending.append(row)
        self._added.append(row)
        if time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self._write(_frame(self.pending), "part")
            self.pending = []
        self.last_flush = time.monotonic()

    def _write(self, df: pd.DataFrame, stem: str) -> None:
        self._seq += 1
        name = f"{stem}-{time.time_ns()}-{os.getpid()}-{self._seq}.parquet"
        tmp = self.dir / f".{name}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            df.to_parquet(tmp, index=False)
            os.replace(tmp, self.dir / name)
        except OSError as exc:
            raise CFPError(
                f"Could not write {len(df)} profile row(s) to {self.dir} ({exc.strerror or exc}); they are lost."
            ) from exc


def _valid_timings(df: pd.DataFrame) -> pd.Series:
    """Rows not marked ok (an oom's infinite cost), or whose measured times are finite and non-negative.

    A phase may be missing (NaN) where a backend does not time it; the total never may.
    """
    times = df[TIMES].astype("float64")
    bad = (times < 0).any(axis=1) | times.isin([math.inf, -math.inf]).any(axis=1) | times["total_s"].isna()
    return (df["status"] != "ok") | ~bad


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in KEY + VALUES:
        if col not in df.columns:
            df[col] = None
    df = df[KEY + VALUES]
    for col in (*TIMES, "measured_at"):
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
    are forward + backward. ``provenance`` is what the run that made it
    records in plan files (backend, device, cluster, store, jobs).

    ``reduced`` (per block class and config, the gradient bytes reduced per
    mesh dimension) prices the gradient reduction of lowered and compiled
    rows as the step runs it, in buckets: at the profiled bucket's
    (``cfp.buckets.bucket_key``) time per byte. Without it, or for the
    interpreted runtime (which reduces parameter by parameter), a row's
    measured reduction stands.

    Sync rows (``cfp.profile.sync``, real backend) give each mesh dimension's
    skew: what a collective costs more in a step, where it waits for the last
    rank's compute, than in its transition job, which starts from a barrier.
    Every collective of a transition (a ZeRO gather or reduce-scatter among
    them) and every bucket of the gradient reduction pays it once; without
    sync rows, nothing.
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        name: str = "profiled",
        provenance: dict | None = None,
        reduced: dict[tuple[str, str], dict[int, int]] | None = None,
        mesh: MeshSpec | None = None,
    ):
        self.rows = rows.reset_index(drop=True)
        self.name = name
        self.provenance = dict(provenance or {})
        self.reduced = reduced or {}
        self.mesh = mesh or parse_mesh("1")
        self._blocks: dict[tuple[str, str], dict] = {}
        self._transitions: dict[tuple, dict] = {}
        self.sync_skew_s: dict[int, float] = {}  # mesh dim -> its sync row's skew
        for row in self.rows.to_dict("records"):
            if row["kind"] == "block":
                self._blocks[(row["class_id"], row["config"])] = row
            elif row["kind"] == "sync":
                ok = row["status"] == "ok" and math.isfinite(row["total_s"])
                self.sync_skew_s[int(row["config"].removeprefix("mesh dim "))] = float(row["total_s"]) if ok else 0.0
            else:
                self._transitions[(row["shape_key"], row["dtype"], row["config"])] = row

    def describe(self) -> dict:
        return dict(self.provenance)

    def noisy(self) -> pd.DataFrame:
        """Rows measured ok whose spread (IQR of the total) is over ``NOISY_SPREAD`` of their median:
        too noisy to trust."""
        rows = self.rows
        if rows.empty:
            return rows
        spread = rows["total_iqr_s"].astype("float64") / rows["total_s"].astype("float64")
        # a sync row's skew is the mean of small waits, most near 0 and a few long: its spread is large by nature
        return rows[(rows["status"] == "ok") & (spread > NOISY_SPREAD) & (rows["kind"] != "sync")]

    def _time(self, row: dict | None, what: str) -> float:
        if row is None:
            raise CFPError(f"No profile for {what}; run `cfp profile` for this model, mesh and backend first.")
        if row["status"] != "ok":
            return math.inf
        return float(row["total_s"])

    def block_time(self, class_id: str, config: str) -> float:
        total = self._time(self._blocks.get((class_id, config)), f"block class {class_id} config {config!r}")
        if not math.isfinite(total):
            return total
        row = self._blocks[(class_id, config)]
        return total - float(row["reduce_s"]) + self._reduce_s(class_id, config)

    def _reduce_s(self, class_id: str, config: str) -> float:
        """The block's gradient reduction: its share of the step's buckets (lowered runtimes), else as measured."""
        row = self._blocks[(class_id, config)]
        reduced = self.reduced.get((class_id, config))
        if row["runtime"] == "interpreted" or not reduced:
            return float(row["reduce_s"])
        buckets = {dim: self._bucket_s(dim) for dim in reduced}
        if not all(math.isfinite(t) for t in buckets.values()):  # the bucket could not be timed
            return float(row["reduce_s"])
        return sum(nbytes * buckets[dim] / BUCKET_BYTES for dim, nbytes in reduced.items())

    def _bucket_s(self, dim: int) -> float:
        """A full bucket's all-reduce over ``dim``: its fastest iteration. One large collective on a shared
        host is bimodal (23 or 87 ms for the same 25 MB on 2 gloo ranks, iteration to iteration), and the
        step's bucketed reduction runs near the fast mode (13 MB in about 20 ms)."""
        key = bucket_key(self.mesh.ndim, dim)
        if not math.isfinite(self.transition_time(key)):
            return math.inf
        return float(self._transition_row(key)["total_min_s"]) + self.sync_s(dim)

    def block_failure(self, class_id: str, config: str) -> str:
        """Why a block config has no finite time (its status and error), or "" if it ran."""
        row = self._blocks.get((class_id, config))
        return "" if row is None or row["status"] == "ok" else f"{row['status']}: {row['error']}"

    def block_phase_s(self, class_id: str, config: str, phase: str) -> float:
        """One measured phase of a block (``forward``, ``backward``, ``reduce``, ``optimizer``), in seconds."""
        self.block_time(class_id, config)  # a clear error if it was never profiled
        if phase == "reduce":
            return self._reduce_s(class_id, config)
        return float(self._blocks[(class_id, config)][f"{phase}_s"])

    def block_cost(self, class_id: str, config: str) -> BlockCost:
        """Measured compute and communication: ``comm_s`` (timed collectives, or priced when emulated) and the rest.
        The gradient reduction counts as ``block_time`` prices it (a lowered row's share of a bucket)."""
        total = self.block_time(class_id, config)
        row = self._blocks[(class_id, config)]
        comm = 0.0
        if math.isfinite(total) and pd.notna(row["comm_s"]):
            comm = max(float(row["comm_s"]) - float(row["reduce_s"]), 0.0) + self._reduce_s(class_id, config)
        return BlockCost(max(total - comm, 0.0), comm)

    def _transition_row(self, key: TransitionKey) -> dict | None:
        return self._transitions.get((json.dumps(list(key.shape)), key.dtype, transition_config(key)))

    def sync_s(self, dim: int) -> float:
        """Mesh dim ``dim``'s skew: what a collective over it pays more in a step than from a barrier."""
        return self.sync_skew_s.get(dim, 0.0)

    def _skew_s(self, key: TransitionKey, phase: str | None = None) -> float:
        """The skew the collectives of a transition pay (those of ``phase``, or all)."""
        return sum(
            self.sync_s(dim) for _, dim, _, ph in redistribute_collectives(key, self.mesh) if phase in (None, ph)
        )

    def transition_time(self, key: TransitionKey) -> float:
        if key.is_noop:
            return 0.0
        row = self._transition_row(key)
        return self._time(row, f"transition {key}") + self._skew_s(key)

    def transition_phase_s(self, key: TransitionKey, phase: str) -> float:
        """The ``forward`` or ``backward`` of a transition as a step pays it (a parameter's all-gather is its
        forward): measured, plus its collectives' skew."""
        if key.is_noop:
            return 0.0
        if not math.isfinite(self.transition_time(key)):
            return math.inf
        return float(self._transition_row(key)[f"{phase}_s"]) + self._skew_s(key, phase)
