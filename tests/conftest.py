"""Shared helpers of the operator tests: seeded inputs, the float64 reference run, error
measures, docs/contract.md's tolerances, and the list of devices the tests run on.

Any test taking a ``device`` argument runs once per entry of ``DEVICES``: "cpu" always, and
"cuda" (marked ``cuda``) when a CUDA device is visible and the extension has CUDA kernels.
Why CUDA is left out is printed in pytest's header and by the skips of test_scan_cuda.py.
Outputs are poisoned with NaN before the kernels run (see below).
"""
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional

# Every output element a kernel must write starts as NaN (csrc/coupled_scan.cpp), so that
# an element a kernel misses fails the comparisons instead of passing on stale memory.
# Read once by the extension at its first call, so it is set before anything runs.
os.environ.setdefault("COUPLED_MAMBA_POISON_OUTPUTS", "1")
# A compile cache of its own per run: PyTorch's caches do not see a change of what a custom
# operator returns, so graphs cached by an earlier build can fail to load (docs/building.md).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _COMPILE_CACHE = tempfile.mkdtemp(prefix="torchinductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _COMPILE_CACHE
else:
    _COMPILE_CACHE = None

import pytest
import torch

import coupled_mamba_ext
from coupled_mamba_ext import build_info


def _cuda_skip_reason() -> Optional[str]:
    """None when the CUDA kernels can be tested here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device visible (torch.cuda.is_available() is False)"
    if not build_info()["cuda"]:
        return ("the extension was built without CUDA kernels (build_info()['cuda'] is False); "
                "rebuild where nvcc is found, or with FORCE_CUDA=1")
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
HAS_CUDA = CUDA_SKIP_REASON is None
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")

# docs/contract.md: ‖out − ref‖ / ‖ref‖ against the float64 reference computed from the same inputs.
# float64 is not in that table: the kernels then compute in double, so they must agree with
# the reference to (nearly) double precision.
FWD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}

# Tensor arguments of coupled_selective_scan, in signature order; each is differentiable.
SCAN_TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling",
                    "initial_state")


def pytest_report_header(config):
    info = build_info()
    line = "coupled_mamba_ext %s (torch %s, cuda kernels %s, archs %s) from %s; op tests on %s" % (
        info["version"], info["torch"], info["cuda"], info["cuda_archs"],
        coupled_mamba_ext.__file__, DEVICES)
    if not HAS_CUDA:
        line += "\nCUDA op tests SKIPPED: " + CUDA_SKIP_REASON
    return line


@pytest.fixture(params=[pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [])
                        for d in DEVICES])
def device(request):
    """Runs the test once per entry of DEVICES (the CUDA run marked ``cuda``)."""
    return request.param


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of A, D, delta_bias, coupling and states for inputs of ``dtype`` (docs/contract.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_scan_inputs(M: int, batch: int, dim: int, L: int, N: int, *,
                     dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                     D: bool = True, z: bool = True, delta_bias: bool = True,
                     delta_softplus: bool = True, coupling: bool = True,
                     initial_state: bool = True) -> dict:
    """Seeded random keyword arguments for ``coupled_selective_scan`` (and the reference).

    Values are drawn in float64 on the CPU from ``seed`` alone, then cast, so the same seed
    gives the same numbers on every device and the low-precision inputs are exactly the
    rounded float64 ones. Ranges follow Mamba in practice: Δ of order 0.1–1 (after the
    optional softplus), A < 0, a coupling w > 0 summing to one (the stable regime). An
    optional argument switched off is passed as None (``delta_softplus`` as False).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    # Δ > 0 always (else exp(Δ·A) > 1 and the state grows): without softplus, delta and the
    # bias are both positive.
    if delta_softplus:
        delta = randn(M, batch, dim, L) * 0.5 - 1.0   # softplus(-1) ≈ 0.31
        bias = randn(M, dim) * 0.25
    else:
        delta = rand(M, batch, dim, L) * 0.4 + 0.05
        bias = rand(M, dim) * 0.1
    inputs = dict(
        u=randn(M, batch, dim, L), delta=delta, A=-torch.exp(randn(M, dim, N) * 0.5),
        B=randn(M, batch, N, L), C=randn(M, batch, N, L),
        D=randn(M, dim) if D else None,
        z=randn(M, batch, dim, L) if z else None,
        delta_bias=bias if delta_bias else None,
        coupling=torch.softmax(randn(M), 0) if coupling else None,
        initial_state=randn(batch, dim, N) * 0.5 if initial_state else None)
    pdtype = param_dtype(dtype)
    out = {}
    for name, x in inputs.items():
        if x is not None:
            x = x.to(device=device, dtype=dtype if name in ("u", "delta", "B", "C", "z")
                     else pdtype)
        out[name] = x
    out["delta_softplus"] = delta_softplus
    return out


def map_tensors(inputs: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """A copy of ``inputs`` with ``fn`` applied to every tensor (other values kept)."""
    return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def to_reference(inputs: dict, device="cpu") -> dict:
    """The same inputs upcast to float64 (on ``device``; the CPU unless the reference's loop is
    too slow there): the reference sees exactly the values (rounded to bf16, say) that the
    kernel sees."""
    return map_tensors(inputs, lambda x: x.detach().to(device, torch.float64))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute when ‖expected‖ = 0). NaN when
    ``actual`` holds a NaN, so that every ``rel_err(...) <= tol`` then fails."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    diff = (a - b).norm().item()
    norm = b.norm().item()
    return diff / norm if norm > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def scan_with_grads(scan: Callable, inputs: dict, dy: torch.Tensor,
                    dfinal: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Runs ``scan(**inputs, return_final_state=True)`` and back-propagates
    ℓ = Σ y·dy + Σ final·dfinal (dfinal None: the final state is unused).

    Gradients are taken with respect to the tensors passed: an input that already requires
    grad (a strided view of a leaf, say) is used as it is, any other is replaced by a leaf
    copy. Returns y, final_state and "d<name>" for every tensor argument present; an input
    the outputs do not depend on (A when L = 0, say) gets a zero gradient.
    ``scan`` is the operator or the reference.
    """
    args = map_tensors(inputs, lambda x: x if x.requires_grad
                       else x.detach().clone().requires_grad_(True))
    y, final = scan(**args, return_final_state=True)
    loss = (y * dy.to(y.dtype)).sum()
    if dfinal is not None:
        loss = loss + (final * dfinal.to(final.dtype)).sum()
    names = [n for n in SCAN_TENSOR_ARGS if args.get(n) is not None]
    grads = torch.autograd.grad(loss, [args[n] for n in names], allow_unused=True)
    out = {"y": y.detach(), "final_state": final.detach()}
    for name, grad in zip(names, grads):
        out["d" + name] = torch.zeros_like(args[name]) if grad is None else grad
    return out


def pytest_sessionfinish(session, exitstatus):
    """Removes the run's own compile cache (above)."""
    if _COMPILE_CACHE is not None:
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)
