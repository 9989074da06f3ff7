"""Forward correctness of coupled_selective_scan against the float64 reference
(contract.md): shapes, dtypes, optional arguments, strides, L = 0, an empty batch or no channels,
the M = 1 Mamba equivalence, the coupling's stability, and non-finite inputs."""
import random

import pytest
import torch

from conftest import (FWD_TOL, GRAD_TOL, assert_rel_close, make_scan_inputs, param_dtype,
                      scan_with_grads, to_reference)
from coupled_mamba_ext import coupled_selective_scan, coupled_selective_state_update
from coupled_mamba_ext.reference import coupled_scan_ref, mamba_scan_ref

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _random_shapes(count):
    """Seeded random (M, batch, dim, L, N) with L crossing chunk boundaries."""
    rng = random.Random(1234)
    return [(rng.randint(1, 8), rng.randint(1, 3), rng.randint(1, 20), rng.randint(0, 200),
             rng.randint(1, 64)) for _ in range(count)]


# (M, batch, dim, L, N). The CPU kernel saves the state every 64 steps and handles channels
# in blocks of 16: lengths and dims around those sizes exercise the boundaries.
SHAPES = [
    (1, 1, 1, 1, 1),      # every size 1
    (2, 2, 3, 0, 4),      # L = 0
    (3, 2, 5, 1, 8),      # L = 1
    (3, 2, 5, 63, 16),    # one step short of a chunk
    (3, 1, 4, 64, 16),    # exactly one chunk
    (4, 1, 3, 65, 8),     # one step into the second chunk
    (8, 2, 2, 130, 4),    # M = 8, three chunks
    (2, 1, 2, 5, 256),    # the largest N
    (5, 2, 17, 40, 33),   # dim not a multiple of the channel block, odd N
] + _random_shapes(4)


def skip_unsupported(device, dtype):
    if device != "cpu" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (docs/contract.md)")


def check_forward(inputs, what):
    """Compares y and the final state of the operator with the float64 reference."""
    dtype = inputs["u"].dtype
    y, final = coupled_selective_scan(**inputs, return_final_state=True)
    y_ref, final_ref = coupled_scan_ref(**to_reference(inputs), return_final_state=True)
    assert y.dtype == dtype and y.device == inputs["u"].device
    assert final.dtype == param_dtype(dtype)
    assert y.shape == inputs["u"].shape
    assert_rel_close(y, y_ref, FWD_TOL[dtype], what + " y")
    # The state is accumulated in fp32 (fp64) whatever the input dtype: only the inputs and
    # y are rounded to the low precision.
    assert_rel_close(final, final_ref, FWD_TOL[param_dtype(dtype)], what + " final_state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d-b%d-d%d-L%d-N%d" % s)
def test_forward_matches_reference(device, dtype, shape):
    skip_unsupported(device, dtype)
    inputs = make_scan_inputs(*shape, dtype=dtype, device=device, seed=sum(shape))
    check_forward(inputs, f"{shape} {dtype}")


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_every_modality_count(device, M):
    inputs = make_scan_inputs(M, 2, 3, 70, 8, device=device, seed=M)
    check_forward(inputs, f"M={M}")


@pytest.mark.parametrize("N", [1, 2, 3, 7, 8, 15, 16, 17, 31, 64, 100, 128, 255, 256])
def test_every_state_size(device, N):
    inputs = make_scan_inputs(2, 1, 3, 66, N, device=device, seed=N)
    check_forward(inputs, f"N={N}")


OPTIONAL = ["D", "z", "delta_bias", "delta_softplus", "coupling", "initial_state"]


@pytest.mark.parametrize("without", OPTIONAL + ["all"])
def test_optional_arguments(device, without):
    """Each optional argument left out alone, and all of them at once."""
    off = OPTIONAL if without == "all" else [without]
    inputs = make_scan_inputs(3, 2, 4, 70, 8, device=device, seed=7,
                              **{name: False for name in off})
    for name in off:
        assert inputs[name] in (None, False)
    check_forward(inputs, f"without {without}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", [False, True], ids=["plain", "D-z-bias-softplus"])
def test_single_modality_is_mamba(device, dtype, options):
    """M = 1 with coupling 1 is Mamba's selective scan (docs/contract.md)."""
    skip_unsupported(device, dtype)
    inputs = make_scan_inputs(1, 2, 5, 130, 16, dtype=dtype, device=device, seed=3,
                              D=options, z=options, delta_bias=options, delta_softplus=options,
                              initial_state=False)
    inputs["coupling"] = torch.ones(1, dtype=param_dtype(dtype), device=device)
    y = coupled_selective_scan(**inputs)
    ref = to_reference(inputs)
    y_mamba = mamba_scan_ref(
        ref["u"][0], ref["delta"][0], ref["A"][0], ref["B"][0], ref["C"][0],
        D=None if ref["D"] is None else ref["D"][0], z=None if ref["z"] is None else ref["z"][0],
        delta_bias=None if ref["delta_bias"] is None else ref["delta_bias"][0],
        delta_softplus=ref["delta_softplus"])
    assert_rel_close(y[0], y_mamba, FWD_TOL[dtype], "M=1 vs Mamba")


