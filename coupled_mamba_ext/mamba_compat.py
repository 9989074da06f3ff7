"""The coupled scan behind mamba_ssm's ``selective_scan_fn`` signature, so that a model that
runs one Mamba scan per modality couples them by changing an import and passing lists."""
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .ops import coupled_selective_scan

OP = "coupled_selective_scan_fn"

# mamba_ssm's layout of each tensor argument for one modality, and its number of dims.
MAMBA_LAYOUTS = {
    "u": ("(batch, dim, L)", 3), "delta": ("(batch, dim, L)", 3), "z": ("(batch, dim, L)", 3),
    "A": ("(dim, N)", 2), "B": ("(batch, N, L)", 3), "C": ("(batch, N, L)", 3),
    "D": ("(dim,)", 1), "delta_bias": ("(dim,)", 1),
}
# The parameters, which the coupled scan takes in the accumulation dtype.
PARAMETERS = ("A", "D", "delta_bias")

TensorOrList = Union[Tensor, Sequence[Tensor]]


def _shape(x: Tensor) -> str:
    return str(tuple(x.shape))


def _accumulation_dtype(u_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if u_dtype == torch.float64 else torch.float32


def _to_accumulation(x: Tensor, acc: torch.dtype) -> Tensor:
    """A parameter in a narrower floating dtype than the accumulation dtype (bf16 weights of a
    half-precision model, fp32 weights beside fp64 inputs) is cast up: exact, a small copy,
    and the gradient flows back in the parameter's own dtype. Any other dtype is passed on
    unchanged for the operator to refuse (casting down would drop digits silently)."""
    if x.dtype != acc and x.is_floating_point() and torch.promote_types(x.dtype, acc) == acc:
        return x.to(acc)
    return x


def _refuse_groups(x: Tensor, groups: int, name: str, where: str) -> None:
    if groups != 1:
        raise ValueError(
            f"{OP}: argument '{where}' has shape {_shape(x)}, a grouped {name} with "
            f"{groups} groups: not supported, the coupled scan takes one {name} per modality "
            f"for all channels, (batch, N, L) or (batch, 1, N, L)")


def _one_modality(x: Tensor, name: str, where: str) -> Tensor:
    """``x`` in mamba_ssm's layout for one modality, B and C without their group axis (a
    view). ``where`` names it in errors (``B[2]`` for an element of a list)."""
    layout, dims = MAMBA_LAYOUTS[name]
    if name in ("B", "C"):
        if x.dim() == 2:
            raise ValueError(
                f"{OP}: argument '{where}' has shape {_shape(x)}, a time-invariant {name} "
                f"(dim, N): not supported, the coupled scan takes an input-dependent {name} "
                f"of shape (batch, N, L) or (batch, 1, N, L)")
        if x.dim() == 4:
            _refuse_groups(x, x.shape[1], name, where)
            x = x.squeeze(1)
    if x.dim() != dims:
        also = " or (batch, 1, N, L)" if name in ("B", "C") else ""
        if where == "u":
            also = ", (M, batch, dim, L) or a list of (batch, dim, L)"
        raise ValueError(f"{OP}: argument '{where}' expected {dims} dims {layout}{also}, got "
                         f"{x.dim()} dims with shape {_shape(x)}")
    return x


def _tensor(x, where: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{OP}: argument '{where}' expected a torch.Tensor, got "
                        f"{type(x).__name__}")
    return x


def _per_modality_stacked(x, name: str, M: int, acc: torch.dtype) -> Tensor:
    """One argument of the list form (or of a single modality) as the coupled scan's
    (M, ...) tensor. A list or tuple holds one tensor per modality: stacked, which copies. A
    single tensor is shared by all modalities: broadcast with stride 0, no copy."""
    if isinstance(x, (list, tuple)):
        if len(x) != M:
            raise ValueError(f"{OP}: argument '{name}' expected {M} tensors (one per modality, "
                             f"as u), got {len(x)}")
        parts = [_one_modality(_tensor(part, f"{name}[{m}]"), name, f"{name}[{m}]")
                 for m, part in enumerate(x)]
        for m, part in enumerate(parts[1:], start=1):
            if part.shape != parts[0].shape or part.dtype != parts[0].dtype:
                raise ValueError(
                    f"{OP}: argument '{name}[{m}]' expected shape {_shape(parts[0])} and dtype "
                    f"{parts[0].dtype} (as {name}[0]), got {_shape(part)} and {part.dtype}")
        if name in PARAMETERS:
            parts = [_to_accumulation(part, acc) for part in parts]
        return torch.stack(parts)
    shared = _one_modality(_tensor(x, name), name, name)
    if name in PARAMETERS:
        shared = _to_accumulation(shared, acc)
    return shared.expand(M, *shared.shape)


def _stacked(x, name: str, M: int, acc: torch.dtype) -> Tensor:
    """One argument of the stacked form: (M, ...) as the coupled scan takes it, B and C also
    with a group axis of size 1, (M, batch, 1, N, L) (squeezed, a view); or, with one dim
    fewer, mamba_ssm's layout of one modality, shared by all (broadcast, no copy)."""
    x = _tensor(x, name)
    _, dims = MAMBA_LAYOUTS[name]
    if name in ("B", "C") and x.dim() == 5:
        _refuse_groups(x, x.shape[2], name, name)
        x = x.squeeze(2)
    if x.dim() == dims + 1:
        return _to_accumulation(x, acc) if name in PARAMETERS else x
    return _per_modality_stacked(x, name, M, acc)


def coupled_selective_scan_fn(
    u: TensorOrList, delta: TensorOrList, A: TensorOrList, B: TensorOrList, C: TensorOrList,
    D: Optional[TensorOrList] = None, z: Optional[TensorOrList] = None,
    delta_bias: Optional[TensorOrList] = None, delta_softplus: bool = False,
    return_last_state: bool = False, *, coupling: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Union[TensorOrList, Tuple[TensorOrList, Tensor]]:
    """The coupled selective scan with mamba_ssm's ``selective_scan_fn`` arguments, in its
    order, plus the keyword-only ``coupling`` (M,) (default 1/M) and ``initial_state``
    (batch, dim, N) of :func:`coupled_selective_scan`.

    The form of ``u`` decides how every tensor argument is read:

    - a list or tuple of M tensors: each argument is a list or tuple of M tensors in
      mamba_ssm's layouts, u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or
      (batch, 1, N, L); D, delta_bias (dim,). Stacking the lists copies them (one (M, ...)
      tensor per argument). An argument given as one tensor instead of a list is shared by
      all modalities and broadcast with stride 0 (no copy). Returns a list (a tuple for a
      tuple) of M outputs (batch, dim, L), views of one stacked output.
    - one tensor (batch, dim, L): one modality (M = 1), every argument in mamba_ssm's layout;
      with the default coupling this is Mamba's scan. Returns (batch, dim, L).
    - one tensor (M, batch, dim, L): the stacked layout of :func:`coupled_selective_scan`;
      B and C may also be (M, batch, 1, N, L), and an argument in mamba_ssm's layout (one
      dim fewer, e.g. A (dim, N), D (dim,)) is shared by all modalities (stride 0, no copy).
      Returns (M, batch, dim, L).

    Apart from stacking lists, nothing is copied: the kernels take any strides, so the
    broadcasts, the squeezed group axis and one modality's leading axis are views, and no
    argument is made contiguous. dtypes as mamba_ssm's: u, delta, z, B, C one dtype (fp32,
    fp16, bf16; fp64 on the CPU), A, D, delta_bias fp32 (fp64 with fp64 inputs); a
    parameter in a narrower floating dtype (bf16, or fp32 beside fp64 inputs) is cast up, a
    small copy. Outputs in u's dtype.

    With ``return_last_state`` returns ``(out, last_state)``: last_state is the coupled
    state after the last step, (batch, dim, N) fp32 (fp64 with fp64 inputs), as mamba_ssm
    returns its last state; unlike mamba_ssm's, its gradient flows back.

    Refused with ValueError: a time-invariant B or C (dim, N), grouped B or C
    (batch, G, N, L) with G > 1 (the coupled scan has one B and C per modality), lists of
    different lengths or element shapes; TypeError for anything but a tensor where one is
    expected. Shapes that disagree across arguments get :func:`coupled_selective_scan`'s
    RuntimeError, which names them in the stacked layout.
    """
    if isinstance(u, (list, tuple)):
        if not u:
            raise ValueError(f"{OP}: argument 'u' expected at least one tensor (one per "
                             f"modality), got an empty {type(u).__name__}")
        M, u_dtype, read = len(u), _tensor(u[0], "u[0]").dtype, _per_modality_stacked
    elif _tensor(u, "u").dim() == 4:
        M, u_dtype, read = u.shape[0], u.dtype, _stacked
    else:
        M, u_dtype, read = 1, u.dtype, _per_modality_stacked
    acc = _accumulation_dtype(u_dtype)
    given = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    args: Dict[str, Optional[Tensor]] = {
        name: None if x is None else read(x, name, M, acc) for name, x in given.items()}
    y, last_state = coupled_selective_scan(
        **args, delta_softplus=delta_softplus, coupling=coupling, initial_state=initial_state,
        return_final_state=True)
    out: TensorOrList
    if isinstance(u, list):
        out = list(y.unbind(0))
    elif isinstance(u, tuple):
        out = y.unbind(0)
    else:
        out = y if read is _stacked else y[0]
    return (out, last_state) if return_last_state else out
