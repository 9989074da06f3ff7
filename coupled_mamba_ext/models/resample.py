"""Bringing modalities of different lengths (unaligned data) to one common length."""
import torch
import torch.nn.functional as F
from torch import Tensor


def segment_mean_resample(x: Tensor, lengths: Tensor, target_lengths: Tensor,
                          out_len: int) -> Tensor:
    """Resample each sequence from its TRUE length to its own target length by averaging
    over equal segments.

    For a sample of length l and target T, output step i < T is the mean of input steps
    [floor(i*l/T), floor((i+1)*l/T)), widened to one step where that is empty (l < T: short
    sequences repeat steps; l = T: the identity). Output steps at or beyond T are zero.
    Input steps at or beyond l are never read: padding, even inf or NaN, cannot change the
    result.

    Args:
        x: (batch, L, D) padded sequences, floating point.
        lengths: (batch,) integer true lengths, in [1, L].
        target_lengths: (batch,) integer target lengths, in [1, out_len].
        out_len: steps of the output.
    Returns:
        (batch, out_len, D) in x's dtype.
    """
    batch, _, D = x.shape
    lengths = lengths.to(x.device, torch.long)[:, None]
    targets = target_lengths.to(x.device, torch.long)[:, None]
    position = torch.arange(out_len, device=x.device)[None, :]
    inside = position < targets                                          # (batch, out_len)
    step = torch.minimum(position, targets - 1)  # steps beyond the target: any valid segment
    start = step * lengths // targets
    end = torch.maximum((step + 1) * lengths // targets, start + 1)
    # Segment sums as differences of prefix sums, prefix[:, j] = sum of x[:, :j]; prefixes up
    # to j <= l involve valid steps only. Float64 keeps the difference of two long sums exact
    # enough that l = T gives back x.
    prefix = F.pad(x.double().cumsum(dim=1), (0, 0, 1, 0))               # (batch, L + 1, D)
    segment_sum = (prefix.gather(1, end[..., None].expand(-1, -1, D))
                   - prefix.gather(1, start[..., None].expand(-1, -1, D)))
    means = segment_sum / (end - start)[..., None]
    return means.masked_fill(~inside[..., None], 0.0).to(x.dtype)
