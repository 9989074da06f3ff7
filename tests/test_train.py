"""The trainer and the CLI on a tiny synthetic dataset: outputs, resume, eval, bf16."""
import json
import os
import re

import numpy as np
import pytest
import torch

from coupled_mamba_ext import train as training
from coupled_mamba_ext.cli import main
from coupled_mamba_ext.data import MMSADataset, collate_mmsa, load_mmsa, write_synthetic
from coupled_mamba_ext.data.mmsa import atomic_write, write_pickle
from coupled_mamba_ext.errors import UsageError

SIZES = {"train": 48, "valid": 16, "test": 16}
# A model small enough that an epoch takes a fraction of a second on a CPU.
TINY = ["--d-model", "8", "--n-layers", "1", "--d-state", "4", "--seq-len", "8",
        "--batch-size", "16"]


@pytest.fixture(scope="module")
def pickle_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic.pkl"
    write_synthetic(path, seed=0, sizes=SIZES)
    return str(path)


def tiny_config(data, out, **overrides) -> training.TrainConfig:
    config = dict(data=data, out=str(out), d_model=8, n_layers=1, d_state=4, seq_len=8,
                  batch_size=16, epochs=3, device="cpu")
    return training.TrainConfig(**{**config, **overrides})


def test_train_writes_every_output_and_prints_the_table(pickle_path, tmp_path, capsys):
    assert main(["train", "--data", pickle_path, "--out", str(tmp_path), "--epochs", "2",
                 "--device", "cpu", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "Has0_acc_2" in printed and "Corr" in printed and "test" in printed

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["test"]) == {"Has0_acc_2", "Has0_F1_score", "Non0_acc_2",
                                    "Non0_F1_score", "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"}
    assert results["config"]["fusion"] == "coupled" and results["config"]["epochs"] == 2
    assert results["config"]["dataset"] == "synthetic"
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert 1 <= results["best_epoch"] <= 2
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Has0_acc_2" in (tmp_path / "report.md").read_text()
    assert training.load_checkpoint(str(tmp_path / "checkpoint.pt"))["epoch"] == 2


def test_eval_reproduces_the_test_metrics(pickle_path, tmp_path, capsys):
    results = training.train(tiny_config(pickle_path, tmp_path, epochs=2))
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--data", pickle_path,
                 "--split", "valid", "test", "--json", str(out_json)]) == 0
    assert "Has0_acc_2" in capsys.readouterr().out
    evaluated = json.loads(out_json.read_text())
    for name, value in results["test"].items():
        assert evaluated["test"][name] == pytest.approx(value, abs=1e-6), name
    assert evaluated["valid"]["MAE"] == pytest.approx(results["valid"]["MAE"], abs=1e-6)


