"""coupled_selective_scan_fn, the coupled scan behind mamba_ssm's selective_scan_fn signature:
one modality with the plain-sum coupling is Mamba's scan (against a float64 loop of Mamba's
recurrence written here), the list form is the stacked form, views where views do, the
refused forms, and the example of docs/api.md."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import coupled_mamba_ext.mamba_compat as mamba_compat
from conftest import FWD_TOL, GRAD_TOL, assert_rel_close, make_scan_inputs
from coupled_mamba_ext import coupled_selective_scan, coupled_selective_scan_fn
from coupled_mamba_ext.reference import coupled_scan_ref

BATCH, DIM, L, N = 2, 5, 9, 4
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def mamba_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus, w, x0):
    """Mamba's recurrence for one modality, one step at a time, in float64:
    h[t] = exp(Δ[t] A) x[t-1] + Δ[t] B[t] u[t],  y[t] = C[t]·h[t] + D u[t], gated by silu(z),
    and the carried state x[t] = w h[t] (w = 1: Mamba's scan; the coupling of one modality).
    u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L); D, delta_bias (dim,); w ();
    x0 (batch, dim, N). Returns y (batch, dim, L) and the last state x[L]."""
    delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))
    x = x0
    ys = []
    for t in range(u.shape[-1]):
        step = delta[:, :, t, None]                                     # (batch, dim, 1)
        h = torch.exp(step * A) * x + step * u[:, :, t, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
        x = w * h
    y = torch.stack(ys, dim=-1) + D[:, None] * u
    return y * z * torch.sigmoid(z), x


def mamba_inputs(dtype=torch.float64, seed=0, grouped_BC=False, device="cpu"):
    """One modality's arguments in mamba_ssm's layouts (B, C (batch, 1, N, L) when
    grouped_BC), from make_scan_inputs with M = 1, as leaves requiring grad."""
    x = make_scan_inputs(1, BATCH, DIM, L, N, dtype=dtype, seed=seed, device=device)
    args = {name: x[name][0] for name in ARGS}
    if grouped_BC:
        args["B"], args["C"] = args["B"][:, None], args["C"][:, None]
    args["initial_state"] = x["initial_state"]
    return {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}


def mamba_loop_of(args, coupling):
    """mamba_loop on the float64 values of ``args`` (as given: B, C may carry a group axis)."""
    f64 = {k: v.double() for k, v in args.items()}
    B, C = (f64[k].reshape(BATCH, N, L) for k in ("B", "C"))
    return mamba_loop(f64["u"], f64["delta"], f64["A"], B, C, f64["D"], f64["z"],
                      f64["delta_bias"], True, coupling.double()[0], f64["initial_state"])


def loss_and_grads(y, last, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dlast = torch.randn(last.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * dy).sum() + (last.double() * dlast).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("form", ["tensor", "list", "tuple"])
@pytest.mark.parametrize("grouped_BC", [False, True], ids=["BC3d", "BC4d"])
def test_one_modality_plain_sum_is_mamba_for_every_argument_and_gradient(form, grouped_BC):
    args = mamba_inputs(grouped_BC=grouped_BC)
    coupling = torch.ones(1, dtype=torch.float64, requires_grad=True)
    wrap = {"tensor": lambda x: x, "list": lambda x: [x], "tuple": lambda x: (x,)}[form]
    out, last = coupled_selective_scan_fn(
        *(wrap(args[name]) for name in ARGS), True, True, coupling=coupling,
        initial_state=args["initial_state"])
    if form != "tensor":
        assert type(out) is {"list": list, "tuple": tuple}[form] and len(out) == 1
        out = out[0]
    assert out.shape == (BATCH, DIM, L) and last.shape == (BATCH, DIM, N)
    ref_out, ref_last = mamba_loop_of(args, coupling)
    assert_rel_close(out, ref_out, FWD_TOL[torch.float64], "out")
    assert_rel_close(last, ref_last, FWD_TOL[torch.float64], "last_state")

    leaves = list(args.values()) + [coupling]
    grads = loss_and_grads(out, last, leaves)
    ref_grads = loss_and_grads(ref_out, ref_last, leaves)
    for name, grad, ref in zip(list(args) + ["coupling"], grads, ref_grads):
        assert grad.shape == ref.shape, name
        assert_rel_close(grad, ref, GRAD_TOL[torch.float64], "d" + name)


def test_positional_call_written_for_mamba_ssm_runs_unchanged():
    """mamba_ssm's dtypes: u, delta, B, C, z fp32 or bf16; A, D, delta_bias fp32."""
    for dtype in (torch.float32, torch.bfloat16):
        args = {k: v.detach() for k, v in mamba_inputs().items()}
        u, delta, B, C, z = (args[k].to(dtype) for k in ("u", "delta", "B", "C", "z"))
        A, D, delta_bias = (args[k].float() for k in ("A", "D", "delta_bias"))
        out, last_state = coupled_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True,
                                                    True)
        assert out.dtype == dtype and last_state.dtype == torch.float32
        rounded = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                       initial_state=torch.zeros(BATCH, DIM, N))
        ref_out, ref_last = mamba_loop_of(rounded, torch.ones(1))
        assert_rel_close(out, ref_out, FWD_TOL[dtype], f"out ({dtype})")
        assert_rel_close(last_state, ref_last, FWD_TOL[dtype], f"last_state ({dtype})")
        # Without return_last_state: out alone, as mamba_ssm returns it.
        alone = coupled_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True)
        assert torch.equal(alone, out)
    with pytest.raises(TypeError, match="positional argument"):  # coupling is keyword-only
        coupled_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, True, True,
                                  torch.ones(1))


