"""MMSA pickles (CMU-MOSI, CMU-MOSEI, CH-SIMS, CH-SIMS v2), aligned or unaligned.

An MMSA pickle is a dict with splits ``train`` / ``valid`` / ``test``; each split holds
``text`` (N, Lt, Dt), ``audio`` (N, La, Da), ``vision`` (N, Lv, Dv) float arrays padded with
zeros at the end, ``regression_labels`` (N,), and optionally ``audio_lengths`` /
``vision_lengths`` (N,) true lengths (unaligned data), ``text_bert`` (N, 3, Lt) BERT token ids /
attention mask / segment ids, ``classification_labels`` (N,), ``id``, ``raw_text`` and, for
CH-SIMS, ``regression_labels_T/A/V``. The format is described in docs/data.md.

This module needs numpy and torch only; it does not load the compiled operator.
"""
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..catalog import DATASETS, SPLITS, DatasetInfo
from ..metrics import sims_classes
from .safe_pickle import ForbiddenGlobalError, load_restricted

MODALITIES = ("text", "audio", "vision")


class MMSAFormatError(ValueError):
    """A file or dict that is not a valid MMSA dataset; the message says what is wrong."""


@dataclass
class MMSASplit:
    """One split, ready for training.

    features: 3 float32 arrays (N, L_m, D_m) in MODALITIES order, non-finite values set to 0.
    lengths: 3 int64 arrays (N,), the true length of every sequence, in [1, L_m].
    regression_labels: float32 (N,). classification_labels: int64 (N,), classes 0..K-1
    (None only while parsing, before they are derived from the regression labels).
    """
    features: List[np.ndarray]
    lengths: List[np.ndarray]
    regression_labels: np.ndarray
    classification_labels: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.regression_labels)


@dataclass
class MMSAData:
    """A whole dataset: its DatasetInfo, the splits by name and the number of classes."""
    info: DatasetInfo
    splits: Dict[str, MMSASplit]
    num_classes: int

    @property
    def feature_dims(self) -> List[int]:
        return [f.shape[-1] for f in self.splits["train"].features]

    @property
    def aligned(self) -> bool:
        """True when every modality has the same padded length and the same true lengths
        (word-aligned data); unaligned data must be brought to one length by the model."""
        return all(len({f.shape[1] for f in s.features}) == 1 and
                   all(np.array_equal(s.lengths[0], other) for other in s.lengths[1:])
                   for s in self.splits.values())


# ----------------------------------------------------------------------------- reading
def read_pickle(path: Union[str, os.PathLike]) -> dict:
    """Unpickle ``path`` without running code from it (``safe_pickle.load_restricted``: numpy
    arrays, dtypes, builtin containers and scalars only). A pickle that refers to anything
    else, or a truncated or corrupted file, raises MMSAFormatError naming the file."""
    try:
        with open(path, "rb") as f:
            return load_restricted(f)
    except ForbiddenGlobalError as err:
        raise MMSAFormatError(
            f"{path}: refused to unpickle it: {err}, which an MMSA pickle does not hold (only "
            f"numpy arrays, dtypes and builtin containers and scalars are admitted, since "
            f"anything else could run code on loading)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
            TypeError, ValueError, MemoryError) as err:
        raise MMSAFormatError(f"{path}: cannot read it as an MMSA pickle, the file is truncated "
                              f"or corrupted ({type(err).__name__}: {err})") from err


def load_mmsa(path: Union[str, os.PathLike], dataset: Optional[str] = None) -> MMSAData:
    """Read and validate an MMSA pickle. ``dataset`` (a key of DATASETS) is recognised from
    the feature sizes when not given. See ``parse_mmsa``.

    The unpickled dict is this function's own, so its float32 features are cleaned in place
    rather than copied: the peak memory stays about the file's size, not twice it (unaligned
    MOSEI holds several GB of features)."""
    return parse_mmsa(read_pickle(path), dataset, source=str(path), copy=False)


