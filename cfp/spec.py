"""Model specs: how a command names the model it works on.

A spec is one of

- ``path/to/file.py:factory``  a factory function in a Python file,
- ``package.module:factory``   a factory function in an importable module,
- ``gpt:gpt2-xl``              a preset of one of CFP's example models,
- ``hf:llama``, ``hf:path/config.json``  a Hugging Face transformers causal LM
  built from a model type's default config or a checkpoint's (``cfp.hf``).

A factory is called as ``factory(**kwargs)`` and returns ``(model, inputs)``:
an ``nn.Module`` whose forward returns the training loss, and a tuple of
example inputs. ``--batch``, ``--seq``, ``--device`` and ``--arg key=value``
become keyword arguments.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfp.errors import CFPError

EXAMPLES = ("gpt", "llama", "moe")


@dataclass(frozen=True)
class ModelSpec:
    """What to build: the spec string plus the keyword overrides."""

    spec: str
    batch: int | None = None
    seq: int | None = None
    device: str = "cpu"
    args: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.args)
        if self.batch is not None:
            kwargs["batch"] = self.batch
        if self.seq is not None:
            kwargs["seq"] = self.seq
        kwargs["device"] = self.device
        return kwargs

    def describe(self) -> str:
        extra = [f"{k}={v}" for k, v in self.kwargs().items()]
        return f"{self.spec} ({', '.join(extra)})"


@dataclass
class Workload:
    """A built model and the example inputs of one training step."""

    spec: ModelSpec
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]


def parse_args(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ``["n_layer=12", "tie_weights=False"]`` into typed keyword args."""
    args: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CFPError(f"--arg {pair!r} is not of the form key=value.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(raw.lower(), raw)  # a bare word such as float32 stays a string
        args[key.strip()] = value
    return args


def resolve_factory(spec: str) -> Callable[..., Any]:
    """Find the factory a spec names, or say clearly why it cannot be found."""
    if spec.startswith("hf:") and spec[3:]:
        from cfp import hf

        return lambda **kw: hf.build(spec[3:], **kw)
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CFPError(
            f"Model spec {spec!r} is not of the form 'path/to/file.py:factory', "
            f"'package.module:factory', 'hf:MODEL_TYPE' or a preset such as 'gpt:gpt2-xl' "
            f"(examples: {', '.join(EXAMPLES)})."
        )
    if target in EXAMPLES:
        module = importlib.import_module(f"examples.{target}")
        presets = module.PRESETS
        if name not in presets:
            raise CFPError(f"Example {target!r} has no preset {name!r}; presets: {', '.join(presets)}.")
        return lambda **kw: module.build(preset=name, **kw)
    module = _import_target(spec, target)
    factory = getattr(module, name, None)
    if not callable(factory):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
        raise CFPError(
            f"Model spec {spec!r}: {target} has no callable {name!r}. "
            f"Functions it defines: {', '.join(found) or 'none'}."
        )
    return factory


def _import_target(spec: str, target: str):
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise CFPError(f"Model spec {spec!r}: the file {target} does not exist.")
        module_name = f"cfp_user_{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as exc:
            raise CFPError(
                f"Model spec {spec!r}: importing {target} failed with "
                f"{type(exc).__name__}: {exc}. Run with --debug for the traceback."
            ) from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise CFPError(
            f"Model spec {spec!r}: no module named {exc.name!r} can be imported. "
            f"Name a file as path/to/file.py:factory or a module on PYTHONPATH."
        ) from exc
    except Exception as exc:
        raise CFPError(
            f"Model spec {spec!r}: importing {target} failed with "
            f"{type(exc).__name__}: {exc}. Run with --debug for the traceback."
        ) from exc


def build(spec: ModelSpec) -> Workload:
    """Call the spec's factory and check it returned ``(model, inputs)``."""
    factory = resolve_factory(spec.spec)
    check_kwargs(spec)
    try:
        result = factory(**spec.kwargs())
    except CFPError:
        raise
    except Exception as exc:
        raise CFPError(
            f"Model spec {spec.describe()}: the factory raised "
            f"{type(exc).__name__}: {exc}. Run with --debug for the traceback."
        ) from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise CFPError(
            f"Model spec {spec.spec!r}: the factory must return (model, inputs), "
            f"an nn.Module and a tuple of example inputs; it returned {type(result).__name__}."
        )
    model, inputs = result
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    check_sizes(spec, model, inputs)
    return Workload(spec=spec, model=model, inputs=inputs)


def check_kwargs(spec: ModelSpec) -> None:
    """Refuse sizes that cannot be right before the factory runs: a batch or sequence below 1, a negative count."""
    for key, value in spec.kwargs().items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        flag = f"--{key}" if key in ("batch", "seq") else f"--arg {key}="
        if key in ("batch", "seq") and value < 1:
            raise CFPError(f"Model spec {spec.spec!r}: {flag} {value} is not a size; it must be at least 1.")
        if value < 0:
            raise CFPError(f"Model spec {spec.spec!r}: {flag}{value} is negative; sizes and counts cannot be.")


def check_sizes(spec: ModelSpec, model: nn.Module, inputs: tuple) -> None:
    """Refuse a built model with an empty input or parameter: nothing would be computed, and DTensor hangs on it."""
    named = [(f"input {i}", t) for i, t in enumerate(inputs)] + [
        (f"parameter {n}", p) for n, p in model.named_parameters()
    ]
    for what, t in named:
        if isinstance(t, torch.Tensor) and 0 in t.shape:
            raise CFPError(
                f"Model spec {spec.describe()}: {what} has shape {tuple(t.shape)}, with a zero-size dimension. "
                f"Check --batch, --seq and the --arg sizes."
            )
