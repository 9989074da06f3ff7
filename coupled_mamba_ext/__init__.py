"""coupled_mamba_ext: the Coupled Mamba coupled selective scan as a PyTorch operator
(C++ CPU and CUDA kernels), the Coupled Mamba fusion model and its baselines.

The names below load on first use (so that ``coupled-mamba --help`` answers without
importing torch); using any of them, or ``import coupled_mamba_ext.ops``, registers the
operators as ``torch.ops.coupled_mamba.*``.
"""
import importlib
from typing import Any, List

__version__ = "0.1.0"

_LAZY = {"build_info": "ops", "coupled_selective_scan": "ops",
         "coupled_selective_state_update": "ops", "coupled_selective_scan_fn": "mamba_compat",
         "CoupledMamba": "models", "CoupledMambaLayer": "models", "CoupledMambaStack": "models"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'coupled_mamba_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
