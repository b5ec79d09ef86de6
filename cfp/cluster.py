"""Cluster models: what communication and compute cost on a target cluster.

A cluster model is a JSON file (``profiles/clusters/*.json``) with the device's
peak FLOP/s per dtype, memory bandwidth and memory, and an alpha-beta model
per collective kind for two tiers of links: within a node and across nodes.
A mesh dimension whose process groups span more than one node uses the
inter-node tier (meshes are laid out row-major over ranks, node by node).

The time of a collective on ``n`` ranks whose input on each rank is ``b``
bytes is ``alpha + beta * f(kind, n) * b`` where ``f`` is the ring algorithm's
traffic factor (below), so ``1 / beta`` is the bus bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cfp.errors import CFPError
from cfp.mesh import MeshSpec

CLUSTERS_DIR = Path(__file__).resolve().parent.parent / "profiles" / "clusters"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")


def traffic_factor(kind: str, n: int) -> float:
    """Bytes each rank sends per byte of its input, for ring algorithms."""
    if n <= 1:
        return 0.0
    return {
        "all_reduce": 2 * (n - 1) / n,
        "all_gather": n - 1,  # the input is the local shard; n-1 shards arrive
        "reduce_scatter": (n - 1) / n,
        "all_to_all": (n - 1) / n,
        "broadcast": 1.0,
    }[kind]


@dataclass(frozen=True)
class AlphaBeta:
    alpha: float  # seconds per call
    beta: float  # seconds per byte of traffic

    def time(self, traffic_bytes: float) -> float:
        return self.alpha + self.beta * traffic_bytes


@dataclass
class ClusterModel:
    name: str
    device_kind: str
    peak_flops: dict[str, float]  # dtype name ("float32", "bfloat16") -> FLOP/s
    memory_bandwidth: float  # bytes/s
    memory_bytes: int  # per device
    devices_per_node: int
    intra_node: dict[str, AlphaBeta]  # collective kind -> model
    inter_node: dict[str, AlphaBeta] = field(default_factory=dict)
    description: str = ""
    sources: list[str] = field(default_factory=list)
    path: Path | None = None

    def crosses_nodes(self, mesh: MeshSpec, dim: int) -> bool:
        stride = math.prod(mesh.shape[dim + 1 :])
        return stride * mesh.shape[dim] > self.devices_per_node

    def collective_time(self, kind: str, input_bytes: float, mesh: MeshSpec, dim: int) -> float:
        """Seconds for one collective over mesh dimension ``dim``."""
        n = mesh.shape[dim]
        if n <= 1:
            return 0.0
        tier = self.inter_node if self.crosses_nodes(mesh, dim) and self.inter_node else self.intra_node
        if kind not in tier:
            raise CFPError(f"Cluster model {self.name!r} has no {kind} figures.")
        return tier[kind].time(traffic_factor(kind, n) * input_bytes)

    def compute_time(self, flops: float, bytes_moved: float, dtype: str) -> float:
        """Roofline: the slower of the FLOPs at peak and the bytes at full bandwidth."""
        peak = self.peak_flops.get(dtype) or self.peak_flops["float32"]
        return max(flops / peak, bytes_moved / self.memory_bandwidth)

    def to_json(self) -> dict:
        tiers = {"intra_node": self.intra_node, "inter_node": self.inter_node}
        return {
            "name": self.name,
            "description": self.description,
            "sources": self.sources,
            "device": {
                "kind": self.device_kind,
                "peak_flops": self.peak_flops,
                "memory_bandwidth": self.memory_bandwidth,
                "memory_bytes": self.memory_bytes,
            },
            "devices_per_node": self.devices_per_node,
            **{t: {k: {"alpha": v.alpha, "beta": v.beta} for k, v in m.items()} for t, m in tiers.items()},
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_cluster(name_or_path: str | Path) -> ClusterModel:
    """A cluster model by file path or by name under ``profiles/clusters``."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CLUSTERS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CLUSTERS_DIR.glob("*.json"))) or "none"
        raise CFPError(f"Cluster model {name_or_path!r} not found (known: {known}).")
    try:
        data = json.loads(path.read_text())
        device = data["device"]
        tiers = {
            t: {k: AlphaBeta(v["alpha"], v["beta"]) for k, v in data.get(t, {}).items()}
            for t in ("intra_node", "inter_node")
        }
        return ClusterModel(
            name=data["name"],
            device_kind=device["kind"],
            peak_flops={k: float(v) for k, v in device["peak_flops"].items()},
            memory_bandwidth=float(device["memory_bandwidth"]),
            memory_bytes=int(device["memory_bytes"]),
            devices_per_node=int(data["devices_per_node"]),
            description=data.get("description", ""),
            sources=data.get("sources", []),
            path=path,
            **tiers,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CFPError(f"Cluster model {path} is damaged or incomplete: {type(exc).__name__}: {exc}.") from exc
