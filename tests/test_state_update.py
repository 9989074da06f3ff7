"""coupled_selective_state_update: one step of the coupled scan for streaming inference.
Against the float64 reference, chained over L against the full scan, and pure (the state
passed in is left untouched)."""
import pytest
import torch

from conftest import FWD_TOL, assert_rel_close, make_scan_inputs, param_dtype, to_reference
from coupled_mamba_ext import coupled_selective_scan, coupled_selective_state_update
from coupled_mamba_ext.reference import coupled_state_update_ref

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def step_inputs(inputs, t):
    """Arguments of the step update at time t from the scan's inputs. The slices along L are
    strided views (stride L), as a streaming caller slicing a buffer would pass."""
    step = {k: inputs[k] for k in ("A", "D", "delta_bias", "delta_softplus", "coupling")}
    for name in ("u", "delta", "z", "B", "C"):
        step[name] = None if inputs[name] is None else inputs[name][..., t]
    return step


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", [True, False], ids=["all-args", "no-optional-args"])
def test_state_update_matches_reference(device, dtype, options):
    if device != "cpu" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (docs/contract.md)")
    inputs = make_scan_inputs(3, 2, 17, 1, 16, dtype=dtype, device=device, seed=21,
                              D=options, z=options, delta_bias=options, delta_softplus=options,
                              coupling=options)
    state = inputs.pop("initial_state")
    args = step_inputs(inputs, 0)
    y, new_state = coupled_selective_state_update(state, **args)
    ref = to_reference(dict(args, state=state))
    y_ref, state_ref = coupled_state_update_ref(**ref)
    assert y.shape == args["u"].shape and y.dtype == dtype
    assert new_state.shape == state.shape and new_state.dtype == param_dtype(dtype)
    assert_rel_close(y, y_ref, FWD_TOL[dtype], "y")
    assert_rel_close(new_state, state_ref, FWD_TOL[param_dtype(dtype)], "new_state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chained_steps_equal_full_scan(device, dtype):
    """Streaming L = 70 steps one at a time gives the full scan's y and final state."""
    if device != "cpu" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (docs/contract.md)")
    M, batch, dim, L, N = 3, 2, 5, 70, 8
    inputs = make_scan_inputs(M, batch, dim, L, N, dtype=dtype, device=device, seed=22)
    y_scan, final_scan = coupled_selective_scan(**inputs, return_final_state=True)

    state = inputs["initial_state"]
    ys = []
    for t in range(L):
        y_t, state = coupled_selective_state_update(state, **step_inputs(inputs, t))
        ys.append(y_t)
    y_steps = torch.stack(ys, dim=-1)
    # Both run the same per-step math in the same precision.
    assert_rel_close(y_steps, y_scan, FWD_TOL[dtype], "y steps vs scan")
    assert_rel_close(state, final_scan, FWD_TOL[param_dtype(dtype)], "state steps vs scan")


def test_state_is_not_modified(device):
    inputs = make_scan_inputs(3, 2, 5, 1, 8, device=device, seed=23)
    state = inputs.pop("initial_state")
    before = state.clone()
    _, new_state = coupled_selective_state_update(state, **step_inputs(inputs, 0))
    assert torch.equal(state, before)
    assert new_state.data_ptr() != state.data_ptr()
    assert not torch.equal(new_state, state)  # it did advance


def test_state_update_any_strides(device):
    """A state stored transposed and inputs sliced from a wider buffer give the contiguous
    result."""
    inputs = make_scan_inputs(3, 2, 5, 1, 8, device=device, seed=24)
    state = inputs.pop("initial_state")
    args = step_inputs(inputs, 0)
    y, new_state = coupled_selective_state_update(state, **args)

    strided_state = state.transpose(1, 2).contiguous().transpose(1, 2)
    strided = {k: v.transpose(1, 2).contiguous().transpose(1, 2)
               if isinstance(v, torch.Tensor) and v.dim() == 3 else v for k, v in args.items()}
    assert not strided_state.is_contiguous() and not strided["u"].is_contiguous()
    y_s, new_state_s = coupled_selective_state_update(strided_state, **strided)
    assert_rel_close(y_s, y, 1e-6, "y")
    assert_rel_close(new_state_s, new_state, 1e-6, "new_state")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func
def test_backward_through_the_step_raises(device):
    """The step update has no gradient: a backward through it raises, naming the op (before,
    PyTorch only warned and left the inputs' gradients at zero); so does forward mode."""
    inputs = make_scan_inputs(2, 1, 3, 1, 4, device=device, seed=9)
    state = inputs.pop("initial_state")
    args = step_inputs(inputs, 0)
    args["u"] = args["u"].clone().requires_grad_(True)
    y, _ = coupled_selective_state_update(state, **args)
    with pytest.raises(RuntimeError, match="coupled_selective_state_update is not differentiable"):
        y.sum().backward()
    with pytest.raises(RuntimeError, match="coupled_selective_state_update: forward-mode"):
        torch.func.jvp(lambda x: coupled_selective_state_update(state, **dict(args, u=x))[0],
                       (args["u"].detach(),), (torch.ones_like(args["u"]),))
