"""Seeded fuzzing of coupled_selective_scan against the float64 reference: random sizes,
dtypes, memory layouts, optional arguments and non-finite values, forward and every gradient;
and of the state update's forward against coupled_state_update_ref.

Each case must finish, and agree with the reference where it is finite (within the
project's tolerances) and where it is not: the same elements non-finite, NaN where the
reference has NaN, and where the reference has ±inf the same infinity or NaN (the CPU kernel
pads the state axis, and a padded state's inf·0 gives NaN there: docs/api.md, "Non-finite
inputs"). Outputs start as NaN (conftest.py), so an element a kernel leaves unwritten fails.
A failing case is reproduced by its seed alone. The reference is differentiated with a zero
gradient for an unused final state, as the kernels take it (docs/api.md, same section).
"""
import random

import pytest
import torch

from conftest import (FWD_TOL, GRAD_TOL, SCAN_TENSOR_ARGS, make_scan_inputs, param_dtype, rel_err,
                      scan_with_grads, to_reference)
from coupled_mamba_ext import coupled_selective_scan, coupled_selective_state_update
from coupled_mamba_ext.reference import coupled_scan_ref, coupled_state_update_ref

N_CASES = 80
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NON_FINITE = [float("inf"), float("-inf"), float("nan")]


def _layout(x: torch.Tensor, rng: random.Random, expandable_dims) -> torch.Tensor:
    """x's values in a random memory layout: contiguous, two dims swapped in memory, a slice
    with a stride of 2 of a larger buffer, or a stride-0 expansion along one of
    ``expandable_dims`` (then every entry along that dim is the first one's)."""
    kind = rng.choice(["contiguous", "transposed", "sliced", "expanded"])
    if kind == "transposed" and x.dim() >= 2:
        a, b = rng.sample(range(x.dim()), 2)
        return x.transpose(a, b).contiguous().transpose(a, b)
    if kind == "sliced":
        d = rng.randrange(x.dim())
        shape = list(x.shape)
        shape[d] *= 2
        buf = x.new_zeros(shape)
        index = [slice(None)] * x.dim()
        index[d] = slice(1, None, 2)
        buf[tuple(index)] = x
        return buf[tuple(index)]
    if kind == "expanded" and expandable_dims:
        d = rng.choice(expandable_dims)
        return x.narrow(d, 0, 1).expand(x.shape)
    return x


def random_case(seed: int):
    """(inputs, dy, dfinal or None) of one case; inputs as make_scan_inputs returns them,
    in random layouts, views of leaves that require grad."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    M = rng.choice([1, 2, 3, 5])
    batch = rng.choice([1, 2, 3])
    dim = rng.choice([1, 3, 17])           # 17: past the CPU kernel's block of 16 channels
    L = rng.choice([1, 2, 5, 63, 64, 65, 130])   # chunks of 64 steps
    N = rng.choice([1, 4, 16, 17, 33])     # blocks of 16 states, padded when not a multiple
    dtype = rng.choice(DTYPES)
    pdtype = param_dtype(dtype)
    softplus = rng.random() < 0.5

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    delta = randn(M, batch, dim, L) * 0.5 - 1.0 if softplus else \
        torch.rand(M, batch, dim, L, generator=g, dtype=torch.float64) * 0.4 + 0.05
    values = dict(
        u=randn(M, batch, dim, L), delta=delta, A=-torch.exp(randn(M, dim, N) * 0.5),
        B=randn(M, batch, N, L), C=randn(M, batch, N, L), D=randn(M, dim),
        z=randn(M, batch, dim, L), delta_bias=randn(M, dim) * 0.1,
        coupling=torch.softmax(randn(M), 0), initial_state=randn(batch, dim, N) * 0.5)
    for name in ("D", "z", "delta_bias", "coupling", "initial_state"):
        if rng.random() < 0.4:
            values[name] = None
    # A few non-finite values in a third of the cases, anywhere.
    if rng.random() < 0.35:
        present = [k for k, v in values.items() if v is not None]
        for _ in range(rng.choice([1, 1, 2])):
            x = values[rng.choice(present)]
            x.view(-1)[rng.randrange(x.numel())] = rng.choice(NON_FINITE)

    # Dims along which a tensor may be a stride-0 expansion (its values made equal there).
    expandable = dict(u=[1, 2], delta=[0, 1, 2, 3], A=[0, 1, 2], B=[0, 1, 2, 3], C=[1, 3],
                      D=[0, 1], z=[0, 3], delta_bias=[0], coupling=[], initial_state=[0, 2])
    inputs = {"delta_softplus": softplus}
    for name, x in values.items():
        if x is None:
            inputs[name] = None
            continue
        x = x.to(dtype if name in ("u", "delta", "B", "C", "z") else pdtype)
        leaf = x.detach().clone().requires_grad_(True)
        inputs[name] = _layout(leaf, rng, expandable[name])
    dy = randn(M, batch, dim, L).to(dtype)
    dfinal = randn(batch, dim, N).to(pdtype) if rng.random() < 0.5 else None
    return inputs, dy, dfinal


def _describe(inputs) -> str:
    shapes = {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    strides = {k: v.stride() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return f"u {shapes['u']} {inputs['u'].dtype}, N {shapes['A'][-1]}, strides {strides}, " \
           f"absent {[k for k, v in inputs.items() if v is None]}, " \
           f"softplus {inputs['delta_softplus']}"


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, tol: float,
                             what: str) -> None:
    """The same non-finite pattern (NaN where expected is NaN; where it is ±inf, the same
    infinity or NaN), and the finite elements within ``tol`` (relative, as rel_err)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), \
        f"{what}: finite in one, not in the other at {(torch.isfinite(a) != finite).nonzero()[:5].tolist()}"
    assert torch.equal(torch.isnan(a[torch.isnan(e)]), torch.isnan(e[torch.isnan(e)])), \
        f"{what}: not NaN where the reference is"
    infinite = torch.isinf(e)
    assert torch.all((a[infinite] == e[infinite]) | torch.isnan(a[infinite])), \
        f"{what}: another infinity than the reference's"
    err = rel_err(a[finite], e[finite])
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} on the finite elements"


