"""The Coupled Mamba model, its layer and the paper's baselines (docs/contract.md)."""
from .baselines import (AverageFusion, ConcatFusion, CrossAttentionFusion, CrossModalBlock,
                        IndependentMambaFusion, TransformerFusion)
from .layer import (COUPLINGS, CoupledMambaLayer, CoupledMambaStack, LayerCache,
                    StackedLayerNorm, StackedLinear)
from .model import FUSIONS, CoupledMamba, StreamingCache, masked_pool
from .resample import segment_mean_resample

__all__ = ["AverageFusion", "COUPLINGS", "ConcatFusion", "CoupledMamba", "CoupledMambaLayer",
           "CoupledMambaStack", "CrossAttentionFusion", "CrossModalBlock", "FUSIONS",
           "IndependentMambaFusion", "LayerCache", "StackedLayerNorm", "StackedLinear",
           "StreamingCache", "TransformerFusion", "masked_pool", "segment_mean_resample"]
