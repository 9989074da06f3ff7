"""The ``coupled-mamba`` command (also ``python -m coupled_mamba_ext``).

    coupled-mamba train --data PATH|synthetic --out DIR [--task ...] [--fusion ...] ...
    coupled-mamba eval --checkpoint DIR/best.pt --data PATH|synthetic [--split test ...]
    coupled-mamba synthetic --out FILE.pkl [--seed S]

Run ``coupled-mamba COMMAND --help`` for every option; docs/training.md explains them.
"""
import argparse
import sys
from typing import List, Optional

from .data import DATASETS, SPLITS, MMSAFormatError
from .errors import UsageError
from .models import COUPLINGS, FUSIONS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coupled-mamba", description="Train and evaluate Coupled Mamba on multimodal "
        "sentiment data (MMSA pickles or the built-in synthetic dataset).")
    commands = parser.add_subparsers(dest="command", required=True)
    data_help = "an MMSA pickle, or 'synthetic' for the built-in synthetic dataset"
    dataset_help = (f"which dataset the pickle holds ({', '.join(DATASETS)}); "
                    f"recognised from its feature sizes when omitted")

    train = commands.add_parser("train", help="train a model, select it on the validation "
                                "split, test it and write a report")
    train.add_argument("--data", required=True, help=data_help)
    train.add_argument("--out", required=True, help="output directory (checkpoints, "
                       "results.json, learning_curves.png, report.md)")
    train.add_argument("--dataset", choices=sorted(DATASETS), help=dataset_help)
    train.add_argument("--task", choices=("regression", "classification"), default="regression",
                       help="L1 loss on the sentiment score, or cross-entropy on the classes")
    train.add_argument("--fusion", choices=FUSIONS, default="coupled")
    train.add_argument("--epochs", type=int, help="default: 150 (paper), 15 for synthetic")
    train.add_argument("--batch-size", type=int, help="global batch; default per dataset: "
                       "MOSEI 1024, SIMS 128, SIMSv2 256, MOSI 128, synthetic 64")
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--weight-decay", type=float, default=5e-4)
    train.add_argument("--d-model", type=int, help="default 128 (paper), 32 for synthetic")
    train.add_argument("--n-layers", type=int, help="default 3 (paper), 2 for synthetic")
    train.add_argument("--d-state", type=int, help="default 64 (paper), 8 for synthetic")
    train.add_argument("--seq-len", type=int, help="steps that unaligned modalities are "
                       "resampled to; default: the padded text length (synthetic: 16)")
    train.add_argument("--dropout", type=float, default=0.1)
    train.add_argument("--dt-rank", type=int, help="rank of the Mamba layers' delta "
                       "projection; default ceil(d_state / 8), the paper's d_state / 8")
    train.add_argument("--dt-min", type=float, help="the Mamba layers' initial time steps "
                       "softplus(dt bias) are log-uniform in [dt-min, dt-max]; default "
                       "Mamba's [1e-3, 1e-1], for synthetic [1/16, 1]")
    train.add_argument("--dt-max", type=float)
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
    train.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    train.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    train.add_argument("--synthetic-train-size", type=int, help="training clips of the "
                       "synthetic data (default 8000; valid and test do not change)")
    train.add_argument("--device", help="cpu, cuda, cuda:1...; default cuda when available")
    train.add_argument("--amp", choices=("bf16",), help="bfloat16 autocast")
    train.add_argument("--deterministic", action="store_true",
                       help="the same bits from the same seed on CUDA too: PyTorch's "
                       "deterministic algorithms (slower backward; an operation without a "
                       "deterministic form raises)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last finished epoch")
    train.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    evaluate = commands.add_parser("eval", help="evaluate a saved model")
    evaluate.add_argument("--checkpoint", required=True, help="best.pt or checkpoint.pt")
    evaluate.add_argument("--data", required=True, help=data_help)
    evaluate.add_argument("--dataset", choices=sorted(DATASETS), help=dataset_help)
    evaluate.add_argument("--split", nargs="+", choices=SPLITS, default=["test"])
    evaluate.add_argument("--device")
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")

    export = commands.add_parser("export", help="torch.export a saved model for inference")
    export.add_argument("--checkpoint", required=True, help="best.pt or checkpoint.pt")
    export.add_argument("--out", required=True, help="the .pt2 file to write")
    export.add_argument("--device", help="device of the exported program (default: cuda when "
                        "available, else cpu)")
    export.add_argument("--max-steps", type=int, default=4096,
                        help="longest sequence the program accepts, per modality")

    synthetic = commands.add_parser("synthetic",
                                    help="write the synthetic dataset as an MMSA pickle")
    synthetic.add_argument("--out", required=True, help="path of the pickle to write")
    synthetic.add_argument("--seed", type=int, default=0)
    return parser


# A mistake in the command or in the files it names (missing, unreadable, not an MMSA
# pickle, a run already there), or a diverged run: printed as one message, exit status 2
# (argparse's for a bad option). A traceback would bury the message and is no help there.
USER_ERRORS = (UsageError, MMSAFormatError, OSError, FloatingPointError)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``coupled-mamba``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except USER_ERRORS as err:
        print(f"coupled-mamba {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from . import train as training
        training.export_checkpoint(args.checkpoint, args.out, args.device, args.max_steps)
        print(f"wrote {args.out}")
        return 0
    if args.command == "synthetic":
        from .data import write_synthetic
        write_synthetic(args.out, args.seed)
        print(f"wrote {args.out}")
        return 0

    from . import train as training
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k != "command"}
        training.train(training.TrainConfig(**options))
        return 0

    columns = training.evaluate_checkpoint(args.checkpoint, args.data, args.dataset,
                                           args.split, args.device, args.batch_size)
    print(training.format_metrics_table(columns))
    if args.json:
        training.save_json(columns, args.json)
    return 0
