import math

import pytest

from cfp.errors import CFPError
from cfp.mesh import parse_mesh


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