def test_a_killed_run_resumes_without_losing_epochs(pickle_path, tmp_path, monkeypatch):
    straight = training.train(tiny_config(pickle_path, tmp_path / "straight"))
    expected = training.load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))

    real_epoch = training.train_one_epoch
    def killed_in_third_epoch(*args, **kwargs):
        if args[-1] == 2:  # the epoch index
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(training, "train_one_epoch", killed_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        training.train(tiny_config(pickle_path, tmp_path / "killed"))
    saved = training.load_checkpoint(str(tmp_path / "killed" / "checkpoint.pt"))
    assert saved["epoch"] == 2 and len(saved["history"]) == 2
    assert not [f for f in os.listdir(tmp_path / "killed") if f.endswith(".tmp")]

    monkeypatch.setattr(training, "train_one_epoch", real_epoch)
    resumed = training.train(tiny_config(pickle_path, tmp_path / "killed", resume=True))
    got = training.load_checkpoint(str(tmp_path / "killed" / "checkpoint.pt"))
    for name, weight in expected["model"].items():
        assert torch.allclose(got["model"][name], weight, rtol=1e-6, atol=1e-7), name
    assert resumed["history"] == straight["history"]
    assert resumed["test"] == straight["test"]


def test_export_writes_a_program_that_predicts_as_the_model(pickle_path, tmp_path, capsys):
    """coupled-mamba export: the .pt2 program, loaded back, predicts the test split as the
    saved model run eagerly, for a batch size and lengths other than those it was traced
    with (one clip alone included)."""
    training.train(tiny_config(pickle_path, tmp_path, epochs=1))
    assert main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--out",
                 str(tmp_path / "model.pt2"), "--device", "cpu"]) == 0
    assert "model.pt2" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    saved = training.load_checkpoint(str(tmp_path / "best.pt"))
    model = training.build_model(training.TrainConfig(**saved["config"]), saved["input_dims"],
                                 saved["num_classes"]).eval()
    model.load_state_dict(saved["model"])
    test = MMSADataset(load_mmsa(pickle_path).splits["test"])
    for first, last in ((0, 7), (7, 8)):
        batch = collate_mmsa([test[i] for i in range(first, last)])
        with torch.no_grad():
            torch.testing.assert_close(program(batch.xs, batch.lengths),
                                       model(batch.xs, batch.lengths), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_steps: expected at least 14, got 10"):
        training.export_checkpoint(str(tmp_path / "best.pt"), str(tmp_path / "x.pt2"), "cpu", 10)


def test_resume_and_overwrite_are_explicit(pickle_path, tmp_path):
    training.train(tiny_config(pickle_path, tmp_path, epochs=1))
    with pytest.raises(FileExistsError, match="--resume"):
        training.train(tiny_config(pickle_path, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="fusion='coupled' \\(now 'average'\\)"):
        training.train(tiny_config(pickle_path, tmp_path, epochs=2, fusion="average",
                                   resume=True))
    # more epochs on resume is allowed: the run continues from epoch 1
    results = training.train(tiny_config(pickle_path, tmp_path, epochs=2, resume=True))
    assert [h["epoch"] for h in results["history"]] == [1, 2]


def test_dt_rank_and_coupling_options_reach_the_model(pickle_path, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", pickle_path, "--out", str(out), "--epochs", "1",
                 "--device", "cpu", "--dt-rank", "3", "--coupling", "mean", *TINY]) == 0
    saved = training.load_checkpoint(str(out / "best.pt"))
    assert saved["config"]["dt_rank"] == 3 and saved["config"]["coupling"] == "mean"
    config = training.TrainConfig(**saved["config"])
    layer = training.build_model(config, saved["input_dims"], saved["num_classes"]) \
        .encoder.layers[0]
    assert layer.dt_rank == 3 and layer.coupling == "mean"
    assert layer.dt_proj.weight.shape[1] == 3
    assert saved["model"]["encoder.layers.0.dt_proj.weight"].shape[1] == 3
    # the defaults: rank ceil(d_state / 8) = 1 for d_state 4, learned coupling
    default = training.build_model(tiny_config(pickle_path, tmp_path), [32, 12, 24], 2)
    assert default.encoder.layers[0].dt_rank == 1
    assert default.encoder.layers[0].coupling == "learned"
    # resuming with another coupling is refused
    with pytest.raises(ValueError, match="coupling='mean' \\(now 'sum'\\)"):
        training.train(tiny_config(pickle_path, out, epochs=2, dt_rank=3, coupling="sum",
                                   resume=True))


def test_dt_rank_and_coupling_options_are_checked(pickle_path, tmp_path):
    with pytest.raises(ValueError, match="--dt-rank: expected an int >= 1, got 0"):
        training.train(tiny_config(pickle_path, tmp_path, dt_rank=0))
    with pytest.raises(ValueError, match="only --fusion coupled has a coupling"):
        training.train(tiny_config(pickle_path, tmp_path, fusion="average", coupling="sum"))
    with pytest.raises(SystemExit):
        main(["train", "--data", pickle_path, "--out", str(tmp_path), "--coupling", "max"])


@pytest.mark.parametrize("option, message", [
    (dict(epochs=0), "--epochs: expected an int >= 1, got 0"),
    (dict(batch_size=-3), "--batch-size: expected an int >= 1, got -3"),
    (dict(d_model=0), "--d-model: expected an int >= 1, got 0"),
    (dict(n_layers=0), "--n-layers: expected an int >= 1, got 0"),
    (dict(d_state=0), "--d-state: expected an int >= 1, got 0"),
    (dict(d_state=257), "--d-state: expected at most 256"),
    (dict(seq_len=0), "--seq-len: expected an int >= 1, got 0"),
    (dict(num_workers=-1), "--num-workers: expected an int >= 0, got -1"),
    (dict(lr=0.0), "--lr: expected a value > 0, got 0.0"),
    (dict(weight_decay=-1e-4), "--weight-decay: expected a value >= 0, got -0.0001"),
    (dict(dropout=1.0), "--dropout: expected a value in [0, 1), got 1.0"),
    (dict(synthetic_train_size=0), "--synthetic-train-size: expected an int >= 1, got 0"),
])
def test_option_values_out_of_range_are_refused(option, message):
    config = training.TrainConfig(data="synthetic", out="unused", **option)
    with pytest.raises(UsageError, match=re.escape(message)):
        training.check_config(config)


def test_device_is_checked():
    assert training.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="--device: expected cpu, cuda or cuda:N, got 'gpu'"):
        training.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda: no CUDA device is available"):
            training.resolve_device("cuda")
    else:
        index = torch.cuda.device_count()
        with pytest.raises(UsageError, match=f"this machine has {index} CUDA device"):
            training.resolve_device(f"cuda:{index}")


