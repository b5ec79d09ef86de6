"""GPT-like transformer with mixture-of-experts MLPs (GShard top-2 gating), for CFP.

The attention half of each block is GPT-2's (see ``examples/gpt.py``); the MLP
half is a mixture of ``n_expert`` GELU MLPs in every layer, or every
``moe_every``-th layer. Routing follows GShard (Lepikhin et al. 2020):

* tokens are split into groups ``[G, S, d]`` (one sequence per group by default);
* a linear router gives softmax gates over experts; each token goes to its top-2;
* each expert takes at most ``capacity = ceil(capacity_factor * 2 * S / E)``
  tokens per group; top-1 choices are seated first, top-2 choices fill the
  remaining slots, and overflow tokens are dropped (they ride the residual);
* dispatch and combine are one-hot ``[G, S, E, C]`` tensors applied with
  einsums, so the graph is static: no gather/scatter, no data-dependent shapes;
* the GShard load-balancing loss is added to the LM loss with ``aux_loss_coef``.

Experts are batched weights, ``w_in [E, d, f]`` and ``w_out [E, f, d]``, so
expert parallelism is sharding their ``E`` dim (and ``egcd``'s). GShard's
random routing of the second expert is left out to keep the model deterministic.

``forward(idx, targets)`` returns the scalar loss (LM cross-entropy plus the
auxiliary loss). Everything is random-init, nothing is downloaded::

    from examples.moe import build
    model, (idx, targets) = build("tiny")                 # real weights on CPU
    model, inputs = build("moe-64e", device="meta")       # shapes only
    loss = model(*inputs)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MoEConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32  # maximum sequence length (position table, causal mask)
    seq_len: int = 32  # sequence length build() uses unless told otherwise
    n_expert: int = 4
    expert_hidden: int = 256  # f, each expert's MLP width
    capacity_factor: float = 1.25
    moe_every: int = 1  # 1: every layer is MoE; 2: every other layer (as in GShard)
    group_size: int | None = None  # tokens per routing group; None: one sequence per group
    aux_loss_coef: float = 0.01
    bias: bool = True  # biases in attention, dense MLP and LayerNorm (experts have none)
    tie_weights: bool = True  # lm_head.weight is wte.weight
    layer_norm_eps: float = 1e-5


# Shapes of our own choosing, GShard/Switch-like (not a published checkpoint).
PRESETS: dict[str, MoEConfig] = {
    # Toy sizes, divisible by 8 (vocab, hidden) and 4 (heads, experts) to shard on up to 8 devices.
    "tiny": MoEConfig(
        vocab_size=256, n_layer=2, n_head=4, n_embd=64, block_size=32, seq_len=32, n_expert=4, expert_hidden=256
    ),
    "small": MoEConfig(
        vocab_size=1024, n_layer=4, n_head=8, n_embd=256, block_size=128, seq_len=128, n_expert=8, expert_hidden=1024
    ),
    # GPT-2-small body, every MLP an 8-expert MoE (Switch-base-like width).
    "moe-8e": MoEConfig(
        vocab_size=32000,
        n_layer=12,
        n_head=12,
        n_embd=768,
        block_size=1024,
        seq_len=1024,
        n_expert=8,
        expert_hidden=3072,
    ),
    # GPT-medium body, 64 experts in every other layer (GShard's layout).
    "moe-64e": MoEConfig(
        vocab_size=32000,
        n_layer=24,
        n_head=16,
        n_embd=1024,
        block_size=1024,
        seq_len=1024,
        n_expert=64,
        expert_hidden=4096,
        moe_every=2,
    ),
}


class CausalSelfAttention(nn.Module):
    """GPT-2 attention with the per-head (Megatron) fused QKV layout of examples/gpt.py."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # out features [n_head, 3, head_dim]
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
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

        att = (q @ k.transpose(-2, -1)) * self.scale
        att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v

        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """Dense GELU MLP for the non-MoE layers when moe_every > 1."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.expert_hidden, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(cfg.expert_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class MoE(nn.Module):
    """Top-2 gated mixture of GELU MLP experts; returns (output, load-balancing loss)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.n_expert < 2:
            raise ValueError(f"top-2 gating needs n_expert >= 2, got {cfg.n_expert}")
        self.n_expert = cfg.n_expert
        self.capacity_factor = cfg.capacity_factor
        self.group_size = cfg.group_size
        self.gate = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)  # router
        self.w_in = nn.Parameter(torch.empty(cfg.n_expert, cfg.n_embd, cfg.expert_hidden))
        self.w_out = nn.Parameter(torch.empty(cfg.n_expert, cfg.expert_hidden, cfg.n_embd))
        self.act = nn.GELU(approximate="tanh")
        # Index vectors for building one-hots by comparison; buffers so no arange lands in the graph.
        max_group = cfg.group_size or cfg.block_size
        self.register_buffer("expert_ids", torch.empty(cfg.n_expert, dtype=torch.long), persistent=False)
        self.register_buffer("slot_ids", torch.empty(max_group, dtype=torch.long), persistent=False)  # capacity <= S
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The index buffers; the expert weights are drawn by the model's init (``MoEGPT.init_passes``)."""
        for ids in (self.expert_ids, self.slot_ids):
            ids.copy_(torch.arange(len(ids), device=ids.device))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, d = x.shape
        E = self.n_expert
        S = self.group_size or T
        if (B * T) % S != 0:
            raise ValueError(f"batch * seq = {B * T} tokens do not split into groups of group_size={S}")
        G = B * T // S
        C = min(S, math.ceil(self.capacity_factor * 2 * S / E))  # an expert can't get more than S tokens
        x = x.reshape(G, S, d)

        # Router in float32: the gates are small probabilities and feed a loss.
        gates = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [G, S, E]
        top_gates, top_idx = torch.topk(gates, k=2, dim=-1)  # [G, S, 2], best first
        is_top1 = top_idx[..., 0:1] == self.expert_ids  # [G, S, E] bool one-hots
        is_top2 = top_idx[..., 1:2] == self.expert_ids

        # GShard load balancing: (fraction of tokens routed to e) * (mean gate of e), scaled
        # by E^2 so a uniform router scores 1. Counted before capacity drops.
        density = is_top1.float().mean(dim=1)  # [G, E]
        density_proxy = gates.mean(dim=1)  # [G, E], the differentiable stand-in
        aux_loss = (density * density_proxy).mean() * (E * E)

        # Seat tokens in expert buffers in token order: top-1 choices first, top-2 choices
        # after the kept top-1s. A position >= C means the expert is full and the choice is dropped.
        pos1 = torch.cumsum(is_top1, dim=1) - 1  # [G, S, E] int64
        keep1 = is_top1 & (pos1 < C)
        pos2 = torch.cumsum(is_top2, dim=1) - 1 + keep1.sum(dim=1, keepdim=True)
        keep2 = is_top2 & (pos2 < C)

        # The two chosen gates, renormalised to sum to 1 per token.
        gate1, gate2 = (top_gates / top_gates.sum(dim=-1, keepdim=True)).unbind(dim=-1)  # [G, S]

        slots = self.slot_ids[:C]
        dispatch1 = keep1[..., None] & (pos1[..., None] == slots)  # [G, S, E, C] bool
        dispatch2 = keep2[..., None] & (pos2[..., None] == slots)
        combine = gate1[..., None, None] * dispatch1 + gate2[..., None, None] * dispatch2
        dispatch = (dispatch1 | dispatch2).to(x.dtype)
        combine = combine.to(x.dtype)

        expert_in = torch.einsum("gsec,gsd->egcd", dispatch, x)  # gather tokens into expert slots
        h = self.act(torch.einsum("egcd,edf->egcf", expert_in, self.w_in))
        out = torch.einsum("egcf,efd->egcd", h, self.w_out)
        y = torch.einsum("gsec,egcd->gsd", combine, out)  # weighted scatter back to tokens
        return y.reshape(B, T, d), aux_loss


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, use_moe: bool):
        super().__init__()
        self.use_moe = use_moe
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MoE(cfg) if use_moe else MLP(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.ln_1(x))
        if self.use_moe:  # static (config), not data-dependent
            y, aux_loss = self.mlp(self.ln_2(x))
        else:
            y, aux_loss = self.mlp(self.ln_2(x)), None
        return x + y, aux_loss


