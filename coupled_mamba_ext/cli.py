"""The ``coupled-mamba`` command (also ``python -m coupled_mamba_ext``).

    coupled-mamba train --data PATH|synthetic --out DIR [--seeds [S ...]] [--fusion ...] ...
    coupled-mamba eval --checkpoint DIR/best.pt --data PATH|synthetic [--split test ...]
    coupled-mamba export --checkpoint DIR/best.pt --out FILE.pt2
    coupled-mamba synthetic --out FILE.pkl [--seed S]

Run ``coupled-mamba COMMAND --help`` for every option; docs/training.md explains them.
Parsing imports only this package's plain-Python catalog: torch loads once a command runs,
so ``--help`` answers at once.
"""
import argparse
import sys
from typing import Dict, List, Optional

from .catalog import COUPLINGS, DATASETS, FUSIONS, MMSA_SEEDS, SPLITS, TASKS
from .errors import UsageError


class _HelpWithDefaults(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a default value and its text
    does not already say what the default is (options whose default depends on the data
    say so in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        default = action.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        elif isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})"


def _parsers() -> Dict[str, argparse.ArgumentParser]:
    """The top-level parser (key "") and each command's."""
    parser = argparse.ArgumentParser(
        prog="coupled-mamba", description="Train and evaluate Coupled Mamba on multimodal "
        "sentiment data (MMSA pickles or the built-in synthetic dataset).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_help = "an MMSA pickle, or 'synthetic' for the built-in synthetic dataset"
    dataset_help = (f"which dataset the pickle holds ({', '.join(DATASETS)}); "
                    f"default: recognised from its feature sizes")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text,
                                   formatter_class=_HelpWithDefaults)

    train = command("train", "train a model, select it on the validation split, test it and "
                    "write a report; several seeds with --seeds")
    train.add_argument("--data", required=True, help=data_help)
    train.add_argument("--out", required=True, help="output folder (checkpoints, results.json, "
                       "metrics.csv, learning_curves.png, report.md; with --seeds one "
                       "seed-S folder per seed and summary.csv / summary.json)")
    train.add_argument("--dataset", choices=sorted(DATASETS), help=dataset_help)
    train.add_argument("--task", choices=TASKS, default="regression",
                       help="L1 loss on the sentiment score, or cross-entropy on the classes")
    train.add_argument("--fusion", choices=FUSIONS, default="coupled",
                       help="how the modalities are fused (docs/api.md, Models)")
    train.add_argument("--epochs", type=int, help="training epochs; default 150 (paper), 15 for "
                       "synthetic")
    train.add_argument("--batch-size", type=int, help="global batch; default per dataset: "
                       "MOSEI 1024, SIMS 128, SIMSv2 256, MOSI 128, synthetic 64")
    train.add_argument("--lr", type=float, default=5e-4, help="Adam's learning rate")
    train.add_argument("--weight-decay", type=float, default=5e-4, help="Adam's weight decay")
    train.add_argument("--d-model", type=int, help="model width; default 128 (paper), 32 for "
                       "synthetic")
    train.add_argument("--n-layers", type=int, help="layers; default 3 (paper), 2 for synthetic")
    train.add_argument("--d-state", type=int, help="state size of the Mamba layers; default 64 "
                       "(paper), 8 for synthetic")
    train.add_argument("--seq-len", type=int, help="steps that unaligned modalities are "
                       "resampled to; default: the padded text length (synthetic: 16)")
    train.add_argument("--dropout", type=float, default=0.1, help="dropout probability")
    train.add_argument("--dt-rank", type=int, help="rank of the Mamba layers' delta "
                       "projection; default ceil(d_state / 8), the paper's d_state / 8")
    train.add_argument("--dt-min", type=float, help="the Mamba layers' initial time steps "
                       "softplus(dt bias) are log-uniform in [dt-min, dt-max]; default "
                       "Mamba's 1e-3, for synthetic 1/16")
    train.add_argument("--dt-max", type=float, help="upper end of that range; default Mamba's "
                       "1e-1, for synthetic 1")
    train.add_argument("--weight-decay-on", choices=("all", "weights"),
                       help="all parameters (the paper's Adam; the default), or weight "
                       "matrices and kernels only (the default for synthetic): no decay on "
                       "A_log and D (marked _no_weight_decay, as in mamba_ssm), nor on "
                       "biases, norms, the dt bias and the coupling logits")
    train.add_argument("--bc-norm", action=argparse.BooleanOptionalAction,
                       help="RMS-normalise the Mamba layers' B and C over the state axis, "
                       "without a learnable weight (as Falcon-Mamba), in every Mamba-based "
                       "fusion; default off, on for synthetic")
    train.add_argument("--coupling", choices=COUPLINGS, default="learned",
                       help="coupled state weights of --fusion coupled: learned softmax "
                       "(starts at 1/M), fixed mean 1/M, or the paper's plain sum (grows "
                       "with the length for M >= 2)")
    seeds = train.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0,
                       help="seed of the initial weights and the data order, one run in --out")
    seeds.add_argument("--seeds", type=int, nargs="*", metavar="S",
                       help="train one run per seed, each in --out/seed-S, and summarise them "
                       f"(mean, std, every seed) in --out/summary.csv and summary.json; "
                       f"default without values: MMSA's {' '.join(map(str, MMSA_SEEDS))}")
    train.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    train.add_argument("--synthetic-train-size", type=int, help="training clips of the "
                       "synthetic data; default 8000 (valid and test do not change)")
    train.add_argument("--device", help="cpu, cuda, cuda:1...; default cuda when available")
    train.add_argument("--amp", choices=("bf16",), help="bfloat16 autocast; default off "
                       "(float32)")
    train.add_argument("--deterministic", action="store_true",
                       help="the same bits from the same seed on CUDA too: PyTorch's "
                       "deterministic algorithms (slower backward; an operation without a "
                       "deterministic form raises)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last finished epoch (with "
                       "--seeds: finished seeds are kept, the others continue)")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    train.add_argument("--tensorboard", action="store_true",
                       help="also log every epoch to TensorBoard in --out/tensorboard (needs "
                       "the tensorboard package)")

    evaluate = command("eval", "evaluate a saved model")
    evaluate.add_argument("--checkpoint", required=True, help="best.pt or checkpoint.pt")
    evaluate.add_argument("--data", required=True, help=data_help)
    evaluate.add_argument("--dataset", choices=sorted(DATASETS), help=dataset_help)
    evaluate.add_argument("--split", nargs="+", choices=SPLITS, default=["test"],
                          help="the splits to evaluate")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1...; default cuda when available")
    evaluate.add_argument("--batch-size", type=int, help="default: the training's")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file; default: "
                          "print only")

    export = command("export", "torch.export a saved model for inference")
    export.add_argument("--checkpoint", required=True, help="best.pt or checkpoint.pt")
    export.add_argument("--out", required=True, help="the .pt2 file to write")
    export.add_argument("--device", help="device of the exported program; default cuda when "
                        "available, else cpu")
    export.add_argument("--max-steps", type=int, default=4096,
                        help="longest sequence the program accepts, per modality")

    synthetic = command("synthetic", "write the synthetic dataset as an MMSA pickle")
    synthetic.add_argument("--out", required=True, help="path of the pickle to write")
    synthetic.add_argument("--seed", type=int, default=0, help="seed of the data")
    return {"": parser, **commands.choices}


