"""Hugging Face transformers models as model specs: ``hf:MODEL_TYPE`` or ``hf:path/to/config.json``.

The model is built from its config with random weights (nothing is
downloaded, no network is used); ``--arg key=value`` overrides config fields
(``num_hidden_layers=2``). The workload is the training loss of the first
task transformers has a head for, in the order of ``TASKS``: an
encoder-decoder's sequence-to-sequence LM (T5, BART), an encoder's masked LM
(BERT, RoBERTa), a decoder's causal LM (GPT-2, LLaMA, Mixtral), an image
classifier (ViT, ConvNeXt, ResNet). ``forward(inputs, labels)`` returns the
model's ``.loss``: token ids and target ids for the language models, images
of the config's ``image_size`` and class ids for the classifiers. The
Auto classes' own mappings decide, so no architecture is named here.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cfp.errors import CFPError, CFPWarning

ATTN_IMPLEMENTATION = "sdpa"
DEFAULT_BATCH, DEFAULT_SEQ = 1, 128


@dataclass(frozen=True)
class Task:
    """A training objective transformers has heads for: its Auto class, and what the head's inputs are."""

    name: str
    auto_class: str  # transformers.AutoModelFor...
    mapping: str  # the model types it covers: transformers.models.auto.modeling_auto.MODEL_FOR_..._NAMES
    input_name: str = "input_ids"
    attribute: str = "lm"  # the wrapped model's name in parameter FQNs (lm.model.layers.0...)

    @property
    def images(self) -> bool:
        return self.input_name == "pixel_values"


# The first that has a head for the model type is its workload. An encoder-decoder's objective is the
# sequence-to-sequence LM and an encoder's the masked LM, though transformers also builds a decoder-only
# causal LM from many of them (BertLMHeadModel, BartForCausalLM).
TASKS = (
    Task("sequence-to-sequence LM", "AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    Task("masked LM", "AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    Task("causal LM", "AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    Task(
        "image classifier",
        "AutoModelForImageClassification",
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        input_name="pixel_values",
        attribute="model",
    ),
)


def task_of(config) -> Task | None:
    from transformers.models.auto import modeling_auto

    for task in TASKS:
        if config.model_type in getattr(modeling_auto, task.mapping, {}):
            return task
    return None


def _model(transformers, task: Task, target: str, config, device: str, dtype: torch.dtype) -> nn.Module:
    """The task's model with SDPA attention, or with eager attention where transformers has no SDPA one for
    it (BLOOM; models without attention, such as Mamba, refuse the option too)."""

    from transformers.models.auto import modeling_auto

    heads = getattr(modeling_auto, task.mapping)[config.model_type]
    if isinstance(heads, (tuple, list)) and not getattr(config, "architectures", None):
        # Several heads for one type (DeiT's, with and without a distillation teacher): transformers picks by
        # the config's architectures, which a default config leaves empty. The first is the plain one.
        config.architectures = [heads[0]]

    def build_with(attention: str) -> nn.Module:
        with torch.device(device):
            auto = getattr(transformers, task.auto_class)
            return auto.from_config(config, attn_implementation=attention, dtype=dtype)

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


def image_shape(vision_config, side: int | None = None) -> tuple[int, int, int]:
    """Channels, height and width of a classifier's images: ``side`` x ``side`` if given, else the config's
    image size, else 224 x 224, as convolutional nets that take any size are trained; RGB unless it says."""
    size = side or getattr(vision_config, "image_size", 224)
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    return getattr(vision_config, "num_channels", 3), height, width


class TaskLoss(nn.Module):
    """A transformers model with a task head whose ``forward(inputs, labels)`` returns the training loss."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.add_module(task.attribute, model)
        self.attribute, self.input_name = task.attribute, task.input_name
        # Images have no cache; the language models are told not to build one even where the config forgets.
        self.call_kwargs = {} if task.images else {"use_cache": False}

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = getattr(self, self.attribute)
        return model(**{self.input_name: inputs}, labels=labels, **self.call_kwargs).loss


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
    seq: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    **overrides,
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model ``target`` names with its task's head (``TASKS``), randomly initialised (seed 0) on
    ``device``, and a random batch for it."""
    transformers = _transformers()
    config = load_config(target, overrides)
    known = type(config)()  # transformers keeps unknown keyword arguments as attributes: check a default one
    unknown = [key for key in overrides if not hasattr(known, key)]
    if unknown:
        raise CFPError(
            f"Model spec hf:{target}: its config ({type(config).__name__}) has no field {', '.join(unknown)}."
        )
    task = task_of(config)
    if task is None:
        raise CFPError(
            f"Model spec hf:{target}: transformers has no {', '.join(t.name for t in TASKS)} for model type "
            f"{config.model_type!r}. Write a factory that returns the model and its loss "
            f"(see 'Plan your own model' in the README)."
        )
    vision = getattr(config, "vision_config", None) or config
    if task.images and seq is not None and hasattr(vision, "image_size"):
        vision.image_size = seq  # --seq is the image side, as for examples/zoo.py's convnet
    config.use_cache = False
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        # The decoder's inputs are the labels shifted right after this token; some default configs (T5's) leave it out.
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    torch.manual_seed(0)
    try:
        model = _model(transformers, task, target, config, device, getattr(torch, dtype))
    except ValueError as exc:
        raise CFPError(
            f"Model spec hf:{target}: transformers cannot build a {task.name} from this config: {exc}"
        ) from exc
    model.train()
    if task.images:
        inputs = torch.randn(batch, *image_shape(vision, seq), device=device, dtype=getattr(torch, dtype))
        labels = torch.randint(config.num_labels, (batch,), device=device)
    else:
        vocab = model.get_input_embeddings().num_embeddings
        inputs = torch.randint(vocab, (batch, seq or DEFAULT_SEQ), device=device)
        labels = torch.randint(vocab, (batch, seq or DEFAULT_SEQ), device=device)
    return TaskLoss(model, task), (inputs, labels)
