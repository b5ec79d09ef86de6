"""ParallelBlocks, classes, segments and config propagation on the example models."""

import re
import textwrap

import pytest
import torch

import cfp
from cfp.analyze import analyze
from cfp.anchors import ANCHOR_RULES, AnchorLetters, param_root, register_anchor
from cfp.blocks import partition
from cfp.configs import signature
from cfp.costs import edge_transitions
from cfp.mesh import parse_mesh
from cfp.placements import to_strs
from cfp.segments import find_segments
from cfp.spec import ModelSpec

aten = torch.ops.aten
R, S0, S1, S2, P = "Replicate()", "Shard(0)", "Shard(1)", "Shard(2)", "Partial(sum)"


def graph_of(spec, mesh="2", **args):
    traced = cfp.capture(cfp.build(ModelSpec(spec, device="meta", args=args)))
    return analyze(traced, parse_mesh(mesh))


@pytest.fixture(scope="module")
def gpt():
    return graph_of("gpt:tiny", batch=2)


def anchors(graph):
    return [graph.traced.nodes[b.anchor] for b in graph.blocks]


def config(graph, block, name):
    return next(p for p in graph.block_strategies(block) if p.config.name == name)


def node_placement(graph, block, strategy, op_name):
    """Placements of the first op of the block whose target contains op_name."""
    for name, placements in zip(block.nodes, strategy.node_placements):
        if op_name in str(graph.traced.nodes[name].target):
            return to_strs(placements)
    raise AssertionError(f"no {op_name} in block {block.anchor}")


def layer_blocks(graph, layer):
    """The blocks whose anchor reads a parameter of transformer layer ``layer``."""
    pattern = re.compile(rf"(^|\.)(h|layers)\.{layer}\.")
    return [b for b in graph.blocks if any(pattern.search(graph.traced.params[i.name]) for i in b.anchor_params())]


def test_gpt_layer_is_four_blocks_of_shared_classes(gpt):
    layers = [layer_blocks(gpt, i) for i in range(2)]
    assert [len(blocks) for blocks in layers] == [4, 4]
    # The last layer's last block feeds only the final norm, not a next layer.
    assert [gpt.class_of(b) for b in layers[0]][:3] == [gpt.class_of(b) for b in layers[1]][:3]
    assert gpt.class_of(layers[0][3]) != gpt.class_of(layers[1][3])
    deeper = graph_of("gpt:tiny", n_layer=4)
    (segment,) = deeper.segments
    assert segment.repeats == 3 and len(segment.classes) == 4
    kinds = [set(str(gpt.traced.nodes[n].target) for n in b.nodes) for b in layers[0]]
    assert any("softmax" in str(k) for k in kinds[0])  # QKV + attention core
    assert any("layer_norm" in str(k) for k in kinds[1])  # out proj + residual + norm
    assert any("gelu" in str(k) for k in kinds[2])  # FFN up + activation
    assert any("layer_norm" in str(k) for k in kinds[3])  # FFN down + residual + next norm


def test_gpt_megatron_column_parallel_qkv_is_head_sharded_and_free(gpt):
    qkv = layer_blocks(gpt, 0)[0]
    col = config(gpt, qkv, "col")
    assert to_strs(col.config.activation) == [R]
    assert col.comm_free and not [c for c in col.collectives if c.phase == "forward"]
    # Scores [B, H, T, T] are sharded by head; the merged output [B, T, d] by hidden.
    assert node_placement(gpt, qkv, col, "softmax") == [S1]
    assert [to_strs(p) for p in col.exit_placements] == [[S2]]


def test_gpt_megatron_row_parallel_projection_has_one_reduction(gpt):
    proj = layer_blocks(gpt, 0)[1]
    row = config(gpt, proj, "row")
    assert to_strs(row.config.activation) == [S2]
    assert to_strs(
        dict(row.config.params)[next(i.name for i in proj.inputs if i.role == "param" and "weight" in i.name)]
    ) == [S1]
    # The linear's output is Partial; its reduction is the block's one collective.
    assert node_placement(gpt, proj, row, "linear") == [P]
    forward = [c for c in row.collectives if c.phase == "forward"]
    assert [c.kind for c in forward] == ["all_reduce"]
    assert [to_strs(p) for p in row.exit_placements] == [[R], [R]]