def test_default_coupling_is_one_over_M(device):
    inputs = make_scan_inputs(3, 2, 4, 70, 8, device=device, seed=11, coupling=False)
    y, final = coupled_selective_scan(**inputs, return_final_state=True)
    inputs["coupling"] = torch.full((3,), 1 / 3, device=device)
    y_w, final_w = coupled_selective_scan(**inputs, return_final_state=True)
    torch.testing.assert_close(y, y_w, rtol=0, atol=0)
    torch.testing.assert_close(final, final_w, rtol=0, atol=0)


# ------------------------------------------------------------------------------ strides
def _every_other(x):
    """The same values, stored with a stride of 2 along the last dim (a sliced view)."""
    buf = x.new_zeros(x.shape[:-1] + (2 * x.shape[-1],))
    buf[..., ::2] = x
    return buf[..., ::2]


def _transposed(x):
    """The same values, stored with the last two dims swapped in memory."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _reversed_layout(x):
    """The same values, every dim's stride reversed (column-major)."""
    dims = list(range(x.dim()))[::-1]
    return x.permute(dims).contiguous().permute(dims)


def test_any_strides(device):
    """Transposed, sliced and broadcast (stride 0) views give the contiguous result, forward
    and every gradient."""
    M, batch, dim, L, N = 3, 2, 5, 70, 8
    inputs = make_scan_inputs(M, batch, dim, L, N, device=device, seed=5)
    # A and D shared by the modalities: the strided run passes them as stride-0 expansions.
    inputs["A"] = inputs["A"][:1].expand(M, dim, N).contiguous()
    inputs["D"] = inputs["D"][:1].expand(M, dim).contiguous()
    layouts = dict(u=_transposed, delta=_every_other, z=_reversed_layout, B=_transposed,
                   C=_every_other, A=lambda x: x[:1].expand(x.shape),
                   D=lambda x: x[:1].expand(x.shape), delta_bias=_transposed,
                   coupling=_every_other, initial_state=_reversed_layout)
    # The strided tensors are views of leaves, so that gradients are taken with respect to
    # the views themselves.
    strided = dict(inputs)
    for name, layout in layouts.items():
        leaf = inputs[name].detach().clone().requires_grad_(True)
        strided[name] = layout(leaf)
        assert torch.equal(strided[name], inputs[name])
        assert not strided[name].is_contiguous(), name
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(M, batch, dim, L, generator=g).to(device)
    dfinal = torch.randn(batch, dim, N, generator=g).to(device)
    contiguous_out = scan_with_grads(coupled_selective_scan, inputs, dy, dfinal)
    strided_out = scan_with_grads(coupled_selective_scan, strided, dy, dfinal)
    reference_out = scan_with_grads(coupled_scan_ref, to_reference(inputs), dy.double().cpu(),
                                    dfinal.double().cpu())
    for key, value in contiguous_out.items():
        # Same values in another layout: the same arithmetic, up to the order of the
        # kernels' parallel reductions.
        assert_rel_close(strided_out[key], value, 1e-6, "strided vs contiguous " + key)
        tol = FWD_TOL if key in ("y", "final_state") else GRAD_TOL
        assert_rel_close(value, reference_out[key], tol[torch.float32], key)


# ------------------------------------------------------------------------------ edge cases
def test_empty_sequence(device):
    """L = 0: empty y, the final state is the initial state, and its gradient passes through."""
    inputs = make_scan_inputs(3, 2, 4, 0, 8, device=device, seed=2)
    y, final = coupled_selective_scan(**inputs, return_final_state=True)
    assert y.shape == (3, 2, 4, 0) and y.dtype == inputs["u"].dtype
    torch.testing.assert_close(final, inputs["initial_state"], rtol=0, atol=0)

    without_initial = dict(inputs, initial_state=None)
    _, final = coupled_selective_scan(**without_initial, return_final_state=True)
    torch.testing.assert_close(final, torch.zeros_like(inputs["initial_state"]), rtol=0, atol=0)

    dfinal = torch.randn_like(inputs["initial_state"])
    grads = scan_with_grads(coupled_selective_scan, inputs, torch.zeros_like(inputs["u"]),
                            dfinal)
    torch.testing.assert_close(grads["dinitial_state"], dfinal, rtol=0, atol=0)
    for name in ("A", "D", "delta_bias", "coupling"):
        assert torch.count_nonzero(grads["d" + name]) == 0, name
    for name in ("u", "delta", "B", "C", "z"):
        assert grads["d" + name].shape == inputs[name].shape, name