def test_narrower_parameters_are_cast_up_and_wider_ones_refused():
    args = {k: v.detach() for k, v in mamba_inputs(dtype=torch.float32).items()}
    base = [args[name] for name in ARGS]
    expected = coupled_selective_scan_fn(*base, True)
    # bf16 parameters of a half-precision model: cast up, gradient back in bf16.
    params = {k: args[k].bfloat16().requires_grad_(True) for k in ("A", "D", "delta_bias")}
    out = coupled_selective_scan_fn(*[params.get(name, args[name]) for name in ARGS], True)
    upcast = coupled_selective_scan_fn(
        *[params[name].detach().float() if name in params else args[name] for name in ARGS],
        True)
    assert torch.equal(out, upcast) and not torch.equal(out, expected)
    out.sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0 for p in params.values())
    # fp32 parameters beside fp64 inputs (mamba_ssm's fp32 D): cast up.
    f64 = [args[n].double() if n not in ("A", "D", "delta_bias") else args[n] for n in ARGS]
    ref, _ = mamba_loop_of({**{n: x for n, x in zip(ARGS, f64)},
                            "initial_state": torch.zeros(BATCH, DIM, N)}, torch.ones(1))
    assert_rel_close(coupled_selective_scan_fn(*f64, True), ref, FWD_TOL[torch.float64],
                     "fp64 inputs, fp32 parameters")
    # fp64 D beside fp32 inputs would lose digits: the operator refuses it.
    wider = [args[n].double() if n == "D" else args[n] for n in ARGS]
    with pytest.raises(RuntimeError, match="argument 'D' expected dtype Float"):
        coupled_selective_scan_fn(*wider, True)


def stacked_and_lists(M=3, seed=0, device="cpu"):
    """Stacked inputs (float32, every argument) and the same as lists of M per-modality
    tensors in mamba_ssm's layouts, all leaves requiring grad."""
    x = make_scan_inputs(M, BATCH, DIM, L, N, seed=seed, coupling=False, initial_state=False,
                         device=device)
    stacked = {name: x[name].clone().requires_grad_(True) for name in ARGS}
    lists = {name: [t.clone().requires_grad_(True) for t in x[name].unbind(0)]
             for name in ARGS}
    return stacked, lists


@pytest.mark.parametrize("container", [list, tuple])
def test_list_form_equals_stacked_form(container):
    stacked, lists = stacked_and_lists()
    coupling = torch.tensor([0.5, 0.3, 0.2])
    y, final = coupled_selective_scan(**stacked, delta_softplus=True, coupling=coupling,
                                      return_final_state=True)
    outs, last = coupled_selective_scan_fn(*(container(lists[n]) for n in ARGS), True, True,
                                           coupling=coupling)
    assert type(outs) is container and len(outs) == 3
    assert torch.equal(torch.stack(outs), y) and torch.equal(last, final)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((y * dy).sum() + final.sum(), [stacked[n] for n in ARGS])
    list_grads = torch.autograd.grad((torch.stack(outs) * dy).sum() + last.sum(),
                                     [t for n in ARGS for t in lists[n]])
    for i, (name, grad) in enumerate(zip(ARGS, grads)):
        assert torch.equal(torch.stack(list_grads[3 * i:3 * i + 3]), grad), "d" + name
    # The stacked form through coupled_selective_scan_fn is coupled_selective_scan.
    same = coupled_selective_scan_fn(*(stacked[n] for n in ARGS), True, coupling=coupling)
    assert torch.equal(same, y)


