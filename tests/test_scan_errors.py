"""Bad input (contract.md): each check raises RuntimeError naming the operator, the argument, what
was expected and what was received. The messages asserted here are the contract users see."""
import re

import pytest
import torch

from conftest import SCAN_TENSOR_ARGS, make_scan_inputs, map_tensors, requires_cuda
from coupled_mamba_ext import coupled_selective_scan, coupled_selective_state_update

M, BATCH, DIM, L, N = 3, 2, 5, 7, 4
SCAN = "coupled_selective_scan"


def base_inputs(dtype=torch.float32):
    return make_scan_inputs(M, BATCH, DIM, L, N, dtype=dtype, seed=0)


def _modified(make_base, **changes):
    """A case: make_base()'s inputs with some arguments replaced (functions of those inputs)."""
    def make():
        inputs = make_base()
        inputs.update({k: f(inputs) for k, f in changes.items()})
        return inputs
    return make


def _set(**changes):
    return _modified(base_inputs, **changes)


def _randn(*shape, dtype=torch.float32):
    return lambda _: torch.randn(*shape, dtype=dtype)


# (id, inputs, message). Messages are matched literally.
SCAN_CASES = [
    # wrong rank
    ("u-rank", _set(u=lambda x: x["u"][0]),
     "argument 'u' expected 4 dims (M, batch, dim, L), got 3 dims with shape (2, 5, 7)"),
    ("delta-rank", _set(delta=lambda x: x["delta"][..., 0]),
     "argument 'delta' expected 4 dims (M, batch, dim, L), same as u, got 3 dims with shape "
     "(3, 2, 5)"),
    ("A-rank", _set(A=lambda x: x["A"][0]),
     "argument 'A' expected 3 dims (M, dim, N), got 2 dims with shape (5, 4)"),
    ("B-rank", _set(B=lambda x: x["B"][None]),
     "argument 'B' expected 4 dims (M, batch, N, L), got 5 dims with shape (1, 3, 2, 4, 7)"),
    ("coupling-rank", _set(coupling=lambda x: x["coupling"][:, None]),
     "argument 'coupling' expected 1 dims (M,), got 2 dims with shape (3, 1)"),
    ("initial_state-rank", _set(initial_state=lambda x: x["initial_state"][0]),
     "argument 'initial_state' expected 3 dims (batch, dim, N), got 2 dims with shape (5, 4)"),
    # mismatched M
    ("M-A", _set(A=lambda x: x["A"][:2]),
     "argument 'A' expected shape (3, 5, 4) (M, dim, N), got (2, 5, 4)"),
    ("M-C", _set(C=lambda x: x["C"][:2]),
     "argument 'C' expected shape (3, 2, 4, 7) (M, batch, N, L), got (2, 2, 4, 7)"),
    ("M-D", _set(D=_randn(4, DIM)), "argument 'D' expected shape (3, 5) (M, dim), got (4, 5)"),
    ("M-coupling", _set(coupling=_randn(2)),
     "argument 'coupling' expected shape (3,) (M,), got (2,)"),
    # mismatched batch
    ("batch-B", _set(B=lambda x: x["B"][:, :1]),
     "argument 'B' expected shape (3, 2, 4, 7) (M, batch, N, L), got (3, 1, 4, 7)"),
    ("batch-z", _set(z=_randn(M, 3, DIM, L)),
     "argument 'z' expected shape (3, 2, 5, 7) (M, batch, dim, L), same as u, got (3, 3, 5, 7)"),
    ("batch-initial_state", _set(initial_state=_randn(1, DIM, N)),
     "argument 'initial_state' expected shape (2, 5, 4) (batch, dim, N), got (1, 5, 4)"),
    # mismatched dim
    ("dim-delta", _set(delta=lambda x: x["delta"][:, :, :4]),
     "argument 'delta' expected shape (3, 2, 5, 7) (M, batch, dim, L), same as u, got "
     "(3, 2, 4, 7)"),
    ("dim-A", _set(A=_randn(M, 6, N)),
     "argument 'A' expected shape (3, 5, 4) (M, dim, N), got (3, 6, 4)"),
    ("dim-delta_bias", _set(delta_bias=_randn(M, 4)),
     "argument 'delta_bias' expected shape (3, 5) (M, dim), got (3, 4)"),
    # mismatched L
    ("L-z", _set(z=lambda x: x["z"][..., :6]),
     "argument 'z' expected shape (3, 2, 5, 7) (M, batch, dim, L), same as u, got (3, 2, 5, 6)"),
    ("L-B", _set(B=_randn(M, BATCH, N, L + 1)),
     "argument 'B' expected shape (3, 2, 4, 7) (M, batch, N, L), got (3, 2, 4, 8)"),
    # mismatched N (A fixes N)
    ("N-C", _set(C=lambda x: x["C"][:, :, :3]),
     "argument 'C' expected shape (3, 2, 4, 7) (M, batch, N, L), got (3, 2, 3, 7)"),
    ("N-initial_state", _set(initial_state=_randn(BATCH, DIM, N + 1)),
     "argument 'initial_state' expected shape (2, 5, 4) (batch, dim, N), got (2, 5, 5)"),
    # unsupported or inconsistent dtypes
    ("dtype-u-int32", _set(u=lambda x: x["u"].to(torch.int32)),
     "argument 'u' expected dtype float32, float16, bfloat16 or float64, got Int"),
    ("dtype-delta", _set(delta=lambda x: x["delta"].to(torch.bfloat16)),
     "argument 'delta' expected dtype Float (same as u), got BFloat16"),
    ("dtype-C", _set(C=lambda x: x["C"].half()),
     "argument 'C' expected dtype Float (same as u), got Half"),
    ("dtype-A-float64", _set(A=lambda x: x["A"].double()),
     "argument 'A' expected dtype Float (always float32), got Double"),
    ("dtype-D-float64", _set(D=lambda x: x["D"].double()),
     "argument 'D' expected dtype Float (always float32), got Double"),
    ("dtype-coupling-half", _set(coupling=lambda x: x["coupling"].half()),
     "argument 'coupling' expected dtype Float (always float32), got Half"),
    ("dtype-initial_state", _set(initial_state=lambda x: x["initial_state"].double()),
     "argument 'initial_state' expected dtype Float (always float32), got Double"),
    # sizes beyond the kernels' limits
    ("N-257", _set(A=_randn(M, DIM, 257), B=_randn(M, BATCH, 257, L), C=_randn(M, BATCH, 257, L),
                   initial_state=lambda _: None),
     "argument 'A' expected a state size N from 1 to 256 (last dim), got 257"),
    ("M-17", lambda: make_scan_inputs(17, BATCH, DIM, L, N),
     "argument 'u' expected 1 to 16 modalities along dim 0, got 17"),
    ("M-0", _set(**{k: (lambda k: lambda x: x[k][:0])(k)
                    for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling")}),
     "argument 'u' expected 1 to 16 modalities along dim 0, got 0"),
    ("M-0-default-coupling",
     _set(**{k: (lambda k: lambda x: x[k][:0])(k)
             for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
          coupling=lambda _: None),
     "argument 'u' expected 1 to 16 modalities along dim 0, got 0"),
    ("u-0-dims", _set(u=lambda _: torch.tensor(1.0), coupling=lambda _: None),
     "argument 'u' expected 4 dims (M, batch, dim, L), got 0 dims with shape ()"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in SCAN_CASES],
                         ids=[c[0] for c in SCAN_CASES])
def test_scan_rejects_bad_input(make, message):
    inputs = make()
    with pytest.raises(RuntimeError, match=re.escape(f"{SCAN}: {message}")):
        coupled_selective_scan(**inputs)
    # The registered op checks too: torch.ops.coupled_mamba.scan called directly is public.
    args = dict(inputs)
    if args["coupling"] is None:
        args["coupling"] = torch.full((args["u"].shape[0] if args["u"].dim() else M,), 1.0)
    with pytest.raises(RuntimeError, match=re.escape(f"{SCAN}: {message}")):
        torch.ops.coupled_mamba.scan(**args)


def test_scan_backward_op_checks_its_own_arguments():
    """The backward op is public too: its extra arguments are checked like the forward's."""
    inputs = base_inputs()
    args = dict(inputs, delta_softplus=True)
    _, _, chunk_states, y_ungated = torch.ops.coupled_mamba.scan(**args)
    bad_dy = torch.zeros(M, BATCH, DIM, L + 1)
    with pytest.raises(RuntimeError, match=re.escape(
            "coupled_selective_scan backward: argument 'dy' expected shape (3, 2, 5, 7) "
            "(M, batch, dim, L), got (3, 2, 5, 8)")):
        torch.ops.coupled_mamba.scan_backward(bad_dy, None, **args, chunk_states=chunk_states,
                                              y_ungated=y_ungated)
    with pytest.raises(RuntimeError, match=re.escape(
            "coupled_selective_scan backward: argument 'chunk_states' expected shape "
            "(2, 5, 4) (batch, dim, n_chunks·N), from forward, got (2, 5, 8)")):
        torch.ops.coupled_mamba.scan_backward(
            torch.zeros(M, BATCH, DIM, L), None, **args,
            chunk_states=torch.zeros(BATCH, DIM, 2 * N), y_ungated=y_ungated)


# ------------------------------------------------------------------------------ state update
UPDATE = "coupled_selective_state_update"


def update_inputs():
    inputs = base_inputs()
    state = inputs.pop("initial_state")
    for name in ("u", "delta", "z", "B", "C"):
        inputs[name] = inputs[name][..., 0]
    return dict(inputs, state=state)


def _update(**changes):
    return _modified(update_inputs, **changes)


# The step's arguments have no L axis: messages name the shapes the caller passed.
UPDATE_CASES = [
    ("u-rank", _update(u=_randn(M, BATCH, DIM, L)),
     r"argument 'u' expected 3 dims \(M, batch, dim\), got 4 dims with shape \(3, 2, 5, 7\)"),
    ("delta-rank", _update(delta=_randn(M, BATCH, DIM, L)),
     r"argument 'delta' expected 3 dims \(M, batch, dim\).*, got 4 dims with shape "
     r"\(3, 2, 5, 7\)$"),
    ("B-rank", _update(B=_randn(M, BATCH, N, L)),
     r"argument 'B' expected 3 dims \(M, batch, N\), got 4 dims with shape \(3, 2, 4, 7\)"),
    ("C-rank", _update(C=_randn(M, BATCH, N, L)),
     r"argument 'C' expected 3 dims \(M, batch, N\), got 4 dims with shape \(3, 2, 4, 7\)"),
    ("dim-delta", _update(delta=_randn(M, BATCH, 4)),
     r"argument 'delta' expected shape \(3, 2, 5\) .*got \(3, 2, 4\)$"),
    ("N-B", _update(B=_randn(M, BATCH, N + 1)),
     r"argument 'B' expected shape \(3, 2, 4\) .*got \(3, 2, 5\)$"),
    ("state-shape", _update(state=_randn(BATCH, DIM, N + 1)),
     r"argument 'state' expected shape \(2, 5, 4\) \(batch, dim, N\), got \(2, 5, 5\)$"),
    ("state-dtype", _update(state=lambda x: x["state"].double()),
     r"argument 'state' expected dtype Float \(always float32\), got Double$"),
    ("M-A", _update(A=_randn(2, DIM, N)),
     r"argument 'A' expected shape \(3, 5, 4\) \(M, dim, N\), got \(2, 5, 4\)$"),
]


@pytest.mark.parametrize("make, pattern", [c[1:] for c in UPDATE_CASES],
                         ids=[c[0] for c in UPDATE_CASES])
def test_state_update_rejects_bad_input(make, pattern):
    inputs = make()
    with pytest.raises(RuntimeError) as error:
        coupled_selective_state_update(**inputs)
    first_line = str(error.value).splitlines()[0]
    assert re.search(f"^{UPDATE}: {pattern}", first_line), first_line


# ------------------------------------------------------------------------------ devices
# A call with any argument on the meta device is sent to the fake kernel (ops.py), whatever
# the devices of the others; the CPU and CUDA kernels check their own arguments (C++). Both
# must refuse a mix of devices. The C++ check is reached on the CPU by sending the call to
# the CPU kernel itself.
CPU_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
OP_ROUTES = {
    "dispatcher": lambda op, args: op(**args),
    "cpu-kernel": lambda op, args: op.default.redispatch(CPU_KERNEL, **args),
}
BACKWARD_TENSOR_ARGS = ("dy", "dfinal_state", "u", "delta", "A", "B", "C", "D", "z",
                        "delta_bias", "coupling", "initial_state", "chunk_states", "y_ungated")
UPDATE_TENSOR_ARGS = ("state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling")
# (the device of the argument moved, that of all the others)
DEVICE_MIXES = [pytest.param(("meta", "cpu"), id="meta-among-cpu"),
                pytest.param(("cpu", "meta"), id="cpu-among-meta")] + [
    pytest.param(mix, id=f"{mix[0]}-among-{mix[1]}", marks=[pytest.mark.cuda, requires_cuda])
    for mix in (("cuda", "cpu"), ("cpu", "cuda"))]


def _mixed_devices(args, name, mix):
    """args with ``name`` on device mix[0] and every other tensor on mix[1]; returns them
    and the message expected. The devices are compared with u's, so with u moved the first
    argument checked, delta, is named."""
    alone, other = mix
    args = {k: v.to(alone if k == name else other) if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}
    bad = "delta" if name == "u" else name
    return args, (f"argument '{bad}' expected device {args['u'].device} (the device of u), "
                  f"got {args[bad].device}")


def _assert_refused(call, op_name, message):
    with pytest.raises(RuntimeError, match=re.escape(f"{op_name}: {message}")):
        call()


@pytest.mark.parametrize("mix", DEVICE_MIXES)
@pytest.mark.parametrize("name", SCAN_TENSOR_ARGS)
def test_scan_refuses_arguments_on_different_devices(name, mix):
    args, message = _mixed_devices(base_inputs(), name, mix)
    _assert_refused(lambda: coupled_selective_scan(**args), SCAN, message)
    for route in OP_ROUTES.values():
        _assert_refused(lambda: route(torch.ops.coupled_mamba.scan, args), SCAN, message)


@pytest.mark.parametrize("mix", DEVICE_MIXES)
@pytest.mark.parametrize("name, with_z", [(n, True) for n in BACKWARD_TENSOR_ARGS] +
                         [(n, False) for n in BACKWARD_TENSOR_ARGS if n != "z"])
def test_scan_backward_refuses_arguments_on_different_devices(name, with_z, mix):
    inputs = dict(base_inputs(), z=None) if not with_z else base_inputs()
    _, _, chunk_states, y_ungated = torch.ops.coupled_mamba.scan(**inputs)
    args = dict(dy=torch.zeros(M, BATCH, DIM, L), dfinal_state=torch.zeros(BATCH, DIM, N),
                **inputs, chunk_states=chunk_states, y_ungated=y_ungated)
    args, message = _mixed_devices(args, name, mix)
    for route in OP_ROUTES.values():
        _assert_refused(lambda: route(torch.ops.coupled_mamba.scan_backward, args),
                        f"{SCAN} backward", message)


@pytest.mark.parametrize("mix", DEVICE_MIXES)
@pytest.mark.parametrize("name", UPDATE_TENSOR_ARGS)
def test_state_update_refuses_arguments_on_different_devices(name, mix):
    args, message = _mixed_devices(update_inputs(), name, mix)
    _assert_refused(lambda: coupled_selective_state_update(**args), UPDATE, message)
    for route in OP_ROUTES.values():
        _assert_refused(lambda: route(torch.ops.coupled_mamba.state_update, args), UPDATE,
                        message)


def test_all_meta_arguments_give_the_output_shapes():
    """Meta tensors alone are a shape computation (what tracing relies on)."""
    inputs = map_tensors(base_inputs(), lambda x: x.to("meta"))
    y, final_state = coupled_selective_scan(**inputs, return_final_state=True)
    assert (y.device.type, y.shape) == ("meta", (M, BATCH, DIM, L))
    assert (final_state.device.type, final_state.shape) == ("meta", (BATCH, DIM, N))
    _, _, chunk_states, y_ungated = torch.ops.coupled_mamba.scan(**inputs)
    grads = torch.ops.coupled_mamba.scan_backward(
        torch.zeros(M, BATCH, DIM, L, device="meta"), None, **inputs,
        chunk_states=chunk_states, y_ungated=y_ungated)
    assert all(g.device.type == "meta" for g in grads)
    assert [tuple(g.shape) for g in grads[:5]] == [tuple(inputs[k].shape)
                                                   for k in ("u", "delta", "A", "B", "C")]
    y, new_state = coupled_selective_state_update(**map_tensors(update_inputs(),
                                                                lambda x: x.to("meta")))
    assert (y.shape, new_state.shape) == ((M, BATCH, DIM), (BATCH, DIM, N))
