"""The model matrix of tests/test_models.py: ecosystem models at tiny shapes, built from config.

Each entry is a ModelSpec; Hugging Face ones are random-init from a model type's default config
with a few fields overridden (2 layers, hidden 32, vocabulary 128), so nothing is downloaded.
"""

from __future__ import annotations

import cfp

BATCH, SEQ = 2, 8
SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=128)
SMALL_NO_MLP = {k: v for k, v in SMALL.items() if k != "intermediate_size"}  # configs that size their MLP from hidden
# Dropout draws its masks per shard under a sharded config, so a plan drops other elements
# than one device does: the parity check turns it off where the default config has it.
NO_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "opt": dict(dropout=0.0, attention_dropout=0.0),
    "t5": dict(dropout_rate=0.0),
}


def hf(model_type: str, **overrides) -> cfp.ModelSpec:
    return cfp.ModelSpec(f"hf:{model_type}", batch=BATCH, seq=SEQ, device="cpu", args=overrides)


MATRIX: dict[str, cfp.ModelSpec] = {
    # GPT-2: learned positions, LayerNorm, fused c_attn (HF Conv1D: addmm), tied head.
    "gpt2": hf("gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=32, **NO_DROPOUT["gpt2"]),
    # LLaMA: RMSNorm, rotary, grouped-query attention, SwiGLU, untied head.
    "llama": hf("llama", **SMALL, num_key_value_heads=2),
    # Mixtral: sparse MoE (top-2 of 4 experts, histc + grouped matmul), GQA.
    "mixtral": hf("mixtral", **SMALL, num_key_value_heads=2, num_local_experts=4),
    # Qwen2: GQA with biased q/k/v projections.
    "qwen2": hf("qwen2", **SMALL, num_key_value_heads=2),
    # Qwen2-MoE: MoE with a gated shared expert.
    "qwen2_moe": hf(
        "qwen2_moe",
        **SMALL,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    ),
    # Falcon: multi-query attention, linears written as x @ weight.T, k and v picked by index constants.
    "falcon": hf("falcon", **SMALL_NO_MLP, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # GPT-NeoX: parallel attention and MLP, fused query_key_value, partial rotary, LayerNorm.
    "gpt_neox": hf("gpt_neox", **SMALL),
    # Gemma: tied head, RMSNorm with (1 + weight), GeGLU, scaled embeddings.
    "gemma": hf("gemma", **SMALL, num_key_value_heads=1, head_dim=8),
    # OPT: learned positions with an offset, LayerNorm, ReLU MLP (fc1/fc2), tied head.
    "opt": hf(
        "opt",
        num_hidden_layers=2,
        hidden_size=32,
        ffn_dim=64,
        num_attention_heads=4,
        vocab_size=128,
        word_embed_proj_dim=32,
        max_position_embeddings=32,
        **NO_DROPOUT["opt"],
    ),
    # Phi: parallel attention and MLP, partial rotary, dense / fc1 / fc2, untied head with a bias.
    "phi": hf("phi", **SMALL),
    # BLOOM: ALiBi position biases, no SDPA attention in transformers (built with eager attention).
    "bloom": hf("bloom", n_layer=2, hidden_size=32, n_head=4, vocab_size=128),
    # Mamba: a state-space model, no attention; depthwise causal conv1d, selective scan (its slow path).
    "mamba": hf("mamba", num_hidden_layers=2, hidden_size=32, state_size=8, vocab_size=128),
    # T5: an encoder-decoder (hf: makes it a sequence-to-sequence LM): cross-attention, relative position biases.
    "t5": hf("t5", num_layers=1, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=128, **NO_DROPOUT["t5"]),
    # ResNet (hf: makes it an image classifier; --seq is the image side): BatchNorm2d, residuals added in place.
    "resnet": cfp.ModelSpec(
        "hf:resnet", batch=4, seq=32, device="cpu", args=dict(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16)
    ),
    # torch.nn.TransformerEncoder sequence classifier.
    "encoder": cfp.ModelSpec("examples/zoo.py:encoder", batch=BATCH, seq=SEQ, device="cpu"),
    # Dense top-1 experts whose router picks and scales under torch.no_grad() (straight-through).
    "router": cfp.ModelSpec("examples/zoo.py:router", batch=BATCH, seq=SEQ, device="cpu"),
    # CNN with BatchNorm2d (running statistics updated in place). 32 x 32 images: DTensor then normalises
    # a batch-sharded input channel-sharded, on a channel-sharded copy of the running statistics.
    "convnet": cfp.ModelSpec("examples/zoo.py:convnet", batch=4, seq=32, device="cpu"),
}
