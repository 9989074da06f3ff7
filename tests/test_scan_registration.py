"""The operators as registered PyTorch ops (docs/contract.md): torch.library.opcheck (schema, fake
kernels, autograd registration, AOT dispatch), torch.compile(fullgraph=True) forward and
backward against eager, torch.export with a dynamic length, and build_info()."""
import os
import re
import subprocess
import sys

import pytest
import torch

import coupled_mamba_ext
from conftest import SCAN_TENSOR_ARGS, make_scan_inputs, map_tensors
from coupled_mamba_ext import build_info, coupled_selective_scan

OPS = torch.ops.coupled_mamba


def op_args(inputs, requires_grad):
    """Keyword arguments of torch.ops.coupled_mamba.scan: the public function's, with the
    coupling made explicit (the op has no default)."""
    args = dict(inputs)
    if args["coupling"] is None:
        M = args["u"].shape[0]
        args["coupling"] = torch.full((M,), 1.0 / M, dtype=args["A"].dtype,
                                      device=args["u"].device)
    if requires_grad:
        args = map_tensors(args, lambda x: x.detach().clone().requires_grad_(True))
    return args


# (id, make_scan_inputs keyword arguments): with and without the optional arguments, L
# across a chunk boundary and L = 0, every input dtype.
OPCHECK_CASES = [
    ("all-args", dict()),
    ("no-optional", dict(D=False, z=False, delta_bias=False, delta_softplus=False,
                         initial_state=False)),
    ("z-only", dict(D=False, delta_bias=False, initial_state=False)),
    ("L0", dict(L=0)),
    ("bf16", dict(dtype=torch.bfloat16)),
    ("fp16", dict(dtype=torch.float16, delta_softplus=False)),
    ("fp64", dict(dtype=torch.float64)),
]


OPCHECK_OPTIONS, OPCHECK_IDS = [c[1] for c in OPCHECK_CASES], [c[0] for c in OPCHECK_CASES]


def opcheck_inputs(device, options):
    options = dict(options)
    if device != "cpu" and options.get("dtype") == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (docs/contract.md)")
    L = options.pop("L", 70)
    return make_scan_inputs(2, 2, 3, L, 4, device=device, seed=31, **options)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("options", OPCHECK_OPTIONS, ids=OPCHECK_IDS)
def test_opcheck_scan(device, options, requires_grad):
    args = op_args(opcheck_inputs(device, options), requires_grad)
    torch.library.opcheck(OPS.scan.default, (), args)


@pytest.mark.parametrize("options", OPCHECK_OPTIONS, ids=OPCHECK_IDS)
def test_opcheck_scan_backward(device, options):
    args = op_args(opcheck_inputs(device, options), requires_grad=False)
    y, final, chunk_states, y_ungated = OPS.scan(**args)
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(y.shape, generator=g).to(y)
    dfinal = torch.randn(final.shape, generator=g).to(final)
    torch.library.opcheck(OPS.scan_backward.default, (dy, dfinal),
                          dict(args, chunk_states=chunk_states, y_ungated=y_ungated))


@pytest.mark.parametrize("options", [c[1] for c in OPCHECK_CASES if c[0] != "L0"],
                         ids=[c[0] for c in OPCHECK_CASES if c[0] != "L0"])
def test_opcheck_state_update(device, options):
    inputs = op_args(opcheck_inputs(device, options), requires_grad=False)
    state = inputs.pop("initial_state")
    if state is None:
        state = torch.zeros(2, 3, 4, dtype=inputs["A"].dtype, device=device)
    for name in ("u", "delta", "z", "B", "C"):
        if inputs[name] is not None:
            inputs[name] = inputs[name][..., 0]
    torch.library.opcheck(OPS.state_update.default, (state,), inputs)


# ------------------------------------------------------------------------------ torch.compile
def _loss_and_outputs(u, delta, A, B, C, D, z, delta_bias, coupling, initial_state, dy, dfinal):
    y, final = coupled_selective_scan(u, delta, A, B, C, D, z, delta_bias, True, coupling,
                                      initial_state, return_final_state=True)
    return (y * dy).sum() + (final * dfinal).sum(), y, final


