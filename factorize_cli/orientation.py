"""What a checkpoint says about its own layers: module types from a ``config.json`` beside it.

transformers' ``Conv1D`` (GPT-2 and its family) stores its weight ``in x out`` and computes
``x @ W + b``; shapes alone cannot tell it from an ``nn.Linear`` (a square ``c_proj``). A Hugging
Face ``config.json`` beside the weights can: a skeleton of the model built on the ``meta`` device
(no weights, no memory) has every module's type. :func:`read_structure` takes a checkpoint's path
(a file, or a folder of shards) and returns those facts by module name, for any format; when
there is no ``config.json``, transformers is missing or does not know the architecture, it
returns no facts and a note, and selection falls back to what the keys and biases prove.

torch and transformers are imported only when a ``config.json`` is found.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from factorize_cli.geometry import LayerKind

CONFIG_NAME = "config.json"


class Orientation(str, Enum):
    OUT_IN = "out-in"  # nn.Linear / nn.Conv1d / nn.Conv2d: the weight is out x in (x k...)
    IN_OUT = "in-out"  # transformers Conv1D: the weight is in x out, y = x @ W + b


@dataclass(frozen=True)
class ModuleFact:
    """One module of the skeleton: its type, and how its weight is stored when it is a layer we factorize."""

    type_name: str  # the class name, e.g. "Conv1D", "Linear", "Embedding"
    kind: LayerKind | None  # None: not a layer this tool factorizes
    weight_shape: tuple[int, ...] | None  # the skeleton's weight shape (None: no weight parameter)
    orientation: Orientation = Orientation.OUT_IN
    groups: int = 1


@dataclass(frozen=True)
class Structure:
    """Module facts by module name; empty (with a note saying why) when the checkpoint says nothing."""

    source: str = ""  # e.g. "config.json's GPT2LMHeadModel"
    modules: Mapping[str, ModuleFact] = field(default_factory=dict)
    prefix: str = ""  # the base model's attribute (transformers' base_model_prefix, e.g. "transformer")
    note: str | None = None  # what the report should say about where orientation came from

    def module(self, name: str) -> ModuleFact | None:
        """The module a state-dict layer name belongs to, with or without the base model prefix
        (``transformer.h.0.attn.c_attn`` and ``h.0.attn.c_attn`` are the same layer)."""
        if not self.modules:
            return None
        if name in self.modules:
            return self.modules[name]
        if not self.prefix:
            return None
        if name.startswith(self.prefix + ".") and (found := self.modules.get(name[len(self.prefix) + 1:])):
            return found
        return self.modules.get(f"{self.prefix}.{name}")


def is_transformers_conv1d(module: Any) -> bool:
    """transformers' ``Conv1D`` (weight ``nx x nf``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def module_fact(module: Any) -> ModuleFact:
    """What a live module is, for factorizing: exact torch types only (a subclass may not call its
    weight as a layer: nn.MultiheadAttention's out_proj is read directly)."""
    import torch
    from torch import nn

    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    if is_transformers_conv1d(module):
        return ModuleFact("Conv1D", LayerKind.LINEAR, shape, Orientation.IN_OUT)
    kind = {nn.Linear: LayerKind.LINEAR, nn.Conv1d: LayerKind.CONV1D, nn.Conv2d: LayerKind.CONV2D}.get(type(module))
    return ModuleFact(type(module).__name__, kind, shape, groups=int(getattr(module, "groups", 1)))


def config_file(path: str | os.PathLike) -> Path | None:
    """The ``config.json`` that describes a checkpoint: in its folder, or in the sharded folder itself."""
    path = Path(path)
    if not path.exists():
        return None
    candidate = (path if path.is_dir() else path.parent) / CONFIG_NAME
    return candidate if candidate.is_file() else None


def read_structure(path: str | os.PathLike) -> Structure:
    """Module facts from the Hugging Face ``config.json`` beside ``path``, or none and a note why."""
    config = config_file(path)
    if config is None:
        return Structure()
    fallback = "orientation read from the checkpoint's keys and biases"
    try:
        import transformers
    except ImportError:
        return Structure(note=f"{config} found, but transformers is not installed "
                              f"(pip install 'factorize-cli[hf]'): {fallback}")
    try:
        model, source = _skeleton(transformers, config.parent)
    except Exception as e:  # transformers raises many kinds on configs it does not know
        from factorize_cli.errors import describe

        return Structure(note=f"{config} not used ({describe(e, 120)}): {fallback}")
    modules = {name: module_fact(m) for name, m in model.named_modules() if name}
    prefix = getattr(model, "base_model_prefix", "") or ""
    return Structure(source=source, modules=modules, prefix=prefix,
                     note=f"module types from {source} (built on the meta device)")


def _skeleton(transformers: Any, folder: Path) -> tuple[Any, str]:
    """The model of ``folder``'s config, built on the meta device: the class named in
    ``architectures`` when transformers has it, else the AutoModel of its model type."""
    import torch

    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # config warnings are about generation, not about weights
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        names = getattr(config, "architectures", None) or []
        cls = getattr(transformers, names[0], None) if names else None
        with torch.device("meta"):
            if cls is not None and hasattr(cls, "config_class"):
                return cls(config), f"config.json's {names[0]}"
            return transformers.AutoModel.from_config(config), f"config.json's {config.model_type} AutoModel"
    finally:
        logging.set_verbosity(verbosity)
