"""Datasets: MMSA pickles (MOSI, MOSEI, CH-SIMS, CH-SIMS v2) and the built-in synthetic data.

Imports numpy and torch only, never the compiled operator.
"""
from .mmsa import (DATASETS, MODALITIES, SPLITS, Batch, DatasetInfo, MMSAData, MMSADataset,
                   MMSAFormatError, MMSASplit, collate_mmsa, load_mmsa, parse_mmsa)
from .synthetic import load_synthetic, make_synthetic, write_synthetic

__all__ = ["DATASETS", "MODALITIES", "SPLITS", "Batch", "DatasetInfo", "MMSAData", "MMSADataset",
           "MMSAFormatError", "MMSASplit", "collate_mmsa", "load_mmsa", "parse_mmsa",
           "load_synthetic", "make_synthetic", "write_synthetic"]
