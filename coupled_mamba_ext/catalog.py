"""What the package offers by name: datasets, splits, fusions, couplings, tasks.

Plain Python, importable without torch, so that ``coupled-mamba --help`` lists the choices
without loading torch.
"""
from dataclasses import dataclass

SPLITS = ("train", "valid", "test")
FUSIONS = ("coupled", "average", "concat", "mamba", "cross_attention", "transformer")
COUPLINGS = ("learned", "mean", "sum")
TASKS = ("regression", "classification")


@dataclass(frozen=True)
class DatasetInfo:
    """name; feature_dims: the (text, audio, vision) feature sizes, by which a pickle is
    recognised; metrics_dataset: the ``msa_metrics`` family that scores it ("mosi" / "mosei":
    labels in [-3, 3], "sims" / "simsv2": labels in [-1, 1])."""
    name: str
    feature_dims: tuple
    metrics_dataset: str


DATASETS = {
    "mosi": DatasetInfo("mosi", (768, 5, 20), "mosi"),
    "mosei": DatasetInfo("mosei", (768, 74, 35), "mosei"),
    "sims": DatasetInfo("sims", (768, 33, 709), "sims"),
    "simsv2": DatasetInfo("simsv2", (768, 25, 177), "simsv2"),
    "synthetic": DatasetInfo("synthetic", (32, 12, 24), "mosi"),  # data/synthetic.py
}

# MMSA's default seeds: what `coupled-mamba train --seeds` without values trains.
MMSA_SEEDS = (1111, 1112, 1113, 1114, 1115)