@pytest.mark.parametrize("batch, dim", [(0, 4), (2, 0), (0, 0)], ids=["batch0", "dim0", "both0"])
def test_no_rows(device, batch, dim):
    """An empty batch or no channels: the scan, its backward and the step give the shapes
    and values the float64 reference gives (empty, or zero gradients), without a kernel
    launch; a backward with dim = 0 once divided by zero in the CPU kernel (SIGFPE)."""
    inputs = make_scan_inputs(3, batch, dim, 70, 8, device=device, seed=5)
    dy = torch.zeros(3, batch, dim, 70, dtype=torch.float64)
    dfinal = torch.zeros(batch, dim, 8, dtype=torch.float64)
    out = scan_with_grads(coupled_selective_scan, inputs, dy.to(device, torch.float32),
                          dfinal.to(device))
    ref = scan_with_grads(coupled_scan_ref, to_reference(inputs), dy, dfinal)
    assert out.keys() == ref.keys()
    for key, expected in ref.items():
        assert out[key].shape == expected.shape, key
        torch.testing.assert_close(out[key].cpu().double(), expected, rtol=0, atol=0, msg=key)

    step = {name: inputs[name][..., 0] for name in ("u", "delta", "B", "C", "z")}
    rest = {name: inputs[name] for name in ("A", "D", "delta_bias", "coupling")}
    y, new_state = coupled_selective_state_update(inputs["initial_state"], **step, **rest,
                                                  delta_softplus=True)
    assert y.shape == (3, batch, dim) and new_state.shape == (batch, dim, 8)


def _ones_and_normalised_states(device, lengths):
    """Final states for w = 1 (the paper's sum) and w = 1/M at each length, float64, M = 3."""
    inputs = make_scan_inputs(3, 1, 4, max(lengths), 8, dtype=torch.float64, device=device,
                              seed=9, D=False, z=False, delta_bias=False, delta_softplus=False,
                              initial_state=False)
    states = {}
    for name, w in (("ones", torch.ones(3)), ("normalised", torch.full((3,), 1 / 3))):
        states[name] = []
        for L in lengths:
            prefix = dict(inputs, coupling=w.to(device, torch.float64),
                          **{k: inputs[k][..., :L] for k in ("u", "delta", "B", "C")})
            _, final = coupled_selective_scan(**prefix, return_final_state=True)
            _, final_ref = coupled_scan_ref(**to_reference(prefix), return_final_state=True)
            # Whether it grows or not, the operator computes what the recurrence says.
            assert_rel_close(final, final_ref, FWD_TOL[torch.float64], f"{name} L={L}")
            states[name].append(final)
    return inputs, states


def test_paper_coupling_ones_diverges_normalised_stays_bounded():
    """math.md §5: with w = 1 (the paper's plain sum) the coupled recurrence multiplies the state
    by P = Σ_m a_m ∈ (0, M) each step and grows without bound for M = 3; with w = 1/M,
    P = mean(a_m) < 1 and |G[t]| ≤ |G[0]| + max|b| / (1 - max a) for every t."""
    lengths = [25, 50, 100]
    inputs, states = _ones_and_normalised_states("cpu", lengths)
    norms = [s.norm().item() for s in states["ones"]]
    for shorter, longer in zip(norms, norms[1:]):
        assert longer > 1e3 * shorter, norms

    step = inputs["delta"]                                          # no softplus, no bias
    decay = torch.exp(step[..., None, :] * inputs["A"][:, None, :, :, None])  # (M,b,d,N,L)
    drive = (step * inputs["u"])[..., None, :] * inputs["B"][:, :, None]      # (M,b,d,N,L)
    bound = drive.abs().max() / (1 - decay.max())                   # G[0] = 0
    for L, state in zip(lengths, states["normalised"]):
        assert state.abs().max() <= bound, (L, state.abs().max().item(), bound.item())


def test_non_finite_inputs_propagate(device):
    """A NaN in u or an inf in delta makes the outputs of its own (batch, channel) non-finite
    from that step on, in every modality (they share the coupled state), and no other
    channel; forward and backward finish."""
    M, batch, dim, L, N = 3, 2, 4, 70, 8
    inputs = make_scan_inputs(M, batch, dim, L, N, device=device, seed=4)
    inputs["u"][1, 0, 2, 10] = float("nan")
    inputs["delta"][0, 1, 3, 20] = float("inf")
    hit = {(0, 2): (1, 10), (1, 3): (0, 20)}  # (batch, channel): (modality, step)

    dy = torch.randn(M, batch, dim, L).to(device)
    dfinal = torch.randn(batch, dim, N).to(device)
    out = scan_with_grads(coupled_selective_scan, inputs, dy, dfinal)
    y, final = out["y"], out["final_state"]
    for b in range(batch):
        for e in range(dim):
            if (b, e) in hit:
                m, t = hit[(b, e)]
                assert torch.isfinite(y[:, b, e, :t]).all(), (b, e)
                assert not torch.isfinite(y[m, b, e, t])
                assert not torch.isfinite(y[:, b, e, t + 1:]).any(), (b, e)
                assert not torch.isfinite(final[b, e]).any(), (b, e)
                assert not torch.isfinite(out["dz"][:, b, e, t + 1:]).any(), (b, e)
            else:
                # Channels do not interact: everything per-channel stays finite.
                assert torch.isfinite(y[:, b, e]).all(), (b, e)
                assert torch.isfinite(final[b, e]).all(), (b, e)
                for name in ("du", "ddelta", "dz"):
                    assert torch.isfinite(out[name][:, b, e]).all(), (name, b, e)
    # Parameter gradients sum over channels, so the non-finite values reach them.
    assert not torch.isfinite(out["dA"]).all()
