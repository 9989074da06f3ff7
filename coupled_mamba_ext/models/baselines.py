"""The paper's baselines (Tables 6 and 9, Figures 3 and 4) as fusion encoders.

Every fusion encoder maps the projected modalities x (M, batch, L, d_model) and an optional
valid mask (batch, L) (True where a step is inside the sample's length) to S feature streams
(S, batch, L, d_model); `n_streams` says S. :class:`~coupled_mamba_ext.models.CoupledMamba`
pools each stream and feeds their concatenation to its head. Width (d_model) and depth
(n_layers) are the same as the coupled model's.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .layer import CoupledMambaStack

# Mamba baselines run single-stream stacks; "sum" coupling with M = 1 is plain Mamba (w = 1)
# and, unlike "learned", has no parameter that a single stream leaves without gradient.
_SINGLE_STREAM = dict(n_modalities=1, coupling="sum")


class AverageFusion(nn.Module):
    """Average the modalities' features step by step, then one Mamba stack. S = 1."""
    n_streams = 1

    def __init__(self, n_modalities: int, d_model: int, n_layers: int, **mamba_kwargs):
        super().__init__()
        self.mamba = CoupledMambaStack(n_layers, d_model, **_SINGLE_STREAM, **mamba_kwargs)

    def forward(self, x: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
        """x: (M, batch, L, d) -> (1, batch, L, d). Causal, so `valid_mask` is not needed."""
        return self.mamba(x.mean(dim=0, keepdim=True))


class ConcatFusion(nn.Module):
    """Concatenate the modalities' features step by step, project back to d_model, then one
    Mamba stack. S = 1."""
    n_streams = 1

    def __init__(self, n_modalities: int, d_model: int, n_layers: int, **mamba_kwargs):
        super().__init__()
        self.fuse = nn.Linear(n_modalities * d_model, d_model)
        self.mamba = CoupledMambaStack(n_layers, d_model, **_SINGLE_STREAM, **mamba_kwargs)

    def forward(self, x: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
        """x: (M, batch, L, d) -> (1, batch, L, d). Causal, so `valid_mask` is not needed."""
        M, batch, L, d = x.shape
        concatenated = x.permute(1, 2, 0, 3).reshape(batch, L, M * d)
        return self.mamba(self.fuse(concatenated).unsqueeze(0))


class IndependentMambaFusion(nn.Module):
    """One Mamba stack per modality with its own weights and no coupling. S = M.

    The coupled operator cannot express independent modalities (every modality starts from
    the shared coupled state), so each modality runs its own single-stream stack.
    """

    def __init__(self, n_modalities: int, d_model: int, n_layers: int, **mamba_kwargs):
        super().__init__()
        self.n_streams = n_modalities
        self.mambas = nn.ModuleList(
            CoupledMambaStack(n_layers, d_model, **_SINGLE_STREAM, **mamba_kwargs)
            for _ in range(n_modalities))

    def forward(self, x: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
        """x: (M, batch, L, d) -> (M, batch, L, d). Causal, so `valid_mask` is not needed."""
        return torch.cat([mamba(x[m:m + 1]) for m, mamba in enumerate(self.mambas)])


def sinusoidal_positions(length: int, dim: int, like: Tensor) -> Tensor:
    """Transformer sine/cosine position encodings, (length, dim), on like's device and dtype."""
    position = torch.arange(length, device=like.device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=like.device, dtype=torch.float32)
                          * (-math.log(10000.0) / dim))
    encoding = torch.zeros(length, dim, device=like.device)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return encoding.to(like.dtype)


def _feed_forward(d_model: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(4 * d_model, d_model))


class CrossModalBlock(nn.Module):
    """Pre-norm block: a query modality attends to a context (the other modalities), then a
    feed-forward network; both with residuals.

    forward: query (batch, Lq, d), context (batch, Lc, d), context_padding_mask (batch, Lc)
    True where the context step is padding (or None) -> (batch, Lq, d).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm_query = nn.LayerNorm(d_model)
        self.norm_context = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, n_heads, dropout=dropout,
                                               batch_first=True)
        self.norm_feed_forward = nn.LayerNorm(d_model)
        self.feed_forward = _feed_forward(d_model, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, context: Tensor,
                context_padding_mask: Optional[Tensor]) -> Tensor:
        context = self.norm_context(context)
        attended, _ = self.attention(self.norm_query(query), context, context,
                                     key_padding_mask=context_padding_mask, need_weights=False)
        x = query + self.dropout(attended)
        return x + self.dropout(self.feed_forward(self.norm_feed_forward(x)))


class CrossAttentionFusion(nn.Module):
    """Cross-modal attention fusion (paper Table 6): in every layer each modality attends to
    the concatenated sequences of all other modalities, with its own weights. S = M."""

    def __init__(self, n_modalities: int, d_model: int, n_layers: int, n_heads: int,
                 dropout: float):
        super().__init__()
        if n_modalities < 2:
            raise ValueError(f"n_modalities: cross-attention needs at least 2, got {n_modalities}")
        self.n_streams = n_modalities
        self.layers = nn.ModuleList(
            nn.ModuleList(CrossModalBlock(d_model, n_heads, dropout) for _ in range(n_modalities))
            for _ in range(n_layers))

    def forward(self, x: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
        """x: (M, batch, L, d), valid_mask (batch, L) or None -> (M, batch, L, d)."""
        M, batch, L, d = x.shape
        x = x + sinusoidal_positions(L, d, x)
        padding = None if valid_mask is None else ~valid_mask
        context_padding = None if padding is None else padding.repeat(1, M - 1)
        for blocks in self.layers:
            x = torch.stack([
                block(x[m], torch.cat([x[j] for j in range(M) if j != m], dim=1), context_padding)
                for m, block in enumerate(blocks)])
        return x


class TransformerFusion(nn.Module):
    """A Transformer encoder over all modalities' sequences joined along time (M * L tokens,
    each with a position and a learned modality embedding); the speed / memory reference of
    the paper's Figures 3 and 4. Pre-norm layers, feed-forward width 4 * d_model. S = M."""

    def __init__(self, n_modalities: int, d_model: int, n_layers: int, n_heads: int,
                 dropout: float):
        super().__init__()
        self.n_streams = n_modalities
        self.modality_embedding = nn.Parameter(torch.randn(n_modalities, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor, valid_mask: Optional[Tensor] = None) -> Tensor:
        """x: (M, batch, L, d), valid_mask (batch, L) or None -> (M, batch, L, d)."""
        M, batch, L, d = x.shape
        x = x + sinusoidal_positions(L, d, x) + self.modality_embedding[:, None, None, :]
        tokens = x.permute(1, 0, 2, 3).reshape(batch, M * L, d)
        padding = None if valid_mask is None else (~valid_mask).repeat(1, M)
        encoded = self.encoder(tokens, src_key_padding_mask=padding)
        return encoded.reshape(batch, M, L, d).transpose(0, 1)
