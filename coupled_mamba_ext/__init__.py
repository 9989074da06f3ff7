"""coupled_mamba_ext: the Coupled Mamba coupled selective scan as a PyTorch operator
(C++ CPU and CUDA kernels), the Coupled Mamba fusion model and its baselines."""
__version__ = "0.1.0"

from .ops import build_info, coupled_selective_scan, coupled_selective_state_update  # noqa: E402
from .mamba_compat import coupled_selective_scan_fn  # noqa: E402
from .models import CoupledMamba, CoupledMambaLayer, CoupledMambaStack  # noqa: E402

__all__ = ["build_info", "coupled_selective_scan", "coupled_selective_scan_fn",
           "coupled_selective_state_update", "CoupledMamba", "CoupledMambaLayer",
           "CoupledMambaStack"]