def check_against_reference(inputs, dy, dfinal, what):
    """Forward and every gradient of the operator against the float64 reference, for
    ℓ = Σ y·dy (+ Σ final·dfinal); dfinal None: the final state unused."""
    dtype = inputs["u"].dtype
    out = scan_with_grads(coupled_selective_scan, inputs, dy, dfinal)
    ref_dfinal = torch.zeros(out["final_state"].shape, dtype=torch.float64) if dfinal is None \
        else dfinal.double()
    ref = scan_with_grads(coupled_scan_ref, to_reference(inputs), dy.double(), ref_dfinal)
    assert set(out) == set(ref) == {"y", "final_state"} | {
        "d" + k for k in SCAN_TENSOR_ARGS if inputs[k] is not None}
    for key in out:
        tol = (FWD_TOL if key in ("y", "final_state") else GRAD_TOL)[dtype]
        assert_matches_reference(out[key], ref[key], tol, f"{key} ({what})")
    return out, ref


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzz_against_reference(seed):
    inputs, dy, dfinal = random_case(seed)
    out, _ = check_against_reference(inputs, dy, dfinal, f"seed {seed}: {_describe(inputs)}")
    # Without return_final_state, the same y alone.
    y = coupled_selective_scan(**{k: v.detach() if isinstance(v, torch.Tensor) else v
                                  for k, v in inputs.items()})
    torch.testing.assert_close(y, out["y"], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
@pytest.mark.parametrize("N", [4, 16])
def test_plus_inf_delta_matches_reference(N, softplus, dtype):
    """Δ = +inf at one (modality, batch, channel, step): its decay exp(Δ·A) is 0, as in the
    reference, and no NaN reaches the gradients of the earlier steps (a padded state's
    exp(inf·0) did). With N = 16 no state is padded: NaN and ±inf exactly as the reference."""
    inputs = make_scan_inputs(3, 2, 5, 28, N, dtype=dtype, delta_softplus=softplus, seed=1)
    inputs["delta"][1, 0, 2, 5] = float("inf")
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(3, 2, 5, 28, generator=g, dtype=torch.float64).to(dtype)
    dfinal = torch.randn(2, 5, N, generator=g, dtype=torch.float64).to(dtype)
    out, ref = check_against_reference(inputs, dy, dfinal, f"N {N}")
    assert not torch.isfinite(ref["y"][:, 0, 2, 5:]).all()  # the case is non-trivial
    assert torch.isfinite(ref["du"][:, 0, 2, :5]).all()
    if N % 16 == 0:
        for key in out:
            torch.testing.assert_close(out[key].isnan(), ref[key].isnan(), msg=key)
            torch.testing.assert_close(out[key].isinf(), ref[key].isinf(), msg=key)


@pytest.mark.parametrize("seed", range(N_CASES, N_CASES + 20))
def test_fuzz_state_update_against_reference(seed):
    """One step of streaming inference on the same kind of random inputs (their first step)."""
    inputs, _, _ = random_case(seed)
    args = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    for name in ("u", "delta", "z", "B", "C"):
        if args[name] is not None:
            args[name] = args[name][..., 0]
    M, batch, dim = args["u"].shape
    state = args.pop("initial_state")
    if state is None:
        state = torch.zeros(batch, dim, args["A"].shape[-1], dtype=param_dtype(args["u"].dtype))
    y, new_state = coupled_selective_state_update(state, **args)
    ref_y, ref_state = coupled_state_update_ref(**to_reference(dict(args, state=state)))
    what = f"seed {seed}: {_describe(inputs)}"
    tol = FWD_TOL[args["u"].dtype]
    assert_matches_reference(y, ref_y, tol, f"y ({what})")
    assert_matches_reference(new_state, ref_state, tol, f"new_state ({what})")