def test_gpt_data_parallel_reduces_gradients(gpt):
    ffn_up = layer_blocks(gpt, 0)[2]
    batch = config(gpt, ffn_up, "batch")
    assert batch.comm_free
    grad = [c for c in batch.collectives if c.phase == "reduce"]
    assert {c.kind for c in grad} == {"all_reduce"} and len(grad) == 2  # weight and bias


def test_llama_attention_and_swiglu_megatron_configs():
    graph = graph_of("llama:tiny", batch=2)
    blocks = layer_blocks(graph, 0)
    names = [sorted(graph.traced.params[i.name] for i in b.inputs if i.role == "param") for b in blocks]
    by_param = {n[0].split(".")[-2]: b for n, b in zip(names, blocks)}
    # q, k, v and the MLP's w1 column-parallel: head- or hidden-sharded, no communication.
    for proj in ("wq", "wk", "wv", "w1", "w3"):
        assert config(graph, by_param[proj], "col").comm_free, proj
    # The attention core joins the last of the q/k/v blocks it reads; column-parallel
    # projections make it head-sharded.
    core = next(
        by_param[p]
        for p in ("wq", "wk", "wv")
        if any("softmax" in str(graph.traced.nodes[n].target) for n in by_param[p].nodes)
    )
    assert node_placement(graph, core, config(graph, core, "col"), "softmax") == [S1]
    for proj in ("wo", "w2"):
        row = config(graph, by_param[proj], "row")
        assert [c.kind for c in row.collectives if c.phase == "forward"] == ["all_reduce"], proj


def test_moe_expert_parallel_configs_account_for_communication():
    graph = graph_of("moe:tiny", batch=2)
    experts = [b for b in graph.blocks if str(graph.traced.nodes[b.anchor].target) == "aten.einsum.default"]
    assert experts, "expert einsums are anchors"
    for block in experts:
        names = [p.config.name for p in graph.block_strategies(block)]
        assert "expert" in names
        expert = config(graph, block, "expert")
        weight = next(pos for pos, i in enumerate(block.inputs) if i.role == "param")
        assert to_strs(expert.input_placements[weight]) == [S0]  # [E, d, f] split by expert
    # Tokens reach expert-sharded weights by a transition from the router's exit
    # (an all-to-all when the router is batch-sharded) ...
    up, down = experts[0], experts[1]
    expert_index = [p.config.name for p in graph.block_strategies(up)].index("expert")
    into_up = {t.key for t in edge_transitions(graph) if t.consumer == up.id and t.consumer_config == expert_index}
    assert any(to_strs(k.src) == [S1] and to_strs(k.dst) == [S0] for k in into_up)
    # ... and the combine einsum sums over experts. DTensor 2.13 does not keep that
    # sum Partial: it all-gathers the expert outputs, and that is what is counted.
    combine = config(graph, down, "expert")
    assert [c.kind for c in combine.collectives if c.phase == "forward"] == ["all_gather"]


def test_profile_jobs_do_not_grow_with_depth():
    jobs = {n: graph_of("gpt:tiny", n_layer=n).profile_jobs for n in (2, 12, 48)}
    assert len(set(jobs.values())) == 1, jobs


def test_identical_layers_hash_equal_and_different_shapes_do_not():
    graph = graph_of("gpt:tiny", n_layer=3)
    layers = [[graph.class_of(b) for b in layer_blocks(graph, i)] for i in range(3)]
    assert layers[0] == layers[1] and layers[1][:3] == layers[2][:3]
    wider = graph_of("gpt:tiny", n_layer=1, n_embd=128)
    assert not set(wider.class_of(b) for b in layer_blocks(wider, 0)) & set(layers[0])


