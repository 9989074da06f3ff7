"""Plain-PyTorch reference of the coupled selective scan (docs/contract.md).

A loop over time, written to be read next to the specification, not to be fast. It is the
ground truth of every test: run it in float64 and compare. Autograd through it gives the
reference gradients.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F


def _coupling_weights(coupling: Optional[torch.Tensor], M: int, like: torch.Tensor) -> torch.Tensor:
    if coupling is None:
        return torch.full((M,), 1.0 / M, dtype=like.dtype, device=like.device)
    return coupling.to(like.dtype)


def coupled_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     coupling=None, initial_state=None, return_final_state=False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Coupled selective scan, one time step at a time.

    Shapes: u, delta, z (M, batch, dim, L); A (M, dim, N); B, C (M, batch, N, L);
    D, delta_bias (M, dim); coupling (M,) (default 1/M); initial_state (batch, dim, N).
    Computes in the dtype of ``u`` promoted to at least float32 (pass float64 for a reference).
    Returns y (M, batch, dim, L) in that dtype, and the final coupled state (batch, dim, N)
    when ``return_final_state``.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, B, C = (x.to(dtype) for x in (u, delta, B, C))
    A = A.to(dtype)
    M, batch, dim, L = u.shape
    N = A.shape[-1]
    w = _coupling_weights(coupling, M, u)

    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)

    G = (initial_state.to(dtype) if initial_state is not None
         else u.new_zeros(batch, dim, N))
    ys = []
    for t in range(L):
        dt = delta[..., t]                                              # (M, batch, dim)
        a = torch.exp(dt[..., None] * A[:, None])                       # (M, batch, dim, N)
        b = (dt * u[..., t])[..., None] * B[:, :, None, :, t]           # (M, batch, dim, N)
        h = a * G + b                                                   # every modality starts from G[t-1]
        ys.append((h * C[:, :, None, :, t]).sum(-1))                    # (M, batch, dim)
        G = (w[:, None, None, None] * h).sum(0)                         # the coupled state G[t]
    y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(M, batch, dim, 0)
    if D is not None:
        y = y + D.to(dtype)[:, None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return (y, G) if return_final_state else y


def coupled_state_update_ref(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, coupling=None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the coupled scan: u, delta, z (M, batch, dim); B, C (M, batch, N);
    state (batch, dim, N). Returns (y (M, batch, dim), new_state (batch, dim, N))."""
    y, new_state = coupled_scan_ref(
        u[..., None], delta[..., None], A, B[..., None], C[..., None], D,
        None if z is None else z[..., None], delta_bias, delta_softplus, coupling,
        initial_state=state, return_final_state=True)
    return y[..., 0], new_state


def mamba_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False) -> torch.Tensor:
    """Mamba's (uncoupled) selective scan for one modality, as a plain loop.

    u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L); D, delta_bias (dim,).
    Written independently of ``coupled_scan_ref`` so that M = 1, w = 1 can be checked
    against it.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    batch, dim, L = u.shape
    x = u.new_zeros(batch, dim, A.shape[-1], dtype=dtype)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    ys = []
    for t in range(L):
        dA = torch.exp(delta[:, :, t, None] * A)                        # (batch, dim, N)
        dBu = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        x = dA * x + dBu
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, t]))
    y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(batch, dim, 0, dtype=dtype)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y
