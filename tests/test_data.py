"""The MMSA loader (schema, lengths, -inf, labels, bad files) and the synthetic dataset."""
import pickle

import numpy as np
import pytest
import torch

from coupled_mamba_ext.data import (MMSADataset, MMSAFormatError, collate_mmsa, load_mmsa,
                                    load_synthetic, make_synthetic, parse_mmsa, write_synthetic)
from coupled_mamba_ext.data.synthetic import BURST_WIDTH, MIN_GAP, _burst_starts

SMALL = {"train": 40, "valid": 12, "test": 12}


def fake_split(n, dims=(768, 74, 35), lengths=(50, 500, 500), unaligned=True, seed=0):
    """An MMSA split with random features and labels in [-3, 3]."""
    rng = np.random.default_rng(seed)
    split = {m: rng.normal(size=(n, L, d)).astype(np.float32)
             for m, L, d in zip(("text", "audio", "vision"), lengths, dims)}
    split["regression_labels"] = rng.choice([-3.0, -1.2, 0.0, 0.4, 2.6], n).astype(np.float32)
    if unaligned:
        split["audio_lengths"] = rng.integers(1, lengths[1] + 1, n)
        split["vision_lengths"] = rng.integers(1, lengths[2] + 1, n)
    return split


def fake_mmsa(**kwargs):
    return {name: fake_split(n, seed=i, **kwargs) for i, (name, n) in enumerate(SMALL.items())}


# ----------------------------------------------------------------------------- loader
def test_recognises_dataset_and_uses_true_lengths():
    raw = fake_mmsa(lengths=(50, 60, 40))
    raw["train"]["audio"][0, 5:] = 99.0  # beyond a true length of 5: must never be seen
    raw["train"]["audio_lengths"][0] = 5
    data = parse_mmsa(raw)
    assert data.info.name == "mosei" and data.info.metrics_dataset == "mosei"
    assert data.feature_dims == [768, 74, 35]
    train = data.splits["train"]
    assert np.array_equal(train.lengths[1], raw["train"]["audio_lengths"])
    assert np.array_equal(train.lengths[0], np.full(40, 50))  # no text_bert: padded length

    batch = collate_mmsa([MMSADataset(train)[i] for i in range(3)])
    assert batch.xs[1].shape == (3, int(train.lengths[1][:3].max()), 74)
    assert batch.lengths[1].tolist() == train.lengths[1][:3].tolist()
    assert torch.all(batch.xs[1][0, 5:] == 0)  # padded with zeros, not the 99s behind length 5
    assert torch.equal(batch.xs[1][0, :5], torch.from_numpy(raw["train"]["audio"][0, :5]))
    assert batch.regression.dtype == torch.float32 and batch.classification.dtype == torch.long


def test_aligned_data_share_the_text_mask_lengths():
    raw = fake_mmsa(dims=(768, 5, 20), lengths=(50, 50, 50), unaligned=False)  # aligned MOSI
    for split in raw.values():
        text_bert = np.zeros((len(split["regression_labels"]), 3, 50), dtype=np.int64)
        text_bert[:, 1, :7] = 1  # attention mask: 7 tokens
        split["text_bert"] = text_bert
    data = parse_mmsa(raw)
    assert data.info.name == "mosi" and data.aligned
    assert all(set(lengths) == {7} for lengths in data.splits["train"].lengths)

    raw["valid"]["audio_lengths"] = np.zeros(SMALL["valid"], dtype=np.int64)
    data = parse_mmsa(raw)
    assert set(data.splits["valid"].lengths[1]) == {1}  # absent modality -> one zero step
    assert not data.aligned


def test_unaligned_modalities_without_lengths_use_every_step():
    raw = fake_mmsa(unaligned=False)  # padded 50 / 500 / 500, no *_lengths
    data = parse_mmsa(raw)
    assert set(data.splits["test"].lengths[2]) == {500} and not data.aligned


def test_minus_inf_is_zeroed_without_touching_the_input():
    raw = fake_mmsa()
    raw["test"]["audio"][3, 2, :] = -np.inf
    split = parse_mmsa(raw).splits["test"]
    assert np.all(np.isfinite(split.features[1])) and np.all(split.features[1][3, 2] == 0)
    assert np.isneginf(raw["test"]["audio"][3, 2, 0])


def test_nan_and_plus_inf_features_are_zeroed_with_a_warning():
    """NaN and +inf are no dataset's format: zeroed like -inf, but with a warning naming the
    split, the modality and the counts; -inf alone stays quiet (test above)."""
    raw = fake_mmsa()
    raw["valid"]["vision"][0, 1, :2] = np.nan
    raw["valid"]["vision"][1, 0, 0] = np.inf
    raw["valid"]["vision"][1, 0, 1] = -np.inf
    with pytest.warns(UserWarning, match=r"split 'valid'\['vision'\]: 3 NaN or \+inf feature "
                                         r"values set to 0 \(with 1 -inf\)"):
        split = parse_mmsa(raw).splits["valid"]
    assert np.all(np.isfinite(split.features[2]))
    assert split.features[2][0, 1, 0] == 0 and split.features[2][1, 0, 1] == 0


