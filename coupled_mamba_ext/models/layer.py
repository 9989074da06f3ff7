"""The Coupled Mamba layer (paper Algorithm 1; docs/contract.md) for all modalities at once.

Every per-modality weight is stored stacked along a leading modality axis of size M and
applied with one batched matmul (or one grouped convolution), so a layer costs the same
number of kernel launches for 2 modalities as for 8, and the M modalities meet in a single
call of the coupled selective scan.
"""
import math
import numbers
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..catalog import COUPLINGS
from ..ops import build_info, coupled_selective_scan, coupled_selective_state_update

RMS_EPS = 1e-6  # of the optional B and C normalisation (Falcon-Mamba's mixer_rms_eps)


def check_sizes(**sizes) -> None:
    """Raise ValueError naming the first of ``sizes`` that is not an int >= 1 (numpy's
    integers count as ints)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def rms_normalize(x: Tensor, eps: float = RMS_EPS) -> Tensor:
    """x / rms(x) over the last axis, without a learnable weight (Falcon-Mamba's rms_forward)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the scan operator wants for A, D, delta_bias, coupling and the state: float64
    for float64 inputs (gradcheck), float32 for everything else (bf16 autocast included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class StackedLinear(nn.Module):
    """M independent linear maps (no bias) applied in one ``torch.bmm``.

    weight: (M, in_features, out_features). forward: x (M, ..., in_features) ->
    (M, ..., out_features), the m-th slice mapped by the m-th weight.
    """

    def __init__(self, n_stacks: int, in_features: int, out_features: int):
        super().__init__()
        bound = in_features ** -0.5  # nn.Linear's default range
        self.weight = nn.Parameter(
            torch.empty(n_stacks, in_features, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        n_stacks, in_features, out_features = self.weight.shape
        flat = x.reshape(n_stacks, -1, in_features)
        return torch.bmm(flat, self.weight).reshape(*x.shape[:-1], out_features)


class StackedLayerNorm(nn.Module):
    """M LayerNorms over the last axis, each with its own affine weight and bias.

    weight, bias: (M, dim). forward: x (M, ..., dim) -> same shape.
    """

    def __init__(self, n_stacks: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_stacks, dim))
        self.bias = nn.Parameter(torch.zeros(n_stacks, dim))

    def forward(self, x: Tensor) -> Tensor:
        n_stacks, dim = self.weight.shape
        affine_shape = (n_stacks,) + (1,) * (x.dim() - 2) + (dim,)
        normed = F.layer_norm(x, (dim,), eps=self.eps)
        return normed * self.weight.view(affine_shape) + self.bias.view(affine_shape)


class LayerCache(NamedTuple):
    """Streaming state of one :class:`CoupledMambaLayer`.

    conv_state: (M, batch, E, d_conv - 1), the last inputs of the causal convolution.
    ssm_state: (batch, E, N), the coupled state G, float32 (float64 for a float64 layer).
    """
    conv_state: Tensor
    ssm_state: Tensor


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class _ShiftedCausalConv(torch.autograd.Function):
    """Depthwise causal convolution as a sum of K shifted products, with a hand-written
    backward: the CPU path of :meth:`CoupledMambaLayer._causal_conv`.

    forward(u (M, batch, L, E), weight (M, E, K), bias (M, E)) -> (M, batch, E, L), with
    out[t] = bias + Σ_k weight[k] · u[t - (K-1) + k] (u = 0 before the first step).

    Why by hand: at the synthetic demo's size (M·E = 192 channels, batch 64, L = 16)
    PyTorch's CPU backward of a grouped conv1d took 6.8 ms per call, and autograd through
    the shifted products reduces each tap's gradient over the batch and time axes in one
    strided reduction. Here every such sum runs over the batch axis first (whole contiguous
    (E, L) planes added together), then over the L contiguous steps: forward and backward
    together 11 -> 6 ms per layer on the 2-core development machine.
    """

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        K, L = weight.shape[-1], u.shape[2]
        padded = F.pad(u.permute(0, 1, 3, 2), (K - 1, 0))            # (M, batch, E, K-1+L)
        taps = weight[:, None, :, :, None]                            # (M, 1, E, K, 1)
        out = torch.addcmul(bias[:, None, :, None], padded[..., 0:L], taps[..., 0, :])
        # Under torch.compile out of place: torch 2.11 compiles an autograd.Function whose
        # forward adds into its output in place to all-zero gradients (pytorch/pytorch#180642;
        # 2.13 and 2.14 do not; tests/test_model.py::test_layer_compiles_fullgraph fails with
        # 2.11 otherwise). Eagerly in place: K - 1 fewer allocations, 1.3 against 2.1 ms per
        # call at the demo's size.
        compiling = torch.compiler.is_compiling()
        for k in range(1, K):
            if compiling:
                out = torch.addcmul(out, padded[..., k:k + L], taps[..., k, :])
            else:
                out.addcmul_(padded[..., k:k + L], taps[..., k, :])
        ctx.save_for_backward(padded, weight)  # padded has u's dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        padded, weight = ctx.saved_tensors
        K = weight.shape[-1]
        L = padded.shape[-1] - (K - 1)
        grad_out = grad_out.contiguous()
        taps = weight[:, None, :, :, None]
        # Padded step t + k fed out[t] through weight[k].
        grad_padded = grad_out.new_zeros(padded.shape)
        for k in range(K):
            grad_padded[..., k:k + L].addcmul_(grad_out, taps[..., k, :])
        grad_u = grad_padded[..., K - 1:].permute(0, 1, 3, 2).to(padded.dtype)
        grad_weight = torch.stack([(grad_out * padded[..., k:k + L]).sum(1).sum(-1)
                                   for k in range(K)], dim=-1)
        grad_bias = grad_out.sum(1).sum(-1)
        return grad_u, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


class CoupledMambaLayer(nn.Module):
    """One Coupled Mamba block for M modalities (paper Algorithm 1 with Eq. 6).

    Per modality: LayerNorm -> Linear_u, Linear_z (width E = expand * d_model) -> causal
    depthwise Conv1d + SiLU -> x_proj to (low-rank dt, B, C) -> dt_proj -> selective SSM whose
    state at every step starts from the coupled state G = sum_m w[m] h[m] -> y * SiLU(z) ->
    Linear_out, plus the residual. All modalities go through ONE coupled scan.

    Args:
        d_model: feature width of the residual stream.
        n_modalities: M >= 1.
        d_state: N, the SSM state size (the operator supports up to 256).
        d_conv: kernel size of the causal depthwise convolution.
        expand: E = expand * d_model.
        dt_rank: rank of the dt projection; "auto" = ceil(d_state / 8), the paper's
            "Delta = d_state / 8" (mamba_ssm's default ceil(d_model / 16) coincides for the
            paper's d_model 128, d_state 64).
        coupling: how the coupled state weighs the modalities:
            "learned": w = softmax(logits), logits learnable, initialised to 0 (w = 1/M);
            "mean": w = 1/M, fixed;
            "sum": w = 1, the paper's literal Eq. 6. Its transition P = sum_m a_m lies in
            (0, M), so for M >= 2 the state grows geometrically with L and overflows float32
            on long sequences (docs/math.md §5); use it for short sequences or M = 1 only.
        dt_min, dt_max: softplus(dt_bias) is initialised log-uniform in [dt_min, dt_max].
        dt_init_floor: lower clamp of those initial time steps.
        bc_norm: RMS-normalise B and C over the state axis at every step, without a
            learnable weight (as Falcon-Mamba does; it also normalises the low-rank Δ input,
            which this option leaves alone). Off: B and C as in Mamba.

    Parameters are float32 and stay so; under bf16 autocast the projections run in bf16
    and the scan's A, D, dt bias and coupling stay float32.
    """

    def __init__(self, d_model: int, n_modalities: int, d_state: int = 64, d_conv: int = 4,
                 expand: int = 2, dt_rank: Union[int, str] = "auto", coupling: str = "learned",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 bc_norm: bool = False):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling: expected one of {COUPLINGS}, got {coupling!r}")
        if n_modalities < 1:
            raise ValueError(f"n_modalities: expected at least 1, got {n_modalities}")
        check_sizes(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        max_dstate = build_info()["max_dstate"]
        if d_state > max_dstate:
            raise ValueError(f"d_state: expected at most {max_dstate} (the operator's largest "
                             f"state), got {d_state}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min} "
                             f"and {dt_max}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_state / 8)
        elif isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
            raise ValueError(f"dt_rank: expected 'auto' or an int >= 1, got {dt_rank!r}")
        M, E = n_modalities, expand * d_model
        self.d_model, self.n_modalities, self.d_state, self.d_conv = d_model, M, d_state, d_conv
        self.d_inner, self.dt_rank, self.coupling = E, dt_rank, coupling
        self.bc_norm = bc_norm

        self.norm = StackedLayerNorm(M, d_model)
        self.in_proj = StackedLinear(M, d_model, 2 * E)        # to u and z
        conv_bound = d_conv ** -0.5                              # nn.Conv1d's default range
        self.conv_weight = nn.Parameter(torch.empty(M, E, d_conv).uniform_(-conv_bound, conv_bound))
        self.conv_bias = nn.Parameter(torch.empty(M, E).uniform_(-conv_bound, conv_bound))
        self.x_proj = StackedLinear(M, E, dt_rank + 2 * d_state)  # to (dt low-rank, B, C)
        self.dt_proj = StackedLinear(M, dt_rank, E)
        self.out_proj = StackedLinear(M, E, d_model)

        # dt bias: softplus(dt_bias) starts log-uniform in [dt_min, dt_max], so each channel
        # begins with its own memory time scale (Mamba's initialisation).
        log_dt = torch.rand(M, E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.dt_bias = nn.Parameter(_inverse_softplus(log_dt.exp().clamp(min=dt_init_floor)))
        # S4D-real: A[n] = -(n + 1) for every channel, stored as log(-A) to keep A < 0.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(M, E, 1))
        self.D = nn.Parameter(torch.ones(M, E))
        # As mamba_ssm: the optimiser may exempt these from weight decay (train.py, under
        # --weight-decay-on weights, reads the mark).
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

        if coupling == "learned":
            self.coupling_logits = nn.Parameter(torch.zeros(M))
        else:
            fixed = torch.full((M,), 1.0 / M if coupling == "mean" else 1.0)
            self.register_buffer("fixed_coupling", fixed)

    def coupling_weights(self) -> Tensor:
        """The coupling weights w, shape (M,), in the parameters' dtype."""
        if self.coupling == "learned":
            return torch.softmax(self.coupling_logits, dim=0)
        return self.fixed_coupling

    def _scan_parameters(self, input_dtype: torch.dtype) -> dict:
        """A, D, dt bias and coupling in the dtype the operator wants for `input_dtype`."""
        dtype = accumulation_dtype(input_dtype)
        return dict(A=-torch.exp(self.A_log.to(dtype)), D=self.D.to(dtype),
                    delta_bias=self.dt_bias.to(dtype), delta_softplus=True,
                    coupling=self.coupling_weights().to(dtype))

    def _check_input(self, x: Tensor, name: str, layout: str) -> None:
        rank = layout.count(",") + 1
        if x.dim() != rank or x.shape[0] != self.n_modalities or x.shape[-1] != self.d_model:
            raise ValueError(f"{name}: expected shape {layout} with M={self.n_modalities}, "
                             f"d_model={self.d_model}, got {tuple(x.shape)}")

    def _causal_conv(self, u: Tensor) -> Tensor:
        """Depthwise causal convolution of every modality's channels.
        u: (M, batch, L, E) -> (M, batch, E, L), time last as the scan wants it.

        On CUDA one grouped conv1d; on the CPU :class:`_ShiftedCausalConv`, whose backward
        is several times faster there than PyTorch's for a grouped convolution. Same result
        up to rounding (tests/test_model.py compares both with a per-modality conv1d).
        """
        M, batch, L, E = u.shape
        K = self.d_conv
        if not u.is_cuda:
            return _ShiftedCausalConv.apply(u, self.conv_weight, self.conv_bias)
        channels = u.permute(1, 0, 3, 2).reshape(batch, M * E, L)
        out = F.conv1d(channels, self.conv_weight.reshape(M * E, 1, K),
                       self.conv_bias.reshape(M * E), padding=K - 1, groups=M * E)
        # Left padding K - 1 and dropping the last K - 1 outputs makes it causal.
        return out[..., :L].reshape(batch, M, E, L).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (M, batch, L, d_model) -> (M, batch, L, d_model)."""
        self._check_input(x, "x", "(M, batch, L, d_model)")
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)           # (M, batch, L, E) each
        u = F.silu(self._causal_conv(u))                              # (M, batch, E, L)
        dt_low, B, C = self.x_proj(u.transpose(-1, -2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)      # (M, batch, L, *)
        dt = self.dt_proj(dt_low)                                     # (M, batch, L, E)
        if self.bc_norm:
            B, C = rms_normalize(B), rms_normalize(C)

        # The operator takes time last and one dtype for u, delta, B, C, z (under autocast
        # the conv and the matmuls may disagree); u's dtype decides.
        def time_last(t: Tensor) -> Tensor:
            return t.transpose(-1, -2).to(u.dtype)

        y = coupled_selective_scan(u, time_last(dt), B=time_last(B), C=time_last(C),
                                   z=time_last(z), **self._scan_parameters(u.dtype))
        return x + self.out_proj(y.transpose(-1, -2))

    def init_cache(self, batch_size: int) -> LayerCache:
        """Empty streaming state (no steps seen yet) for `batch_size` sequences."""
        weight = self.conv_weight
        M, E, N = self.n_modalities, self.d_inner, self.d_state
        conv_state = weight.new_zeros(M, batch_size, E, self.d_conv - 1)
        ssm_state = weight.new_zeros(batch_size, E, N, dtype=accumulation_dtype(weight.dtype))
        return LayerCache(conv_state, ssm_state)

    def step(self, x: Tensor, cache: LayerCache) -> Tuple[Tensor, LayerCache]:
        """Advance every modality by one time step.

        x: (M, batch, d_model), the inputs at time t. Returns (y, new_cache): y (M, batch,
        d_model) equals ``forward`` at time t of the sequence fed so far; `cache` is not
        modified. Not differentiable (a backward through the single-step operator raises).
        """
        self._check_input(x, "x", "(M, batch, d_model)")
        if cache.conv_state.shape[1] != x.shape[1]:
            raise ValueError(f"cache: holds {cache.conv_state.shape[1]} sequences (from "
                             f"init_cache), x has batch size {x.shape[1]}")
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)            # (M, batch, E) each
        window = torch.cat([cache.conv_state, u.unsqueeze(-1).to(cache.conv_state.dtype)],
                           dim=-1)                                     # (M, batch, E, d_conv)
        u = F.silu((window * self.conv_weight[:, None]).sum(-1) + self.conv_bias[:, None])
        dt_low, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bc_norm:
            B, C = rms_normalize(B), rms_normalize(C)
        dt = self.dt_proj(dt_low)
        y, ssm_state = coupled_selective_state_update(
            cache.ssm_state, u, dt.to(u.dtype), B=B.to(u.dtype), C=C.to(u.dtype),
            z=z.to(u.dtype), **self._scan_parameters(u.dtype))
        return x + self.out_proj(y), LayerCache(window[..., 1:], ssm_state)


class CoupledMambaStack(nn.Module):
    """`n_layers` :class:`CoupledMambaLayer` in sequence (keyword arguments go to each).

    forward: x (M, batch, L, d_model) -> (M, batch, L, d_model). No final norm: the model
    that uses the stack applies it. As a fusion encoder it gives `n_streams` = M streams.
    """

    def __init__(self, n_layers: int, d_model: int, n_modalities: int, **layer_kwargs):
        super().__init__()
        self.n_streams = n_modalities
        self.layers = nn.ModuleList(CoupledMambaLayer(d_model, n_modalities, **layer_kwargs)
                                    for _ in range(n_layers))

    def forward(self, x: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
        """x: (M, batch, L, d_model). `valid_mask` (batch, L) is accepted so that every fusion
        encoder has one signature, and ignored: the stack is causal, so steps past a
        sample's length never reach its earlier steps."""
        for layer in self.layers:
            x = layer(x)
        return x

    def init_cache(self, batch_size: int) -> List[LayerCache]:
        """One empty :class:`LayerCache` per layer."""
        return [layer.init_cache(batch_size) for layer in self.layers]

    def step(self, x: Tensor, cache: List[LayerCache]) -> Tuple[Tensor, List[LayerCache]]:
        """x: (M, batch, d_model) at one time step -> (y (M, batch, d_model), new cache)."""
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.step(x, layer_cache)
            new_cache.append(layer_cache)
        return x, new_cache