def test_find_segments():
    (seg,) = find_segments(list("EABCDABCDABCDH"))
    assert (seg.classes, seg.start, seg.repeats) == (tuple("ABCD"), 1, 3)
    assert find_segments(list("ABC")) == []


def test_search_space_shrinks():
    space = graph_of("gpt:tiny", n_layer=4).search_space()
    assert space["operator_level"] > space["block_level"] > space["deduplicated"] > 0


MLP = """
import torch
from torch import nn

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))).pow(2).mean()

def build(batch=4, device="cpu", **kw):
    with torch.device(device):
        return MLP(), (torch.randn(batch, 8, 16),)
"""


def test_two_dimensional_mesh_configs_pair_choices(tmp_path):
    # A small MLP keeps this cheap: DTensor's first propagation on a 2-D mesh is slow.
    (tmp_path / "mlp.py").write_text(MLP)
    traced = cfp.capture(cfp.build(ModelSpec(f"{tmp_path / 'mlp.py'}:build", device="meta")))
    graph = analyze(traced, parse_mesh("2x2"))
    up = graph.blocks[0]
    strategies = {p.config.name: p for p in graph.block_strategies(up)}
    assert {"rep/rep", "batch/batch", "batch/col", "rep/col", "col/col", "seq/col"} <= set(strategies)
    dp_tp = strategies["batch/col"]
    assert dp_tp.comm_free
    assert [to_strs(p) for p in dp_tp.exit_placements] == [[S0, S2]]
    assert {(c.kind, c.mesh_dim) for c in dp_tp.collectives if c.phase == "reduce"} == {("all_reduce", 0)}


