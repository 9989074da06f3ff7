"""Python side of the ``coupled_mamba`` operators: fake kernels, autograd, public functions.

The schemas and the CPU / CUDA kernels are registered in C++ (``csrc/``) when the compiled
extension ``coupled_mamba_ext._C`` is imported. Argument checking lives there too, so that
``torch.ops.coupled_mamba.*`` called directly gives the same clear errors as the functions
below.
"""
from typing import Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _C  # registers the operators; its constants describe the build

# Forward keeps the coupled state only at the start of every chunk of this many steps;
# backward recomputes the states inside a chunk. Must match kChunkLen in include/.
CHUNK_LEN = _C.CHUNK_LEN


def _n_chunks(L: int) -> int:
    return (L + CHUNK_LEN - 1) // CHUNK_LEN


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- fake kernels
# The dispatcher sends a call with any argument on the meta device here, whatever the
# devices of the others (meta outranks every backend), so the C++ kernels' device check
# never sees it: without this one, meta arguments next to CPU ones gave uninitialised CPU
# outputs. The message is the C++ check's.
def _check_devices(op: str, tensors: dict) -> None:
    """Every tensor of ``tensors`` (name -> tensor or None) on the device of tensors["u"]."""
    device = tensors["u"].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"{op}: argument '{name}' expected device {device} (the device "
                               f"of u), got {t.device}")


@torch.library.register_fake("coupled_mamba::scan")
def _scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, initial_state):
    _check_devices("coupled_selective_scan", dict(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, coupling=coupling,
        initial_state=initial_state))
    M, batch, dim, L = u.shape
    N = A.shape[-1]
    acc = _compute_dtype(u.dtype)
    y = u.new_empty((M, batch, dim, L))
    final_state = u.new_empty((batch, dim, N), dtype=acc)
    chunk_states = u.new_empty((batch, dim, _n_chunks(L) * N), dtype=acc)  # coupled_scan.cpp
    y_ungated = u.new_empty((M, batch, dim, L) if z is not None else (0,))
    return y, final_state, chunk_states, y_ungated


@torch.library.register_fake("coupled_mamba::scan_backward")
def _scan_backward_fake(dy, dfinal_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                        coupling, initial_state, chunk_states, y_ungated):
    _check_devices("coupled_selective_scan backward", dict(  # in the C++ check's order
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, coupling=coupling,
        initial_state=initial_state, dy=dy, dfinal_state=dfinal_state,
        chunk_states=chunk_states, y_ungated=y_ungated))

    def like(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if x is not None \
            else u.new_empty((0,), dtype=A.dtype)
    batch, dim, N = u.shape[1], u.shape[2], A.shape[-1]
    d_initial = u.new_empty((batch, dim, N), dtype=A.dtype) if initial_state is not None \
        else u.new_empty((0,), dtype=A.dtype)
    return (like(u), like(delta), like(A), like(B), like(C), like(D), like(z),
            like(delta_bias), like(coupling), d_initial)


@torch.library.register_fake("coupled_mamba::state_update")
def _state_update_fake(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling):
    _check_devices("coupled_selective_state_update", dict(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, coupling=coupling,
        state=state))
    return u.new_empty(u.shape), torch.empty_like(state, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------- autograd
def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, initial_state = inputs
    _, _, chunk_states, y_ungated = output
    ctx.delta_softplus = delta_softplus
    ctx.has = [x is not None for x in (D, z, delta_bias, initial_state)]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, coupling, initial_state,
                          chunk_states, y_ungated)


def _scan_backward(ctx, dy, dfinal_state, _d_chunk_states, _d_y_ungated):
    (u, delta, A, B, C, D, z, delta_bias, coupling, initial_state,
     chunk_states, y_ungated) = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    grads = torch.ops.coupled_mamba.scan_backward(
        dy, dfinal_state, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, coupling,
        initial_state, chunk_states, y_ungated)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dcoupling, dinitial = grads
    has_D, has_z, has_bias, has_init = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None,
            ddelta_bias if has_bias else None, None, dcoupling,
            dinitial if has_init else None)


torch.library.register_autograd("coupled_mamba::scan", _scan_backward,
                                setup_context=_scan_setup_context)


# Without an autograd kernel, PyTorch lets a backward through these ops run and only warns,
# leaving zero gradients (a gradient penalty through the scan's gradient silently came out
# 0); so a backward through them raises instead, when it runs (create_graph=True alone is
# fine as long as nothing differentiates the result).
def _raise_on_backward(message: str):
    def backward(ctx, *grads):
        raise RuntimeError(message)
    return backward


torch.library.register_autograd("coupled_mamba::scan_backward", _raise_on_backward(
    "coupled_selective_scan: differentiating its gradient (double backward, e.g. "
    "torch.autograd.grad(..., create_graph=True) and then a backward through that "
    "gradient) is not implemented"))
torch.library.register_autograd("coupled_mamba::state_update", _raise_on_backward(
    "coupled_selective_state_update is not differentiable (it serves streaming "
    "inference); train through coupled_selective_scan"))