def test_non_finite_values_are_counted_across_blocks(monkeypatch):
    """The scan for non-finite values goes a block of samples at a time (bounded masks); with
    blocks of 2 samples the same values are zeroed and counted as with one block."""
    import coupled_mamba_ext.data.mmsa as mmsa
    monkeypatch.setattr(mmsa, "_VALUES_PER_BLOCK", 2 * 40 * 35)  # 2 samples of vision
    raw = fake_mmsa(lengths=(50, 20, 40))
    vision = raw["train"]["vision"]
    vision[0, 0, 0] = vision[5, 3, 1] = vision[39, 39, 34] = np.nan  # first, middle, last
    vision[6, 1, :3] = -np.inf
    with pytest.warns(UserWarning, match=r"'train'\['vision'\]: 3 NaN or \+inf feature values "
                                         r"set to 0 \(with 3 -inf\)"):
        split = parse_mmsa(raw).splits["train"]
    assert np.all(np.isfinite(split.features[2]))
    assert np.count_nonzero(split.features[2] == 0) == 6


def test_parse_without_copy_cleans_float32_in_place_and_converts_the_rest():
    raw = fake_mmsa()
    text = raw["test"]["text"]  # float32: cleaned in place and returned itself
    text[2, 1, 0] = -np.inf
    raw["test"]["audio"] = raw["test"]["audio"].astype(np.float64)  # converted to float32
    split = parse_mmsa(raw, copy=False).splits["test"]
    assert split.features[0] is text and text[2, 1, 0] == 0
    assert split.features[1].dtype == np.float32
    assert not any(m in raw["test"] for m in ("text", "audio", "vision"))  # handed over
    assert "regression_labels" in raw["test"]


