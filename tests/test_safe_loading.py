"""Reading an MMSA pickle runs no code from it: what such files hold loads, anything else is
refused with one line naming the file and the global, before that global is called."""
import builtins
import os
import pickle
import subprocess

import numpy as np
import pytest

from coupled_mamba_ext.cli import main
from coupled_mamba_ext.data import MMSAFormatError, load_mmsa, write_synthetic
from coupled_mamba_ext.data.safe_pickle import load_restricted


def mmsa_like(seed=0):
    """A small dict in the layout of MMSA's own pickles (MOSI's feature sizes), with what
    they hold besides the features: object arrays of ids and raw text, BERT ids, float64
    labels of shape (N, 1), CH-SIMS' per-modality labels."""
    rng = np.random.default_rng(seed)
    raw = {}
    for split, n in (("train", 6), ("valid", 3), ("test", 3)):
        text_bert = np.zeros((n, 3, 8), dtype=np.int64)
        text_bert[:, 0] = rng.integers(100, 3000, (n, 8))
        text_bert[:, 1, :5] = 1
        raw[split] = {
            "text": rng.normal(size=(n, 8, 768)).astype(np.float32),
            "audio": rng.normal(size=(n, 10, 5)).astype(np.float32),
            "vision": rng.normal(size=(n, 7, 20)),  # float64, as some exports have
            "text_bert": text_bert,
            "audio_lengths": rng.integers(1, 11, n).tolist(),
            "vision_lengths": rng.integers(1, 8, n),
            "regression_labels": rng.uniform(-3, 3, (n, 1)),
            "regression_labels_A": rng.uniform(-3, 3, n).astype(np.float32),
            "id": np.array([f"clip{i}$_${i}" for i in range(n)], dtype=object),
            "raw_text": np.array([f"words of clip {i}" for i in range(n)]),
            "annotations": [("Negative", "Positive")[i % 2] for i in range(n)],
            "meta": {"fps": np.float32(30.0), "sizes": (1, 2.5, 3 + 1j), "tags": {"a", "b"},
                     "blob": b"\x00\x01", "buffer": bytearray(b"xy"), "ok": True},
        }
    return raw


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_plain_pickle_of_numpy_arrays_loads(tmp_path, protocol):
    raw = mmsa_like()
    path = tmp_path / "mmsa.pkl"
    with open(path, "wb") as f:
        pickle.dump(raw, f, protocol=protocol)
    with open(path, "rb") as f:
        loaded = load_restricted(f)
    for split in raw:
        for key, value in raw[split].items():
            if isinstance(value, np.ndarray):
                assert loaded[split][key].dtype == value.dtype
                assert np.array_equal(loaded[split][key], value), (split, key)
            else:
                assert loaded[split][key] == value, (split, key)
    data = load_mmsa(path)
    assert data.info.name == "mosi"
    assert np.array_equal(data.splits["train"].features[0], raw["train"]["text"])
    assert np.array_equal(data.splits["test"].lengths[1], raw["test"]["audio_lengths"])


def test_a_pickle_written_by_numpy_1_loads(tmp_path):
    """numpy 1.x names its internals numpy.core.*, numpy 2 numpy._core.*; published MMSA
    files were written by numpy 1.x. Protocol 2 spells each global out as text (no length
    prefix), so renaming the module in the bytes gives what numpy 1.x writes."""
    raw = mmsa_like()
    data = pickle.dumps(raw, protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(data.replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy._core" not in path.read_bytes()
    loaded = load_mmsa(path)
    assert np.array_equal(loaded.splits["valid"].features[1], raw["valid"]["audio"])


def test_the_synthetic_writers_pickle_loads(tmp_path):
    path = tmp_path / "synthetic.pkl"
    write_synthetic(path, seed=3)
    assert load_mmsa(path).info.name == "synthetic"


class _Reduces:
    """Unpickles as ``call(*args)``: how a malicious pickle runs code."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _attacks(target):
    """(name of the global in the file, an object whose unpickling would create target)."""
    return [
        ("posix.system", _Reduces(os.system, f"touch {target}")),
        ("io.open", _Reduces(builtins.open, str(target), "w")),
        ("subprocess.call", _Reduces(subprocess.call, ["touch", str(target)])),
        ("builtins.exec", _Reduces(builtins.exec, f"open({str(target)!r}, 'w')")),
        # An admitted module but a name outside the admitted set.
        ("numpy.save", _Reduces(np.save, str(target), np.zeros(1))),
    ]


@pytest.mark.parametrize("index", range(len(_attacks("x"))), ids=[a[0] for a in _attacks("x")])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, index, protocol):
    target = tmp_path / "created_by_the_pickle"
    name, attack = _attacks(target)[index]
    raw = mmsa_like()
    # Hidden deep inside an otherwise valid file, as the last element of an object array.
    raw["train"]["id"][-1] = attack
    path = tmp_path / "evil.pkl"
    # fix_imports=False: protocol 2 would otherwise spell some modules as Python 2 did
    path.write_bytes(pickle.dumps(raw, protocol=protocol, fix_imports=False))
    with pytest.raises(MMSAFormatError) as error:
        load_mmsa(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused to unpickle it: the pickle refers to {name},")
    assert not target.exists()


def test_the_cli_refuses_it_with_one_line_and_status_2(tmp_path, capsys):
    target = tmp_path / "created_by_the_pickle"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": _Reduces(os.system, f"touch {target}")}))
    # train and eval read --data through the same load_mmsa
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: refused to unpickle it" in err, err
    assert "posix.system" in err
    assert not target.exists()


def test_codecs_encode_is_admitted_for_latin1_bytes_only(tmp_path):
    """Protocols 0-2 store bytes as _codecs.encode(text, 'latin1'); another codec is refused."""
    path = tmp_path / "codec.pkl"
    rot13 = pickle.dumps(b"x", protocol=2).replace(b"latin1", b"rot_13")
    path.write_bytes(rot13)
    with pytest.raises(MMSAFormatError, match="refers to _codecs.encode with encoding 'rot_13'"):
        load_mmsa(path)
