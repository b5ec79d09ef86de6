"""Every example model builds, trains a step at its tiny preset, and captures."""

import math

import pytest
import torch

import cfp
from cfp.spec import ModelSpec


def test_tiny_forward_backward(example):
    workload = cfp.build(ModelSpec(f"{example}:tiny"))
    loss = workload.model(*workload.inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    vocab = workload.model.cfg.vocab_size
    assert abs(loss.item() - math.log(vocab)) < 0.5  # random init predicts ~uniformly
    loss.backward()
    grads = [p.grad for p in workload.model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_capture_counts_every_parameter(example):
    workload = cfp.build(ModelSpec(f"{example}:tiny"))
    traced = cfp.capture(workload)
    assert traced.num_parameters() == sum(p.numel() for p in workload.model.parameters())
    assert traced.forward_flops() > 0
    assert len(traced.user_inputs) == 2
    # FLOPs of the contractions dominate: a linear's count is 2*M*N*K.
    linear = next(n for n in traced.ops() if "linear" in str(n.target))
    x, w = linear.args[0].meta["val"], linear.args[1].meta["val"]
    assert traced.flops[linear.name] == 2 * x.shape[:-1].numel() * w.shape[0] * w.shape[1]


def test_capture_on_meta_matches_cpu(example):
    cpu = cfp.capture(cfp.build(ModelSpec(f"{example}:tiny")))
    meta = cfp.capture(cfp.build(ModelSpec(f"{example}:tiny", device="meta")))
    assert meta.fingerprint() == cpu.fingerprint()
    assert meta.forward_flops() == cpu.forward_flops()


@pytest.mark.parametrize(
    "spec,params", [("gpt:gpt3-175b", 175e9), ("llama:llama-70b", 69e9), ("llama:llama-7b", 6.7e9)]
)
def test_large_presets_build_on_meta(spec, params):
    workload = cfp.build(ModelSpec(spec, device="meta"))
    count = sum(p.numel() for p in workload.model.parameters())
    assert abs(count - params) / params < 0.02


def test_tied_head_is_one_parameter():
    traced = cfp.capture(cfp.build(ModelSpec("gpt:tiny", device="meta")))
    assert traced.aliases == {"transformer.wte.weight": "lm_head.weight"}
    assert "lm_head.weight" in traced.params.values()


def test_overrides_change_the_graph():
    small = cfp.capture(cfp.build(ModelSpec("gpt:tiny", device="meta", args={"n_layer": 1})))
    big = cfp.capture(cfp.build(ModelSpec("gpt:tiny", device="meta", args={"n_layer": 3})))
    assert len(big.ops()) > len(small.ops())
    assert big.fingerprint() != small.fingerprint()
