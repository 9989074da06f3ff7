"""The Coupled Mamba fusion model (contract.md) and, behind the same interface, its baselines."""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..catalog import FUSIONS, TASKS
from .baselines import (AverageFusion, ConcatFusion, CrossAttentionFusion,
                        IndependentMambaFusion, TransformerFusion)
from .layer import CoupledMambaStack, LayerCache, StackedLayerNorm, check_sizes
from .resample import segment_mean_resample

POOLINGS = ("mean", "last", "max")
MIN_MODALITIES, MAX_MODALITIES = 2, 8


class StreamingCache(NamedTuple):
    """Streaming state of a :class:`CoupledMamba` model.

    layers: one :class:`LayerCache` per layer.
    pooled: (M, batch, d_model) running sum ("mean" pooling), running max ("max") or the
        latest features ("last"), in the parameters' dtype.
    n_steps: time steps fed so far.
    """
    layers: List[LayerCache]
    pooled: Tensor
    n_steps: int


def masked_pool(features: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """Pool each stream over the valid steps of each sample.

    features: (S, batch, L, d); lengths: (batch,) integer valid lengths in [1, L];
    pooling: "mean", "last" (the step at length - 1) or "max". Returns (S, batch, d).
    """
    S, batch, L, d = features.shape
    if pooling == "last":
        index = (lengths - 1).view(1, batch, 1, 1).expand(S, batch, 1, d)
        return features.gather(2, index).squeeze(2)
    valid = (torch.arange(L, device=features.device) < lengths[:, None])[None, :, :, None]
    if pooling == "max":
        return features.masked_fill(~valid, -math.inf).amax(dim=2)
    total = features.masked_fill(~valid, 0.0).sum(dim=2)
    return total / lengths.view(1, batch, 1).to(features.dtype)


class CoupledMamba(nn.Module):
    """Multimodal sequence model: per-modality input projections, a common length, a fusion
    encoder of `n_layers` layers, a final per-stream LayerNorm, pooling over time and a head.

    Args:
        input_dims: feature size of each modality (2 to 8 modalities), e.g. MOSEI
            [768, 74, 35] for text, audio, vision.
        d_model, n_layers, d_state: width, depth and SSM state size (paper: 128, 3, 64).
        fusion: "coupled" (Coupled Mamba) or a baseline: "average", "concat", "mamba"
            (independent Mamba per modality), "cross_attention", "transformer"
            (see :mod:`coupled_mamba_ext.models.baselines`).
        task: "regression" (output (batch,)) or "classification" (logits
            (batch, num_classes)); num_classes only for classification.
        pooling: "mean", "last" or "max" over each sample's valid steps.
        dropout: after the input projections, before the head, and inside the attention
            baselines.
        seq_len: the common length the modalities are brought to before fusion. Each
            modality of each sample is resampled from its true length by segment means
            (:func:`segment_mean_resample`) to seq_len steps, or, for None, to the longest
            true length among the sample's modalities (aligned inputs, all of one length,
            are then used as they are; the other steps of the batch are padding, masked).
        coupling: coupling of the "coupled" fusion ("learned", "mean" or "sum"; see
            :class:`CoupledMambaLayer`). d_conv, expand, dt_rank, dt_min, dt_max, bc_norm: the
            Mamba layers' settings (every Mamba-based fusion gets the same).
        n_heads: attention heads of the attention baselines.
    """

    def __init__(self, input_dims: Sequence[int], d_model: int = 128, n_layers: int = 3,
                 d_state: int = 64, fusion: str = "coupled", task: str = "regression",
                 num_classes: Optional[int] = None, pooling: str = "mean", dropout: float = 0.1,
                 seq_len: Optional[int] = None, coupling: str = "learned", d_conv: int = 4,
                 expand: int = 2, dt_rank: Union[int, str] = "auto", n_heads: int = 4,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, bc_norm: bool = False):
        super().__init__()
        input_dims = list(input_dims)
        if not MIN_MODALITIES <= len(input_dims) <= MAX_MODALITIES:
            raise ValueError(f"input_dims: expected {MIN_MODALITIES} to {MAX_MODALITIES} "
                             f"modalities, got {len(input_dims)}")
        for name, value, allowed in (("fusion", fusion, FUSIONS), ("task", task, TASKS),
                                     ("pooling", pooling, POOLINGS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if task == "classification" and (num_classes is None or num_classes < 2):
            raise ValueError(f"num_classes: expected an int >= 2 for task='classification', "
                             f"got {num_classes}")
        if task == "regression" and num_classes is not None:
            raise ValueError(f"num_classes: expected None for task='regression', "
                             f"got {num_classes}")
        if seq_len is not None and seq_len < 1:
            raise ValueError(f"seq_len: expected None or an int >= 1, got {seq_len}")
        for m, dim in enumerate(input_dims):
            check_sizes(**{f"input_dims[{m}]": dim})
        check_sizes(d_model=d_model, n_layers=n_layers)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        if fusion in ("cross_attention", "transformer"):
            check_sizes(n_heads=n_heads)
            if d_model % n_heads:
                raise ValueError(f"n_heads: expected a divisor of d_model={d_model} for "
                                 f"fusion={fusion!r}, got {n_heads}")
        self.input_dims, self.d_model, self.fusion = input_dims, d_model, fusion
        self.task, self.pooling, self.seq_len = task, pooling, seq_len
        M = len(input_dims)

        # Input sizes differ per modality, so these cannot be stacked; it is the only place
        # the model loops over modalities (the fusion baselines aside).
        self.input_projections = nn.ModuleList(nn.Linear(dim, d_model) for dim in input_dims)
        mamba_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                            dt_min=dt_min, dt_max=dt_max, bc_norm=bc_norm)
        if fusion == "coupled":
            self.encoder = CoupledMambaStack(n_layers, d_model, M, coupling=coupling,
                                             **mamba_kwargs)
        elif fusion in ("average", "concat", "mamba"):
            encoder_class = {"average": AverageFusion, "concat": ConcatFusion,
                             "mamba": IndependentMambaFusion}[fusion]
            self.encoder = encoder_class(M, d_model, n_layers, **mamba_kwargs)
        else:
            encoder_class = {"cross_attention": CrossAttentionFusion,
                             "transformer": TransformerFusion}[fusion]
            self.encoder = encoder_class(M, d_model, n_layers, n_heads, dropout)
        n_streams = self.encoder.n_streams
        self.final_norm = StackedLayerNorm(n_streams, d_model)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(n_streams * d_model, 1 if task == "regression" else num_classes)

    # ------------------------------------------------------------------ input checks
    def _check_modalities(self, xs: Sequence[Tensor], with_time: bool) -> None:
        """Number, rank, batch and feature size of the per-modality inputs."""
        M = len(self.input_dims)
        if not isinstance(xs, (list, tuple)) or len(xs) != M:
            received = f"{len(xs)} tensors" if isinstance(xs, (list, tuple)) else type(xs).__name__
            raise ValueError(f"xs: expected a list of {M} tensors (one per modality), "
                             f"got {received}")
        for m, (x, dim) in enumerate(zip(xs, self.input_dims)):
            layout = f"(batch, L, {dim})" if with_time else f"(batch, {dim})"
            if x.dim() != (3 if with_time else 2):
                raise ValueError(f"xs[{m}]: expected shape {layout}, got {tuple(x.shape)}")
            if x.shape[-1] != dim:
                raise ValueError(f"xs[{m}]: expected feature dim {dim} (input_dims[{m}]), "
                                 f"got {x.shape[-1]}")
            if x.shape[0] != xs[0].shape[0]:
                raise ValueError(f"xs[{m}]: expected batch size {xs[0].shape[0]} (as xs[0]), "
                                 f"got {x.shape[0]}")
            if with_time and x.shape[1] < 1:
                raise ValueError(f"xs[{m}]: expected at least 1 time step, got shape "
                                 f"{tuple(x.shape)}")

    @staticmethod
    def _check_lengths(xs: Sequence[Tensor], lengths) -> Optional[List[Tensor]]:
        """Validate `lengths` against `xs`; returns them as int64 tensors on xs' devices."""
        if lengths is None:
            return None
        if not isinstance(lengths, (list, tuple)) or len(lengths) != len(xs):
            received = (f"{len(lengths)} entries" if isinstance(lengths, (list, tuple))
                        else type(lengths).__name__)
            raise ValueError(f"lengths: expected a list of {len(xs)} tensors (one per "
                             f"modality), got {received}")
        checked = []
        for m, (x, length) in enumerate(zip(xs, lengths)):
            length = torch.as_tensor(length, device=x.device)
            batch, L = x.shape[:2]
            if length.shape != (batch,):
                raise ValueError(f"lengths[{m}]: expected shape ({batch},), "
                                 f"got {tuple(length.shape)}")
            if length.dtype.is_floating_point or length.dtype.is_complex or \
                    length.dtype == torch.bool:
                raise ValueError(f"lengths[{m}]: expected an integer dtype, got {length.dtype}")
            if torch.compiler.is_compiling():  # values unknown while tracing: checked at run
                torch._assert_async(((length >= 1) & (length <= L)).all(),
                                    f"lengths[{m}]: expected values in [1, L] (L: the steps "
                                    f"of xs[{m}])")
            elif batch and (int(length.min()) < 1 or int(length.max()) > L):
                raise ValueError(f"lengths[{m}]: expected values in [1, {L}] (xs[{m}] has "
                                 f"{L} steps), got values in [{int(length.min())}, "
                                 f"{int(length.max())}]")
            checked.append(length.long())
        return checked

    def _to_common_length(self, xs: Sequence[Tensor], lengths: Optional[List[Tensor]]
                          ) -> Tuple[List[Tensor], Tensor]:
        """Resample every modality of every sample to the sample's common length (seq_len, or
        the longest true length among its modalities). Returns the modalities as tensors
        (batch, L, D_m) with one L, and the common lengths (batch,): steps at or beyond them
        are padding."""
        batch, device = xs[0].shape[0], xs[0].device
        # torch.compile / torch.export do not trace a value read back from a tensor (a graph
        # break, or no export), and comparing a dynamic length with the constant seq_len
        # would pin it (to != seq_len). So, traced: with seq_len or with lengths, every
        # modality is resampled where eager skips one already at the common length (the
        # identity then, up to rounding); with lengths but no seq_len, the longest padded
        # length is kept (the steps past the longest true one are padding, masked either way).
        tracing = torch.compiler.is_compiling()
        if lengths is None:  # every step counts: decided by the shapes alone
            out_len = self.seq_len or max(x.shape[1] for x in xs)
            targets = torch.full((batch,), out_len, dtype=torch.long, device=device)
            skip_check = tracing and self.seq_len is not None
            return [x if not skip_check and x.shape[1] == out_len else
                    segment_mean_resample(x, torch.full_like(targets, x.shape[1]), targets,
                                          out_len)
                    for x in xs], targets
        if self.seq_len is None:
            targets = torch.stack(lengths).amax(dim=0)
            # An empty batch has no longest true length: it keeps the longest padded one.
            out_len = (max(x.shape[1] for x in xs) if tracing or batch == 0
                       else int(targets.max()))
        else:
            targets = torch.full_like(lengths[0], self.seq_len)
            out_len = self.seq_len
        resampled = []
        for x, length in zip(xs, lengths):
            already_there = (not tracing and x.shape[1] == out_len
                             and torch.equal(length, targets))
            resampled.append(x if already_there else
                             segment_mean_resample(x, length, targets, out_len))
        return resampled, targets

    # ------------------------------------------------------------------ forward
    def _predict(self, pooled: Tensor) -> Tensor:
        """pooled (S, batch, d_model) -> (batch,) or (batch, num_classes)."""
        out = self.head(self.dropout(pooled.transpose(0, 1).flatten(1)))
        return out.squeeze(-1) if self.task == "regression" else out

    def forward(self, xs: Sequence[Tensor], lengths: Optional[Sequence[Tensor]] = None
                ) -> Tensor:
        """Predict from whole sequences.

        Args:
            xs: M tensors (batch, L_m, input_dims[m]), floating point; padded steps beyond
                a sample's length may hold anything.
            lengths: optional M integer tensors (batch,), the true lengths, each in
                [1, L_m]. Steps at or beyond a sample's length never change its output.
        Returns:
            (batch,) for regression, (batch, num_classes) logits for classification.
        Raises:
            ValueError naming the argument, what was expected and what was received.
        """
        self._check_modalities(xs, with_time=True)
        lengths = self._check_lengths(xs, lengths)
        xs, common_lengths = self._to_common_length(xs, lengths)
        h = self.dropout(torch.stack([project(x) for project, x in
                                      zip(self.input_projections, xs)]))  # (M, batch, L, d)
        # Without lengths every step is valid and the encoders get no mask: an all-valid one
        # changed nothing but kept attention off PyTorch's fast paths (the Transformer's
        # inference at L = 500 took 2.4x as long on the CPU) and stopped torch 2.11's export
        # with a dynamic length.
        # An empty batch has nothing to mask (and MultiheadAttention cannot reshape an empty
        # mask).
        valid_mask = None
        if lengths is not None and h.shape[1] > 0:
            valid_mask = torch.arange(h.shape[2], device=h.device) < common_lengths[:, None]
            # Attention weighs masked steps by 0, but 0 * inf is NaN: zero the padding.
            h = h.masked_fill(~valid_mask[None, :, :, None], 0.0)
        features = self.final_norm(self.encoder(h, valid_mask))             # (S, batch, L, d)
        return self._predict(masked_pool(features, common_lengths, self.pooling))

    # ------------------------------------------------------------------ streaming
    def _check_streaming(self) -> None:
        if self.fusion != "coupled":
            raise ValueError(f"fusion: streaming needs fusion='coupled', this model has "
                             f"{self.fusion!r}")
        if self.seq_len is not None:
            raise ValueError(f"seq_len: streaming needs aligned inputs (seq_len=None), this "
                             f"model resamples to {self.seq_len} steps")

    def init_cache(self, batch_size: int) -> StreamingCache:
        """Empty streaming state for `batch_size` sequences (fusion="coupled", seq_len=None)."""
        self._check_streaming()
        M = len(self.input_dims)
        fill = -math.inf if self.pooling == "max" else 0.0
        pooled = self.head.weight.new_full((M, batch_size, self.d_model), fill)
        return StreamingCache(self.encoder.init_cache(batch_size), pooled, 0)

    def step(self, xs: Sequence[Tensor], cache: StreamingCache
             ) -> Tuple[Tensor, StreamingCache]:
        """Feed one time step of every modality.

        xs: M tensors (batch, input_dims[m]). Returns (prediction, new_cache): the prediction
        equals ``forward`` on all steps fed so far (no lengths), (batch,) or
        (batch, num_classes). `cache` is not modified. Not differentiable.
        """
        self._check_streaming()
        self._check_modalities(xs, with_time=False)
        if xs[0].shape[0] != cache.pooled.shape[1]:
            raise ValueError(f"cache: holds {cache.pooled.shape[1]} sequences (from init_cache), "
                             f"xs have batch size {xs[0].shape[0]}")
        h = self.dropout(torch.stack([project(x) for project, x in
                                      zip(self.input_projections, xs)]))  # (M, batch, d)
        h, layer_caches = self.encoder.step(h, cache.layers)
        features = self.final_norm(h)
        if self.pooling == "mean":
            pooled = cache.pooled + features
            summary = pooled / (cache.n_steps + 1)
        elif self.pooling == "max":
            pooled = summary = torch.maximum(cache.pooled, features)
        else:
            pooled = summary = features
        return self._predict(summary), StreamingCache(layer_caches, pooled, cache.n_steps + 1)