class MoEGPT(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {cfg.moe_every}")
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                # With moe_every=2 the MoE layers are 1, 3, 5, ... (every second layer).
                h=nn.ModuleList(Block(cfg, use_moe=(i + 1) % cfg.moe_every == 0) for i in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
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
        """GPT-2 init as one pass of a per-module function over ``self.modules()`` (in the order of
        ``self.named_parameters()``): N(0, 0.02), residual projections (c_proj, w_out) scaled down by depth."""
        prefix = {id(m): name for name, m in self.named_modules()}
        canonical = {name for name, _ in self.named_parameters()}  # a tied head is its embedding, drawn once
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer)

        def init(module: nn.Module) -> None:
            for local, p in module.named_parameters(recurse=False):
                name = f"{prefix[id(module)]}.{local}".lstrip(".")
                if name not in canonical:
                    continue
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    nn.init.ones_(p)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)
                elif name.endswith(("c_proj.weight", "w_out")):
                    nn.init.normal_(p, mean=0.0, std=std)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02)

        return [init]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(self.pos[:T])
        aux_loss = 0.0
        for block in self.transformer.h:
            x, block_aux = block(x)
            if block_aux is not None:
                aux_loss = aux_loss + block_aux
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # [B, T, V]
        lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return lm_loss + self.cfg.aux_loss_coef * aux_loss


def build(
    preset: str = "tiny",
    batch: int = 2,
    seq: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    **overrides,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build a randomly initialised MoE GPT and a random batch ``(idx, targets)``.

    ``overrides`` replace fields of the preset's ``MoEConfig`` by name. On
    ``device="meta"`` nothing is allocated: parameters and buffers have shapes
    but no data, which is all tracing and planning need.
    """
    cfg = _config(preset, overrides)
    seq = cfg.seq_len if seq is None else seq
    if not 0 < seq <= cfg.block_size:
        raise ValueError(f"seq={seq} must be in [1, block_size={cfg.block_size}]")
    if cfg.group_size is not None and (batch * seq) % cfg.group_size != 0:
        raise ValueError(f"batch * seq = {batch * seq} tokens do not split into groups of {cfg.group_size}")

    torch.manual_seed(0)
    with torch.device(device):
        model = MoEGPT(cfg)
    model.to(dtype=_dtype(dtype))  # casts floating-point tensors only; masks and index buffers keep their dtype

    idx = torch.randint(cfg.vocab_size, (batch, seq), device=device)
    targets = torch.randint(cfg.vocab_size, (batch, seq), device=device)
    return model, (idx, targets)


def _config(preset: str, overrides: dict) -> MoEConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {list(PRESETS)}")
    valid = [f.name for f in fields(MoEConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown MoEConfig field(s) {unknown}; valid fields are {valid}")
    return replace(PRESETS[preset], **overrides)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. 'float32', 'bfloat16')")
    return resolved