def test_op_without_sharding_rule_runs_replicated(tmp_path):
    path = tmp_path / "renorm.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Renorm(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = nn.Linear(8, 8)

                def forward(self, x):
                    return torch.renorm(self.lin(x), 2, 0, 1.0).sum()

            def build(batch=4, device="cpu", **kw):
                with torch.device(device):
                    return Renorm(), (torch.randn(batch, 8),)
            """
        )
    )
    graph = analyze(cfp.capture(cfp.build(ModelSpec(f"{path}:build", device="meta"))), parse_mesh("2"))
    strategies = graph.block_strategies(0)
    assert all("aten.renorm.default" in p.fallbacks for p in strategies)
    col = next(p for p in strategies if p.config.name == "col")
    assert any(c.kind == "all_gather" for c in col.collectives), "the fallback gathers its input"


def test_analysis_cache_reuses_and_recovers(tmp_path, monkeypatch):
    monkeypatch.setenv("CFP_CACHE_DIR", str(tmp_path))
    traced = cfp.capture(cfp.build(ModelSpec("gpt:tiny", device="meta", args={"n_layer": 1})))
    cold = analyze(traced, parse_mesh("2"), workers=1)
    assert cold.cached_classes == 0
    warm = analyze(traced, parse_mesh("2"), workers=1)
    assert warm.cached_classes == len(warm.classes)
    for class_id in cold.strategies:
        assert [(p.config, p.exit_placements, p.collectives) for p in cold.strategies[class_id]] == [
            (p.config, p.exit_placements, p.collectives) for p in warm.strategies[class_id]
        ]
    # A damaged entry is recomputed.
    entries = sorted((tmp_path / "analysis").glob("*.pkl"))
    entries[0].write_bytes(b"not a pickle")
    again = analyze(traced, parse_mesh("2"), workers=1)
    assert again.cached_classes == len(again.classes) - 1

    # A deeper model has no block class a 2-layer one lacks, so it is all cached.
    def layers(n):
        return cfp.capture(cfp.build(ModelSpec("gpt:tiny", device="meta", args={"n_layer": n})))

    two = analyze(layers(2), parse_mesh("2"), workers=1)
    five = analyze(layers(5), parse_mesh("2"), workers=1)
    assert five.cached_classes == len(five.classes) == len(two.classes)
    assert five.profile_jobs == two.profile_jobs


def test_blocks_that_differ_only_in_their_exits_are_different_classes(tmp_path, monkeypatch):
    # The last layer's FFN-down block feeds only the final norm; in a deeper
    # model the same ops also feed the next layer. Reusing one's propagation
    # for the other (in a class, or from the cache) would misalign the exits.
    monkeypatch.setenv("CFP_CACHE_DIR", str(tmp_path))
    for n_layer in (1, 2):
        graph = graph_of("gpt:tiny", n_layer=n_layer)
        for block in graph.blocks:
            for strategy in graph.block_strategies(block):
                assert len(strategy.exit_placements) == len(block.outputs)


def test_an_op_without_an_anchor_rule_is_no_anchor(tmp_path, monkeypatch):
    (tmp_path / "mlp.py").write_text(MLP)
    traced = cfp.capture(cfp.build(ModelSpec(f"{tmp_path / 'mlp.py'}:build", device="meta")))
    blocks = partition(traced)
    monkeypatch.delitem(ANCHOR_RULES, aten.linear.default)
    with pytest.raises(ValueError, match="no anchor op"):
        partition(traced)
    with pytest.raises(ValueError, match="has no anchor rule"):  # not convolution letters, as it once was
        signature(blocks[0], traced)
    with pytest.raises(ValueError, match="already has an anchor rule"):
        register_anchor(aten.mm.default)(lambda anchor, traced: None)


SCALED_MLP = MLP.replace(
    "self.up = nn.Linear(16, 64)", "self.up = nn.Linear(16, 64)\n        self.scale = nn.Parameter(torch.ones(16))"
).replace("self.up(x)", "self.up(x * self.scale)")


@pytest.fixture
def scale_anchor():
    """A per-feature scale (``x * scale``) registered as an anchor, for this test only."""

    @register_anchor(aten.mul.Tensor)
    def _scale(anchor, traced):
        x, scale = anchor.args
        lead = "abcdefgh"[: x.meta["val"].dim() - 1]
        return AnchorLetters(lead + "D", {param_root(scale, traced).name: "D"}, lead + "D")

    yield
    del ANCHOR_RULES[aten.mul.Tensor]


def test_a_registered_anchor_starts_a_block_with_its_configs(tmp_path, monkeypatch, scale_anchor):
    monkeypatch.setenv("CFP_CACHE_DIR", str(tmp_path))
    (tmp_path / "mlp.py").write_text(SCALED_MLP)
    traced = cfp.capture(cfp.build(ModelSpec(f"{tmp_path / 'mlp.py'}:build", device="meta")))
    graph = analyze(traced, parse_mesh("2"), workers=1)
    assert [str(n.target) for n in anchors(graph)] == ["aten.mul.Tensor", "aten.linear.default", "aten.linear.default"]
    scale = graph.blocks[0]
    assert [i.role for i in scale.inputs] == ["activation", "param"]
    strategies = {p.config.name: p for p in graph.block_strategies(scale)}
    assert {"rep", "batch", "seq", "expert"} <= set(strategies)  # D is in activation, parameter and output
    assert strategies["expert"].comm_free
    assert [to_strs(p) for p in strategies["expert"].input_placements] == [[S2], [S0]]


def test_a_convolution_is_sharded_by_batch_only():
    """DTensor's convolution backward runs channel-sharded kernels on mismatched shards, and its width-sharded
    halo exchange is out of analysis' sight: no config shards either."""
    graph = graph_of("examples/zoo.py:convnet", batch=4, seq=8)
    convs = [b for b in graph.blocks if b.anchor.startswith("conv")]
    assert convs
    for block in convs:
        assert {s.config.name for s in graph.block_strategies(block)} <= {"rep", "batch"}


