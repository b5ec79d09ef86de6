"""GPT-2 style decoder-only transformer, written out nanoGPT-style for CFP.

Learned position embeddings, pre-LayerNorm blocks, a fused QKV projection
(``c_attn``), a GELU MLP and (by default) an output head tied to the token
embedding. ``forward(idx, targets)`` returns the scalar cross-entropy loss, so
tracing the model traces a training step's forward.

The fused ``c_attn`` output is laid out per head as Megatron-LM does it:
``[n_head, 3, head_dim]`` along the output features. Column-sharding
``c_attn.weight`` by heads therefore hands each shard the complete q, k and v
of its own heads, and attention needs no communication until ``c_proj``.

Everything is random-init, nothing is downloaded. Build a model plus a batch::

    from examples.gpt import build
    model, (idx, targets) = build("tiny")                 # real weights on CPU
    model, inputs = build("gpt3-175b", device="meta")     # shapes only
    loss = model(*inputs)

Presets are listed in ``PRESETS``; any config field can be overridden by
keyword, e.g. ``build("small", n_layer=2, tie_weights=False)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32  # maximum sequence length (position table, causal mask)
    seq_len: int = 32  # sequence length build() uses unless told otherwise
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    tie_weights: bool = True  # lm_head.weight is wte.weight
    layer_norm_eps: float = 1e-5


PRESETS: dict[str, GPTConfig] = {
    # Toy sizes, divisible by 8 (vocab, hidden) and 4 (heads) so they shard on up to 8 devices.
    "tiny": GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=64, block_size=32, seq_len=32),
    "small": GPTConfig(vocab_size=1024, n_layer=4, n_head=8, n_embd=256, block_size=128, seq_len=128),
    # Published shapes (GPT-2 paper / HF configs; GPT-3 paper table 2.1).
    "gpt2": GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024, seq_len=1024),
    "gpt2-xl": GPTConfig(vocab_size=50257, n_layer=48, n_head=25, n_embd=1600, block_size=1024, seq_len=1024),
    "gpt3-6.7b": GPTConfig(vocab_size=50257, n_layer=32, n_head=32, n_embd=4096, block_size=2048, seq_len=2048),
    "gpt3-175b": GPTConfig(vocab_size=50257, n_layer=96, n_head=96, n_embd=12288, block_size=2048, seq_len=2048),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        # Output features ordered [n_head, 3, head_dim] (Megatron layout), not [3, n_head, head_dim].
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        # A buffer, not built in forward, so the traced graph has no factory op for it.
        self.register_buffer("mask", torch.empty(cfg.block_size, cfg.block_size, dtype=torch.bool), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own tensors (the causal mask), so that a model built on meta can be materialised."""
        self.mask.copy_(torch.tril(torch.ones_like(self.mask)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, self.n_head, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each [B, T, H, hd]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]

        att = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, T, T]
        att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # [B, H, T, hd]

        y = y.transpose(1, 2).reshape(B, T, C)  # heads back side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        # Position ids as a buffer: torch.arange in forward would be baked into the graph.
        self.register_buffer("pos", torch.empty(cfg.block_size, dtype=torch.long), persistent=False)
        self.reset_parameters()

        # GPT-2 init. No-ops on meta, where cfp.parallelize(init_fn=model.init_passes()) replays it.
        for init in self.init_passes():
            for module in self.modules():
                init(module)

    def reset_parameters(self) -> None:
        """This module's own tensors (the position ids)."""
        self.pos.copy_(torch.arange(len(self.pos), device=self.pos.device))

    def init_passes(self) -> list:
        """GPT-2 init as passes of a per-module function over ``self.modules()``: N(0, 0.02), then the
        residual projections (``c_proj``) again, scaled down by depth."""
        residual = {id(m) for name, m in self.named_modules() if name.endswith("c_proj")}
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer)

        def scale_residual(module: nn.Module) -> None:
            if id(module) in residual:
                nn.init.normal_(module.weight, mean=0.0, std=std)

        return [self._init_weights, scale_residual]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(self.pos[:T])
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # [B, T, V]
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def build(
    preset: str = "tiny",
    batch: int = 2,
    seq: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    **overrides,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a randomly initialised GPT and a random batch ``(idx, targets)``.

    ``overrides`` replace fields of the preset's ``GPTConfig`` by name. On
    ``device="meta"`` nothing is allocated: parameters and buffers have shapes
    but no data, which is all tracing and planning need.
    """
    cfg = _config(preset, overrides)
    seq = cfg.seq_len if seq is None else seq
    if not 0 < seq <= cfg.block_size:
        raise ValueError(f"seq={seq} must be in [1, block_size={cfg.block_size}]")

    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    model.to(dtype=_dtype(dtype))  # casts floating-point tensors only; the bool mask stays bool

    idx = torch.randint(cfg.vocab_size, (batch, seq), device=device)
    targets = torch.randint(cfg.vocab_size, (batch, seq), device=device)
    return model, (idx, targets)


def _config(preset: str, overrides: dict) -> GPTConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {list(PRESETS)}")
    valid = [f.name for f in fields(GPTConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid fields are {valid}")
    return replace(PRESETS[preset], **overrides)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return resolved
