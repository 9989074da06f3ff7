"""CUDA kernels beyond the shared device-parametrised tests: long sequences (L = 4095, 4096,
16384), the paper's big-batch short-sequence regime (batch 1024, L = 50), wide channels,
forward and every gradient against the float64 reference AND the CPU kernel, in fp32, bf16
and fp16; launches on the current stream; the deterministic backward.

Every test of the other op test files that takes ``device`` also runs on "cuda" (marked
``cuda``), which covers opcheck, torch.compile, the step update, strides and errors on CUDA.
Skipped, with the reason, where no CUDA device is visible or the build has no CUDA kernels.
"""
import pytest
import torch

from conftest import (FWD_TOL, GRAD_TOL, assert_rel_close, make_scan_inputs,
                      map_tensors, param_dtype, requires_cuda, scan_with_grads, to_reference)
from coupled_mamba_ext import coupled_selective_scan, coupled_selective_state_update
from coupled_mamba_ext.reference import coupled_scan_ref
from coupled_mamba_ext.train import deterministic_algorithms

pytestmark = [pytest.mark.cuda, requires_cuda]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (M, batch, dim, L, N). dim and N stay moderate so that the float64 reference loop (on the
# GPU) takes seconds.
SHAPES = [
    pytest.param((3, 2, 8, 4095, 16), id="L4095"),
    pytest.param((3, 2, 8, 4096, 16), id="L4096"),
    pytest.param((2, 1, 4, 16384, 16), id="L16384", marks=pytest.mark.slow),
    pytest.param((3, 1024, 16, 50, 64), id="batch1024-L50-N64"),
    pytest.param((2, 2, 1536, 130, 16), id="dim1536"),
    pytest.param((4, 3, 40, 200, 256), id="N256"),
    # The state-lanes backward is compiled per lanes of a row in one warp: N = 16 and 64
    # above take 1 and 2, N = 100 takes 4 (with 4 states per lane; N = 256 takes 8 states).
    pytest.param((2, 3, 24, 130, 100), id="N100"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_reference_and_cpu_kernel(shape, dtype):
    """y, the final state and the gradient of every argument: CUDA vs the float64 reference
    (docs/contract.md's tolerances) and vs the CPU kernel on the same inputs."""
    inputs = make_scan_inputs(*shape, dtype=dtype, device="cuda", seed=sum(shape))
    M, batch, dim, L, N = shape
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(M, batch, dim, L, generator=g, dtype=torch.float64).to(dtype)
    dfinal = torch.randn(batch, dim, N, generator=g, dtype=torch.float64)

    cuda = scan_with_grads(coupled_selective_scan, inputs, dy.cuda(), dfinal.float().cuda())
    cpu = scan_with_grads(coupled_selective_scan, map_tensors(inputs, lambda x: x.cpu()), dy,
                          dfinal.float())
    # The float64 reference runs on the GPU: its loop over time is too slow on the CPU here.
    ref = scan_with_grads(coupled_scan_ref, to_reference(inputs, "cuda"), dy.double().cuda(),
                          dfinal.cuda())
    assert set(cuda) == set(ref) == set(cpu)
    for key in cuda:
        if key == "final_state":
            tol = FWD_TOL[param_dtype(dtype)]  # accumulated in fp32 whatever the input
        else:
            tol = (FWD_TOL if key == "y" else GRAD_TOL)[dtype]
        assert cuda[key].device.type == "cuda"
        assert cuda[key].dtype == cpu[key].dtype, key
        assert_rel_close(cuda[key], ref[key], tol, f"{key} CUDA vs reference")
        assert_rel_close(cuda[key], cpu[key], tol, f"{key} CUDA vs CPU kernel")


def test_cuda_runs_on_the_current_stream():
    """The kernels launch on PyTorch's current stream, forward and backward. The inputs are
    written on a side stream behind a long-running kernel: an operator launching elsewhere
    (the legacy default stream, say) would read them before they are written."""
    inputs = make_scan_inputs(3, 4, 64, 300, 16, device="cuda", seed=3)
    dy = torch.randn(3, 4, 64, 300, device="cuda")
    expected = scan_with_grads(coupled_selective_scan, inputs, dy, None)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # keeps `side` busy for tens of milliseconds
        copies = map_tensors(inputs, lambda x: x.clone())
        # Autograd runs each backward node on the stream its forward ran on: `side`.
        result = scan_with_grads(coupled_selective_scan, copies, dy.clone(), None)
    torch.cuda.current_stream().wait_stream(side)
    for key, value in expected.items():
        # Not bitwise: parameter gradients may be summed by atomics in any order.
        assert_rel_close(result[key], value, FWD_TOL[torch.float32], key)


# Many blocks adding into the same dB, dC (16 blocks of channels per batch index at N = 64,
# dim 256; 24 at N = 16, dim 1536) and dA (64 batch indices), and 8 states per lane (N = 256).
DETERMINISTIC_SHAPES = [
    pytest.param((3, 64, 256, 50, 64), id="batch64-dim256-L50-N64"),
    pytest.param((2, 4, 1536, 300, 16), id="dim1536-L300-N16"),
    pytest.param((2, 3, 40, 130, 256), id="N256"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", DETERMINISTIC_SHAPES)
def test_cuda_deterministic_backward_gives_the_same_bits_and_is_right(shape, dtype):
    """Under torch.use_deterministic_algorithms(True) the state-lanes backward sums over blocks
    through a slot per block (register_cuda.cpp): three runs give the same bits in every
    gradient, which match the float64 reference and the default (atomic) backward."""
    inputs = make_scan_inputs(*shape, dtype=dtype, device="cuda", seed=sum(shape) + 3)
    M, batch, dim, L, N = shape
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(M, batch, dim, L, generator=g, dtype=torch.float64)
    dfinal = torch.randn(batch, dim, N, generator=g, dtype=torch.float64)
    default = scan_with_grads(coupled_selective_scan, inputs, dy.to(dtype).cuda(),
                              dfinal.float().cuda())
    ref = scan_with_grads(coupled_scan_ref, to_reference(inputs, "cuda"), dy.cuda(), dfinal.cuda())
    with deterministic_algorithms():
        runs = [scan_with_grads(coupled_selective_scan, inputs, dy.to(dtype).cuda(),
                                dfinal.float().cuda()) for _ in range(3)]
    for key in ref:
        assert torch.equal(runs[0][key], runs[1][key]), f"{key}: run 1 vs 2"
        assert torch.equal(runs[0][key], runs[2][key]), f"{key}: run 1 vs 3"
        if key == "final_state":
            tol = FWD_TOL[torch.float32]
        else:
            tol = (FWD_TOL if key == "y" else GRAD_TOL)[dtype]
        assert_rel_close(runs[0][key], ref[key], tol, f"{key} deterministic vs reference")
        assert_rel_close(runs[0][key], default[key], tol, f"{key} deterministic vs default")


def test_cuda_time_lanes_backward_alerts_under_deterministic_algorithms():
    """More than 4 modalities take the time-lanes backward, which has no deterministic form:
    under torch.use_deterministic_algorithms(True) its backward raises, naming the op; with
    warn_only=True it warns and runs. The forward has no sums over blocks and runs."""
    inputs = make_scan_inputs(5, 2, 16, 40, 16, device="cuda", seed=4)
    dy = torch.randn(5, 2, 16, 40, device="cuda")
    expected = scan_with_grads(coupled_selective_scan, inputs, dy, None)
    message = "coupled_selective_scan backward on CUDA with the time-lanes kernel"
    with deterministic_algorithms():
        coupled_selective_scan(**inputs)
        with pytest.raises(RuntimeError, match=message):
            scan_with_grads(coupled_selective_scan, inputs, dy, None)
    with deterministic_algorithms(warn_only=True), pytest.warns(UserWarning, match=message):
        got = scan_with_grads(coupled_selective_scan, inputs, dy, None)
    for key in expected:
        assert_rel_close(got[key], expected[key], FWD_TOL[torch.float32], key)


# Both thread mappings stay selectable (COUPLED_MAMBA_CUDA_KERNELS, read at every call); the
# default is state lanes, the backward falling back to time lanes where the state-lanes one
# does not fit (M > 4, or too little shared memory).
MAPPING_SHAPES = [
    pytest.param((3, 2, 8, 4096, 16), id="L4096"),
    pytest.param((3, 1024, 16, 50, 64), id="batch1024-L50-N64"),
    pytest.param((4, 3, 40, 200, 256), id="N256"),
    pytest.param((2, 2, 1536, 130, 16), id="dim1536"),
]


@pytest.mark.parametrize("mapping", ["state_lanes", "time_lanes"])
@pytest.mark.parametrize("shape", MAPPING_SHAPES)
def test_cuda_each_kernel_mapping_matches_reference_and_default(shape, mapping, monkeypatch):
    inputs = make_scan_inputs(*shape, device="cuda", seed=sum(shape) + 7)
    M, batch, dim, L, N = shape
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(M, batch, dim, L, generator=g, dtype=torch.float64)
    dfinal = torch.randn(batch, dim, N, generator=g, dtype=torch.float64)
    default = scan_with_grads(coupled_selective_scan, inputs, dy.float().cuda(),
                              dfinal.float().cuda())
    monkeypatch.setenv("COUPLED_MAMBA_CUDA_KERNELS", mapping)
    forced = scan_with_grads(coupled_selective_scan, inputs, dy.float().cuda(),
                             dfinal.float().cuda())
    ref = scan_with_grads(coupled_scan_ref, to_reference(inputs, "cuda"), dy.cuda(), dfinal.cuda())
    for key in ref:
        tol = (FWD_TOL if key in ("y", "final_state") else GRAD_TOL)[torch.float32]
        assert_rel_close(forced[key], ref[key], tol, f"{key} {mapping} vs reference")
        assert_rel_close(forced[key], default[key], tol, f"{key} {mapping} vs default")


def test_cuda_kernels_choice_is_checked(monkeypatch):
    inputs = make_scan_inputs(2, 1, 4, 10, 4, device="cuda")
    monkeypatch.setenv("COUPLED_MAMBA_CUDA_KERNELS", "fastest")
    with pytest.raises(RuntimeError, match="COUPLED_MAMBA_CUDA_KERNELS expected 'state_lanes' "
                                           "or 'time_lanes', got 'fastest'"):
        coupled_selective_scan(**inputs)


@pytest.mark.parametrize("mapping", ["state_lanes", "time_lanes"])
def test_cuda_softplus_over_its_whole_range(mapping, monkeypatch):
    """δ + β from -30 to 25: every branch of the state-lanes kernels' fast softplus (the
    series below e^x = 1/16, lg2.approx above, x itself past 20) and of dδ formed from Δ,
    forward and every gradient against the float64 reference, fp32."""
    shape = (2, 2, 24, 130, 16)
    inputs = make_scan_inputs(*shape, device="cuda", seed=3)
    g = torch.Generator().manual_seed(4)
    inputs["delta"] = (torch.rand(shape[:4], generator=g, dtype=torch.float64) * 55 - 30
                       ).float().cuda()
    M, batch, dim, L, N = shape
    dy = torch.randn(M, batch, dim, L, generator=g, dtype=torch.float64)
    monkeypatch.setenv("COUPLED_MAMBA_CUDA_KERNELS", mapping)
    got = scan_with_grads(coupled_selective_scan, inputs, dy.float().cuda(), None)
    ref = scan_with_grads(coupled_scan_ref, to_reference(inputs, "cuda"), dy.cuda(), None)
    for key in ref:
        tol = (FWD_TOL if key in ("y", "final_state") else GRAD_TOL)[torch.float32]
        assert_rel_close(got[key], ref[key], tol, f"{key} {mapping} vs reference")


def test_cuda_scan_in_a_cuda_graph():
    """Captured in a CUDA graph and replayed on new inputs, forward and the step update give
    what eager calls give. The forward's tile here takes more than 48 KB of shared memory,
    so its launch opts in (cudaFuncSetAttribute) while the graph is being captured."""
    shape = (3, 4, 64, 64, 64)
    static = make_scan_inputs(*shape, device="cuda", seed=8)
    state = torch.randn(shape[1], shape[2], shape[4], device="cuda")
    step_inputs = {k: (v[..., 0].contiguous() if k in ("u", "delta", "z", "B", "C") else v)
                   for k, v in static.items() if k != "initial_state"}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
        coupled_selective_scan(**static, return_final_state=True)
        coupled_selective_state_update(state, **step_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, final = coupled_selective_scan(**static, return_final_state=True)
        step_y, step_state = coupled_selective_state_update(state, **step_inputs)
    fresh = make_scan_inputs(*shape, device="cuda", seed=9)
    for name in ("u", "delta", "z", "B", "C"):
        static[name].copy_(fresh[name])
        step_inputs[name].copy_(fresh[name][..., 0])
    state.copy_(torch.randn_like(state))
    graph.replay()
    torch.cuda.synchronize()
    y_eager, final_eager = coupled_selective_scan(**static, return_final_state=True)
    step_y_eager, step_state_eager = coupled_selective_state_update(state, **step_inputs)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(final, final_eager, rtol=0, atol=0)
    torch.testing.assert_close(step_y, step_y_eager, rtol=0, atol=0)
    torch.testing.assert_close(step_state, step_state_eager, rtol=0, atol=0)