def _user_errors() -> tuple:
    """A mistake in the command or in the files it names (missing, unreadable, not an MMSA
    pickle or not a checkpoint, a run already there), or a diverged run: printed as one
    line, exit status 2 (argparse's for a bad option). A traceback would bury the message.
    Imported only once a command has failed, so that parsing needs no torch."""
    from .data import MMSAFormatError
    return UsageError, MMSAFormatError, OSError, FloatingPointError


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``coupled-mamba``; returns the exit status."""
    parsers = _parsers()
    args, unknown = parsers[""].parse_known_args(argv)
    if unknown:  # the command's own usage, not the top level's
        parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _run(args)
    except _user_errors() as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"coupled-mamba {args.command}: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "synthetic":
        if args.seed < 0:
            raise UsageError(f"--seed: expected an int >= 0, got {args.seed}")
        from .data import write_synthetic
        write_synthetic(args.out, args.seed)
        print(f"wrote {args.out}")
        return 0

    from . import train as training
    if args.command == "export":
        training.export_checkpoint(args.checkpoint, args.out, args.device, args.max_steps)
        print(f"wrote {args.out}")
        return 0
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k not in ("command", "seeds")}
        config = training.TrainConfig(**options)
        if args.seeds is None:
            training.train(config)
        else:
            training.train_seeds(config, args.seeds or list(MMSA_SEEDS))
        return 0

    columns = training.evaluate_checkpoint(args.checkpoint, args.data, args.dataset,
                                           args.split, args.device, args.batch_size)
    print(training.format_metrics_table(columns))
    if args.json:
        training.save_json(columns, args.json)
    return 0