def test_shared_arguments_are_broadcast_and_mamba_layouts_are_views(monkeypatch, device):
    """A shared argument reaches the operator with stride 0 over the modalities, B with a
    group axis of size 1 and a single modality as views of what was given: no copy."""
    seen = {}

    def recording_scan(**kwargs):
        seen.update(kwargs)
        return coupled_selective_scan(**kwargs)

    monkeypatch.setattr(mamba_compat, "coupled_selective_scan", recording_scan)
    stacked, lists = stacked_and_lists(device=device)
    A, D = (stacked[k][0].detach().requires_grad_(True) for k in ("A", "D"))
    # List form, A and D one tensor each (shared) = stacked form with them repeated; the
    # shared one's gradient is the sum of the modalities' gradients.
    outs = coupled_selective_scan_fn(lists["u"], lists["delta"], A, lists["B"], lists["C"], D,
                                     lists["z"], lists["delta_bias"], True)
    assert seen["A"].stride(0) == 0 and seen["A"].data_ptr() == A.data_ptr()
    assert seen["D"].stride(0) == 0 and seen["D"].data_ptr() == D.data_ptr()
    repeated = {k: x.detach().repeat(3, *[1] * x.dim()).requires_grad_(True)
                for k, x in (("A", A), ("D", D))}
    y = coupled_selective_scan(**dict(stacked, **repeated), delta_softplus=True)
    assert torch.equal(torch.stack(outs), y)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
    grads = torch.autograd.grad((torch.stack(outs) * dy).sum(), [A, D])
    repeated_grads = torch.autograd.grad((y * dy).sum(), [repeated["A"], repeated["D"]])
    for name, grad, per_modality in zip("AD", grads, repeated_grads):
        assert_rel_close(grad, per_modality.sum(0), GRAD_TOL[torch.float32], "d" + name)
    A, D = A.detach(), D.detach()
    # Stacked form, A (dim, N) and D (dim,) shared, B and C with a group axis of size 1.
    B5, C5 = stacked["B"].detach()[:, :, None], stacked["C"].detach()[:, :, None]
    same = coupled_selective_scan_fn(stacked["u"], stacked["delta"], A, B5, C5, D,
                                     stacked["z"], stacked["delta_bias"], True)
    assert torch.equal(same, y)
    assert seen["A"].stride(0) == 0 and seen["B"].data_ptr() == B5.data_ptr()
    # One modality in mamba_ssm's layouts: every argument a view of the one given.
    one = {k: v.detach() for k, v in
           mamba_inputs(dtype=torch.float32, grouped_BC=True, device=device).items()}
    coupled_selective_scan_fn(*(one[n] for n in ARGS), True)
    for name in ARGS:
        assert seen[name].data_ptr() == one[name].data_ptr(), name


def _single(**changes):
    args = {k: v.detach() for k, v in mamba_inputs(dtype=torch.float32).items()}
    args.update(changes)
    return [args[n] for n in ARGS], {}


def _listed(**changes):
    _, lists = stacked_and_lists()
    lists = {k: [t.detach() for t in v] for k, v in lists.items()}
    lists.update(changes)
    return [lists[n] for n in ARGS], {}


def _stacked(**changes):
    stacked, _ = stacked_and_lists()
    stacked = {k: v.detach() for k, v in stacked.items()}
    stacked.update(changes)
    return [stacked[n] for n in ARGS], {}


