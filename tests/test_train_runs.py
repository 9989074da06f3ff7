"""The command as a lab runs it: several seeds, per-epoch logs, figures, a resume that loses
nothing when the process is killed while saving, one folder per live run, `--help` without
torch, and one line with exit status 2 for every bad input. Tiny synthetic runs (a few
tenths of a second an epoch); the kill tests send a real SIGKILL to a real process."""
import contextlib
import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import coupled_mamba_ext
from coupled_mamba_ext import plots
from coupled_mamba_ext import train as training
from coupled_mamba_ext.catalog import FUSIONS
from coupled_mamba_ext.cli import main
from coupled_mamba_ext.data import make_synthetic, write_synthetic

# Child processes import the package the tests import (the installed wheel under `make test`,
# the source tree with PYTHONPATH=.), from a folder that does not hold the source tree.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(coupled_mamba_ext.__file__)))
CHILD_CWD = os.path.dirname(os.path.abspath(__file__))
CHILD_ENV = {**os.environ,
             "PYTHONPATH": PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
SIZES = {"train": 48, "valid": 16, "test": 16}
TINY = ["--d-model", "8", "--n-layers", "1", "--d-state", "4", "--seq-len", "8",
        "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def pickle_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic.pkl"
    write_synthetic(path, seed=0, sizes=SIZES)
    return str(path)


def run_cli(*args, env_extra=None, prelude=""):
    """``python -m coupled_mamba_ext ARGS`` in a fresh process (``prelude``: Python run
    before the command, in the same process)."""
    env = {**CHILD_ENV, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    code = prelude + "\nimport sys\nfrom coupled_mamba_ext.cli import main\nsys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=CHILD_CWD,
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- --help
def test_help_does_not_import_torch():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from coupled_mamba_ext.cli import main
        for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main(argv)
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
        print(sorted(m for m in sys.modules if m.startswith("matplotlib")))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=CHILD_CWD, capture_output=True, text=True,
                         env=CHILD_ENV, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]
    run = subprocess.run([sys.executable, "-m", "coupled_mamba_ext", "train", "--help"],
                         cwd=CHILD_CWD, capture_output=True, text=True, env={**CHILD_ENV,
                         "PYTHONVERBOSE": "1"})
    assert run.returncode == 0 and "--seeds" in run.stdout
    assert "import 'torch'" not in run.stderr  # -v lists every module imported


def test_every_option_has_text_and_its_default():
    from coupled_mamba_ext.cli import _HelpWithDefaults, _parsers
    for name, parser in _parsers().items():
        if not name:
            continue
        formatter = _HelpWithDefaults(prog="x")
        for action in parser._actions:
            if action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert text, (name, action.dest)
            assert action.required or "default" in text, (name, action.dest, text)
    train_help = _parsers()["train"].format_help()
    assert "Adam's learning rate (default: 0.0005)" in " ".join(train_help.split())
    assert "MMSA's 1111 1112 1113 1114 1115" in " ".join(train_help.split())


def test_an_unknown_option_prints_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "synthetic", "--out", "x", "--bogus"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: coupled-mamba train ")
    assert "unrecognized arguments: --bogus" in err


# ----------------------------------------------------------------------------- several seeds
def test_several_seeds_write_each_run_and_a_summary(pickle_path, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["train", "--data", pickle_path, "--out", str(out), "--epochs", "2", *TINY,
            "--seeds", "3", "5"]
    assert main(argv) == 0
    assert "2 seeds, test split" in capsys.readouterr().out
    runs = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (3, 5)}
    assert [runs[s]["config"]["seed"] for s in (3, 5)] == [3, 5]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [3, 5] and "seed" not in summary["config"]
    for split in ("test", "valid"):
        assert set(summary[split]) == set(runs[3][split])
        for name, stats in summary[split].items():
            values = [runs[s][split][name] for s in (3, 5)]
            assert stats["values"] == {"3": values[0], "5": values[1]}
            assert stats["mean"] == pytest.approx(sum(values) / 2, rel=1e-12)
            # sample standard deviation of two values: |a - b| / sqrt(2)
            assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5,
                                                 rel=1e-12, abs=1e-15)
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(summary["test"])
    mae = next(r for r in rows if r["split"] == "test" and r["metric"] == "MAE")
    assert float(mae["seed_5"]) == runs[5]["test"]["MAE"]
    assert float(mae["std"]) == summary["test"]["MAE"]["std"]
    assert (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"

    # Seed 3 as if killed in its second epoch: resumed, while seed 5 is kept as it is.
    kept = (out / "seed-5" / "checkpoint.pt").stat().st_mtime_ns
    checkpoint = training.load_checkpoint(str(out / "seed-3" / "checkpoint.pt"))
    (out / "seed-3" / "results.json").unlink()
    assert main(argv) == 2  # without --resume the finished runs are not overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert (out / "seed-5" / "checkpoint.pt").stat().st_mtime_ns == kept
    assert "finished run of 2 epochs: kept" in (out / "seed-5" / "train.log").read_text()
    again = json.loads((out / "seed-3" / "results.json").read_text())
    assert again["test"] == runs[3]["test"] and checkpoint["epoch"] == 2


def test_seeds_without_values_are_mmsas_and_seeds_are_checked(monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(training, "train_seeds", lambda config, seeds: trained.append(seeds))
    assert main(["train", "--data", "synthetic", "--out", "x", "--seeds"]) == 0
    assert trained == [[1111, 1112, 1113, 1114, 1115]]
    monkeypatch.undo()
    assert main(["train", "--data", "synthetic", "--out", "x", "--seeds", "4", "4"]) == 2
    assert "--seeds: expected each seed once, got seed 4 2 times" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "synthetic", "--out", "x", "--seed", "1", "--seeds", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------- logs
def test_metrics_csv_and_one_line_per_epoch_off_a_terminal(pickle_path, tmp_path, capsys):
    assert main(["train", "--data", pickle_path, "--out", str(tmp_path), "--epochs", "3",
                 *TINY]) == 0
    run = capsys.readouterr()  # stdout and stderr captured: not terminals
    assert "\r" not in run.out + run.err  # no progress-bar frames in a redirected log
    epoch_lines = [l for l in run.out.splitlines() if l.startswith("epoch ")]
    assert [l.split()[1] for l in epoch_lines] == ["1/3", "2/3", "3/3"]
    results = json.loads((tmp_path / "results.json").read_text())
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row, h in zip(rows, results["history"]):
        assert float(row["train_loss"]) == h["train_loss"]
        assert float(row["valid_loss"]) == h["valid_loss"]
        assert {k[len("valid_"):]: float(v) for k, v in row.items() if k.startswith("valid_")
                and k != "valid_loss"} == pytest.approx(h["valid"], nan_ok=True)


def test_tensorboard_is_refused_with_one_line_when_not_installed(pickle_path, tmp_path,
                                                                   monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", "--data", pickle_path, "--out", str(tmp_path), "--tensorboard",
                 *TINY]) == 2
    err = capsys.readouterr().err
    assert err == ("coupled-mamba train: error: --tensorboard: the tensorboard package is not "
                   "installed (pip install tensorboard)\n")


def test_tensorboard_gets_every_epoch(pickle_path, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert main(["train", "--data", pickle_path, "--out", str(tmp_path), "--epochs", "2",
                 "--tensorboard", *TINY]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/valid")] == [1, 2]
    assert "valid/Has0_acc_2" in events.Tags()["scalars"]


# ----------------------------------------------------------------------------- figures
def test_learning_curves_name_the_run_and_mark_chance_and_selection():
    history = [{"epoch": e, "train_loss": 2.0 / e, "valid_loss": 2.1 / e,
                "valid": {"Has0_acc_2": 0.5 + 0.1 * e}} for e in (1, 2, 3)]
    fig = plots.learning_curves_figure(history, "Has0_acc_2", plots.run_title(
        "average", "mosi", [7]), "average", selected_epoch=2, chance=0.5)
    assert fig._suptitle.get_text() == "average fusion on mosi, seed 7"
    loss, metric = fig.axes
    assert (loss.get_title(), metric.get_title()) == ("loss", "validation Acc-2 (has-0)")
    assert metric.get_ylabel() == "Acc-2 (has-0)"
    colour = plots.FUSION_COLOURS["average"]
    lines = {l.get_label(): l for ax in fig.axes for l in ax.get_lines()}
    assert lines["valid"].get_color() == colour and lines["train"].get_color() == colour
    assert list(lines["chance (0.5)"].get_ydata()) == [0.5, 0.5]
    for ax in fig.axes:
        selected = [l for l in ax.get_lines() if l.get_label() == "selected (epoch 2)"]
        assert len(selected) == 1 and list(selected[0].get_xdata()) == [2, 2]
    assert min(t.get_fontsize() for ax in fig.axes
               for t in ax.get_xticklabels() + [ax.xaxis.label, ax.title]) >= 12
    plots.pyplot().close(fig)


def test_seed_curves_show_the_mean_and_the_spread():
    histories = {s: [{"epoch": e, "train_loss": 1.0 + s + e, "valid_loss": 2.0 * s + e,
                      "valid": {"Mult_acc_2": 0.1 * s}} for e in (1, 2)] for s in (1, 2, 3)}
    fig = plots.seed_curves_figure(histories, "Mult_acc_2", plots.run_title(
        "coupled", "sims", [1, 2, 3]), "coupled", chance=plots.chance_level("Mult_acc_2"))
    assert fig._suptitle.get_text() == "coupled fusion on sims, 3 seeds (1, 2, 3)"
    loss, metric = fig.axes
    valid = next(l for l in loss.get_lines() if l.get_label() == "valid, mean")
    assert list(valid.get_ydata()) == pytest.approx([5.0, 6.0])  # mean of 2s + e over s
    band = next(c for c in loss.collections if c.get_label() == "valid, ± 1 std")
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (low, high) == pytest.approx((5.0 - 2.0, 6.0 + 2.0))  # std of 2, 4, 6 is 2
    assert metric.get_title() == "validation Acc-2"
    assert [l.get_label() for l in metric.get_lines()] == ["valid, mean", "chance (0.5)"]
    assert valid.get_color() == plots.FUSION_COLOURS["coupled"]
    plots.pyplot().close(fig)


def test_metric_names_and_chance_levels():
    assert [plots.metric_name(k) for k in ("Has0_acc_2", "Non0_F1_score", "Mult_acc_7", "MAE")] \
        == ["Acc-2 (has-0)", "F1 (non-0)", "Acc-7", "MAE"]
    assert plots.chance_level("Mult_acc_5") == pytest.approx(0.2)
    assert plots.chance_level("Acc", num_classes=3) == pytest.approx(1 / 3)
    assert plots.chance_level("Corr") == 0.0 and plots.chance_level("MAE") is None
    assert set(plots.FUSION_COLOURS) == set(FUSIONS)
    assert len(set(plots.FUSION_COLOURS.values())) == len(plots.FUSION_COLOURS)


# ----------------------------------------------------------------------------- resume after a kill
# Kills the process (SIGKILL) at the n-th save of a file: "during" once the temporary file is
# written, before its rename; "after" once the rename is done.
KILLER = textwrap.dedent("""
    import os, signal
    from coupled_mamba_ext import train as training
    _name, _when, _nth = os.environ["KILL_AT"].split(":")
    _real, _seen = training.atomic_write, {}
    def _killing_write(path, write):
        name = os.path.basename(path)
        _seen[name] = _seen.get(name, 0) + 1
        if name != _name or _seen[name] != int(_nth):
            return _real(path, write)
        def write_then_die(tmp):
            write(tmp)
            os.kill(os.getpid(), signal.SIGKILL)
        if _when == "during":
            _real(path, write_then_die)
        _real(path, write)
        os.kill(os.getpid(), signal.SIGKILL)
    training.atomic_write = _killing_write
""")
RESUMABLE = ["--epochs", "3", "--task", "classification", "--seed", "1", *TINY]
VARYING = ("out", "resume")  # what differs between the runs compared (besides the time)


def _comparable(results: dict) -> dict:
    config = {k: v for k, v in results["config"].items() if k not in VARYING}
    return {**results, "config": config, "train_seconds": None}


@contextlib.contextmanager
def one_thread():
    """As the killed processes run (OMP_NUM_THREADS=1), so that the runs agree to the bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight_run(pickle_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    with one_thread():
        assert main(["train", "--data", pickle_path, "--out", str(out), *RESUMABLE]) == 0
    results = json.loads((out / "results.json").read_text())
    losses = [h["valid_loss"] for h in results["history"]]
    # The kill windows below need a best epoch after the first (best.pt rewritten).
    assert min(losses[1:]) < losses[0] and results["best_epoch"] >= 2
    return out


@pytest.mark.parametrize("kill_at", ["checkpoint.pt:during:BEST", "checkpoint.pt:after:BEST",
                                     "best.pt:during:BEST", "results.json:during:1"])
def test_a_run_killed_while_saving_resumes_to_the_same_end(pickle_path, tmp_path, straight_run,
                                                           kill_at):
    """Killed in the epoch of the selected model (the last that rewrites best.pt): while
    checkpoint.pt is written, between checkpoint.pt and best.pt, while best.pt is written;
    or while results.json is written. The resumed run ends as the straight one."""
    best_epoch = json.loads((straight_run / "results.json").read_text())["best_epoch"]
    kill_at = kill_at.replace("BEST", str(best_epoch))
    killed = run_cli("train", "--data", pickle_path, "--out", str(tmp_path), *RESUMABLE,
                     env_extra={"KILL_AT": kill_at}, prelude=KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    name = kill_at.split(":")[0]
    if ":during:" in kill_at:
        assert [f for f in os.listdir(tmp_path) if f.startswith(f".{name}.")]  # left behind
    with one_thread():
        assert main(["train", "--data", pickle_path, "--out", str(tmp_path), *RESUMABLE,
                     "--resume"]) == 0

    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(straight_run))  # no .tmp, no .lock
    expected = json.loads((straight_run / "results.json").read_text())
    got = json.loads((tmp_path / "results.json").read_text())
    assert _comparable(got) == _comparable(expected)
    assert (tmp_path / "metrics.csv").read_text() == (straight_run / "metrics.csv").read_text()
    best, expected_best = (training.load_checkpoint(str(d / "best.pt"))
                           for d in (tmp_path, straight_run))
    assert best["epoch"] == expected_best["epoch"] == got["best_epoch"]
    assert best["model"].keys() == expected_best["model"].keys()
    for key, weight in expected_best["model"].items():
        assert torch.equal(best["model"][key], weight), key


def test_files_get_the_umasks_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        training.save_json({"a": 1}, str(tmp_path / "r.json"))
    finally:
        os.umask(previous)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------------- one run per folder
def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_ones_taken_over(pickle_path,
                                                                           tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom coupled_mamba_ext.train import "
         "output_lock\nwith output_lock(sys.argv[1]):\n    print('held', flush=True)\n"
         "    time.sleep(60)", str(tmp_path)],
        cwd=CHILD_CWD, env=CHILD_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["train", "--data", pickle_path, "--out", str(tmp_path), *TINY]) == 2
        assert capsys.readouterr().err == (
            f"coupled-mamba train: error: --out {tmp_path}: another run (pid {holder.pid}) is "
            f"writing there; wait for it to end or choose another --out\n")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").read_text() == f"{holder.pid}\n"  # left by the killed holder
    assert main(["train", "--data", pickle_path, "--out", str(tmp_path), "--epochs", "1",
                 *TINY]) == 0
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------- bad input
def _pickle_with(tmp_path, name, change):
    raw = make_synthetic(0, SIZES)
    change(raw)
    path = tmp_path / f"{name}.pkl"
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    return str(path)


def _set(split, key, value):
    def change(raw):
        raw[split][key] = value(raw[split])
    return change


def test_every_bad_input_is_one_line_and_status_2(pickle_path, tmp_path, capsys):
    """Each case through the command's entry point (``main``, what ``coupled-mamba`` runs),
    one of them in its own process: exit status 2, one line on stderr that names the option
    or the file and says what is wrong."""
    trained = tmp_path / "trained"
    assert main(["train", "--data", pickle_path, "--out", str(trained), "--epochs", "1",
                 *TINY]) == 0
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained / "best.pt").read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    refused = tmp_path / "refused.pt"
    torch.save({"model": subprocess.Popen}, refused)  # a global that weights_only refuses
    damaged = tmp_path / "damaged"  # a run whose checkpoint.pt was cut short
    damaged.mkdir()
    (damaged / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes()[:3000])

    def nan_lengths(split):
        lengths = split["audio_lengths"].astype(np.float64)
        lengths[3] = np.nan
        return lengths

    def labels_1e9(split):
        labels = (split["regression_labels"] > 0).astype(np.float64)
        labels[0] = 1e9
        return labels

    data = ["--data", pickle_path]
    cases = [
        (["train", *data, "--data-seed", "-1"], "--data-seed: expected an int >= 0, got -1"),
        (["train", *data, "--seed", "-2"], "--seed: expected an int >= 0, got -2"),
        (["synthetic", "--out", str(tmp_path / "s.pkl"), "--seed", "-5"],
         "--seed: expected an int >= 0, got -5"),
        (["train", *data, "--fusion", "transformer", "--d-model", "6"],
         "--d-model 6: --fusion transformer splits it over 4 attention heads"),
        (["train", *data, "--d-model", "100000"], "model size: --d-model 100000"),
        (["train", "--data", _pickle_with(tmp_path, "zero_steps", _set(
            "valid", "audio", lambda s: s["audio"][:, :0]))],
         "zero_steps.pkl: split 'valid'['audio'] is empty"),
        (["train", "--data", _pickle_with(tmp_path, "no_features", _set(
            "train", "vision", lambda s: s["vision"][:, :, :0]))],
         "no_features.pkl: split 'train'['vision'] is empty"),
        (["train", "--data", _pickle_with(tmp_path, "nan_lengths", _set(
            "test", "audio_lengths", nan_lengths))],
         "nan_lengths.pkl: split 'test': audio lengths must be whole numbers of steps, got nan"),
        (["train", "--data", _pickle_with(tmp_path, "half_lengths", _set(
            "train", "vision_lengths", lambda s: s["vision_lengths"] + 0.5))],
         "half_lengths.pkl: split 'train': vision lengths must be whole numbers"),
        (["train", "--task", "classification", "--data", _pickle_with(
            tmp_path, "label_1e9", _set("train", "classification_labels", labels_1e9))],
         "label_1e9.pkl: classification_labels must be the class indices 0..K-1"),
        (["eval", "--checkpoint", str(empty), *data], "empty.pt: the file is empty"),
        (["eval", "--checkpoint", str(truncated), *data],
         "truncated.pt: cannot read it as a checkpoint, the file is truncated or corrupted"),
        (["eval", "--checkpoint", str(foreign), *data],
         "foreign.pt: not a file of coupled-mamba train (it lacks 'model'"),
        (["eval", "--checkpoint", str(refused), *data],
         "refused.pt: torch.load(weights_only=True) refuses it"),
        (["train", *data, "--out", str(damaged), "--resume", *TINY],
         "damaged/checkpoint.pt: cannot read it as a checkpoint, the file is truncated"),
    ]
    for argv, message in cases:
        if argv[0] == "train" and "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "out"), "--device", "cpu"]
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"coupled-mamba {argv[0]}: error: "), \
            (argv, captured.err)
        assert message in lines[0], (argv, lines[0])
        assert "Traceback" not in captured.out + captured.err
    # The same through the process: `python -m coupled_mamba_ext` exits with status 2.
    run = subprocess.run([sys.executable, "-m", "coupled_mamba_ext", "eval", "--checkpoint",
                          str(foreign), *data], cwd=CHILD_CWD, capture_output=True, text=True,
                         env=CHILD_ENV)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    assert "foreign.pt: not a file of coupled-mamba train" in run.stderr