def test_command_line_mistakes_are_one_message(pickle_path, tmp_path, capsys):
    """A mistake in the options or files gives one line on stderr, naming what is wrong,
    and exit status 2, not a traceback."""
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(open(pickle_path, "rb").read()[:1000])
    cases = [
        (["train", "--data", str(tmp_path / "none.pkl"), "--out", str(tmp_path / "a")],
         "coupled-mamba train: error: [Errno 2] No such file or directory"),
        (["train", "--data", str(truncated), "--out", str(tmp_path / "b")],
         "truncated.pkl: cannot read it as an MMSA pickle"),
        (["train", "--data", pickle_path, "--out", str(tmp_path / "c"), "--dt-rank", "0"],
         "coupled-mamba train: error: --dt-rank: expected an int >= 1, got 0"),
        (["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", pickle_path],
         "coupled-mamba eval: error: [Errno 2] No such file or directory"),
        (["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", pickle_path,
          "--batch-size", "0"], "coupled-mamba eval: error: --batch-size: expected an int >= 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize("fusion", ["coupled", "average", "concat", "mamba", "transformer",
                                    "cross_attention"])
def test_weight_decay_on_weights_exempts_biases_norms_and_the_scan_parameters(fusion):
    model = training.build_model(tiny_config("synthetic", "unused", fusion=fusion,
                                             dropout=0.1), [32, 12, 24], 2)
    names = {id(p): n for n, p in model.named_parameters()}
    every = training.parameter_groups(model, 5e-4, "all")
    assert [g["weight_decay"] for g in every] == [5e-4]
    assert len(every[0]["params"]) == len(names)
    decay, no_decay = training.parameter_groups(model, 5e-4, "weights")
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    for name in exempt:  # biases, norm affine weights, A_log, D, dt bias, coupling logits
        leaf = name.split(".")[-1]
        assert leaf.endswith("bias") or leaf in ("A_log", "D", "coupling_logits") or \
            "norm" in name, name
    for name in decayed:  # weight matrices, convolution kernels, embeddings
        assert not name.endswith("bias") and "norm" not in name, name
    if fusion in ("coupled", "average", "concat", "mamba"):
        assert any(n.endswith("A_log") for n in exempt) and any(n.endswith(".D") for n in exempt)
        assert any(n.endswith("x_proj.weight") for n in decayed)


def test_dt_range_and_weight_decay_options_reach_the_model_and_optimizer(pickle_path,
                                                                         tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", pickle_path, "--out", str(out), "--epochs", "1",
                 "--device", "cpu", "--dt-min", "0.125", "--dt-max", "1",
                 "--weight-decay-on", "weights", *TINY]) == 0
    saved = training.load_checkpoint(str(out / "checkpoint.pt"))
    assert saved["config"]["dt_min"] == 0.125 and saved["config"]["dt_max"] == 1.0
    assert saved["config"]["weight_decay_on"] == "weights"
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [5e-4, 0.0]
    torch.manual_seed(0)
    model = training.build_model(training.TrainConfig(**saved["config"]), [32, 12, 24], 2)
    for layer in model.encoder.layers:  # softplus(dt bias) starts in [dt_min, dt_max]
        dt = torch.nn.functional.softplus(layer.dt_bias)
        assert dt.min() >= 0.125 * (1 - 1e-5) and dt.max() <= 1.0 * (1 + 1e-5)
    for name in ("average", "mamba"):  # every Mamba-based fusion gets the same range
        config = training.TrainConfig(**{**saved["config"], "fusion": name})
        layers = [module for module in training.build_model(config, [32, 12, 24], 2).modules()
                  if hasattr(module, "dt_bias")]
        assert layers and all(torch.nn.functional.softplus(l.dt_bias).min() >= 0.125 * 0.99999
                              for l in layers)
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        training.train(tiny_config(pickle_path, tmp_path / "bad", dt_min=0.5, dt_max=0.1))
    with pytest.raises(ValueError, match="--weight-decay-on"):
        training.train(tiny_config(pickle_path, tmp_path / "bad", weight_decay_on="some"))
    with pytest.raises(ValueError, match="weight_decay_on='weights' \\(now 'all'\\)"):
        training.train(tiny_config(pickle_path, out, epochs=2, dt_min=0.125, dt_max=1.0,
                                   weight_decay_on="all", resume=True))
    # a given bound is checked against the other's default too (synthetic: dt_max 1)
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        training.train(tiny_config(pickle_path, tmp_path / "bad", dt_min=2.0))


