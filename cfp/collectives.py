"""A sharded dim moved to another dim on gloo as one all-to-all.

DTensor redistributes ``Shard(i) -> Shard(j)`` (an expert-parallel
dispatch, a sequence-to-head reshard) with ``shard_dim_alltoall``. On a CPU
mesh it all-gathers the whole tensor and keeps one chunk, because gloo once
lacked all-to-all: each rank receives the full tensor where it needs
1/n of it, and pays the concatenation and the copy of its chunk. Gloo has
``alltoall_base`` (``cfp calibrate --mesh 2`` here: 1.46 GB/s bus bandwidth
against all-gather's 1.00). ``use_gloo_all_to_all`` swaps in an all-to-all
of equal chunks for gloo groups: the same local result, and the programs
CFP lowers carry one ``_c10d_functional.all_to_all_single`` instead of an
all-gather. Profiling and training both install it, so what is profiled
is what trains; analysis, over the fake process group, installs it too, so
the collectives it records for a block are the ones the ranks run (and the
all-to-all NCCL runs natively).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.tensor.placement_types as placement_types
from torch.distributed._local_tensor import local_tensor_mode
from torch.distributed.device_mesh import DeviceMesh

_dtensor_shard_dim_alltoall = placement_types.shard_dim_alltoall


def _has_all_to_all(mesh: DeviceMesh, mesh_dim: int) -> bool:
    """A CPU group that runs all_to_all_single, where DTensor would all-gather: gloo, and the fake group."""
    backend = str(dist.get_backend(mesh.get_group(mesh_dim)))
    return mesh.device_type == "cpu" and ("gloo" in backend or backend == "fake")


def shard_dim_all_to_all(
    local: torch.Tensor, gather_dim: int, shard_dim: int, mesh: DeviceMesh, mesh_dim: int
) -> torch.Tensor:
    """This rank's shard on ``shard_dim`` of the tensor whose ``gather_dim`` shards the ranks hold."""
    if local_tensor_mode() is not None or not _has_all_to_all(mesh, mesh_dim):
        return _dtensor_shard_dim_alltoall(local, gather_dim, shard_dim, mesh, mesh_dim)
    n = mesh.size(mesh_dim)
    # DTensor pads shard_dim to a multiple of n first, so the n chunks are equal, as all_to_all_single's split is
    send = torch.stack(torch.chunk(local, n, dim=shard_dim))
    received = funcol.all_to_all_single(send, None, None, (mesh, mesh_dim))
    if isinstance(received, funcol.AsyncCollectiveTensor):
        received = received.wait()
    return torch.cat(received.unbind(0), dim=gather_dim)


def use_gloo_all_to_all() -> None:
    """Redistribute Shard(i) -> Shard(j) on gloo (and fake) groups with all-to-all, in this process (idempotent)."""
    placement_types.shard_dim_alltoall = shard_dim_all_to_all
    # what is left on DTensor's fallback (other CPU backends) need not warn per rank
    logging.getLogger("torch.distributed.tensor._collective_utils").addFilter(_no_alltoall_warning)


def _no_alltoall_warning(record: logging.LogRecord) -> bool:
    return "does not support alltoall" not in record.getMessage()
