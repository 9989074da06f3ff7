"""Tests of the Coupled Mamba model, its layer and the baselines (issue 4, docs/contract.md).

Small sizes throughout: the model's math does not depend on them, and the whole file must
stay fast on a 2-core CPU.
"""
import copy
import io
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coupled_mamba_ext.models import (FUSIONS, CoupledMamba, CoupledMambaLayer,
                                      CoupledMambaStack, segment_mean_resample)
from coupled_mamba_ext.reference import coupled_scan_ref

DIMS = (5, 7, 3)
SMALL = dict(d_model=16, n_layers=2, d_state=8, dropout=0.0)
BATCH, STEPS = 3, 10
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def make_model(fusion="coupled", seed=0, **kwargs):
    torch.manual_seed(seed)
    return CoupledMamba(DIMS, **{**SMALL, "fusion": fusion, **kwargs}).eval()


def make_inputs(steps=(STEPS,) * 3, batch=BATCH, seed=1, dims=DIMS):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, L, d, generator=generator) for L, d in zip(steps, dims)]


# ---------------------------------------------------------------------------- the layer
def test_layer_parameters_are_stacked_and_mamba_initialised():
    M, d, N, E = 3, 16, 8, 32
    layer = CoupledMambaLayer(d, M, d_state=N, dt_min=1e-3, dt_max=1e-1)
    assert layer.in_proj.weight.shape == (M, d, 2 * E)
    assert layer.conv_weight.shape == (M, E, 4)
    assert layer.x_proj.weight.shape == (M, E, layer.dt_rank + 2 * N)
    assert layer.dt_rank == math.ceil(N / 8)
    assert layer.out_proj.weight.shape == (M, E, d)
    assert layer.norm.weight.shape == (M, d)
    dt = F.softplus(layer.dt_bias)
    assert dt.shape == (M, E) and dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    A = -torch.exp(layer.A_log)
    assert torch.allclose(A, -torch.arange(1.0, N + 1).expand(M, E, N))
    assert torch.equal(layer.D, torch.ones(M, E))
    assert all(p.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("coupling, expected", [("learned", 1 / 3), ("mean", 1 / 3), ("sum", 1.0)])
def test_layer_coupling_weights(coupling, expected):
    weights = CoupledMambaLayer(16, 3, d_state=8, coupling=coupling).coupling_weights()
    assert torch.allclose(weights, torch.full((3,), expected))


def naive_layer_forward(layer, x):
    """Algorithm 1 written one modality at a time with plain torch ops and the reference
    scan: checks that the stacked weights serve the right modality."""
    M, batch, L, _ = x.shape
    E, N, R = layer.d_inner, layer.d_state, layer.dt_rank
    us, zs, dts, Bs, Cs = [], [], [], [], []
    for m in range(M):
        xm = F.layer_norm(x[m], (layer.d_model,), layer.norm.weight[m], layer.norm.bias[m])
        u, z = (xm @ layer.in_proj.weight[m]).chunk(2, dim=-1)              # (batch, L, E)
        u = F.conv1d(u.transpose(1, 2), layer.conv_weight[m][:, None], layer.conv_bias[m],
                     padding=layer.d_conv - 1, groups=E)[..., :L]            # (batch, E, L)
        u = F.silu(u)
        dt_low, B, C = (u.transpose(1, 2) @ layer.x_proj.weight[m]).split([R, N, N], dim=-1)
        if layer.bc_norm:  # B and C divided by their rms over the N state entries
            B = B / (B.square().mean(-1, keepdim=True) + 1e-6).sqrt()
            C = C / (C.square().mean(-1, keepdim=True) + 1e-6).sqrt()
        dt = F.softplus(dt_low @ layer.dt_proj.weight[m] + layer.dt_bias[m])
        us.append(u), zs.append(z.transpose(1, 2)), dts.append(dt.transpose(1, 2))
        Bs.append(B.transpose(1, 2)), Cs.append(C.transpose(1, 2))
    u, z = torch.stack(us), torch.stack(zs)
    y = coupled_scan_ref(u, torch.stack(dts), -torch.exp(layer.A_log), torch.stack(Bs),
                         torch.stack(Cs), coupling=layer.coupling_weights())
    y = (y + layer.D[:, None, :, None] * u) * F.silu(z)                     # (M, batch, E, L)
    return torch.stack([x[m] + y[m].transpose(1, 2) @ layer.out_proj.weight[m]
                        for m in range(M)])


@pytest.mark.parametrize("coupling, bc_norm", [("learned", False), ("mean", False),
                                               ("sum", False), ("learned", True)])
def test_layer_matches_per_modality_algorithm(coupling, bc_norm):
    torch.manual_seed(0)
    layer = CoupledMambaLayer(16, 3, d_state=8, coupling=coupling, bc_norm=bc_norm)
    with torch.no_grad():  # distinct per-modality values, so a mix-up cannot go unseen
        if coupling == "learned":
            layer.coupling_logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
        layer.norm.weight.uniform_(0.5, 1.5), layer.D.uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 9, 16)
    torch.testing.assert_close(layer(x), naive_layer_forward(layer, x), rtol=1e-4, atol=1e-5)


