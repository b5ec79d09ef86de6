"""Parity of more transformers model types than the model matrix holds, at tiny sizes.

For each type: capture and analyse it, then on 2 gloo ranks apply `dp`, the analytic planner's plan
and a random plan, each checked against one device as tests/test_models.py checks the matrix (loss,
gradients, buffers after the forward, one SGD step). Prints one line per type; the README cites it.

    python docs/sweep/hf_sweep.py            # every type below
    python docs/sweep/hf_sweep.py bert levit # some of them

Overrides of None take the common small fields (2 layers, hidden 32, ...) the type's config has,
with its float dropouts set to 0.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import cfp  # noqa: E402
from cfp.analyze import analyze  # noqa: E402
from cfp.mesh import parse_mesh  # noqa: E402

SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=128)
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
            "activation_dropout", "classifier_dropout", "hidden_dropout", "drop_path_rate", "resid_pdrop",
            "embd_pdrop", "attn_pdrop", "dropout_rate")  # fmt: skip
VIT = {k: v for k, v in SMALL.items() if k != "vocab_size"}
VIT.update(patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT_STYLE = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BART = dict(encoder_layers=1, decoder_layers=1, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64)
BART.update(encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128, max_position_embeddings=64)
BART.update(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
DISTILBERT = dict(n_layers=2, dim=32, hidden_dim=64, n_heads=4, vocab_size=128, dropout=0.0, attention_dropout=0.0)
SWIN = dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, patch_size=4)
SWIN.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
# name: (model type, overrides or None, batch, seq: the image side for vision types)
TYPES = {
    "bert": ("bert", None, 2, 8),
    "roberta": ("roberta", None, 2, 8),
    "distilbert": ("distilbert", DISTILBERT, 2, 8),
    "albert": ("albert", None, 2, 8),
    "electra": ("electra", None, 2, 8),
    "deberta-v2": ("deberta-v2", None, 2, 8),
    "bart": ("bart", BART, 2, 8),
    "mistral": ("mistral", dict(SMALL, num_key_value_heads=2), 2, 8),
    # The default configs' special tokens lie outside a 128-token vocabulary.
    "phi3": ("phi3", dict(SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2), 2, 8),
    "starcoder2": ("starcoder2", None, 2, 8),
    "gptj": ("gptj", dict(GPT_STYLE, rotary_dim=4), 2, 8),
    "gpt_bigcode": ("gpt_bigcode", GPT_STYLE, 2, 8),
    "olmo": ("olmo", dict(SMALL, pad_token_id=1, bos_token_id=None, eos_token_id=2), 2, 8),
    "vit": ("vit", VIT, 2, 32),
    "deit": ("deit", VIT, 2, 32),
    "swin": ("swin", SWIN, 2, 32),
    "beit": ("beit", dict(VIT, drop_path_rate=0.0), 2, 32),
    "convnext": ("convnext", dict(num_stages=2, depths=[1, 1], hidden_sizes=[16, 32], drop_path_rate=0.0), 2, 32),
    "regnet": ("regnet", dict(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16), 2, 32),
    "poolformer": ("poolformer", dict(depths=[1] * 4, hidden_sizes=[16, 32, 32, 32], drop_path_rate=0.0), 2, 32),
    # Batch 8: their BatchNorms over two samples amplify rounding past the tolerance (see the README).
    "mobilenet_v2": ("mobilenet_v2", dict(depth_multiplier=0.25, classifier_dropout_prob=0.0), 8, 64),
    "levit": ("levit", {}, 8, 64),
}


def spec(name: str) -> cfp.ModelSpec:
    model_type, overrides, batch, seq = TYPES[name]
    if overrides is None:
        from transformers import AutoConfig

        config = AutoConfig.for_model(model_type)
        overrides = {k: v for k, v in SMALL.items() if hasattr(config, k)}
        overrides.update({k: 0.0 for k in DROPOUTS if isinstance(getattr(config, k, None), float)})
    return cfp.ModelSpec(f"hf:{model_type}", batch=batch, seq=seq, device="cpu", args=overrides)


def _worker(rank: int, world: int, port: int, names: list[str]) -> None:
    import torch
    import torch.distributed as dist
    from test_models import _check, _reference

    from cfp import baselines
    from cfp.parallelize import plan_from_choice, plan_from_indices
    from cfp.pipeline import make_plan

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name in names:
        result = {}
        try:
            graph = analyze(cfp.capture(cfp.build(spec(name))), parse_mesh("2"))
            rng = random.Random(7)
            plans = {
                "dp": plan_from_indices(graph, baselines.choose("dp", graph)),
                "analytic": make_plan(graph.traced, "2", cost="analytic", graph=graph, cluster="cpu-gloo-local")[0],
                "random": plan_from_choice(graph, lambda block, configs, rng=rng: rng.choice(list(configs))),
            }
            ref = _reference(spec(name))
            for plan_name, plan in plans.items():
                try:
                    errors, _ = _check(spec(name), plan, graph.traced, ref)
                    result[plan_name] = errors[:2] or "ok"
                except Exception as exc:  # every rank fails alike
                    result[plan_name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        except Exception as exc:
            result["setup"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if rank == 0:
            print(name, json.dumps(result), flush=True)
    dist.destroy_process_group()


def main(names: list[str]) -> None:
    from ranks import run_ranks

    analysed = []
    for name in names:  # analysis here, on the shared on-disk cache, not once per rank
        try:
            analyze(cfp.capture(cfp.build(spec(name))), parse_mesh("2"))
            analysed.append(name)
        except Exception as exc:
            print(name, json.dumps({"analysis": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True)
    if analysed:
        run_ranks(_worker, (analysed,), timeout_s=1800)


if __name__ == "__main__":
    main(sys.argv[1:] or list(TYPES))
