import math

import pytest

from cfp.errors import CFPError
from cfp.mesh import device_mesh, fake_mesh, parse_mesh


@pytest.mark.parametrize(
    "text, shape, names",
    [
        ("4", (4,), ("tp",)),
        ("2x4", (2, 4), ("dp", "tp")),
        ("2x2x2", (2, 2, 2), ("d0", "d1", "d2")),  # CFP plans no pipeline stages: no default "pp"
        ("dp=2,tp=4", (2, 4), ("dp", "tp")),
    ],
)
def test_parse_mesh_shapes_and_default_names(text, shape, names):
    mesh = parse_mesh(text)
    assert (mesh.shape, mesh.names) == (shape, names)
    assert mesh.size == math.prod(shape)


@pytest.mark.parametrize("text", ["", "2x", "dp=2,dp=2", "2x2x2x2", "0x2"])
def test_bad_meshes_are_refused(text):
    with pytest.raises(CFPError):
        parse_mesh(text)


def test_one_mesh_per_spec_and_process_group():
    """Profiling runs in one process share their mesh (a new one per run broke AOTAutograd's tracing of every
    later model); a process group made again gets a new one."""
    with fake_mesh(parse_mesh("2")) as first:
        assert device_mesh(parse_mesh("2")) is first
        assert device_mesh(parse_mesh("dp=2")) is not first  # other names, another mesh
    with fake_mesh(parse_mesh("2")) as again:
        assert again is not first