# ---------------------------------------------------------------------------- public API
def _refuse_forward_ad(op: str, *tensors: Optional[Tensor]) -> None:
    """Forward-mode differentiation (torch.func.jvp, torch.autograd.forward_ad) has no rule
    for these operators, and PyTorch runs a custom operator on dual tensors by dropping
    their tangents: the result's tangent came out zero, silently. Raise instead. Only looked
    at inside a dual level or a torch.func transform (cheap otherwise), not under
    torch.compile (which does not trace forward AD)."""
    if torch.compiler.is_compiling():
        return
    # Private PyTorch state; where a version lacks it, the tangents are always looked at.
    level = getattr(fwAD, "_current_level", None)
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if level is not None and level < 0 and peek is not None and peek() is None:
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(f"{op}: forward-mode differentiation (torch.func.jvp, "
                           "torch.autograd.forward_ad) is not implemented; use reverse mode "
                           "(backward, torch.autograd.grad)")


def _check_tensor_arguments(op: str, required: dict, optional: dict) -> None:
    """A TypeError naming the argument for anything but a tensor (or None where optional):
    a list of per-modality tensors, say, would otherwise fail deep inside with an
    AttributeError."""
    for name, value in {**required, **optional}.items():
        if isinstance(value, Tensor) or (value is None and name in optional):
            continue
        expected = "a torch.Tensor" + (" or None" if name in optional else "")
        hint = ""
        if isinstance(value, (list, tuple)):
            hint = "; stack per-modality tensors along a new first dim (M, ...)"
            if op == "coupled_selective_scan":
                hint += ", or pass the lists to coupled_selective_scan_fn (mamba_ssm's layouts)"
        elif isinstance(value, bool) and op == "coupled_selective_scan":
            hint = ("; a positional call written for mamba_ssm's selective_scan_fn, whose "
                    "arguments after delta_bias are delta_softplus, return_last_state? Call "
                    "coupled_selective_scan_fn")
        raise TypeError(f"{op}: argument '{name}' expected {expected}, got "
                        f"{type(value).__name__}{hint}")


def _default_coupling(coupling: Optional[Tensor], u: Tensor) -> Tensor:
    if coupling is not None:
        return coupling
    # No modality (or u of no dimension) is left to the operator's check, which names it.
    M = u.shape[0] if u.dim() > 0 else 0
    return torch.full((M,), 1.0 / max(M, 1), dtype=_compute_dtype(u.dtype), device=u.device)


def coupled_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
    coupling: Optional[Tensor] = None, initial_state: Optional[Tensor] = None,
    return_final_state: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Coupled selective scan over M modalities (docs/contract.md), differentiable in every tensor
    (once: a backward through its gradient raises RuntimeError).

    Args:
        u, delta: (M, batch, dim, L) inputs and time steps; fp32, fp16 or bf16 (fp64 on CPU).
        A: (M, dim, N) state matrix (diagonal, negative in practice), fp32.
        B, C: (M, batch, N, L) input and output projections, u's dtype.
        D: (M, dim) skip connection, fp32. z: (M, batch, dim, L) gate, u's dtype.
        delta_bias: (M, dim), fp32, added to delta; delta_softplus applies softplus after.
        coupling: (M,) weights w of the coupled state G[t] = sum_m w[m] h[m, t], fp32;
            default 1/M (stable). Ones reproduce the paper's plain sum (grows like M^t).
        initial_state: (batch, dim, N) coupled state G[0], fp32; default zeros.
        return_final_state: also return G[L] (batch, dim, N), fp32.

    Returns:
        y (M, batch, dim, L) in u's dtype; with ``return_final_state``, ``(y, final_state)``.
    Parameters given in float64 need float64 inputs (for gradcheck); otherwise float32.
    A tensor argument of another type (a list, say) raises TypeError naming it.
    """
    _check_tensor_arguments("coupled_selective_scan", dict(u=u, delta=delta, A=A, B=B, C=C),
                            dict(D=D, z=z, delta_bias=delta_bias, coupling=coupling,
                                 initial_state=initial_state))
    _refuse_forward_ad("coupled_selective_scan", u, delta, A, B, C, D, z, delta_bias, coupling,
                       initial_state)
    coupling = _default_coupling(coupling, u)
    y, final_state, _, _ = torch.ops.coupled_mamba.scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, initial_state)
    return (y, final_state) if return_final_state else y


def coupled_selective_state_update(
    state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor] = None, z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
    coupling: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Advance the coupled state by one time step (streaming inference).

    state: (batch, dim, N) fp32; u, delta, z: (M, batch, dim); B, C: (M, batch, N); A, D,
    delta_bias, coupling as in :func:`coupled_selective_scan`. Returns ``(y, new_state)``:
    y (M, batch, dim) in u's dtype, new_state (batch, dim, N) fp32. ``state`` is not modified.
    Chained over t it equals the full scan. Not differentiable: a backward
    through it raises RuntimeError. A tensor argument of another type raises TypeError
    naming it.
    """
    _check_tensor_arguments("coupled_selective_state_update",
                            dict(state=state, u=u, delta=delta, A=A, B=B, C=C),
                            dict(D=D, z=z, delta_bias=delta_bias, coupling=coupling))
    _refuse_forward_ad("coupled_selective_state_update", state, u, delta, A, B, C, D, z,
                       delta_bias, coupling)
    coupling = _default_coupling(coupling, u)
    return torch.ops.coupled_mamba.state_update(
        state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling)


def build_info() -> dict:
    """What the compiled extension contains: version, torch it was built against, whether
    CUDA kernels are compiled in, and for which architectures."""
    from . import __version__
    return {"version": __version__, "torch": _C.TORCH_VERSION, "cuda": bool(_C.WITH_CUDA),
            "cuda_archs": [arch for arch in _C.CUDA_ARCHS.split(";") if arch],
            "max_dstate": _C.MAX_DSTATE, "max_modalities": _C.MAX_MODALITIES}