def test_a_conv_weight_through_views_anchors_and_a_computed_one_does_not(tmp_path):
    """Mamba's depthwise conv takes its weight squeezed and unsqueezed: a view, so the conv anchors a block
    on it. A conv whose weight is computed (here scaled) reads no parameter where its rule reads the weight:
    it is no anchor (it used to fail analysis), and the linear before it anchors the only block."""
    path = tmp_path / "convs.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Convs(nn.Module):
                def __init__(self, scaled):
                    super().__init__()
                    self.lin = nn.Linear(8, 8)
                    self.conv = nn.Conv1d(8, 8, 3, groups=8, padding=2)
                    self.scaled = scaled

                def forward(self, x):
                    h = self.lin(x).transpose(1, 2)
                    w = self.conv.weight * 2 if self.scaled else self.conv.weight.squeeze(1).unsqueeze(1)
                    return nn.functional.conv1d(h, w, self.conv.bias, padding=2, groups=8).sum()

            def build(batch=4, scaled=False, device="cpu", **kw):
                with torch.device(device):
                    return Convs(scaled), (torch.randn(batch, 5, 8),)
            """
        )
    )
    assert [b.anchor for b in graph_of(f"{path}:build").blocks] == ["linear", "conv1d"]
    assert [b.anchor for b in graph_of(f"{path}:build", scaled=True).blocks] == ["linear"]


def test_a_transposed_weight_anchors_with_its_own_dimensions_named(tmp_path):
    """``x @ self.weight.T`` (Falcon's linear: ``numpy_T``, a view by its schema) and ``x @ w.t()`` anchor blocks,
    and their letters name the weight's own dimensions: col shards the [out, in] weight's rows, where the
    matmul's operand letters would have sharded its columns. A weight reshaped into heads is sharded on
    the dimension the heads split."""
    path = tmp_path / "transposed.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Transposed(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.up = nn.Parameter(torch.randn(32, 8))  # [out, in]
                    self.down = nn.Parameter(torch.randn(8, 32))
                    self.heads = nn.Parameter(torch.randn(8, 4 * 2))  # [in, heads * head_dim]

                def forward(self, x):
                    h = torch.relu(x @ self.up.T) @ self.down.t()
                    per_head = torch.einsum("bd,dhe->bhe", h, self.heads.view(8, 4, 2))
                    return per_head.pow(2).mean()

            def build(batch=4, device="cpu", **kw):
                with torch.device(device):
                    return Transposed(), (torch.randn(batch, 8),)
            """
        )
    )
    graph = graph_of(f"{path}:build")
    assert [graph.traced.nodes[b.anchor].target for b in graph.blocks] == [
        torch.ops.aten.matmul.default,
        torch.ops.aten.matmul.default,
        torch.ops.aten.einsum.default,
    ]
    weights = {}
    for block in graph.blocks:
        for strategy in graph.block_strategies(block):
            for param, placements in strategy.config.params:
                weights[(graph.traced.params[param], strategy.config.name)] = to_strs(placements)
    assert weights[("up", "col")] == ["Shard(0)"] and weights[("up", "row")] == ["Shard(1)"]
    assert weights[("down", "col")] == ["Shard(0)"] and weights[("down", "row")] == ["Shard(1)"]
    assert weights[("heads", "col")] == ["Shard(1)"]  # the head dimension, outermost of the merged [heads * head_dim]


RELU6 = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Relu6MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(8, 16), nn.ReLU6(), nn.Linear(16, 1)

        def forward(self, x):
            return self.down(self.act(self.up(x))).mean()

    def build(batch=4, device="cpu", **kw):
        with torch.device(device):
            return Relu6MLP(), (torch.randn(batch, 8),)
    """
)


def test_a_backward_op_dtensor_has_no_rule_for_runs_replicated(tmp_path):
    """ReLU6's backward (``hardtanh_backward``, as MobileNetV2's) has no DTensor rule: it runs replicated, as a
    forward op without one does, where before every config of its block failed and analysis refused the model."""
    (tmp_path / "relu6.py").write_text(RELU6)
    graph = analyze(cfp.capture(cfp.build(ModelSpec(f"{tmp_path / 'relu6.py'}:build", device="meta"))), parse_mesh("2"))
    block = next(b for b in graph.blocks if any("hardtanh" in str(graph.traced.nodes[n].target) for n in b.nodes))
    assert {s.config.name for s in graph.block_strategies(block)} >= {"rep", "batch"}
