"""Model specs resolve to factories, or fail with a clear one-paragraph error."""

import textwrap

import pytest
import torch
from torch._ops import OpOverload

import cfp
from cfp.errors import CFPError
from cfp.spec import ModelSpec, parse_args


def build(spec, **kw):
    return cfp.build(ModelSpec(spec, **kw))


def test_preset_file_and_module_specs(tmp_path):
    assert build("gpt:tiny").model is not None
    assert build("examples/llama.py:build", args={"preset": "tiny"}).model is not None
    assert build("examples.moe:build", args={"preset": "tiny"}).model is not None


def test_batch_and_seq_reach_the_factory():
    workload = build("gpt:tiny", batch=3, seq=16)
    assert workload.inputs[0].shape == (3, 16)


def test_parse_args_types_values():
    assert parse_args(["n_layer=3", "tie_weights=False", "dtype=bfloat16"]) == {
        "n_layer": 3,
        "tie_weights": False,
        "dtype": "bfloat16",
    }
    with pytest.raises(CFPError, match="key=value"):
        parse_args(["oops"])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nosuchfile.py:build", "does not exist"),
        ("gpt:nosuchpreset", "no preset 'nosuchpreset'"),
        ("not_a_module_xyz:build", "no module named"),
        ("examples/gpt.py:nosuchfactory", "no callable 'nosuchfactory'"),
        ("justaword", "is not of the form"),
    ],
)
def test_bad_specs_say_which_and_why(spec, message):
    with pytest.raises(CFPError, match=message):
        build(spec)


def test_factory_that_raises(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def build(**kw):\n    raise RuntimeError('no weights here')\n")
    with pytest.raises(CFPError, match="the factory raised RuntimeError: no weights here"):
        build(f"{path}:build")


def test_factory_with_wrong_return(tmp_path):
    path = tmp_path / "wrong.py"
    path.write_text("def build(**kw):\n    return 3\n")
    with pytest.raises(CFPError, match=r"must return \(model, inputs\)"):
        build(f"{path}:build")


def test_untraceable_model(tmp_path):
    path = tmp_path / "dynamic.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Dynamic(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = nn.Linear(4, 4)

                def forward(self, x):
                    y = self.lin(x)
                    if y.sum() > 0:  # data-dependent control flow
                        return y.mean()
                    return y.sum()

            def build(**kw):
                return Dynamic(), (torch.randn(2, 4),)
            """
        )
    )
    with pytest.raises(CFPError, match="cannot be traced by torch.export"):
        cfp.capture(build(f"{path}:build", device="cpu"))


def test_a_model_that_fails_when_run_is_not_blamed_on_tracing(tmp_path):
    path = tmp_path / "mismatched.py"
    path.write_text(
        "import torch\n"
        "def build(**kw):\n"
        "    return torch.nn.Linear(4, 4), (torch.randn(2, 3),)  # inputs of width 3 for a layer of width 4\n"
    )
    with pytest.raises(CFPError, match="fails when run, before any tracing: RuntimeError: mat1 and mat2 shapes"):
        cfp.capture(build(f"{path}:build", device="cpu"))


def test_no_grad_regions_are_inlined_and_their_results_detached():
    """torch.export keeps a no_grad region as a submodule call; capture makes its ops the graph's own
    (tests/test_models.py checks that every plan of this model trains as one device does)."""
    traced = cfp.capture(build("examples/zoo.py:router", device="cpu"))
    targets = [n.target for n in traced.graph.nodes]
    assert torch.ops.higher_order.wrap_with_set_grad_enabled not in targets
    assert targets.count(torch.ops.aten.detach.default) == 2  # each layer's scaled pick, a float
    assert all("val" in n.meta for n in traced.graph.nodes if n.op != "output")


def test_in_place_updates_of_activations_run_out_of_place(tmp_path):
    """``h += x`` and ``relu_`` on activations become ``add`` and ``relu`` read by what came after them, so a
    block may start at one (ResNet's residual; in tests/test_models.py it trains under every plan). An update
    of a view (it would change its base too) and BatchNorm's of its buffers stay in place."""
    path = tmp_path / "inplace.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Residual(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a, self.b, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)

                def forward(self, x):
                    h = self.norm(self.a(x))
                    h += x
                    h.relu_()
                    y = self.b(h)
                    y[:, 0] += 1
                    return (y * h).sum()

            def build(batch=4, device="cpu", **kw):
                torch.manual_seed(0)
                with torch.device(device):
                    return Residual(), (torch.randn(batch, 8, device=device),)
            """
        )
    )
    w = build(f"{path}:build", device="cpu")
    traced = cfp.capture(w)
    updates = [
        n for n in traced.graph.nodes if isinstance(n.target, OpOverload) and n.target._schema.name.endswith("_")
    ]
    assert [(str(n.target), n.args[0].op) for n in updates] == [
        ("aten.add_.Tensor", "placeholder"),  # num_batches_tracked
        ("aten.add_.Tensor", "call_function"),  # y[:, 0] += 1, on a view of y,
        ("aten.copy_.default", "call_function"),  # and written back through another
    ]
    model, inputs = build(f"{path}:build", device="cpu").model, w.inputs
    assert torch.equal(traced.exported.module()(*inputs), model(*inputs))


def test_data_dependent_shapes_are_refused(tmp_path):
    path = tmp_path / "split.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class SplitByCounts(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = nn.Linear(4, 4)

                def forward(self, x, counts):
                    parts = torch.split(self.lin(x), counts.tolist())  # sizes from tensor values
                    return sum(p.sum() for p in parts)

            def build(**kw):
                return SplitByCounts(), (torch.randn(6, 4), torch.tensor([2, 4]))
            """
        )
    )
    with pytest.raises(CFPError, match="data-dependent shapes.*every shape must be static"):
        cfp.capture(build(f"{path}:build", device="cpu"))