def test_bc_norm_and_synthetic_train_size_options(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--out", str(out), "--epochs", "1",
                 "--device", "cpu", "--no-bc-norm", "--synthetic-train-size", "32",
                 "--fusion", "average", *TINY]) == 0
    saved = training.load_checkpoint(str(out / "best.pt"))
    assert saved["config"]["bc_norm"] is False and saved["config"]["synthetic_train_size"] == 32
    model = training.build_model(training.TrainConfig(**saved["config"]), [32, 12, 24], 2)
    assert not any(layer.bc_norm for layer in model.encoder.mamba.layers)
    config = training.TrainConfig(**{**saved["config"], "bc_norm": True})
    model = training.build_model(config, [32, 12, 24], 2)
    assert all(layer.bc_norm for layer in model.encoder.mamba.layers)
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 1
    # valid and test do not depend on the training size; eval rebuilds the same data
    small = training.load_data("synthetic", synthetic_train_size=32)
    default = training.load_data("synthetic")
    assert len(small.splits["train"].regression_labels) == 32
    for split in ("valid", "test"):
        assert np.array_equal(small.splits[split].features[1], default.splits[split].features[1])
    columns = training.evaluate_checkpoint(str(out / "best.pt"), "synthetic", splits=("test",),
                                           device="cpu")
    assert columns["test"]["Has0_acc_2"] == pytest.approx(results["test"]["Has0_acc_2"])
    with pytest.raises(ValueError, match="--synthetic-train-size: only for --data synthetic"):
        training.train(tiny_config("some.pkl", tmp_path / "bad", synthetic_train_size=32))
    with pytest.raises(ValueError, match="--synthetic-train-size: expected an int >= 1"):
        training.train(tiny_config("synthetic", tmp_path / "bad", synthetic_train_size=0))


def test_checkpoints_without_the_newer_options_resume_with_what_they_ran(pickle_path,
                                                                         tmp_path):
    """A checkpoint from before an option existed ran with the option's old behaviour (the
    paper's layer settings): resuming it with those works, with today's synthetic defaults
    is refused, and eval rebuilds the model it ran."""
    before = dict(dt_min=1e-3, dt_max=1e-1, weight_decay_on="all", bc_norm=False)
    training.train(tiny_config(pickle_path, tmp_path, epochs=1, **before))
    path = tmp_path / training.CHECKPOINT
    saved = training.load_checkpoint(str(path))
    for key in ("dt_rank", "coupling", "dt_min", "dt_max", "weight_decay_on", "bc_norm",
                "synthetic_train_size"):
        del saved["config"][key]
    torch.save(saved, path)
    with pytest.raises(ValueError, match="bc_norm=False \\(now True\\)"):
        training.train(tiny_config(pickle_path, tmp_path, epochs=2, resume=True))
    results = training.train(tiny_config(pickle_path, tmp_path, epochs=2, resume=True, **before))
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    best = training.load_checkpoint(str(tmp_path / training.BEST))
    del best["config"]["bc_norm"]
    torch.save(best, tmp_path / "old_best.pt")
    old = training.evaluate_checkpoint(str(tmp_path / "old_best.pt"), pickle_path, device="cpu")
    assert old["test"] == pytest.approx(results["test"])
    # `--data synthetic` used to mean the generator's 2000 training clips
    legacy = {**saved["config"], "data": "synthetic"}
    assert training._with_fields_added_since(legacy)["synthetic_train_size"] == 2000
    assert training._with_fields_added_since(saved["config"])["synthetic_train_size"] is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")])])