# Temporary files of atomic_write: ".<name>.<random>.tmp" beside the file they replace.
_TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside ``path``, flush it to disk (fsync),
    then rename it over ``path`` and fsync the folder: a reader, or a run killed at any
    moment (power loss included), sees the old file or the new one, never half. The file
    gets the permissions of the umask, as ``open`` would give it. A temporary file left by
    a killed process is removed by ``remove_temporary_files``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=_TEMPORARY_SUFFIX)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def remove_temporary_files(directory: Union[str, os.PathLike], names: Sequence[str]) -> List[str]:
    """Delete the temporary files that ``atomic_write`` left in ``directory``, for the files
    ``names``, when its process was killed mid-write; returns the names deleted. Only call it
    while no other process writes them (``train`` holds the folder's lock)."""
    prefixes = tuple(f".{name}." for name in names)
    removed = []
    for entry in sorted(os.listdir(directory)):
        if entry.startswith(prefixes) and entry.endswith(_TEMPORARY_SUFFIX) and \
                os.path.isfile(os.path.join(directory, entry)):
            os.unlink(os.path.join(directory, entry))
            removed.append(entry)
    return removed


def write_pickle(raw: dict, path: Union[str, os.PathLike]) -> None:
    """Pickle ``raw`` to ``path`` atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(raw, f, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(path, write)


# ----------------------------------------------------------------------------- validation
def _array(split: dict, key: str, where: str) -> np.ndarray:
    if key not in split:
        raise MMSAFormatError(f"{where} is missing key {key!r} (has {sorted(split)})")
    try:
        return np.asarray(split[key])
    except (TypeError, ValueError) as err:
        raise MMSAFormatError(f"{where}[{key!r}] is not an array: {err}") from err


# Feature values per block (whole samples) when scanning for non-finite values: the masks
# of a block (a few bytes per value) stay near 16 M values, not the size of a whole split.
_VALUES_PER_BLOCK = 1 << 24


def _zero_non_finite(feats: np.ndarray, where: str) -> None:
    """Sets every non-finite feature value to 0, in place. -inf is what MOSEI's audio holds
    for silent frames and goes quietly; NaN or +inf are not part of any MMSA dataset's
    format, so zeroing them gets a warning with the count."""
    per_sample = max(1, int(np.prod(feats.shape[1:])))
    block = max(1, _VALUES_PER_BLOCK // per_sample)
    zeroed = unexpected = 0
    for start in range(0, feats.shape[0], block):
        part = feats[start:start + block]  # a view: zeroing it zeroes feats
        bad = ~np.isfinite(part)
        if bad.any():
            zeroed += int(np.count_nonzero(bad))
            unexpected += int(np.count_nonzero(bad & ~np.isneginf(part)))
            part[bad] = 0.0
    if unexpected:
        warnings.warn(f"{where}: {unexpected} NaN or +inf feature values set to 0 (with "
                      f"{zeroed - unexpected} -inf); the data may be corrupted")


def _check_shape(arr: np.ndarray, expected: Sequence[Optional[int]], what: str) -> None:
    """expected: one entry per dimension, None where any size is fine."""
    ok = arr.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, arr.shape))
    if not ok:
        shown = "(" + ", ".join("*" if e is None else str(e) for e in expected)
        shown += ",)" if len(expected) == 1 else ")"
        raise MMSAFormatError(f"{what} has shape {arr.shape}, expected {shown}")


def _vector(split: dict, key: str, n: int, where: str) -> np.ndarray:
    """split[key] as an (n,) array; MMSA stores (N,), some exports keep a trailing (N, 1)."""
    arr = _array(split, key, where)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    _check_shape(arr, (n,), f"{where}[{key!r}]")
    return arr


def _true_lengths(split: dict, modality: str, n: int, padded: int,
                  aligned_text_lengths: Optional[np.ndarray], where: str) -> np.ndarray:
    """True lengths of one modality (N,).

    text: the sum of the BERT attention mask (row 1 of ``text_bert``) when present. Audio /
    vision: ``<modality>_lengths`` when present (unaligned data); without them, a modality
    padded like the text is aligned to it and shares its lengths, ``aligned_text_lengths``
    (what MMSA's models do with aligned data). Otherwise every padded step counts.
    """
    if modality == "text" and "text_bert" in split:
        bert = _array(split, "text_bert", where)
        _check_shape(bert, (n, 3, padded), f"{where}['text_bert']")
        lengths = bert[:, 1, :].sum(axis=1)
    elif f"{modality}_lengths" in split:
        lengths = _vector(split, f"{modality}_lengths", n, where)
    elif aligned_text_lengths is not None:
        return aligned_text_lengths
    else:
        lengths = np.full(n, padded)
    if lengths.dtype.kind not in "biuf":  # bool, signed, unsigned, float
        raise MMSAFormatError(f"{where}: {modality} lengths must be numbers, got dtype "
                              f"{lengths.dtype}")
    if not np.all(np.isfinite(lengths)) or np.any(lengths != np.round(lengths)):
        bad = lengths[~np.isfinite(lengths) | (lengths != np.round(lengths))][0]
        raise MMSAFormatError(f"{where}: {modality} lengths must be whole numbers of steps, "
                              f"got {bad}")
    if lengths.min(initial=0) < 0 or lengths.max(initial=0) > padded:
        raise MMSAFormatError(f"{where}: {modality} lengths must lie in [0, {padded}] (the padded "
                              f"length), got values in [{lengths.min()}, {lengths.max()}]")
    # A modality that is absent from a clip (length 0) is read as one all-zero step, so that
    # pooling over the true length stays defined.
    return np.maximum(lengths.astype(np.int64), 1)


def _derived_classes(regression: np.ndarray, metrics_dataset: str) -> np.ndarray:
    """negative / neutral / positive (0 / 1 / 2), MMSA's convention: by sign on the [-3, 3]
    scale, by the CH-SIMS 3-class intervals on the [-1, 1] scale."""
    if metrics_dataset in ("mosi", "mosei"):
        return (np.sign(regression) + 1).astype(np.int64)
    return sims_classes(np.clip(regression, -1, 1), 3).astype(np.int64)


def _float32_features(split: dict, modality: str, n: int, where: str, copy: bool) -> np.ndarray:
    """split[modality], checked to be (n, L, D), as float32 with its non-finite values zeroed.
    copy=False: a writeable float32 array is cleaned in place and returned itself, and the
    key leaves ``split``, so that an array of another dtype is freed once converted."""
    feats = _array(split, modality, where)
    _check_shape(feats, (n, None, None), f"{where}[{modality!r}]")
    if feats.shape[1] == 0 or feats.shape[2] == 0:
        raise MMSAFormatError(f"{where}[{modality!r}] is empty: shape {feats.shape}, expected at "
                              f"least one step and one feature")
    if not copy:
        del split[modality]
    if copy or feats.dtype != np.float32 or not feats.flags.writeable:
        feats = feats.astype(np.float32)
    _zero_non_finite(feats, f"{where}[{modality!r}]")
    return feats


def _parse_split(split, name: str, source: str, copy: bool) -> MMSASplit:
    """Validate and convert one split; classification_labels stays None when the split has
    none (they are derived once the dataset is known)."""
    where = f"{source}: split {name!r}"
    if not isinstance(split, dict):
        raise MMSAFormatError(f"{where} must be a dict, got {type(split).__name__}")
    labels = _array(split, "regression_labels", where)
    if labels.ndim == 0:
        raise MMSAFormatError(f"{where}['regression_labels'] must hold one label per sample, "
                              f"got a scalar")
    n = labels.shape[0]  # the number of samples every other key must match
    if n == 0:
        raise MMSAFormatError(f"{where} has no samples; training needs at least one in each "
                              f"split (train to learn, valid to select the model, test to "
                              f"report)")
    labels = _vector(split, "regression_labels", n, where).astype(np.float32)
    if not np.all(np.isfinite(labels)):
        raise MMSAFormatError(f"{where}['regression_labels'] contains non-finite values")

    features, lengths = [], []
    for modality in MODALITIES:
        feats = _float32_features(split, modality, n, where, copy)
        features.append(feats)
        same_padding = lengths and feats.shape[1] == features[0].shape[1]
        lengths.append(_true_lengths(split, modality, n, feats.shape[1],
                                     lengths[0] if same_padding else None, where))

    classes = None
    if "classification_labels" in split:
        classes = _vector(split, "classification_labels", n, where)
        if np.any(classes < 0) or np.any(classes != np.round(classes)):
            raise MMSAFormatError(f"{where}['classification_labels'] must be class indices 0..K-1")
        classes = classes.astype(np.int64)
    return MMSASplit(features, lengths, labels, classes)


def _check_classes_present(classes: np.ndarray, source: str) -> None:
    """Given classification labels set the class count K (their largest + 1), so each of
    0..K-1 must have a sample: a stray value (1e9) would otherwise make the model's output
    layer that wide rather than name a class."""
    present = np.unique(classes)
    if len(present) < present[-1] + 1:
        missing = np.setdiff1d(np.arange(len(present) + 1), present)[0]
        raise MMSAFormatError(f"{source}: classification_labels must be the class indices 0..K-1, "
                              f"each with a sample; got {len(present)} distinct labels up to "
                              f"{present[-1]} (class {missing} has none)")


def infer_dataset(feature_dims: Sequence[int]) -> DatasetInfo:
    """The DatasetInfo whose (text, audio, vision) feature sizes are ``feature_dims``."""
    for info in DATASETS.values():
        if tuple(feature_dims) == info.feature_dims:
            return info
    raise MMSAFormatError(
        f"feature sizes (text, audio, vision) = {tuple(feature_dims)} match no known dataset "
        f"({', '.join(f'{k} {v.feature_dims}' for k, v in DATASETS.items())}); name the "
        f"dataset explicitly (--dataset)")


def parse_mmsa(raw, dataset: Optional[str] = None, source: str = "MMSA data",
               copy: bool = True) -> MMSAData:
    """Validate an unpickled MMSA dict and convert it for training.

    raw: {"train": split, "valid": split, "test": split} as described in the module docstring.
    dataset: a key of DATASETS; recognised from the feature sizes when None.
    copy: True leaves ``raw`` and its arrays as they were (the features are converted into
    new arrays). False hands ``raw`` over to save memory: float32 features are cleaned in
    place and become the returned ones, and the feature keys are removed from ``raw``.
    Errors (MMSAFormatError) name the split and the missing key or the wrong shape.
    """
    if not isinstance(raw, dict):
        raise MMSAFormatError(f"{source}: expected a dict of splits {SPLITS}, "
                              f"got {type(raw).__name__}")
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise MMSAFormatError(f"{source}: missing split {missing[0]!r} (has {sorted(raw)})")
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    splits = {name: _parse_split(raw[name], name, source, copy) for name in SPLITS}
    train_dims = [f.shape[-1] for f in splits["train"].features]
    for name in SPLITS[1:]:
        dims = [f.shape[-1] for f in splits[name].features]
        if dims != train_dims:
            raise MMSAFormatError(f"{source}: split {name!r} has feature sizes {dims}, but "
                                  f"'train' has {train_dims}")
    info = DATASETS[dataset] if dataset else infer_dataset(train_dims)
    given = [s.classification_labels for s in splits.values()
             if s.classification_labels is not None]
    if given:
        _check_classes_present(np.concatenate(given), source)
    for split in splits.values():
        if split.classification_labels is None:
            split.classification_labels = _derived_classes(split.regression_labels,
                                                            info.metrics_dataset)
    num_classes = int(max(s.classification_labels.max(initial=0) for s in splits.values())) + 1
    return MMSAData(info, splits, max(num_classes, 2))


# ----------------------------------------------------------------------------- torch side
class Batch(NamedTuple):
    """A padded batch. xs: 3 tensors (batch, L_m, D_m), L_m = the longest true length of
    modality m in the batch; lengths: 3 int64 tensors (batch,); regression: float32 (batch,);
    classification: int64 (batch,)."""
    xs: List[torch.Tensor]
    lengths: List[torch.Tensor]
    regression: torch.Tensor
    classification: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch([x.to(device) for x in self.xs], [n.to(device) for n in self.lengths],
                     self.regression.to(device), self.classification.to(device))


class MMSADataset(torch.utils.data.Dataset):
    """Samples of one MMSASplit; item i is (features trimmed to the true lengths,
    lengths, regression label, classification label). Batch them with ``collate_mmsa``."""

    def __init__(self, split: MMSASplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Tuple[List[torch.Tensor], List[int], float, int]:
        s = self.split
        lengths = [int(n[i]) for n in s.lengths]
        xs = [torch.from_numpy(f[i, :n]) for f, n in zip(s.features, lengths)]
        return xs, lengths, float(s.regression_labels[i]), int(s.classification_labels[i])


def collate_mmsa(items) -> Batch:
    """Pad each modality to the longest true length in the batch (not the file's padded
    length: unaligned MOSEI pads to 500 steps that most clips do not use)."""
    xs_per_sample, lengths, regression, classification = zip(*items)
    xs = [torch.nn.utils.rnn.pad_sequence([sample[m] for sample in xs_per_sample], batch_first=True)
          for m in range(len(MODALITIES))]
    lengths = [torch.tensor([sample[m] for sample in lengths], dtype=torch.long)
               for m in range(len(MODALITIES))]
    return Batch(xs, lengths, torch.tensor(regression, dtype=torch.float32),
                 torch.tensor(classification, dtype=torch.long))