@pytest.mark.slow
@pytest.mark.parametrize("default_coupling", [False, True], ids=["coupling", "default-coupling"])
def test_compile_fullgraph_matches_eager(device, default_coupling):
    """torch.compile(fullgraph=True) of a function calling the operator: no graph break, and
    the same outputs and gradients as eager."""
    torch._dynamo.reset()
    inputs = make_scan_inputs(3, 2, 5, 70, 8, device=device, seed=32,
                              coupling=not default_coupling)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(3, 2, 5, 70, generator=g).to(device)
    dfinal = torch.randn(2, 5, 8, generator=g).to(device)
    compiled = torch.compile(_loss_and_outputs, fullgraph=True)

    results = []
    for fn in (_loss_and_outputs, compiled):
        args = map_tensors(inputs, lambda x: x.detach().clone().requires_grad_(True))
        tensors = [args[name] for name in SCAN_TENSOR_ARGS]
        loss, y, final = fn(*tensors, dy, dfinal)
        grads = torch.autograd.grad(loss, [t for t in tensors if t is not None])
        results.append((y, final) + grads)
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


# ------------------------------------------------------------------------------ torch.export
class _Scan(torch.nn.Module):
    """The operator with every argument, as a module for torch.export."""

    def forward(self, u, delta, A, B, C, D, z, delta_bias, coupling, initial_state):
        return coupled_selective_scan(u, delta, A, B, C, D, z, delta_bias, True, coupling,
                                      initial_state, return_final_state=True)


def test_export_with_a_dynamic_length_matches_eager(device, tmp_path):
    """torch.export with the sequence length dynamic (2 to 4096), traced at L = 10 (one
    chunk): the one program runs lengths within a chunk and across chunks (L = 3, 64, 65,
    200) with eager's outputs, also after a save / load round trip."""
    def inputs(L):
        args = make_scan_inputs(3, 2, 5, L, 8, device=device, seed=L)
        return tuple(args[name] for name in SCAN_TENSOR_ARGS)

    L = torch.export.Dim("L", min=2, max=4096)
    time_axis = {"u": {3: L}, "delta": {3: L}, "B": {3: L}, "C": {3: L}, "z": {3: L}}
    dynamic = {name: time_axis.get(name) for name in SCAN_TENSOR_ARGS}
    program = torch.export.export(_Scan(), inputs(10), dynamic_shapes=dynamic)
    torch.export.save(program, tmp_path / "scan.pt2")
    loaded = torch.export.load(tmp_path / "scan.pt2")
    for length in (3, 64, 65, 200):
        expected = _Scan()(*inputs(length))
        for exported in (program, loaded):
            for got, want in zip(exported.module()(*inputs(length)), expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ build_info
def test_build_info():
    info = build_info()
    assert info["version"] == coupled_mamba_ext.__version__
    # A torch extension only runs against the torch version it was compiled with.
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert all(re.fullmatch(r"\d+\.\d+a?(\+PTX)?", arch) for arch in info["cuda_archs"]), info
    # Archs are those the CUDA kernels were compiled for: none without them.
    assert bool(info["cuda_archs"]) == info["cuda"], info
    # The limits the operator enforces (tests/test_scan_errors.py: N = 257, M = 17 refused).
    assert (info["max_dstate"], info["max_modalities"]) == (256, 16), info


@pytest.mark.skipif(os.environ.get("COUPLED_MAMBA_EXPECT_INSTALLED") != "1",
                    reason="checks an installed wheel; set COUPLED_MAMBA_EXPECT_INSTALLED=1")
def test_runs_from_installed_wheel():
    """Under `make`'s wheel check the tests import the installed package, not the source tree
    (which would hide a wheel missing a file)."""
    path = os.path.realpath(coupled_mamba_ext.__file__)
    assert "site-packages" in path.split(os.sep), path
    archs = os.environ.get("COUPLED_MAMBA_EXPECT_ARCHS")
    if archs:
        assert build_info()["cuda_archs"] == [a for a in archs.split(";") if a], build_info()


@pytest.mark.skipif(os.environ.get("COUPLED_MAMBA_EXPECT_INSTALLED") != "1",
                    reason="checks an installed wheel; set COUPLED_MAMBA_EXPECT_INSTALLED=1")
def test_installed_wheel_has_the_console_script():
    """The wheel's `coupled-mamba` entry point (make demo starts the one of its own
    environment, not this one)."""
    script = os.path.join(os.path.dirname(sys.executable), "coupled-mamba")
    assert os.path.exists(script), script
    done = subprocess.run([script, "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--synthetic-train-size" in done.stdout and "--bc-norm" in done.stdout
