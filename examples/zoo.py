"""Plain ``nn.Module`` factories built from torch.nn parts, as a user would write them for CFP.

A factory returns ``(model, inputs)``: a module whose ``forward(*inputs)``
returns the training loss, and a batch. ``cfp plan examples/zoo.py:encoder
--mesh 2`` plans one; ``--arg key=value`` sets a keyword argument.

- ``encoder``: a ``torch.nn.TransformerEncoder`` sequence classifier (token
  embedding, learned positions, mean pooling, a linear head).
- ``convnet``: a small CNN with ``BatchNorm2d`` (running statistics updated
  in place while training) and a linear classifier.
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
