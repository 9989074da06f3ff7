"""coupled_mamba_ext: the Coupled Mamba coupled selective scan as a PyTorch operator
(C++ CPU and CUDA kernels), the Coupled Mamba fusion model and its baselines."""
__version__ = "0.1.0"

from .ops import build_info, coupled_selective_scan, coupled_selective_state_update  # noqa: E402
from .models import CoupledMamba, CoupledMambaLayer  # noqa: E402

__all__ = ["build_info", "coupled_selective_scan", "coupled_selective_state_update",
           "CoupledMamba", "CoupledMambaLayer"]
