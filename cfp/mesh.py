"""Device meshes: parsing ``4``, ``2x4`` or ``dp=2,tp=4``, and the fake mesh
that analysis runs on.

Analysis needs no devices: DTensor runs on ``meta`` tensors over the fake
process group of ``torch.testing``, which accepts every collective and moves
no data, so any mesh size can be analysed in one process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from cfp.collectives import use_gloo_all_to_all
from cfp.errors import CFPError


@dataclass(frozen=True)
class MeshSpec:
    shape: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in zip(self.names, self.shape))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "names": list(self.names)}


# CFP plans no pipeline stages, so no default name says "pp": a 3-D mesh is d0, d1, d2 unless named.
DEFAULT_NAMES = {1: ("tp",), 2: ("dp", "tp")}


def parse_mesh(text: str | MeshSpec) -> MeshSpec:
    """``"4"`` -> (4,), ``"2x4"`` -> (2, 4), ``"dp=2,tp=4"`` -> named (2, 4)."""
    if isinstance(text, MeshSpec):
        return text
    text = str(text).strip()
    if re.fullmatch(r"\d+(x\d+)*", text):
        shape = tuple(int(s) for s in text.split("x"))
        names = DEFAULT_NAMES.get(len(shape), tuple(f"d{i}" for i in range(len(shape))))
    elif re.fullmatch(r"\w+=\d+(,\w+=\d+)*", text):
        pairs = [p.split("=") for p in text.split(",")]
        names = tuple(name for name, _ in pairs)
        shape = tuple(int(size) for _, size in pairs)
        if len(set(names)) != len(names):
            raise CFPError(f"Mesh {text!r} names a dimension twice.")
    else:
        raise CFPError(f"Mesh {text!r} is not of the form '4', '2x4' or 'dp=2,tp=4'.")
    if len(shape) > 3:
        raise CFPError(f"Mesh {text!r} has {len(shape)} dimensions; CFP supports 1 to 3.")
    if any(s < 1 for s in shape):
        raise CFPError(f"Mesh {text!r} has a dimension of size 0.")
    return MeshSpec(shape, names)


def launched_world() -> int:
    """Ranks of the ``torchrun`` job this process belongs to (1 when not launched so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def launched_rank() -> int:
    """This process's rank in its ``torchrun`` job (0 when not launched so): only rank 0 prints and writes files."""
    return int(os.environ.get("RANK", "0")) if launched_world() > 1 else 0


def device_mesh(spec: MeshSpec, device_type: str = "cpu") -> DeviceMesh:
    """A DeviceMesh over the current (real or fake) default process group: the same one for the same spec.

    One process that profiled one model and then another, each on a mesh of
    its own over the same ranks (the test suite's models under torchrun;
    the Python API), had every block of the second fail AOTAutograd's
    partitioner ("tangents_2 was invalid, but is output") and be timed on
    the DTensor interpreter instead. Reused, the mesh traces every model.
    The cache holds the group it was made on, so a process group destroyed
    and made again gets a new mesh.
    """
    group = dist.group.WORLD
    key = (spec.shape, spec.names, device_type)
    cached = _MESHES.get(key)
    if cached is None or cached[0] is not group:
        ranks = torch.arange(spec.size).view(spec.shape)
        _MESHES[key] = cached = (group, DeviceMesh(device_type, ranks, mesh_dim_names=spec.names))
    return cached[1]


_MESHES: dict[tuple, tuple[object, DeviceMesh]] = {}


def refuse_real_group() -> None:
    """Analysis runs on its own fake process group, which cannot replace a real one."""
    if dist.is_initialized() and dist.get_backend() != "fake":
        raise CFPError(
            "Analysis needs its own fake process group, but a real one is already initialised in this process: "
            "analyse before init_process_group (analyses are cached on disk, so a rank that analyses after it "
            "reuses one made before it, e.g. by the launching process)."
        )


@contextlib.contextmanager
def fake_mesh(spec: MeshSpec) -> Iterator[DeviceMesh]:
    """A mesh over the fake process group; restores the caller's state on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    refuse_real_group()
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=spec.size)
    use_gloo_all_to_all()  # record the all-to-all the ranks run, not DTensor's CPU fallback
    # DTensor warns on every multi-dimension reduction; analysis sees thousands.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    try:
        yield device_mesh(spec)
    finally:
        dist.destroy_process_group()