def test_deterministic_training_gives_the_same_bits(pickle_path, tmp_path, device):
    """--deterministic: two runs from the same seed select the same model, bit for bit, with
    the same metrics (on CUDA through the scan's deterministic backward); the process's
    setting is back to what it was afterwards."""
    assert main(["train", "--data", pickle_path, "--out", str(tmp_path / "0"), "--epochs", "2",
                 "--device", device, "--deterministic", *TINY]) == 0
    assert not torch.are_deterministic_algorithms_enabled()
    training.train(tiny_config(pickle_path, tmp_path / "1", epochs=2, device=device,
                               deterministic=True))
    first, again = (json.loads((tmp_path / run / "results.json").read_text()) for run in "01")
    assert first["config"]["deterministic"] is True
    assert first["test"] == again["test"] and first["history"] == again["history"]
    weights = [torch.load(tmp_path / run / "best.pt", weights_only=True)["model"] for run in "01"]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_a_diverging_run_stops_with_a_clear_error(pickle_path, tmp_path, monkeypatch):
    """A loss that is not finite (here the 5th batch's: epoch 2, batch 2 of 3) stops the run
    before the optimizer step, naming where; the checkpoint of epoch 1 stays, finite. A
    learning rate of 1e30 diverges on its own and is stopped the same way."""
    real_loss, calls = training._loss, []

    def loss_going_nan(output, batch, task):
        calls.append(1)
        loss = real_loss(output, batch, task)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(training, "_loss", loss_going_nan)
    with pytest.raises(FloatingPointError, match="training diverged at epoch 2, batch 2"):
        training.train(tiny_config(pickle_path, tmp_path / "nan", epochs=3))
    saved = training.load_checkpoint(str(tmp_path / "nan" / "checkpoint.pt"))
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    monkeypatch.undo()
    with pytest.raises(FloatingPointError, match="training diverged at epoch 1"):
        training.train(tiny_config(pickle_path, tmp_path / "lr", epochs=1, lr=1e30))


def test_classification_with_bf16_autocast(pickle_path, tmp_path):
    results = training.train(tiny_config(pickle_path, tmp_path, epochs=1, task="classification",
                                         fusion="average", amp="bf16"))
    assert set(results["test"]) == {"Acc", "F1_score"}
    assert 0.0 <= results["test"]["Acc"] <= 1.0
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in results["history"])


def test_training_learns_a_learnable_task(tmp_path):
    """On a task that mean pooling and a linear head can solve (the label is the mean of the
    first audio feature over the clip), the validation loss must fall well below that of
    the best constant."""
    rng = np.random.default_rng(0)
    raw = {}
    for name, n in (("train", 192), ("valid", 64), ("test", 16)):
        audio = rng.normal(size=(n, 16, 12)).astype(np.float32)
        raw[name] = {"text": rng.normal(size=(n, 8, 32)).astype(np.float32), "audio": audio,
                     "vision": rng.normal(size=(n, 12, 24)).astype(np.float32),
                     "regression_labels": 6.0 * audio[:, :, 0].mean(axis=1)}  # std 1.5
    path = str(tmp_path / "easy.pkl")
    write_pickle(raw, path)
    results = training.train(tiny_config(path, tmp_path / "run", dataset="synthetic", epochs=6,
                                         lr=1e-2, dropout=0.0, d_model=16))
    valid_labels = raw["valid"]["regression_labels"]
    constant = float(np.abs(valid_labels - np.median(valid_labels)).mean())
    assert results["history"][-1]["valid_loss"] < 0.5 * constant


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "file.json")
    training.save_json({"a": 1}, path)
    def fail_midway(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail_midway)
    assert json.loads(open(path).read()) == {"a": 1}
    assert os.listdir(tmp_path) == ["file.json"]


def test_nan_metrics_are_written_as_null(tmp_path):
    training.save_json({"Corr": float("nan"), "nested": [float("nan"), 1.0]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"Corr": None, "nested": [None, 1.0]}


def test_cli_writes_the_synthetic_pickle(tmp_path):
    path = tmp_path / "s.pkl"
    assert main(["synthetic", "--out", str(path), "--seed", "2"]) == 0
    data = load_mmsa(path)
    assert data.info.name == "synthetic" and len(data.splits["train"]) == 2000


def test_layer_and_optimizer_defaults_depend_on_the_dataset(pickle_path):
    """Synthetic data get the settings under which its task is learned; the real datasets
    keep the paper's Adam and Mamba's layer; given options win in both."""
    synthetic = load_mmsa(pickle_path)
    resolved = training.resolve_defaults(tiny_config(pickle_path, "unused"), synthetic)
    assert (resolved.dt_min, resolved.dt_max, resolved.weight_decay_on, resolved.bc_norm) == \
        (1 / 16, 1.0, "weights", True)
    as_mosi = training.resolve_defaults(tiny_config(pickle_path, "unused", dataset="mosi"),
                                        load_mmsa(pickle_path, "mosi"))
    assert (as_mosi.dt_min, as_mosi.dt_max, as_mosi.weight_decay_on, as_mosi.bc_norm) == \
        (1e-3, 1e-1, "all", False)
    assert as_mosi.batch_size == 16  # given (tiny_config); MOSI's default would be 128
    given = training.resolve_defaults(
        tiny_config(pickle_path, "unused", bc_norm=False, weight_decay_on="all"), synthetic)
    assert (given.bc_norm, given.weight_decay_on, given.dt_min) == (False, "all", 1 / 16)
