"""``torch.save`` files (zip and legacy) and in-memory state dicts."""

from __future__ import annotations

import collections
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from factorize_cli.errors import InputError, UnsafePickleError, describe
from factorize_cli.formats.base import Checkpoint, TensorInfo, dtype_name, shared_storage

# Keys under which training code commonly nests the model's state dict, most specific first.
CONTAINER_KEYS = (
    "state_dict", "model_state_dict", "model_state", "model", "module",
    "net", "network", "weights", "params", "ema", "ema_state_dict",
)


class MappingReader:
    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        pass


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and all(isinstance(v, torch.Tensor) or _is_plain_extra(v) for v in obj.values())
    )


def _is_plain_extra(value: Any) -> bool:
    # Some state dicts carry small non-tensor entries (e.g. `_extra_state` values); keep them as they are.
    return isinstance(value, (int, float, str, bool, type(None), bytes))


def locate_state_dict(obj: Any, source: str) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    """Find the state dict inside a loaded object; return the key path to it and the dict."""
    if _is_state_dict(obj):
        return (), obj
    if isinstance(obj, torch.nn.Module):
        raise InputError(f"{source}: holds a whole pickled nn.Module, not a state dict; "
                         "save `model.state_dict()` instead")
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return (key,), obj[key]
        for outer, value in obj.items():
            if isinstance(value, Mapping):
                for key in CONTAINER_KEYS:
                    if key in value and _is_state_dict(value[key]):
                        return (outer, key), value[key]
        found = [k for k, v in obj.items() if _is_state_dict(v)]
        if len(found) == 1:
            return (found[0],), obj[found[0]]
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        hint = f"several hold tensors ({', '.join(map(repr, found))})" if found else "none holds a state dict"
        raise InputError(f"{source}: no state dict found among top-level keys {keys}: {hint}")
    raise InputError(f"{source}: holds a {type(obj).__name__}, not a state dict")


def checkpoint_from_mapping(state_dict: Mapping[str, Any], *, path: str = "<memory>",
                            fmt: str = "memory", container: Any = None,
                            container_path: tuple[str, ...] = ()) -> Checkpoint:
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    infos = [TensorInfo(k, tuple(t.shape), dtype_name(t.dtype)) for k, t in tensors.items()]
    extras = {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    return Checkpoint(
        path=path, format=fmt, infos=infos, reader=MappingReader(tensors),
        container=container if container is not None else state_dict,
        container_path=container_path, passthrough=extras, tied=shared_storage(tensors),
    )


def load_torch_object(path: Path, *, unsafe_pickle: bool) -> Any:
    """``torch.load`` on the CPU, memory-mapped when it can be, safe unless the user opted out."""
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch's loader warnings would break the one-line error contract
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=is_zip)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "weights_only" in text or "WeightsUnpickler" in text:
            raise UnsafePickleError(
                f"{path}: refused by safe loading (weights_only=True): {_unpickler_reason(text)}; "
                "if you trust this file, rerun with --unsafe-pickle (it executes code from the file)"
            ) from e
        raise InputError(f"{path}: not a readable torch.save file ({describe(e)})") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError,
            AttributeError, ImportError, IndexError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable torch.save file ({describe(e)})") from e


def open_torch_file(path: Path, *, unsafe_pickle: bool) -> Checkpoint:
    obj = load_torch_object(path, unsafe_pickle=unsafe_pickle)
    prefix, state_dict = locate_state_dict(obj, str(path))
    return checkpoint_from_mapping(
        state_dict, path=str(path), fmt="torch-zip" if zipfile.is_zipfile(path) else "torch-legacy",
        container=obj, container_path=prefix,
    )


def _unpickler_reason(text: str) -> str:
    """The useful sentence of torch's long weights_only message."""
    _, found, rest = text.partition("WeightsUnpickler error:")
    reason = rest.strip() if found else text.strip()
    return reason.split("\n")[0].split(". ")[0].strip()[:160] or "unsupported content"


def build_container(checkpoint: Checkpoint, new_state: dict[str, Any]) -> Any:
    """The input's container with its state dict replaced; every other entry kept as it was."""
    original = checkpoint.container
    path = checkpoint.container_path
    state = _like(_get_path(original, path) if original is not None else None, new_state)
    if not path or original is None:
        return state
    return _replace_path(original, path, state)


def _get_path(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _replace_path(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    head, *rest = path
    copy = obj.copy() if hasattr(obj, "copy") else dict(obj)
    copy[head] = value if not rest else _replace_path(obj[head], tuple(rest), value)
    return copy


def _like(original: Any, items: dict[str, Any]) -> Any:
    out = collections.OrderedDict(items)
    metadata = getattr(original, "_metadata", None)
    if metadata is not None:  # module versions used by load_state_dict
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)