TINY_LLAMA = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=128)


def test_hf_model_type_and_config_file(tmp_path):
    """hf:TYPE and hf:path/config.json (or its directory) build the causal-LM loss, random-init, on meta too."""
    transformers = pytest.importorskip("transformers")
    w = build("hf:llama", batch=2, seq=8, args=dict(TINY_LLAMA, num_key_value_heads=2), device="meta")
    assert w.inputs[0].shape == (2, 8) and w.model.lm.config.num_key_value_heads == 2
    assert next(w.model.parameters()).device.type == "meta"
    transformers.AutoConfig.for_model("qwen2", **TINY_LLAMA, num_key_value_heads=2).save_pretrained(tmp_path)
    for target in (tmp_path, tmp_path / "config.json"):
        w = build(f"hf:{target}", batch=1, seq=4, args={"num_hidden_layers": 2}, device="cpu")
        assert type(w.model.lm).__name__ == "Qwen2ForCausalLM" and w.model.lm.config.num_hidden_layers == 2
        assert w.model(*w.inputs).dim() == 0
    assert parse_args(["tie_word_embeddings=false"]) == {"tie_word_embeddings": False}


def test_hf_task_follows_the_model_type():
    """An encoder trains its masked LM, an encoder-decoder its sequence-to-sequence LM (T5's default config has
    no decoder start token: one is set), a vision model its image classifier, on images of side --seq (the
    plain head where transformers offers several)."""
    pytest.importorskip("transformers")
    small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    bert = build("hf:bert", batch=2, seq=8, args=dict(small, vocab_size=128), device="meta")
    assert type(bert.model.lm).__name__ == "BertForMaskedLM" and bert.inputs[0].shape == (2, 8)
    t5 = build("hf:t5", batch=2, seq=8, args=dict(num_layers=1, d_model=32, d_ff=64, num_heads=4, vocab_size=128))
    assert type(t5.model.lm).__name__ == "T5ForConditionalGeneration" and t5.model(*t5.inputs).dim() == 0
    vit = build("hf:vit", batch=2, seq=16, args=dict(small, patch_size=8), device="cpu")
    assert type(vit.model.model).__name__ == "ViTForImageClassification"
    assert vit.inputs[0].shape == (2, 3, 16, 16) and vit.inputs[1].shape == (2,)
    assert vit.model(*vit.inputs).dim() == 0
    resnet = build("hf:resnet", batch=2, args=dict(depths=[1], hidden_sizes=[8], embedding_size=8), device="meta")
    assert resnet.inputs[0].shape == (2, 3, 224, 224)  # its config has no image size: ImageNet's
    # DeiT has two classifier heads (with and without a distillation teacher): the plain one.
    deit = build("hf:deit", batch=2, seq=16, args=dict(small, patch_size=8), device="meta")
    assert type(deit.model.model).__name__ == "DeiTForImageClassification"


def test_hf_errors(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(CFPError, match="has no sequence-to-sequence LM, masked LM, causal LM, image classifier"):
        build("hf:wav2vec2", device="meta")
    with pytest.raises(CFPError, match="knows no model type 'nosuchmodel'"):
        build("hf:nosuchmodel")
    with pytest.raises(CFPError, match="has no field no_such_field"):
        build("hf:llama", args=dict(TINY_LLAMA, no_such_field=1), device="meta")
    with pytest.raises(CFPError, match="does not exist"):
        build(f"hf:{tmp_path}/missing/config.json")
