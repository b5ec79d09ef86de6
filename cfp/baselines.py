"""Baseline plans: the layouts people write by hand, as one config per block.

Each baseline says, per block, which config name it wants on each mesh
dimension; the block takes its config that matches the most dimensions (ties
go to the one replicating most), so a baseline applies to any model CFP
analyses:

- ``dp``: data parallel on every mesh dimension: the model's inputs sharded on
  their first (batch) dimension, every parameter replicated, and each block in
  the config that this sharding reaches it in. That is
  ``batch`` for most blocks; a block whose activation carries the batch on
  another dimension, such as an MoE expert buffer ``[experts, groups,
  capacity, d]``, has its own name for it (``seq`` there).
- ``megatron``: Megatron-LM tensor parallelism (Shoeybi et al. 2019) on the
  last mesh dimension, data parallel on the others. Projections into
  attention and the MLP are column parallel, projections out of them row
  parallel, the LM head column (vocabulary) parallel unless its weight is
  tied to the embedding (vocabulary-parallel embeddings are not offered by
  the analysis); everything else is replicated across the tensor-parallel
  group. Which linear is which comes from its parameter's name (GPT-2,
  LLaMA, Hugging Face and Megatron spellings).
- ``expert``: GShard / DeepSpeed-MoE expert parallelism: expert weights
  sharded over experts on the last mesh dimension, everything else data
  parallel.
- ``fsdp``: ``dp`` with every parameter stored ZeRO-3 sharded over every
  mesh dimension (FSDP / ZeRO-3).
- ``fsdp+tp``: ``megatron`` with every parameter ZeRO-3 sharded over the
  mesh dimensions it is replicated on (torchtitan's default 2-D layout:
  FSDP across the first dimension, Megatron across the last).

Tied parameters stay replicated in every layout (``cfp.storage``).

``choose(name, graph)`` returns the config index per block, or None where the
baseline does not apply (no linear is recognised, no block has experts).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch.distributed.tensor import Shard

from cfp.costs import shared_parameters
from cfp.errors import CFPError
from cfp.placements import is_sharded
from cfp.propagate import BlockStrategy

# The projection names of GPT-2, LLaMA, Megatron-LM, T5, Hugging Face transformers and torch.nn.
_SUFFIX = r"(\.weight|\.bias|_weight|_bias)?$"
COLUMN = re.compile(
    r"(^|\.)(c_attn|c_fc|wq|wk|wv|wqkv|w1|w3|w_in|q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj"
    r"|query_key_value|query|key|value|dense_h_to_4h|fc1|fc_in|linear1|in_proj|q|k|v|wi|wi_0|wi_1)" + _SUFFIX,
    re.IGNORECASE,
)
ROW = re.compile(
    r"(^|\.)(c_proj|wo|w2|w_out|o_proj|out_proj|down_proj|dense_4h_to_h|dense|fc2|fc_out|linear2|o)" + _SUFFIX,
    re.IGNORECASE,
)
HEAD = re.compile(r"(^|\.)(lm_head|output)(\.weight)?$")


def closest(names: list[str], want: list[str]) -> int:
    """Index of the config matching ``want`` on the most mesh dims, then replicating on the most."""
    parts = [n.split("/") for n in names]
    score = [(sum(p == w for p, w in zip(ps, want)), sum(p == "rep" for p in ps)) for ps in parts]
    return max(range(len(names)), key=lambda i: score[i])


def _choose(graph, want: Callable) -> list[int]:
    """One config per block by ``want(block)``, a role per mesh dim, where ``batch`` means data parallel."""
    batch = {b.id: graph.block_strategies(b)[i].config.name.split("/") for b, i in zip(graph.blocks, dp(graph))}
    return [
        closest(
            [p.config.name for p in graph.block_strategies(b)],
            [batch[b.id][dim] if role == "batch" else role for dim, role in enumerate(want(b))],
        )
        for b in graph.blocks
    ]


def dp(graph) -> list[int]:
    """Data parallel: per block, the config that batch-sharded model inputs reach it in, every parameter replicated.

    Blocks are walked in graph order. A block whose activation arrives sharded (the model's inputs: ``Shard(0)`` on
    every mesh dim; otherwise as its producer's config leaves it) takes the config that reads it so with replicated
    parameters, so the batch's path has no transition. Where the activation arrives replicated (a block that
    computes replicated, the prologue) or no config fits, the block takes the one closest to ``batch`` on every dim:
    slicing a replicated value is free.
    """
    inputs = set(graph.traced.user_inputs)
    batch = ["batch"] * graph.mesh.ndim
    blocks = {b.id: b for b in graph.blocks}
    chosen: dict[int, BlockStrategy] = {}
    indices = []
    for block in graph.blocks:
        strategies = graph.block_strategies(block)
        act = next(k for k, i in enumerate(block.inputs) if i.role == "activation")
        value = block.inputs[act]
        if value.producer in chosen:
            producer = blocks[value.producer]
            reaching = chosen[value.producer].exit_placements[producer.outputs.index(value.name)]
        elif value.producer is not None:
            reaching = None  # a producer later in graph order: not walked yet
        else:
            reaching = (Shard(0),) * graph.mesh.ndim if value.name in inputs else None
        fits = []
        if reaching is not None and any(is_sharded(p) for p in reaching):
            fits = [
                k
                for k, s in enumerate(strategies)
                if s.input_placements[act] == reaching and _params_replicated(block, s)
            ]
        k = fits[0] if fits else closest([s.config.name for s in strategies], batch)
        chosen[block.id] = strategies[k]
        indices.append(k)
    return indices


def _params_replicated(block, strategy) -> bool:
    return all(
        all(p.is_replicate() for p in placements)
        for i, placements in zip(block.inputs, strategy.input_placements)
        if i.role == "param" and placements is not None
    )


def megatron(graph) -> list[int] | None:
    traced = graph.traced
    shared = shared_parameters(graph)

    def role(block) -> str:
        fqns = [traced.params[i.name] for i in block.anchor_params()]
        if any(COLUMN.search(f) for f in fqns):
            return "col"
        if any(ROW.search(f) for f in fqns):
            return "row"
        return "head" if any(HEAD.search(f) for f in fqns) else "rep"

    roles = {b.id: role(b) for b in graph.blocks}
    if not any(r in ("col", "row") for r in roles.values()):
        return None
    tied = {b.id for b in graph.blocks if any(i.name in shared for i in b.anchor_params())}
    for i, r in roles.items():
        if r == "head":
            roles[i] = "rep" if i in tied else "col"
    dp_dims = ["batch"] * (graph.mesh.ndim - 1)
    return _choose(graph, lambda block: dp_dims + [roles[block.id]])


def expert(graph) -> list[int] | None:
    has_experts = {
        b.id for b in graph.blocks if any("expert" in p.config.name.split("/") for p in graph.block_strategies(b))
    }
    if not has_experts:
        return None
    dp_dims = ["batch"] * (graph.mesh.ndim - 1)
    return _choose(graph, lambda block: dp_dims + ["expert" if block.id in has_experts else "batch"])


BASELINES: dict[str, Callable] = {"dp": dp, "megatron": megatron, "expert": expert, "fsdp": dp, "fsdp+tp": megatron}
STORAGE = {"fsdp": "zero3", "fsdp+tp": "zero3"}  # baselines that store parameters sharded, and at which level
NOT_APPLICABLE = {
    "megatron": (
        "no linear layer has a parameter named like an attention or MLP projection "
        "(c_attn, wq, q_proj, w1, c_proj, ...)"
    ),
    "expert": "no block has an expert dimension to shard",
}
NOT_APPLICABLE["fsdp+tp"] = NOT_APPLICABLE["megatron"]


def storage_levels(name: str, graph, choice: list[int]) -> list[str] | None:
    """The baseline's storage level per block (None: every parameter stored where it computes)."""
    level = STORAGE.get(name)
    if level is None:
        return None
    from cfp.storage import StorageTable, uniform

    return uniform(graph, StorageTable(graph), choice, level)


def choose(name: str, graph) -> list[int] | None:
    """The baseline's config index per block, or None where it does not apply to this model."""
    if name not in BASELINES:
        raise CFPError(f"Unknown baseline {name!r}; CFP has {', '.join(BASELINES)}.")
    return BASELINES[name](graph)
