"""Placements (cfp.placements): the one conversion to and from the strings of plan files and profile rows."""

import json

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _MaskPartial, _StridedShard

from cfp.errors import CFPError
from cfp.placements import (
    canonical,
    from_str,
    from_strs,
    is_sharded,
    local_numel,
    normalize,
    replicate_partials,
    short,
    to_str,
    to_strs,
)
from cfp.plan import Plan

EVERY_KIND = [
    (Shard(0), "Shard(0)"),
    (Shard(3), "Shard(3)"),
    (_StridedShard(0, split_factor=2), "_StridedShard(0, sf=2)"),
    (_StridedShard(1, split_factor=4), "_StridedShard(1, sf=4)"),
    (Replicate(), "Replicate()"),
    (Partial(), "Partial(sum)"),
    (Partial("avg"), "Partial(avg)"),
    (Partial("max"), "Partial(max)"),
]


@pytest.mark.parametrize("placement, text", EVERY_KIND, ids=[t for _, t in EVERY_KIND])
def test_round_trip(placement, text):
    assert to_str(placement) == text
    back = from_str(text)
    assert back == placement and type(back) is type(placement)
    assert to_str(back) == text


def test_strided_shard_is_not_written_as_replicate():
    """DTensor's repr of a strided shard is ``_StridedShard(dim=0, sf=2)``; it must keep its dimension and
    split factor, not fall through to ``Replicate()``."""
    strided = _StridedShard(0, split_factor=2)
    assert to_str(strided) != "Replicate()"
    assert is_sharded(strided) and not strided.is_shard()  # DTensor's is_shard() misses it
    assert to_strs((strided, Shard(1))) == ["_StridedShard(0, sf=2)", "Shard(1)"]


def test_partial_subclasses_are_written_as_the_partial_they_reduce_as():
    masked = _MaskPartial(offset_shape=(8, 4), offset_dim=0)  # a vocabulary-sharded embedding's output
    assert to_str(masked) == "Partial(sum)"
    assert canonical(masked) == Partial("sum") and type(canonical(masked)) is Partial
    assert normalize((masked, Shard(0))) == (Partial("sum"), Shard(0))
    assert canonical(Shard(0)) == Shard(0)


def test_none_and_lists():
    assert to_strs(None) is None and from_strs(None) is None and normalize(None) is None
    assert from_strs(["Shard(1)", "Replicate()"]) == (Shard(1), Replicate())
    assert from_strs([" Shard(1) "]) == (Shard(1),)  # hand-edited files may carry spaces
    assert from_str("Partial()") == Partial("sum")


@pytest.mark.parametrize("text", ["Shard(x)", "Shard 0", "Replicate", "S0", "_StridedShard(0)", ""])
def test_bad_strings(text):
    with pytest.raises((CFPError, ValueError)):
        from_str(text)


def test_placements_are_keys():
    """Placement tuples are hashable and compare by value: the ILP's labels and TransitionKey use them."""
    a = (Shard(0), Replicate())
    b = from_strs(["Shard(0)", "Replicate()"])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert Shard(0) != _StridedShard(0, split_factor=2)
    assert Partial("sum") != Partial("avg")


def test_local_numel():
    assert local_numel((8, 6), (Shard(0), Replicate()), (2, 4)) == 4 * 6
    assert local_numel((8, 6), (Shard(0), Shard(1)), (2, 4)) == 4 * 2  # 6 / 4: the largest shard, 2
    assert local_numel((7,), (Shard(0),), (2,)) == 4
    assert local_numel((8, 6), (_StridedShard(0, split_factor=2), Shard(0)), (2, 4)) == 1 * 6
    assert local_numel((8, 6), (Partial(), Replicate()), (2, 4)) == 48  # a partial sum holds the whole tensor
    assert local_numel((8, 6), None, (2, 4)) == 48
    assert local_numel((8,), (Shard(1),), (2,)) == 8  # no such dimension: nothing to divide


def test_replicate_partials():
    assert replicate_partials((Partial(), Shard(1), Partial("avg"), Replicate())) == (
        Replicate(),
        Shard(1),
        Replicate(),
        Replicate(),
    )


def test_short():
    assert short((Shard(2), Replicate())) == "S2,R"
    assert short((Partial(), Partial("avg"))) == "P,Pavg"
    assert short((_StridedShard(0, split_factor=2),)) == "S0/2"
    assert short(()) == ""


def test_plan_file_keeps_its_strings():
    """A plan file's placements load as DTensor placements and are written back as the same strings."""
    data = {
        "schema_version": 1,
        "model": {"spec": {}, "fingerprint": "f"},
        "mesh": {"shape": [2, 2], "names": ["dp", "tp"]},
        "parameters": {"w": ["Replicate()", "Shard(0)"], "v": ["_StridedShard(0, sf=2)", "Shard(0)"]},
        "storage": {"w": {"level": "zero3", "placements": ["Shard(1)", "Shard(0)"]}},
        "blocks": [
            {
                "id": 0,
                "anchor": "mm",
                "config": "col",
                "inputs": [
                    {
                        "name": "x",
                        "role": "activation",
                        "producer": None,
                        "placements": ["Replicate()", "Partial(avg)"],
                    },
                    {"name": "b", "role": "buffer", "producer": None, "placements": None},
                ],
                "storage": "zero3",
            }
        ],
        "predicted_step_time_s": 1.0,
        "time_breakdown_s": {},
        "memory_per_device_bytes": {"total": 1},
        "solve": {},
        "baselines": {},
        "validation": {},
        "provenance": {},
    }
    plan = Plan.from_json(json.loads(json.dumps(data)))
    assert plan.parameters["w"] == (Replicate(), Shard(0))
    assert plan.parameters["v"] == (_StridedShard(0, split_factor=2), Shard(0))
    assert plan.storage["w"]["placements"] == (Shard(1), Shard(0))
    assert plan.blocks[0]["inputs"][0]["placements"] == (Replicate(), Partial("avg"))
    assert plan.blocks[0]["inputs"][1]["placements"] is None
    assert json.dumps(plan.to_json(), indent=1) == json.dumps(data, indent=1)


def test_plan_file_with_a_bad_placement_is_damaged():
    data = {
        "schema_version": 1,
        "model": {},
        "mesh": {"shape": [2], "names": ["tp"]},
        "parameters": {"w": ["Shard(zero)"]},
        "blocks": [],
        "predicted_step_time_s": 1.0,
        "memory_per_device_bytes": {},
        "solve": {},
        "provenance": {},
    }
    with pytest.raises(CFPError, match="not Shard\\(d\\), Replicate\\(\\) or Partial\\(op\\)"):
        Plan.from_json(data)
