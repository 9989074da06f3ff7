"""A built-in synthetic multimodal sentiment dataset with a cross-modal temporal label.

Same schema as an MMSA pickle (three modalities with different feature sizes and lengths,
padded, with true lengths), generated deterministically from a seed. The label's sign is set
by *when* two events happen in two different modalities, which no single modality reveals:

- every clip has one burst in ``audio`` (the voice rises) and one in ``vision`` (the face
  moves), at uniformly random relative times; in half the clips they coincide (in sync:
  positive), in the other half they are apart by at least ``MIN_GAP`` of the clip (out of
  sync: negative);
- ``text`` holds one cue whose amplitude gives the intensity k ∈ [1, 3];
- regression label = ±k, classification label = 1 when the bursts are in sync, else 0.

Each burst time is uniform whatever the label (see ``_burst_starts``), so audio alone, vision
alone, text alone, or text with one of them carry no information about the sign. The full
generative process is in docs/data.md.
"""
import os
from typing import Dict, Union

import numpy as np

from .mmsa import DATASETS, MODALITIES, SPLITS, MMSAData, parse_mmsa, write_pickle

FEATURE_DIMS = dict(zip(MODALITIES, DATASETS["synthetic"].feature_dims))
PADDED_LENGTHS = {"text": 24, "audio": 64, "vision": 40}
MIN_LENGTHS = {"text": 16, "audio": 40, "vision": 24}
DEFAULT_SIZES = {"train": 2000, "valid": 400, "test": 400}

NOISE_STD = 1.0
BURST_WIDTH = 0.12     # fraction of the clip's true length covered by a burst
BURST_AMPLITUDE = 2.0  # along a unit-norm pattern; noise has std 1 along any unit direction
MIN_GAP = 0.3          # out-of-sync bursts start at least this fraction of the range apart
TEXT_CUE_WIDTH = 0.15
TEXT_CUE_GAIN = 1.5    # text cue amplitude = gain · intensity


def _burst_starts(rng: np.random.Generator, in_sync: np.ndarray):
    """Relative start times in [0, 1 - BURST_WIDTH) of the audio and vision bursts, (N,) each.

    The vision start is the audio start shifted circularly by 0 (in sync) or by an offset
    drawn from [MIN_GAP, 1 - MIN_GAP] of the range (out of sync). A circular shift of a
    uniform variable is uniform, so each start alone is uniform whatever the label, and two
    out-of-sync bursts start at least MIN_GAP · (1 - BURST_WIDTH) apart in linear time too
    (the offset or its complement).
    """
    n = in_sync.shape[0]
    audio = rng.uniform(0.0, 1.0, n)
    shift = np.where(in_sync, 0.0, rng.uniform(MIN_GAP, 1.0 - MIN_GAP, n))
    vision = (audio + shift) % 1.0
    span = 1.0 - BURST_WIDTH
    return audio * span, vision * span


def _add_event(features: np.ndarray, lengths: np.ndarray, start: np.ndarray, width: float,
               amplitude: np.ndarray, pattern: np.ndarray) -> None:
    """Add amplitude · pattern, in place, at the steps whose relative position in the true
    length lies in [start, start + width). features (N, L, D); lengths, start, amplitude (N,).
    MIN_LENGTHS make width · length >= 2 steps, so every event covers at least two steps."""
    steps = np.arange(features.shape[1])
    position = (steps[None, :] + 0.5) / lengths[:, None]                       # (N, L)
    inside = (position >= start[:, None]) & (position < start[:, None] + width)
    features += (amplitude[:, None] * inside)[..., None] * pattern


def _make_split(rng: np.random.Generator, name: str, n: int,
                patterns: Dict[str, np.ndarray]) -> dict:
    lengths = {m: rng.integers(MIN_LENGTHS[m], PADDED_LENGTHS[m] + 1, n) for m in MODALITIES}
    features = {}
    for m in MODALITIES:
        noise = rng.normal(0.0, NOISE_STD, (n, PADDED_LENGTHS[m], FEATURE_DIMS[m]))
        padding = np.arange(PADDED_LENGTHS[m])[None, :] >= lengths[m][:, None]
        noise[padding] = 0.0  # MMSA pads with zeros after the true length
        features[m] = noise

    in_sync = rng.random(n) < 0.5
    intensity = rng.uniform(1.0, 3.0, n)
    audio_start, vision_start = _burst_starts(rng, in_sync)
    burst = np.full(n, BURST_AMPLITUDE)
    _add_event(features["audio"], lengths["audio"], audio_start, BURST_WIDTH, burst,
               patterns["audio"])
    _add_event(features["vision"], lengths["vision"], vision_start, BURST_WIDTH, burst,
               patterns["vision"])
    _add_event(features["text"], lengths["text"], rng.uniform(0.0, 1.0 - TEXT_CUE_WIDTH, n),
               TEXT_CUE_WIDTH, TEXT_CUE_GAIN * intensity, patterns["text"])

    # MMSA gives the text length through the BERT attention mask (row 1 of text_bert).
    text_mask = np.arange(PADDED_LENGTHS["text"])[None, :] < lengths["text"][:, None]
    text_bert = np.stack([text_mask, text_mask, np.zeros_like(text_mask)], axis=1)
    return {
        **{m: features[m].astype(np.float32) for m in MODALITIES},
        "text_bert": text_bert.astype(np.float32),
        "audio_lengths": lengths["audio"],
        "vision_lengths": lengths["vision"],
        "regression_labels": np.where(in_sync, intensity, -intensity).astype(np.float32),
        "classification_labels": in_sync.astype(np.int64),
        "id": [f"{name}_{i}" for i in range(n)],
    }


def make_synthetic(seed: int = 0, sizes: Dict[str, int] = None) -> dict:
    """The synthetic dataset as an unpickled MMSA dict {"train", "valid", "test"}.

    sizes: samples per split (default DEFAULT_SIZES). Identical for identical (seed, sizes);
    each split has its own random stream, so changing one split's size leaves the others
    unchanged. Feature sizes text / audio / vision: 32 / 12 / 24; padded lengths 24 / 64 / 40.
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    pattern_rng = np.random.default_rng([seed, 0])
    patterns = {}
    for m in MODALITIES:
        direction = pattern_rng.normal(size=FEATURE_DIMS[m])
        patterns[m] = direction / np.linalg.norm(direction)
    raw = {}
    for i, split in enumerate(SPLITS, start=1):
        raw[split] = _make_split(np.random.default_rng([seed, i]), split, sizes[split], patterns)
    return raw


def load_synthetic(seed: int = 0, sizes: Dict[str, int] = None) -> MMSAData:
    """The synthetic dataset, validated and converted like an MMSA pickle."""
    return parse_mmsa(make_synthetic(seed, sizes), "synthetic", source=f"synthetic(seed={seed})",
                      copy=False)


def write_synthetic(path: Union[str, os.PathLike], seed: int = 0,
                    sizes: Dict[str, int] = None) -> None:
    """Write the synthetic dataset as an MMSA pickle at ``path``."""
    write_pickle(make_synthetic(seed, sizes), path)