def test_loading_a_pickle_does_not_copy_its_features(tmp_path):
    """load_mmsa owns the unpickled dict, so its float32 features are not copied: the peak
    of traced memory (numpy's allocations included) stays near the features' size, where a
    copy of every split would take twice it."""
    import tracemalloc
    raw = fake_mmsa(lengths=(50, 100, 100))
    feature_bytes = sum(raw[s][m].nbytes for s in raw for m in ("text", "audio", "vision"))
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=4))
    del raw
    tracemalloc.start()
    try:
        data = load_mmsa(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(f.nbytes for s in data.splits.values() for f in s.features) == feature_bytes
    assert peak < 1.5 * feature_bytes, (peak, feature_bytes)


def test_labels_regression_and_classification():
    raw = fake_mmsa()
    data = parse_mmsa(raw)
    train = data.splits["train"]
    assert np.array_equal(train.regression_labels, raw["train"]["regression_labels"])
    # MOSI/MOSEI: negative / neutral / positive by sign
    expected = {-3.0: 0, -1.2: 0, 0.0: 1, 0.4: 2, 2.6: 2}
    assert [expected[round(float(v), 1)] for v in train.regression_labels] == \
        train.classification_labels.tolist()
    assert data.num_classes == 3

    sims = parse_mmsa(raw, dataset="sims").splits["train"]  # [-1, 1] scale, 3-class intervals
    expected = {-3.0: 0, -1.2: 0, 0.0: 1, 0.4: 2, 2.6: 2}
    assert sims.classification_labels.tolist() == \
        [expected[round(float(v), 1)] for v in sims.regression_labels]

    for split in raw.values():  # given classification labels win, and set the class count
        split["classification_labels"] = np.arange(len(split["regression_labels"])) % 4
    data = parse_mmsa(raw)
    assert data.num_classes == 4 and data.splits["valid"].classification_labels[:5].tolist() == \
        [0, 1, 2, 3, 0]


@pytest.mark.parametrize("corrupt, message", [
    (lambda raw: raw.pop("valid"), "missing split 'valid'"),
    (lambda raw: raw["valid"].pop("audio"), "split 'valid' is missing key 'audio'"),
    (lambda raw: raw["test"].pop("regression_labels"), "missing key 'regression_labels'"),
    (lambda raw: raw["train"].update(vision=np.zeros((40, 35))),
     r"split 'train'\['vision'\] has shape \(40, 35\), expected \(40, \*, \*\)"),
    (lambda raw: raw["train"].update(text=np.zeros((39, 50, 768))),
     r"\['text'\] has shape \(39, 50, 768\), expected \(40, \*, \*\)"),
    (lambda raw: raw["train"].update(audio_lengths=np.ones(39, dtype=int)),
     r"\['audio_lengths'\] has shape \(39,\), expected \(40,\)"),
    (lambda raw: raw["train"]["vision_lengths"].__setitem__(0, 501), r"lengths must lie in \[0, 500\]"),
    (lambda raw: raw["test"].update(audio=np.zeros((12, 500, 73))), "feature sizes"),
    (lambda raw: raw["train"]["regression_labels"].__setitem__(0, np.nan), "non-finite"),
    (lambda raw: raw["train"].update(classification_labels=np.full(40, -1)), "class indices"),
    (lambda raw: raw.update(valid={k: v[:0] for k, v in raw["valid"].items()}),
     "split 'valid' has no samples"),
])
def test_schema_errors_name_the_problem(corrupt, message):
    raw = fake_mmsa()
    corrupt(raw)
    with pytest.raises(MMSAFormatError, match=message):
        parse_mmsa(raw)


def test_unknown_feature_sizes_ask_for_the_dataset():
    raw = fake_mmsa(dims=(300, 5, 20))  # e.g. GloVe text instead of BERT
    with pytest.raises(MMSAFormatError, match="--dataset"):
        parse_mmsa(raw)
    assert parse_mmsa(raw, dataset="mosi").info.name == "mosi"


def test_corrupted_and_truncated_pickles(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(fake_mmsa(lengths=(50, 20, 20))))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (truncated, garbage):
        with pytest.raises(MMSAFormatError, match=f"{path.name}.*truncated or corrupted"):
            load_mmsa(path)
    not_a_dict = tmp_path / "list.pkl"
    not_a_dict.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(MMSAFormatError, match="expected a dict of splits"):
        load_mmsa(not_a_dict)
    assert load_mmsa(good).info.name == "mosei"


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_matches_the_schema():
    a, b = make_synthetic(3, SMALL), make_synthetic(3, SMALL)
    c = make_synthetic(4, SMALL)
    for split in SMALL:
        for key in ("text", "audio", "vision", "regression_labels"):
            assert np.array_equal(a[split][key], b[split][key])
        assert not np.array_equal(a[split]["audio"], c[split]["audio"])
    data = parse_mmsa(a)  # recognised by its feature sizes
    assert data.info.name == "synthetic" and data.num_classes == 2
    train = data.splits["train"]
    assert [f.shape for f in train.features] == [(40, 24, 32), (40, 64, 12), (40, 40, 24)]
    for feats, lengths in zip(train.features, train.lengths):
        assert len(set(lengths)) > 1  # true lengths vary across samples
        beyond = np.arange(feats.shape[1])[None, :] >= lengths[:, None]
        assert np.all(feats[beyond] == 0)
    magnitude = np.abs(train.regression_labels)
    assert np.all((magnitude >= 1) & (magnitude <= 3))
    assert np.array_equal(train.classification_labels, (train.regression_labels > 0).astype(int))


def test_synthetic_pickle_round_trips(tmp_path):
    path = tmp_path / "synthetic.pkl"
    write_synthetic(path, seed=1, sizes=SMALL)
    loaded, direct = load_mmsa(path), load_synthetic(1, SMALL)
    assert loaded.info.name == "synthetic"
    for split in SMALL:
        for x, y in zip(loaded.splits[split].features + loaded.splits[split].lengths,
                        direct.splits[split].features + direct.splits[split].lengths):
            assert np.array_equal(x, y)
        assert np.array_equal(loaded.splits[split].regression_labels,
                              direct.splits[split].regression_labels)


def test_each_burst_time_alone_is_independent_of_the_label():
    rng = np.random.default_rng(0)
    in_sync = rng.random(200_000) < 0.5
    audio, vision = _burst_starts(rng, in_sync)
    for starts in (audio, vision):  # the same distribution (uniform) in both classes
        for cls in (True, False):
            hist, _ = np.histogram(starts[in_sync == cls], bins=10, range=(0, 1 - BURST_WIDTH))
            assert hist.sum() == np.sum(in_sync == cls)
            assert np.allclose(hist / hist.sum(), 0.1, atol=0.006)
    gap = np.abs(audio - vision)
    assert np.all(gap[in_sync] == 0)
    assert gap[~in_sync].min() >= MIN_GAP * (1 - BURST_WIDTH) - 1e-12


def _burst_positions(feats, lengths):
    """Relative position of each sample's burst, found without knowing the pattern: the
    pattern is the mean feature direction (noise averages out), and the burst is the
    window of steps with the largest projection onto it."""
    pattern = feats.sum(axis=(0, 1))
    projection = torch.from_numpy(feats @ (pattern / np.linalg.norm(pattern)))[:, None]
    smoothed = torch.nn.functional.avg_pool1d(projection, 3, 1, padding=1)[:, 0].numpy()
    return (smoothed.argmax(axis=1) + 0.5) / lengths


def test_the_label_is_whether_the_audio_and_vision_bursts_coincide():
    split = load_synthetic(0, {"train": 1000, "valid": 4, "test": 4}).splits["train"]
    audio = _burst_positions(split.features[1], split.lengths[1])
    vision = _burst_positions(split.features[2], split.lengths[2])
    positive = split.classification_labels == 1
    # timing across the two modalities gives the label almost perfectly ...
    assert np.mean((np.abs(audio - vision) < MIN_GAP / 2) == positive) > 0.95
    # ... while the best threshold on one burst time alone is near chance
    for position in (audio, vision):
        best = max(np.mean((position < t) == positive) for t in np.linspace(0, 1, 41))
        assert best < 0.6
