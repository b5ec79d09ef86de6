"""LLaMA style decoder-only transformer, written out nanoGPT-style for CFP.

RMSNorm, rotary position embeddings, bias-free ``wq``/``wk``/``wv``/``wo``
attention with optional grouped-query attention (``n_kv_head < n_head``), a
SwiGLU MLP (``w1``, ``w3``, ``w2``) and an untied output head. Module names
follow Meta's reference implementation. ``forward(idx, targets)`` returns the
scalar cross-entropy loss, so tracing the model traces a training step's
forward.

Rotary embeddings use the "rotate half" formulation on real tensors (no
complex numbers): cos/sin tables are precomputed once as non-persistent
buffers. With random weights this is equivalent to Meta's interleaved complex
form up to a fixed permutation of the q/k features.

Everything is random-init, nothing is downloaded. Build a model plus a batch::

    from examples.llama import build
    model, (idx, targets) = build("tiny")                 # real weights on CPU
    model, inputs = build("llama-70b", device="meta")     # shapes only
    loss = model(*inputs)

Presets are listed in ``PRESETS``; any config field can be overridden by
keyword, e.g. ``build("small", n_kv_head=8)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None: one kv head per query head (plain multi-head attention)
    n_embd: int = 64
    ffn_hidden: int = 192  # SwiGLU width; LLaMA uses ~8/3 * n_embd rounded up
    max_seq_len: int = 32  # size of the rotary tables and the causal mask
    seq_len: int = 32  # sequence length build() uses unless told otherwise
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


PRESETS: dict[str, LlamaConfig] = {
    # Toy sizes, divisible by 8 (vocab, hidden, ffn) and 4 (heads) so they shard on up to 8 devices.
    "tiny": LlamaConfig(
        vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=192, max_seq_len=32, seq_len=32
    ),
    "small": LlamaConfig(
        vocab_size=1024, n_layer=4, n_head=8, n_kv_head=4, n_embd=256, ffn_hidden=704, max_seq_len=128, seq_len=128
    ),
    # Published shapes: LLaMA (Touvron et al. 2023) and Llama 2 70B.
    "llama-7b": LlamaConfig(
        vocab_size=32000,
        n_layer=32,
        n_head=32,
        n_embd=4096,
        ffn_hidden=11008,
        max_seq_len=2048,
        seq_len=2048,
        norm_eps=1e-6,
    ),
    "llama-13b": LlamaConfig(
        vocab_size=32000,
        n_layer=40,
        n_head=40,
        n_embd=5120,
        ffn_hidden=13824,
        max_seq_len=2048,
        seq_len=2048,
        norm_eps=1e-6,
    ),
    "llama-70b": LlamaConfig(
        vocab_size=32000,
        n_layer=80,
        n_head=64,
        n_kv_head=8,
        n_embd=8192,
        ffn_hidden=28672,
        max_seq_len=4096,
        seq_len=4096,
        norm_eps=1e-5,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim: multiplying by i, pairing feature j with j + hd/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by position; cos/sin are [T, hd] and broadcast over B and H."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        n_kv_head = cfg.n_kv_head or cfg.n_head
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        if cfg.n_head % n_kv_head != 0:
            raise ValueError(f"n_head={cfg.n_head} is not divisible by n_kv_head={n_kv_head}")
        self.n_head = cfg.n_head
        self.n_kv_head = n_kv_head
        self.n_rep = cfg.n_head // n_kv_head  # query heads sharing each kv head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.wq = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)

        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)  # before repeating: rotate each kv head once

        if self.n_rep > 1:  # static (config), not data-dependent
            k = self._repeat_kv(k)
            v = self._repeat_kv(v)

        att = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, T, T]
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # [B, H, T, hd]

        y = y.transpose(1, 2).reshape(B, T, C)
        return self.wo(y)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, KV, T, hd] -> [B, KV * n_rep, T, hd]; query head h uses kv head h // n_rep."""
        B, KV, T, hd = x.shape
        return x[:, :, None].expand(B, KV, self.n_rep, T, hd).reshape(B, KV * self.n_rep, T, hd)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied

        # Shared by every layer, computed by reset_parameters (so also when a model built on meta is
        # materialised) and kept out of the state dict. Building them in forward would bake constants into the graph.
        head_dim = cfg.n_embd // cfg.n_head
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, head_dim), persistent=False)
        self.register_buffer("mask", torch.empty(cfg.max_seq_len, cfg.max_seq_len, dtype=torch.bool), persistent=False)
        self.reset_parameters()

        # N(0, 0.02) everywhere. No-ops on meta, where cfp.parallelize(init_fn=model.init_passes()) replays it.
        for init in self.init_passes():
            for module in self.modules():
                init(module)

    def reset_parameters(self) -> None:
        """This module's own tensors: the rotary tables and the causal mask."""
        cos, sin = self._rotary_tables(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        self.mask.copy_(torch.tril(torch.ones_like(self.mask)))

    def init_passes(self) -> list:
        """The init as one pass of a per-module function over ``self.modules()`` (in the order of
        ``self.named_parameters()``): N(0, 0.02), residual projections (wo, w2) scaled down by depth,
        RMSNorm gains left at 1."""
        residual = {id(m) for name, m in self.named_modules() if name.endswith(("wo", "w2"))}
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer)

        def init(module: nn.Module) -> None:
            if isinstance(module, RMSNorm):
                return
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, mean=0.0, std=std if id(module) in residual else 0.02)

        return [init]

    @staticmethod
    def _rotary_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of position * frequency, each [max_seq_len, head_dim]."""
        head_dim = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
        angles = torch.outer(t, inv_freq)  # [max_seq_len, head_dim / 2]
        angles = torch.cat((angles, angles), dim=-1)  # same angle for feature j and j + hd/2 (rotate_half)
        return angles.cos(), angles.sin()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        mask = self.mask[:T, :T]

        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        x = self.norm(x)
        logits = self.output(x)  # [B, T, V]
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def build(
    preset: str = "tiny",
    batch: int = 2,
    seq: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    **overrides,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a randomly initialised Llama and a random batch ``(idx, targets)``.

    ``overrides`` replace fields of the preset's ``LlamaConfig`` by name. On
    ``device="meta"`` nothing is allocated: parameters and buffers have shapes
    but no data, which is all tracing and planning need.
    """
    cfg = _config(preset, overrides)
    seq = cfg.seq_len if seq is None else seq
    if not 0 < seq <= cfg.max_seq_len:
        raise ValueError(f"seq={seq} must be in [1, max_seq_len={cfg.max_seq_len}]")

    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(cfg)
    model.to(dtype=_dtype(dtype))  # casts floating-point tensors (incl. rotary tables); the mask stays bool

    idx = torch.randint(cfg.vocab_size, (batch, seq), device=device)
    targets = torch.randint(cfg.vocab_size, (batch, seq), device=device)
    return model, (idx, targets)


def _config(preset: str, overrides: dict) -> LlamaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {list(PRESETS)}")
    valid = [f.name for f in fields(LlamaConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown LlamaConfig field(s) {unknown}; valid fields are {valid}")
    return replace(PRESETS[preset], **overrides)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return resolved