REFUSED = [
    ("time-invariant-B", lambda: _single(B=torch.randn(DIM, N)), ValueError,
     "argument 'B' has shape (5, 4), a time-invariant B (dim, N): not supported, the coupled "
     "scan takes an input-dependent B of shape (batch, N, L) or (batch, 1, N, L)"),
    ("time-invariant-C-in-list", lambda: _listed(C=[torch.randn(BATCH, N, L),
                                                    torch.randn(DIM, N), torch.randn(DIM, N)]),
     ValueError, "argument 'C[1]' has shape (5, 4), a time-invariant C (dim, N): not supported"),
    ("time-invariant-B-shared-in-stacked", lambda: _stacked(B=torch.randn(DIM, N)), ValueError,
     "argument 'B' has shape (5, 4), a time-invariant B (dim, N): not supported"),
    ("grouped-B", lambda: _single(B=torch.randn(BATCH, 2, N, L)), ValueError,
     "argument 'B' has shape (2, 2, 4, 9), a grouped B with 2 groups: not supported, the "
     "coupled scan takes one B per modality for all channels, (batch, N, L) or "
     "(batch, 1, N, L)"),
    ("grouped-C-stacked", lambda: _stacked(C=torch.randn(3, BATCH, 5, N, L)), ValueError,
     "argument 'C' has shape (3, 2, 5, 4, 9), a grouped C with 5 groups: not supported"),
    ("list-length", lambda: _listed(delta=[torch.rand(BATCH, DIM, L)] * 2), ValueError,
     "argument 'delta' expected 3 tensors (one per modality, as u), got 2"),
    ("list-element-shape", lambda: _listed(A=[-torch.rand(DIM, N), -torch.rand(DIM, N),
                                              -torch.rand(DIM, N + 1)]), ValueError,
     "argument 'A[2]' expected shape (5, 4) and dtype torch.float32 (as A[0]), got (5, 5) "
     "and torch.float32"),
    ("list-element-rank", lambda: _listed(D=[torch.randn(DIM, 1)] * 3), ValueError,
     "argument 'D[0]' expected 1 dims (dim,), got 2 dims with shape (5, 1)"),
    ("u-rank", lambda: _single(u=torch.randn(DIM, L)), ValueError,
     "argument 'u' expected 3 dims (batch, dim, L), (M, batch, dim, L) or a list of "
     "(batch, dim, L), got 2 dims with shape (5, 9)"),
    ("empty-list", lambda: ([[]] + _listed()[0][1:], {}), ValueError,
     "argument 'u' expected at least one tensor (one per modality), got an empty list"),
    ("list-element-type", lambda: _listed(z=[torch.randn(BATCH, DIM, L), None, 1.0]),
     TypeError, "argument 'z[1]' expected a torch.Tensor, got NoneType"),
    ("list-in-stacked", lambda: _stacked(B=list(torch.randn(3, BATCH, N, L))), TypeError,
     "argument 'B' expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_forms_say_why(case):
    _, make, error, message = case
    args, kwargs = make()
    with pytest.raises(error, match="^coupled_selective_scan_fn: " + re.escape(message)):
        coupled_selective_scan_fn(*args, True, **kwargs)


def _docs_example() -> str:
    api = Path(__file__).resolve().parents[1] / "docs" / "api.md"
    if not api.is_file():
        pytest.skip(f"{api} is absent (docs/ is not shipped with the installed package)")
    text = api.read_text()
    assert "\n## Coming from mamba_ssm\n" in text, "docs/api.md lost its section"
    section = text.split("\n## Coming from mamba_ssm\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    examples = [b for b in blocks if "import" in b]
    assert len(examples) == 1, "expected one runnable example in 'Coming from mamba_ssm'"
    return examples[0]


def test_docs_example_switches_a_per_modality_model_to_coupling(capsys):
    code = _docs_example()
    assert "from coupled_mamba_ext import coupled_selective_scan_fn as selective_scan_fn" in code
    torch.manual_seed(0)
    namespace = {}
    exec(compile(code, "docs/api.md (Coming from mamba_ssm)", "exec"), namespace)
    model, M = namespace["model"], namespace["M"]
    ys = namespace["ys"]
    assert isinstance(ys, list) and len(ys) == M
    # The model's output is the coupled scan (default coupling 1/M) of its lists.
    params = model.per_modality
    ref = coupled_scan_ref(
        *(torch.stack(namespace[k]).double() for k in ("us", "deltas")),
        torch.stack([-torch.exp(p.A_log.detach()) for p in params]).double(),
        *(torch.stack(namespace[k]).double() for k in ("Bs", "Cs")),
        D=torch.stack([p.D.detach() for p in params]).double(),
        z=torch.stack(namespace["zs"]).double(),
        delta_bias=torch.stack([p.dt_bias.detach() for p in params]).double(),
        delta_softplus=True)
    assert_rel_close(torch.stack(ys), ref, FWD_TOL[torch.float32], "docs example")
    for p in params.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