def test_causal_conv_and_its_gradients_match_a_depthwise_conv1d():
    """The CPU path (shifted products) against one depthwise conv1d per modality, float64:
    output and the gradients of the input, the kernel and the bias."""
    torch.manual_seed(0)
    layer = CoupledMambaLayer(8, 3, d_state=4).double()
    u = torch.randn(3, 2, 7, layer.d_inner, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 2, layer.d_inner, 7, dtype=torch.float64)
    params = (u, layer.conv_weight, layer.conv_bias)
    got = torch.autograd.grad(layer._causal_conv(u), params, grad_out)
    K, E = layer.d_conv, layer.d_inner
    expected_out = torch.stack([
        F.conv1d(u[m].transpose(1, 2), layer.conv_weight[m][:, None], layer.conv_bias[m],
                 padding=K - 1, groups=E)[..., :7] for m in range(3)])
    expected = torch.autograd.grad(expected_out, params, grad_out)
    torch.testing.assert_close(layer._causal_conv(u), expected_out, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(("u", "conv_weight", "conv_bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("coupling, bc_norm", [("learned", False), ("sum", False),
                                               ("learned", True)])
def test_layer_step_equals_forward(coupling, bc_norm):
    torch.manual_seed(0)
    layer = CoupledMambaLayer(16, 3, d_state=8, coupling=coupling, bc_norm=bc_norm)
    x = torch.randn(3, 2, 9, 16)
    with torch.no_grad():
        full = layer(x)
        cache, outputs = layer.init_cache(2), []
        for t in range(x.shape[2]):
            y, cache = layer.step(x[:, :, t], cache)
            outputs.append(y)
    torch.testing.assert_close(torch.stack(outputs, dim=2), full, rtol=1e-5, atol=1e-5)
    assert cache.conv_state.shape == (3, 2, 32, 3) and cache.ssm_state.shape == (2, 32, 8)


@pytest.mark.parametrize("fusion", ["coupled", "average", "concat", "mamba"])
def test_mamba_options_reach_every_mamba_layer(fusion):
    model = make_model(fusion, dt_min=0.25, dt_max=0.5, bc_norm=True)
    layers = [m for m in model.modules() if isinstance(m, CoupledMambaLayer)]
    assert len(layers) == (6 if fusion == "mamba" else 2)
    for layer in layers:
        assert layer.bc_norm
        dt = F.softplus(layer.dt_bias)
        assert dt.min() >= 0.25 * (1 - 1e-5) and dt.max() <= 0.5 * (1 + 1e-5)
    with torch.no_grad():
        changed = model(make_inputs())
        for layer in layers:
            layer.bc_norm = False
        assert not torch.allclose(model(make_inputs()), changed)


@pytest.mark.slow
def test_layer_compiles_fullgraph():
    torch.manual_seed(0)
    layer = CoupledMambaLayer(16, 3, d_state=8)
    x = torch.randn(3, 2, 9, 16)
    expected = layer(x)
    expected.square().sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_stack_exports_with_a_dynamic_length(tmp_path):
    """torch.export of a two-layer CoupledMambaStack with the length dynamic, traced at 10
    steps: the one program gives eager's outputs at lengths within and across the scan's
    64-step chunks, also after a save / load round trip."""
    torch.manual_seed(0)
    stack = CoupledMambaStack(2, 16, 3, d_state=8).eval()
    L = torch.export.Dim("L", min=2, max=4096)
    program = torch.export.export(stack, (torch.randn(3, 2, 10, 16),), dynamic_shapes=({2: L},))
    torch.export.save(program, tmp_path / "stack.pt2")
    loaded = torch.export.load(tmp_path / "stack.pt2")
    for steps in (3, 64, 65, 200):
        x = torch.randn(3, 2, steps, 16)
        expected = stack(x)
        for exported in (program, loaded):
            torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_model_without_lengths_exports_with_a_dynamic_length(fusion):
    """CoupledMamba called without lengths (every step valid) decides its common length from
    the shapes alone, so torch.export takes it with the length dynamic: one program for
    lengths within and across the scan's chunks, eager's outputs bit for bit."""
    model = make_model(fusion)
    L = torch.export.Dim("L", min=2, max=4096)
    program = torch.export.export(model, (make_inputs(),),
                                  dynamic_shapes=([{1: L}] * len(DIMS),))
    for steps in (3, 64, 65, 200):
        xs = make_inputs(steps=(steps,) * len(DIMS), seed=steps)
        torch.testing.assert_close(program.module()(xs), model(xs), rtol=0, atol=0)


def test_resampling_model_exports_with_dynamic_lengths_per_modality():
    """With seq_len (unaligned data) each modality's length may be dynamic on its own: the
    exported program resamples every one (eager skips a modality already at seq_len; the
    resampling is then the identity up to rounding)."""
    model = make_model(seq_len=12)
    dims = [torch.export.Dim(f"L{m}", min=2, max=4096) for m in range(len(DIMS))]
    program = torch.export.export(model, (make_inputs(steps=(10, 17, 30)),),
                                  dynamic_shapes=([{1: d} for d in dims],))
    for steps in ((5, 64, 100), (12, 12, 12), (70, 3, 12)):
        xs = make_inputs(steps=steps, seed=sum(steps))
        torch.testing.assert_close(program.module()(xs), model(xs), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["coupled", "transformer"])
@pytest.mark.parametrize("seq_len", [None, 12], ids=["aligned", "seq_len12"])
def test_model_with_lengths_exports_with_dynamic_lengths(fusion, seq_len):
    """With true lengths, every modality's length dynamic on its own: the exported program
    (which resamples every modality and, without seq_len, keeps the longest padded length)
    gives eager's outputs; lengths out of range fail when it runs, naming the argument."""
    model = make_model(fusion, seq_len=seq_len)
    dims = [torch.export.Dim(f"L{m}", min=2, max=4096) for m in range(len(DIMS))]
    lengths = [torch.tensor([10, 4, 1]), torch.tensor([17, 9, 2]), torch.tensor([30, 2, 30])]
    program = torch.export.export(model, (make_inputs(steps=(10, 17, 30)), lengths),
                                  dynamic_shapes=([{1: d} for d in dims], [None] * len(DIMS)))
    for steps in ((5, 64, 100), (12, 12, 12), (70, 3, 12)):
        xs = make_inputs(steps=steps, seed=sum(steps))
        lengths = [torch.tensor([n, max(1, n // 3), 1]) for n in steps]
        torch.testing.assert_close(program.module()(xs, lengths), model(xs, lengths),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"lengths\[0\]: expected values in \[1, L\]"):
        program.module()(make_inputs(), [torch.tensor([STEPS + 1, 1, 1])] * len(DIMS))


@pytest.mark.slow
def test_model_with_lengths_compiles_fullgraph():
    """torch.compile(fullgraph=True) of the whole model called with true lengths: no graph
    break (the traced program reads no value back), eager's outputs and gradients at two
    lengths. The aot_eager backend: the capture is what is tested here, and inductor's C++
    code generation for the whole model takes minutes on 2 cores."""
    torch.manual_seed(0)
    model = make_model(dropout=0.0)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for steps in (10, 70):
        xs = make_inputs(steps=(steps,) * len(DIMS), seed=steps)
        lengths = [torch.tensor([steps, steps - 1, 2])] * len(DIMS)
        expected, got = model(xs, lengths), compiled(xs, lengths)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        expected.square().sum().backward()
        got.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        model.zero_grad()
        compiled_model.zero_grad()


def test_layer_bf16_autocast_keeps_fp32_parameters():
    torch.manual_seed(0)
    layer = CoupledMambaLayer(16, 3, d_state=8)
    x = torch.randn(3, 2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), layer(x).detach(), rtol=5e-2, atol=5e-2)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in layer.parameters())


# ---------------------------------------------------------------------------- the model
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_output_shapes(fusion, task):
    num_classes = 4 if task == "classification" else None
    model = make_model(fusion, task=task, num_classes=num_classes)
    out = model(make_inputs())
    assert out.shape == ((BATCH,) if task == "regression" else (BATCH, 4))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("n_modalities", [2, 8])
def test_two_to_eight_modalities(n_modalities):
    dims = [3 + m for m in range(n_modalities)]
    torch.manual_seed(0)
    model = CoupledMamba(dims, **SMALL)
    out = model(make_inputs(steps=(STEPS,) * n_modalities, dims=dims))
    assert out.shape == (BATCH,)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradients_reach_every_parameter(fusion):
    model = make_model(fusion).train()
    steps = (10, 14, 7)
    lengths = [torch.tensor([L, L - 2, 3]) for L in steps]
    model(make_inputs(steps), lengths).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def _stream_sensitivity(model, source, target, step):
    """Norm of d(stream `target`'s encoder output at `step`) / d(modality `source`'s
    projected input at steps <= step), for an encoder with one stream per modality."""
    h = torch.randn(len(DIMS), BATCH, STEPS, SMALL["d_model"],
                    generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = model.encoder(h)
    grad, = torch.autograd.grad(out[target, :, step].square().sum(), h)
    return grad[source, :, :step + 1].norm().item()


@pytest.mark.parametrize("fusion", ["coupled", "mamba"])
def test_modalities_meet_only_through_the_coupled_state(fusion):
    """Coupled fusion: a modality's stream depends on the other modalities, strictly through
    earlier steps (the coupled state G[t-1]); "mamba" (uncoupled): never. Guards against a
    model that silently runs the modalities independently (as "coupled" and "mamba" behaved
    alike on the synthetic task, docs/training.md)."""
    model = make_model(fusion)
    for target in range(len(DIMS)):
        own = _stream_sensitivity(model, target, target, STEPS - 1)
        assert own > 0
        for source in set(range(len(DIMS))) - {target}:
            cross = _stream_sensitivity(model, source, target, STEPS - 1)
            if fusion == "mamba":
                assert cross == 0.0
            else:
                assert cross > 1e-6 * own
                # nothing from another modality reaches step 0: only G[t-1] carries it
                assert _stream_sensitivity(model, source, target, 0) == 0.0


@pytest.mark.parametrize("pooling", ["mean", "last", "max"])
def test_model_step_equals_forward_on_every_prefix(pooling):
    model = make_model(pooling=pooling, task="classification", num_classes=3)
    xs = make_inputs(steps=(6,) * 3)
    with torch.no_grad():
        cache = model.init_cache(BATCH)
        for t in range(6):
            prediction, cache = model.step([x[:, t] for x in xs], cache)
            torch.testing.assert_close(prediction, model([x[:, :t + 1] for x in xs]),
                                       rtol=1e-5, atol=1e-5)
    assert cache.n_steps == 6


def pad_with_garbage(xs, lengths, extra_steps):
    """Overwrite everything at or beyond each sample's length with large values, inf and
    NaN, and append `extra_steps` more such steps."""
    padded = []
    for x, length in zip(xs, lengths):
        garbage = torch.randn(x.shape[0], x.shape[1] + extra_steps, x.shape[2]) * 1e3
        garbage[:, ::3, 0], garbage[:, 1::3, -1] = math.inf, math.nan
        keep = torch.arange(x.shape[1])[None, :, None] < length[:, None, None]
        garbage[:, :x.shape[1]] = torch.where(keep, x, garbage[:, :x.shape[1]])
        padded.append(garbage)
    return padded


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("steps", [(10, 10, 10), (10, 23, 16)], ids=["aligned", "unaligned"])
def test_padding_beyond_lengths_does_not_change_output(fusion, steps):
    model = make_model(fusion)
    xs = make_inputs(steps)
    lengths = [torch.tensor([L, L // 2, 2]) for L in steps]
    with torch.no_grad():
        expected = model(xs, lengths)
        padded = model(pad_with_garbage(xs, lengths, extra_steps=5), lengths)
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_no_lengths_means_every_step_is_valid(fusion):
    """Without lengths the encoders get no mask at all; that is the same model as with every
    true length given (an all-valid mask), up to rounding."""
    model = make_model(fusion)
    xs = make_inputs((10, 23, 16))
    full = [torch.full((x.shape[0],), x.shape[1]) for x in xs]
    with torch.no_grad():
        torch.testing.assert_close(model(xs), model(xs, full), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("with_lengths", [False, True], ids=["no-lengths", "lengths"])
def test_empty_batch(fusion, with_lengths):
    """A batch of no samples (the last of a filtered dataset, say) gives no predictions and
    a backward pass, with or without lengths (it once stopped at the longest length of no
    sample, and at MultiheadAttention's reshape of an empty mask)."""
    model = make_model(fusion).train()
    xs = make_inputs((10, 23, 16), batch=0)
    lengths = [torch.zeros(0, dtype=torch.long)] * 3 if with_lengths else None
    out = model(xs, lengths)
    assert out.shape == (0,)
    out.sum().backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


@pytest.mark.parametrize("pooling", ["mean", "last", "max"])
@pytest.mark.parametrize("seq_len", [None, 6])
def test_each_sample_depends_only_on_its_true_steps(pooling, seq_len):
    """A sample's output is the same alone, trimmed to its lengths, as inside a padded
    batch."""
    model = make_model(pooling=pooling, seq_len=seq_len)
    steps = (10, 23, 16)
    xs = make_inputs(steps)
    lengths = [torch.tensor([L, L // 2, 2]) for L in steps]
    with torch.no_grad():
        batched = model(xs, lengths)
        for b in range(BATCH):
            alone = model([x[b:b + 1, :int(n[b])] for x, n in zip(xs, lengths)])
            torch.testing.assert_close(alone, batched[b:b + 1], rtol=1e-5, atol=1e-5)


def test_segment_mean_resample():
    x = torch.arange(8.0).view(1, 8, 1).repeat(3, 1, 2)
    lengths = torch.tensor([6, 4, 2])
    out = segment_mean_resample(x, lengths, torch.tensor([3, 2, 4]), out_len=4)
    assert out.shape == (3, 4, 2)
    torch.testing.assert_close(out[:, :, 0], torch.tensor([[0.5, 2.5, 4.5, 0.0],   # 6 -> 3
                                                           [0.5, 2.5, 0.0, 0.0],   # 4 -> 2
                                                           [0.0, 0.0, 1.0, 1.0]]))  # 2 -> 4
    same = segment_mean_resample(x, torch.tensor([8, 8, 8]), torch.tensor([8, 8, 8]), 8)
    assert torch.equal(same, x)


def test_seq_len_resamples_to_a_fixed_length():
    model = make_model(seq_len=4)
    xs = make_inputs((10, 23, 16))
    lengths = [torch.tensor([8, 8, 8]), torch.tensor([20, 20, 20]), torch.tensor([12, 12, 12])]
    with torch.no_grad():
        out = model(xs, lengths)
        # 8, 20 and 12 steps are whole multiples of 4: segment means by hand.
        means = [x[:, :int(n[0])].reshape(BATCH, 4, -1, x.shape[-1]).mean(2)
                 for x, n in zip(xs, lengths)]
        torch.testing.assert_close(out, model(means), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_same_seed_same_model_and_output(fusion):
    first, second = make_model(fusion, seed=7), make_model(fusion, seed=7)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    xs = make_inputs()
    assert torch.equal(first(xs), second(xs))
    assert not torch.equal(make_model(fusion, seed=8)(xs), first(xs))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_state_dict_round_trip(fusion):
    model, other = make_model(fusion, seed=0), make_model(fusion, seed=1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    xs = make_inputs()
    assert torch.equal(other(xs), model(xs))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_bf16_autocast_forward_on_cpu(fusion):
    model = make_model(fusion)
    xs = make_inputs()
    with torch.no_grad():
        expected = model(xs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_paper_configuration_parameter_count_is_documented():
    model = CoupledMamba([768, 74, 35], d_model=128, n_layers=3, d_state=64)
    count = sum(p.numel() for p in model.parameters())
    api = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    assert f"{count:,}" in api


# ---------------------------------------------------------------------------- bad input
def with_bad(index, shape):
    xs = make_inputs()
    xs[index] = torch.randn(shape)
    return xs


@pytest.mark.parametrize("xs, lengths, message", [
    (make_inputs()[:2], None, "xs: expected a list of 3 tensors (one per modality), got 2 tensors"),
    (torch.randn(3, 10, 5), None,
     "xs: expected a list of 3 tensors (one per modality), got Tensor"),
    (with_bad(1, (2, 10, 7)), None, "xs[1]: expected batch size 3 (as xs[0]), got 2"),
    (with_bad(2, (3, 10, 4)), None, "xs[2]: expected feature dim 3 (input_dims[2]), got 4"),
    (with_bad(0, (3, 5)), None, "xs[0]: expected shape (batch, L, 5), got (3, 5)"),
    (with_bad(0, (3, 0, 5)), None, "xs[0]: expected at least 1 time step, got shape (3, 0, 5)"),
    (make_inputs(), [torch.tensor([10, 10, 10])] * 2,
     "lengths: expected a list of 3 tensors (one per modality), got 2 entries"),
    (make_inputs(), [torch.tensor([10, 10])] * 3, "lengths[0]: expected shape (3,), got (2,)"),
    (make_inputs(), [torch.tensor([10.0, 10, 10])] * 3,
     "lengths[0]: expected an integer dtype, got torch.float32"),
    (make_inputs(), [torch.tensor([10, 10, 10]), torch.tensor([0, 10, 10]),
                     torch.tensor([10, 10, 10])],
     "lengths[1]: expected values in [1, 10] (xs[1] has 10 steps), got values in [0, 10]"),
    (make_inputs(), [torch.tensor([10, 10, 10])] * 2 + [torch.tensor([1, 11, 10])],
     "lengths[2]: expected values in [1, 10] (xs[2] has 10 steps), got values in [1, 11]"),
], ids=["too-few-modalities", "not-a-list", "batch", "feature-dim", "rank", "no-steps",
        "lengths-count", "lengths-shape", "lengths-dtype", "lengths-zero", "lengths-too-long"])
def test_bad_inputs_raise_clear_errors(xs, lengths, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_model()(xs, lengths)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_dims=[5]), "input_dims: expected 2 to 8 modalities, got 1"),
    (dict(input_dims=[5] * 9), "input_dims: expected 2 to 8 modalities, got 9"),
    (dict(fusion="sum"), "fusion: expected one of ('coupled', 'average', 'concat', 'mamba', "
                         "'cross_attention', 'transformer'), got 'sum'"),
    (dict(task="ranking"), "task: expected one of ('regression', 'classification'), got 'ranking'"),
    (dict(pooling="first"), "pooling: expected one of ('mean', 'last', 'max'), got 'first'"),
    (dict(task="classification"),
     "num_classes: expected an int >= 2 for task='classification', got None"),
    (dict(num_classes=3), "num_classes: expected None for task='regression', got 3"),
    (dict(seq_len=0), "seq_len: expected None or an int >= 1, got 0"),
    (dict(coupling="max"), "coupling: expected one of ('learned', 'mean', 'sum'), got 'max'"),
    (dict(dt_rank=0), "dt_rank: expected 'auto' or an int >= 1, got 0"),
    (dict(dt_rank="full"), "dt_rank: expected 'auto' or an int >= 1, got 'full'"),
    (dict(input_dims=[5, 0, 3]), "input_dims[1]: expected an int >= 1, got 0"),
    (dict(d_model=0), "d_model: expected an int >= 1, got 0"),
    (dict(n_layers=0), "n_layers: expected an int >= 1, got 0"),
    (dict(d_state=0), "d_state: expected an int >= 1, got 0"),
    (dict(d_state=257), "d_state: expected at most 256 (the operator's largest state), got 257"),
    (dict(d_conv=2.0), "d_conv: expected an int >= 1, got 2.0"),
    (dict(expand=0), "expand: expected an int >= 1, got 0"),
    (dict(dt_min=0.2, dt_max=0.1),
     "dt_min, dt_max: expected 0 < dt_min <= dt_max, got 0.2 and 0.1"),
    (dict(dropout=1.0), "dropout: expected a value in [0, 1), got 1.0"),
    (dict(fusion="transformer", n_heads=3),
     "n_heads: expected a divisor of d_model=16 for fusion='transformer', got 3"),
])
def test_bad_configuration_raises_clear_errors(kwargs, message):
    kwargs = {"input_dims": DIMS, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        CoupledMamba(**kwargs)


def test_bad_streaming_use_raises_clear_errors():
    with pytest.raises(ValueError, match=re.escape(
            "fusion: streaming needs fusion='coupled', this model has 'transformer'")):
        make_model("transformer").init_cache(BATCH)
    with pytest.raises(ValueError, match=re.escape(
            "seq_len: streaming needs aligned inputs (seq_len=None), this model resamples to 6")):
        make_model(seq_len=6).init_cache(BATCH)
    model = make_model()
    with pytest.raises(ValueError,
                       match=re.escape("xs[1]: expected shape (batch, 7), got (3, 1, 7)")):
        xs = make_inputs()
        model.step([xs[0][:, 0], xs[1][:, :1], xs[2][:, 0]], model.init_cache(BATCH))
    with pytest.raises(ValueError, match=re.escape(
            "cache: holds 2 sequences (from init_cache), xs have batch size 3")):
        model.step([x[:, 0] for x in make_inputs()], model.init_cache(2))


def test_layer_bad_input_raises_clear_error():
    layer = CoupledMambaLayer(16, 3, d_state=8)
    with pytest.raises(ValueError, match=re.escape(
            "x: expected shape (M, batch, L, d_model) with M=3, d_model=16, got (2, 2, 9, 16)")):
        layer(torch.randn(2, 2, 9, 16))
    with pytest.raises(ValueError, match=re.escape(
            "cache: holds 4 sequences (from init_cache), x has batch size 2")):
        layer.step(torch.randn(3, 2, 16), layer.init_cache(4))


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fusion", FUSIONS)
def test_cuda_matches_cpu(fusion):
    model = make_model(fusion)
    model_cuda = copy.deepcopy(model).cuda()
    steps = (10, 23, 16)
    xs = make_inputs(steps)
    lengths = [torch.tensor([L, L // 2, 2]) for L in steps]
    out = model(xs, lengths)
    out_cuda = model_cuda([x.cuda() for x in xs], [n.cuda() for n in lengths])
    torch.testing.assert_close(out_cuda.cpu(), out, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    out_cuda.square().sum().backward()
    for (name, p), p_cuda in zip(model.named_parameters(), model_cuda.parameters()):
        torch.testing.assert_close(p_cuda.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
@cuda
def test_cuda_step_equals_forward_and_bf16_autocast():
    model = make_model().cuda()
    xs = [x.cuda() for x in make_inputs(steps=(6,) * 3)]
    with torch.no_grad():
        cache = model.init_cache(BATCH)
        for t in range(6):
            prediction, cache = model.step([x[:, t] for x in xs], cache)
        torch.testing.assert_close(prediction, model(xs), rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(xs)
    torch.testing.assert_close(out.float(), model(xs).detach(), rtol=0.1, atol=0.1)
