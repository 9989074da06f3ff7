"""Gradients of coupled_selective_scan: every argument against autograd through the float64
reference (docs/contract.md: fp32 ≤ 1e-4, bf16 ≤ 3e-2), and torch.autograd.gradcheck in float64."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from conftest import (FWD_TOL, GRAD_TOL, SCAN_TENSOR_ARGS, assert_rel_close, make_scan_inputs,
                      scan_with_grads, to_reference)
from coupled_mamba_ext import coupled_selective_scan
from coupled_mamba_ext.reference import coupled_scan_ref

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (M, batch, dim, L, N): chunk boundaries (the backward recomputes each 64-step chunk from
# its saved state), L = 1, M = 8, the largest N, dim past the CPU kernel's channel block,
# N and a chunk's length from 8 up but not multiples of 8 (the edges of the CPU kernel's 8×8
# transposes of B, C, dB and dC).
SHAPES = [
    (3, 2, 5, 70, 8),
    (1, 1, 3, 1, 4),
    (8, 1, 2, 65, 3),
    (2, 2, 17, 130, 16),
    (2, 1, 2, 10, 256),
    (2, 2, 3, 75, 12),
]


def check_gradients(inputs, with_dfinal=True, seed=0):
    """Operator vs reference: y, the final state and the gradient of every tensor argument,
    for ℓ = Σ y·dy (+ Σ final·dfinal)."""
    dtype, device = inputs["u"].dtype, inputs["u"].device
    M, batch, dim, L = inputs["u"].shape
    N = inputs["A"].shape[-1]
    g = torch.Generator().manual_seed(seed)
    # dy in the input dtype, as autograd hands it to the operator; the reference gets the
    # same rounded values.
    dy = torch.randn(M, batch, dim, L, generator=g, dtype=torch.float64).to(device, dtype)
    dfinal = torch.randn(batch, dim, N, generator=g, dtype=torch.float64) if with_dfinal else None
    out = scan_with_grads(coupled_selective_scan, inputs, dy,
                          None if dfinal is None else dfinal.to(device, inputs["A"].dtype))
    ref = scan_with_grads(coupled_scan_ref, to_reference(inputs), dy.double().cpu(), dfinal)
    assert set(out) == set(ref)
    for key in out:
        if key in ("y", "final_state"):
            continue
        name = key[1:]
        assert out[key].dtype == inputs[name].dtype, key
        assert out[key].shape == inputs[name].shape, key
        assert_rel_close(out[key], ref[key], GRAD_TOL[dtype], f"{key} ({dtype})")
    assert_rel_close(out["y"], ref["y"], FWD_TOL[dtype], "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d-b%d-d%d-L%d-N%d" % s)
def test_gradients_match_reference(device, dtype, shape):
    if device != "cpu" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (docs/contract.md)")
    inputs = make_scan_inputs(*shape, dtype=dtype, device=device, seed=sum(shape))
    check_gradients(inputs)


@pytest.mark.parametrize("variant", ["no-final-state-grad", "no-initial-state", "no-z",
                                     "no-D-no-bias", "no-softplus", "default-coupling",
                                     "none-optional"])
def test_gradients_optional_arguments(device, variant):
    options = {
        "no-initial-state": dict(initial_state=False),
        "no-z": dict(z=False),
        "no-D-no-bias": dict(D=False, delta_bias=False),
        "no-softplus": dict(delta_softplus=False),
        "default-coupling": dict(coupling=False),
        "none-optional": dict(D=False, z=False, delta_bias=False, delta_softplus=False,
                              coupling=False, initial_state=False),
    }.get(variant, {})
    inputs = make_scan_inputs(3, 2, 4, 70, 8, device=device, seed=8, **options)
    check_gradients(inputs, with_dfinal=variant != "no-final-state-grad")


def test_gradient_through_final_state_only(device):
    """ℓ depends on the final state alone: y's gradient never reaches the operator's backward
    (autograd passes None for it) and the gradients still match the reference."""
    inputs = make_scan_inputs(3, 2, 4, 70, 8, device=device, seed=6)
    leaves = {k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    _, final = coupled_selective_scan(**leaves, return_final_state=True)
    dfinal = torch.randn(final.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (final * dfinal).sum().backward()
    ref_leaves = {k: v.requires_grad_(True) if isinstance(v, torch.Tensor) else v
                  for k, v in to_reference(inputs).items()}
    _, final_ref = coupled_scan_ref(**ref_leaves, return_final_state=True)
    (final_ref * dfinal.double().cpu()).sum().backward()
    for name in SCAN_TENSOR_ARGS:
        expected = ref_leaves[name].grad
        if expected is None:  # z and D do not reach the state
            expected = torch.zeros_like(ref_leaves[name])
        assert_rel_close(leaves[name].grad, expected, GRAD_TOL[torch.float32], "d" + name)


def test_cpu_backward_is_the_same_for_any_number_of_threads_and_correct():
    """The CPU backward cuts its tasks (batch index, 16 channels) into contiguous parts whose
    number the shape alone decides, and adds the parts' sums over channels in part order.
    This shape (3 batch indices of 5 channel blocks, L = 128: 15 tasks in 8 parts) gives
    parts that start inside a batch index, whose dB and dC go through the part's private
    sums: with two threads every gradient matches the reference, and one thread, two
    threads and a second two-thread run give bitwise the same gradients."""
    threads = torch.get_num_threads()
    inputs = make_scan_inputs(3, 3, 80, 128, 16, dtype=torch.float32, seed=5)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(3, 3, 80, 128, generator=g)
    dfinal = torch.randn(3, 80, 16, generator=g)
    runs = []
    try:
        torch.set_num_threads(2)
        check_gradients(inputs)
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            runs.append(scan_with_grads(coupled_selective_scan, inputs, dy, dfinal))
    finally:
        torch.set_num_threads(threads)
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), f"{key}: 2 threads vs 1"
        assert torch.equal(runs[0][key], runs[2][key]), f"{key}: 2 threads, run to run"


def test_double_backward_raises_and_create_graph_alone_is_fine(device):
    """Differentiating the scan's gradient is not implemented: the backward through it raises
    (before, PyTorch only warned and left zero gradients). Taking the first gradient with
    create_graph=True still gives it exactly."""
    inputs = make_scan_inputs(2, 1, 3, 10, 4, device=device, seed=8)
    u = inputs.pop("u").requires_grad_(True)
    (plain,) = torch.autograd.grad(coupled_selective_scan(u, **inputs).square().sum(), u)
    (grad,) = torch.autograd.grad(coupled_selective_scan(u, **inputs).square().sum(), u,
                                  create_graph=True)
    assert torch.equal(grad, plain)
    with pytest.raises(RuntimeError, match=r"coupled_selective_scan: differentiating its "
                                           r"gradient \(double backward"):
        grad.sum().backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func
def test_forward_mode_differentiation_raises(device):
    """Forward mode has no rule: torch.func.jvp and a dual tensor of torch.autograd.forward_ad
    raise, naming the op (before, the op ran and the output's tangent was silently zero)."""
    inputs = make_scan_inputs(2, 1, 3, 10, 4, device=device, seed=9)
    u = inputs.pop("u")
    message = "coupled_selective_scan: forward-mode differentiation"
    with pytest.raises(RuntimeError, match=message):
        torch.func.jvp(lambda x: coupled_selective_scan(x, **inputs), (u,), (torch.ones_like(u),))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=message):
        coupled_selective_scan(u, **dict(inputs, B=fwAD.make_dual(inputs["B"],
                                                                  torch.ones_like(inputs["B"]))))
    with fwAD.dual_level():  # a dual level without dual inputs is no reason to refuse
        torch.testing.assert_close(coupled_selective_scan(u, **inputs),
                                   coupled_selective_scan(u, **inputs))


# ------------------------------------------------------------------------------ gradcheck
# softplus changes only how delta and delta_bias enter; the other arguments are checked with it.
GRADCHECK_CASES = ([(name, True) for name in SCAN_TENSOR_ARGS]
                   + [("delta", False), ("delta_bias", False)])
GRADCHECK_IDS = ["%s-%s" % (n, "softplus" if s else "linear") for n, s in GRADCHECK_CASES]


@pytest.mark.parametrize("name, delta_softplus", GRADCHECK_CASES, ids=GRADCHECK_IDS)
def test_gradcheck(name, delta_softplus):
    """Finite differences vs the operator's backward in float64, one argument at a time,
    through both outputs (y and the final state). L = 70 crosses the 64-step chunk boundary;
    the other sizes are small because gradcheck runs the operator twice per input element."""
    inputs = make_scan_inputs(2, 1, 3, 70, 4, dtype=torch.float64, seed=12,
                              delta_softplus=delta_softplus)
    x = inputs.pop(name).clone().requires_grad_(True)

    def scan(x):
        return coupled_selective_scan(**inputs, **{name: x}, return_final_state=True)

    assert torch.autograd.gradcheck(scan, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
