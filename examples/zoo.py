"""Plain ``nn.Module`` factories built from torch.nn parts, as a user would write them for CFP.

A factory returns ``(model, inputs)``: a module whose ``forward(*inputs)``
returns the training loss, and a batch. ``cfp plan examples/zoo.py:encoder
--mesh 2`` plans one; ``--arg key=value`` sets a keyword argument.

- ``encoder``: a ``torch.nn.TransformerEncoder`` sequence classifier (token
  embedding, learned positions, mean pooling, a linear head).
- ``convnet``: a small CNN with ``BatchNorm2d`` (running statistics updated
  in place while training) and a linear classifier.
- ``router``: a sequence classifier whose MLPs are dense top-1 mixtures of
  experts; the router picks and scales under ``torch.no_grad()``, as routers
  often do (a straight-through estimator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderClassifier(nn.Module):
    def __init__(self, vocab: int, seq: int, d_model: int, nhead: int, layers: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(tokens) + self.pos)
        return F.cross_entropy(self.head(x.mean(dim=1)), labels)


def encoder(
    batch: int = 2,
    seq: int = 16,
    device: str = "cpu",
    vocab: int = 128,
    d_model: int = 32,
    nhead: int = 4,
    layers: int = 2,
    classes: int = 4,
):
    torch.manual_seed(0)
    with torch.device(device):
        model = EncoderClassifier(vocab, seq, d_model, nhead, layers, classes)
    tokens = torch.randint(vocab, (batch, seq), device=device)
    labels = torch.randint(classes, (batch,), device=device)
    return model, (tokens, labels)


class ConvNet(nn.Module):
    def __init__(self, channels: int, width: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.features(images).mean(dim=(2, 3))
        return F.cross_entropy(self.classifier(x), labels)


def convnet(batch: int = 4, seq: int = 8, device: str = "cpu", channels: int = 3, width: int = 8, classes: int = 10):
    """``seq`` is the image side."""
    torch.manual_seed(0)
    with torch.device(device):
        model = ConvNet(channels, width, classes)
    images = torch.randn(batch, channels, seq, seq, device=device)
    labels = torch.randint(classes, (batch,), device=device)
    return model, (images, labels)


class Top1Experts(nn.Module):
    """Every expert runs on every token (dense, so shapes are static), and each token takes its router's pick.

    The pick and the chosen probability are read under ``no_grad``: the forward
    weighs the chosen expert by 1, and the gradient reaches the router through
    ``probs`` alone (straight-through).
    """

    def __init__(self, d_model: int, experts: int):
        super().__init__()
        self.router = nn.Linear(d_model, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, d_model, 2 * d_model) * d_model**-0.5)
        self.w_out = nn.Parameter(torch.randn(experts, 2 * d_model, d_model) * (2 * d_model) ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.router(x).softmax(dim=-1)  # [B, S, E]
        with torch.no_grad():
            top, pick = probs.max(dim=-1, keepdim=True)
            chosen = torch.zeros_like(probs).scatter_(-1, pick, 1.0) / top
        h = F.gelu(torch.einsum("bsd,edf->bsef", x, self.w_in))
        y = torch.einsum("bsef,efd->bsed", h, self.w_out)
        return torch.einsum("bse,bsed->bsd", probs * chosen, y)


class RoutedClassifier(nn.Module):
    def __init__(self, vocab: int, seq: int, d_model: int, layers: int, experts: int, classes: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(layers))
        self.moes = nn.ModuleList(Top1Experts(d_model, experts) for _ in range(layers))
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return F.cross_entropy(self.head(x.mean(dim=1)), labels)


def router(
    batch: int = 2,
    seq: int = 16,
    device: str = "cpu",
    vocab: int = 128,
    d_model: int = 32,
    layers: int = 2,
    experts: int = 4,
    classes: int = 4,
):
    torch.manual_seed(0)
    with torch.device(device):
        model = RoutedClassifier(vocab, seq, d_model, layers, experts, classes)
    tokens = torch.randint(vocab, (batch, seq), device=device)
    labels = torch.randint(classes, (batch,), device=device)
    return model, (tokens, labels)
