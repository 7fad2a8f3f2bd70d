"""Hugging Face model folders as runnable models: ``load_pretrained(folder)``.

A folder with a ``config.json`` is a model. :func:`load_pretrained` builds the class its config names
(``architectures[0]`` when transformers has it, else the AutoModel of its ``model_type``), puts the
factorized pairs where the folder's rank map says (none for an original folder), and loads every
tensor of the folder into it strictly: each tensor lands in the model, and each parameter and
persistent buffer of the model comes from the folder, except those transformers ties to another one
(``lm_head.weight`` to the input embeddings), checked by storage after tying. Tensors of buffers the
model computes itself (``position_ids``, saved by older transformers) are the one thing left out. Offline, no remote code.

transformers is an optional extra (``pip install 'factorize-cli[hf]'``), imported only here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from factorize_cli.errors import InputError, UsageError
from factorize_cli.formats.hfmodel import is_model_folder
from factorize_cli.orientation import CONFIG_NAME

__all__ = ["import_transformers", "is_model_folder", "load_pretrained", "model_class", "rank_map"]


def import_transformers() -> Any:
    """transformers, or a one-line error naming the extra that installs it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise UsageError("Hugging Face folders need transformers: pip install 'factorize-cli[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    return transformers


def model_class(folder: Path) -> tuple[Any, Any]:
    """``(config, class)`` of the folder's model, or a one-line error when transformers does not know it."""
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError... on configs it does not know
        from factorize_cli.errors import describe

        raise InputError(f"{folder / CONFIG_NAME}: transformers cannot read this config ({describe(e, 160)})") from None
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None or not hasattr(cls, "config_class"):
        mapping = transformers.AutoModel._model_mapping
        try:
            cls = mapping[type(config)]
        except KeyError:
            raise InputError(f"{folder / CONFIG_NAME}: architecture {names[0] if names else config.model_type!r} is not "
                             f"one transformers {transformers.__version__} knows") from None
    return config, cls


def rank_map(folder: Path) -> dict[str, int]:
    """The rank map a factorized folder carries (empty for an original folder)."""
    from factorize_cli.modules import read_rank_map

    try:
        return read_rank_map(folder)
    except InputError:
        return {}


def load_pretrained(folder: str | os.PathLike, *, device: str = "cpu", dtype: Any = None) -> Any:
    """The transformers model of ``folder`` (an original or a factorized one), weights loaded strictly,
    in eval mode, ready to run. ``dtype`` defaults to the dtype of the folder's floating weights."""
    import torch

    from factorize_cli.formats import open_checkpoint
    from factorize_cli.modules import convert_to_factorized

    folder = Path(folder)
    if not is_model_folder(folder):
        raise InputError(f"{folder}: not a Hugging Face model folder (no {CONFIG_NAME})")
    config, cls = model_class(folder)
    transformers = import_transformers()
    with _no_init(transformers):
        model = cls(config)
    with open_checkpoint(folder) as checkpoint:  # the weights transformers would read, in any layout
        tensors = {info.key: checkpoint.get(info.key) for info in checkpoint.infos}
    if dtype is None:
        floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
        dtype = max(set(floating), key=floating.count) if floating else torch.float32
    model.to(dtype)
    names = _name_mapper(model, tensors)
    convert_to_factorized(model, {names(k + ".weight").removesuffix(".weight"): r for k, r in rank_map(folder).items()})
    state = {names(k): v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    computed = {name for name, _ in model.named_buffers()}  # non-persistent: the model makes them (position_ids)
    unexpected = [k for k in unexpected if k not in computed]
    if unexpected:
        raise InputError(f"{folder}: {len(unexpected)} tensor(s) the model has no place for, e.g. {unexpected[0]}")
    untied = _untied(model, missing)
    if untied:
        raise InputError(f"{folder}: {len(untied)} weight(s) of the model missing from the folder, e.g. {untied[0]}")
    return model.to(device).eval()


def _no_init(transformers: Any) -> Any:
    """transformers' context that skips random initialisation (weights are loaded right after)."""
    from contextlib import nullcontext

    for owner in ("initialization", "modeling_utils"):  # 5.x, 4.x
        make = getattr(getattr(transformers, owner, None), "no_init_weights", None)
        if make is not None:
            return make()
    return nullcontext()


def _name_mapper(model: Any, tensors: dict[str, Any]) -> Any:
    """Checkpoint key -> model key: the base model's prefix is added or dropped when only that differs
    (``h.0.attn.c_attn.weight`` in a GPT2LMHeadModel is ``transformer.h.0.attn.c_attn.weight``, and a
    GPT2Model reads a GPT2LMHeadModel's ``transformer.h.0...``). A factorized pair's keys
    (``<layer>.module0.weight``) follow their layer, which the model has before conversion."""
    expected = set(model.state_dict())
    modules = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "") or ""

    def known(key: str) -> bool:
        return key in expected or key.rsplit(".", 2)[0] in modules and key.rsplit(".", 1)[0] not in modules

    def name(key: str) -> str:
        if key in expected or not prefix:
            return key
        if known(f"{prefix}.{key}"):
            return f"{prefix}.{key}"
        if key.startswith(prefix + ".") and known(key[len(prefix) + 1:]):
            return key[len(prefix) + 1:]
        return key

    return name


def _untied(model: Any, missing: list[str]) -> list[str]:
    """The missing keys that are not tied to a loaded tensor (same storage after ``tie_weights``)."""
    state = model.state_dict()
    loaded = {t.untyped_storage().data_ptr() for k, t in state.items() if k not in missing and t.numel()}
    return [k for k in missing if state[k].untyped_storage().data_ptr() not in loaded]


def read_config(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())
