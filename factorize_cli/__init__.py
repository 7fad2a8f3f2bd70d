"""factorize: shrink PyTorch checkpoints by low-rank factorization.

The public Python API is imported lazily so that ``factorize --help`` never
imports torch::

    from factorize_cli import FactorizeConfig, factorize_, factorize_state_dict
    from factorize_cli import FactorizedLinear, FactorizedConv2d, convert_to_factorized
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FactorizeConfig": "factorize_cli.config",
    "SelectionConfig": "factorize_cli.config",
    "RatioPolicy": "factorize_cli.config",
    "FactorizedLinear": "factorize_cli.modules",
    "FactorizedConv1d": "factorize_cli.modules",
    "FactorizedConv2d": "factorize_cli.modules",
    "convert_to_factorized": "factorize_cli.modules",
    "read_rank_map": "factorize_cli.modules",
    "factorize_": "factorize_cli.api",
    "load_pretrained": "factorize_cli.hf",
    "factorize_state_dict": "factorize_cli.pipeline",
    "plan_checkpoint": "factorize_cli.pipeline",
    "apply_checkpoint": "factorize_cli.pipeline",
    "low_rank_factors": "factorize_cli.factorization",
    "collect_activation_stats": "factorize_cli.calibration",
    "save_activation_stats": "factorize_cli.calibration",
    "load_activation_stats": "factorize_cli.calibration",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'factorize_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
