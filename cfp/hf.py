"""Hugging Face transformers models as model specs: ``hf:MODEL_TYPE`` or ``hf:path/to/config.json``.

The model is built from its config with random weights (nothing is
downloaded, no network is used); ``--arg key=value`` overrides config fields
(``num_hidden_layers=2``). The workload is the causal-LM training loss:
``forward(input_ids, labels)`` returns the model's ``.loss``.

Attention runs through ``scaled_dot_product_attention`` (``attn_implementation
="sdpa"``): one aten op per layer, forward and backward, that DTensor shards
over batch and heads, rather than the dozen ops of the eager path. A model
transformers has no SDPA attention for (BLOOM, with ALiBi; Mamba, with
none) is built with ``attn_implementation="eager"``, with a warning.
transformers is an optional dependency (``pip install cfp[hf]``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from cfp.errors import CFPError, CFPWarning

ATTN_IMPLEMENTATION = "sdpa"
DEFAULT_BATCH, DEFAULT_SEQ = 1, 128


def _causal_lm(transformers, target: str, config, device: str, dtype: torch.dtype) -> nn.Module:
    """The model with SDPA attention, or with eager attention where transformers has no SDPA one for it
    (BLOOM; models without attention, such as Mamba, refuse the option too)."""

    def build_with(attention: str) -> nn.Module:
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)

    try:
        return build_with(ATTN_IMPLEMENTATION)
    except ValueError as exc:
        if ATTN_IMPLEMENTATION not in str(exc) and "scaled_dot_product_attention" not in str(exc):
            raise
        warnings.warn(
            f"hf:{target}: transformers has no {ATTN_IMPLEMENTATION} attention for {type(config).__name__}; "
            'it is built with attn_implementation="eager"',
            CFPWarning,
            stacklevel=3,
        )
        return build_with("eager")


class CausalLMLoss(nn.Module):
    """A transformers causal LM whose ``forward(input_ids, labels)`` returns the training loss."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, labels=labels, use_cache=False).loss


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise CFPError(
            "Model specs hf:... need Hugging Face transformers: pip install 'cfp[hf]' (or pip install transformers)."
        ) from exc
    return transformers


def load_config(target: str, overrides: dict):
    """The config a spec's target names: a model type, a config.json, or a directory holding one."""
    transformers = _transformers()
    path = Path(target)
    if path.suffix == ".json" or path.is_dir() or "/" in target:
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise CFPError(
                f"Model spec hf:{target}: {file} does not exist (give a config.json or a directory holding one)."
            )
        try:
            fields = json.loads(file.read_text())
            model_type = fields.pop("model_type")
            return transformers.AutoConfig.for_model(
                model_type, **_rederived(transformers, model_type, fields, overrides)
            )
        except Exception as exc:
            raise CFPError(
                f"Model spec hf:{target}: {file} is not a transformers config: {type(exc).__name__}: {exc}"
            ) from exc
    try:
        return transformers.AutoConfig.for_model(target, **overrides)
    except ValueError as exc:
        raise CFPError(
            f"Model spec hf:{target}: transformers {transformers.__version__} knows no model type {target!r} "
            f"(e.g. gpt2, llama, mixtral, qwen2, gemma), and there is no config file of that name."
        ) from exc


def _rederived(transformers, model_type: str, fields: dict, overrides: dict) -> dict:
    """The file's fields with the overrides, less the per-layer lists the config derives from
    other fields (``layer_types`` from ``num_hidden_layers``): left as saved they would
    contradict an override such as ``num_hidden_layers=2``."""
    derived = []
    for key, value in fields.items():
        if isinstance(value, list) and key not in overrides:
            rest = {k: v for k, v in fields.items() if k != key}
            if getattr(transformers.AutoConfig.for_model(model_type, **rest), key, None) == value:
                derived.append(key)
    return {**{k: v for k, v in fields.items() if k not in derived}, **overrides}


def build(
    target: str,
    batch: int = DEFAULT_BATCH,
    seq: int = DEFAULT_SEQ,
    device: str = "cpu",
    dtype: str = "float32",
    **overrides,
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The causal LM ``target`` names, randomly initialised (seed 0) on ``device``, and a random batch."""
    transformers = _transformers()
    config = load_config(target, overrides)
    known = type(config)()  # transformers keeps unknown keyword arguments as attributes: check a default one
    unknown = [key for key in overrides if not hasattr(known, key)]
    if unknown:
        raise CFPError(
            f"Model spec hf:{target}: its config ({type(config).__name__}) has no field {', '.join(unknown)}."
        )
    config.use_cache = False
    torch.manual_seed(0)
    try:
        lm = _causal_lm(transformers, target, config, device, getattr(torch, dtype))
    except ValueError as exc:
        raise CFPError(
            f"Model spec hf:{target}: transformers cannot build a causal LM from this config: {exc}"
        ) from exc
    lm.train()
    vocab = lm.get_input_embeddings().num_embeddings
    input_ids = torch.randint(vocab, (batch, seq), device=device)
    labels = torch.randint(vocab, (batch, seq), device=device)
    return CausalLMLoss(lm), (input_ids, labels)
