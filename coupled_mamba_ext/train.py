"""Training and evaluation of Coupled Mamba (and its fusion baselines) on MMSA data.

One code path serves a single process and ``torchrun --nproc_per_node K``: the data order
comes from a DistributedSampler in both cases (with one replica when not distributed), so K
processes with per-process batch B / K see exactly the batches of one process with batch B.
Rank 0 alone evaluates, logs and writes files. See docs/training.md.
"""
import contextlib
import csv
import dataclasses
import fcntl
import importlib.util
import io
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .data import MMSAData, MMSADataset, collate_mmsa, load_mmsa, load_synthetic
from .data.mmsa import atomic_write, remove_temporary_files
from .data.synthetic import DEFAULT_SIZES as SYNTHETIC_DEFAULT_SIZES
from .errors import UsageError
from .metrics import classification_metrics, msa_metrics
from .models import CoupledMamba
from .models.layer import StackedLayerNorm
from .ops import build_info
from .plots import (chance_level, learning_curves_figure, run_title, save_figure,
                    seed_curves_figure)

# The paper's settings (§4.1). It does not train on MOSI; MOSI gets the batch size of the
# dataset of its size (SIMS).
PAPER_DEFAULTS = {"epochs": 150, "d_model": 128, "n_layers": 3, "d_state": 64}
PAPER_BATCH_SIZES = {"mosi": 128, "mosei": 1024, "sims": 128, "simsv2": 256}
# The Mamba layers' settings of the real datasets: Mamba's initial Δ range, the paper's plain
# Adam (every parameter decayed), B and C as computed.
PAPER_LAYER_DEFAULTS = {"dt_min": 1e-3, "dt_max": 1e-1, "weight_decay_on": "all",
                        "bc_norm": False}
# The synthetic task is small; this model and schedule train it on a 2-core CPU in about
# three minutes with one thread. With the paper's settings above no coupled model learned
# it; with these (mamba_ssm's weight-decay exemptions, Δ spanning the 16 steps, B and C
# RMS-normalised, 8000 training clips) every Mamba-based fusion does (docs/training.md).
SYNTHETIC_DEFAULTS = {"epochs": 15, "d_model": 32, "n_layers": 2, "d_state": 8, "batch_size": 64,
                      "seq_len": 16, "dt_min": 1 / 16, "dt_max": 1.0, "weight_decay_on": "weights",
                      "bc_norm": True}
# Training clips generated for `--data synthetic` (the generator's own default is 2000,
# what `--data synthetic` trained on before this constant).
SYNTHETIC_TRAIN_SIZE = 8000

CHECKPOINT = "checkpoint.pt"  # everything needed to resume; rewritten after every epoch
BEST = "best.pt"              # the model selected on the validation split, for `eval`
RESULTS = "results.json"
METRICS = "metrics.csv"       # one row per epoch, rewritten after every epoch
LOCK = ".lock"                # held by the live run writing the folder; holds its pid
TENSORBOARD = "tensorboard"   # --tensorboard's event files
CURVES = "learning_curves.png"
REPORT = "report.md"
RUN_FILES = (CHECKPOINT, BEST, RESULTS, METRICS, CURVES, REPORT)  # written atomically


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in checkpoints and results.json.

    data: a path to an MMSA pickle or "synthetic". Fields left None take the defaults of the
    dataset (``resolve_defaults``).
    """
    data: str
    out: str
    dataset: Optional[str] = None
    task: str = "regression"
    fusion: str = "coupled"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: float = 5e-4
    weight_decay: float = 5e-4
    d_model: Optional[int] = None
    n_layers: Optional[int] = None
    d_state: Optional[int] = None
    seq_len: Optional[int] = None
    dropout: float = 0.1
    dt_rank: Optional[int] = None
    dt_min: Optional[float] = None
    dt_max: Optional[float] = None
    weight_decay_on: Optional[str] = None
    bc_norm: Optional[bool] = None
    coupling: str = "learned"
    seed: int = 0
    data_seed: int = 0
    synthetic_train_size: Optional[int] = None
    device: Optional[str] = None
    amp: Optional[str] = None
    deterministic: bool = False
    resume: bool = False
    num_workers: int = 0
    tensorboard: bool = False


# Fields that must agree between a checkpoint and the command that resumes it.
_RUN_IDENTITY = ("data", "dataset", "task", "fusion", "batch_size", "lr", "weight_decay",
                 "d_model", "n_layers", "d_state", "seq_len", "dropout", "dt_rank", "dt_min",
                 "dt_max", "weight_decay_on", "bc_norm", "coupling", "seed", "data_seed",
                 "synthetic_train_size", "amp")


def resolve_defaults(config: TrainConfig, data: MMSAData) -> TrainConfig:
    """Fill the None fields with the defaults of the dataset (synthetic or the paper's).

    Unaligned data are resampled to ``seq_len`` steps, by default the padded text length
    (the word grid of aligned data); aligned data keep their own steps (seq_len None).
    """
    name = data.info.name
    if name == "synthetic":
        defaults = dict(SYNTHETIC_DEFAULTS)
    else:
        defaults = {**PAPER_DEFAULTS, **PAPER_LAYER_DEFAULTS,
                    "batch_size": PAPER_BATCH_SIZES[name]}
    if not data.aligned:
        defaults.setdefault("seq_len", data.splits["train"].features[0].shape[1])
    filled = {k: v for k, v in defaults.items() if getattr(config, k) is None}
    return dataclasses.replace(config, dataset=name, **filled)


def load_data(data: str, dataset: Optional[str] = None, data_seed: int = 0,
              synthetic_train_size: Optional[int] = None) -> MMSAData:
    """``data`` = "synthetic" (generated from ``data_seed``, with ``synthetic_train_size``
    training clips, default the generator's 2000 — ``train`` asks for SYNTHETIC_TRAIN_SIZE;
    the valid and test splits do not depend on it) or the path
    of an MMSA pickle."""
    if data == "synthetic":
        sizes = None if synthetic_train_size is None else {"train": synthetic_train_size}
        return load_synthetic(data_seed, sizes)
    return load_mmsa(data, dataset)


# Integer options and the least value each takes (None, a default still to come, is not
# checked).
_AT_LEAST = {"seed": 0, "data_seed": 0, "epochs": 1, "batch_size": 1, "d_model": 1,
             "n_layers": 1, "d_state": 1, "seq_len": 1, "dt_rank": 1, "synthetic_train_size": 1,
             "num_workers": 0}


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_config(config: TrainConfig) -> None:
    """Reject values out of range and option combinations the model would otherwise ignore
    or fail on later, naming the option."""
    for field, least in _AT_LEAST.items():
        value = getattr(config, field)
        if value is not None and value < least:
            raise UsageError(f"{_option(field)}: expected an int >= {least}, got {value}")
    max_dstate = build_info()["max_dstate"]
    if config.d_state is not None and config.d_state > max_dstate:
        raise UsageError(f"--d-state: expected at most {max_dstate} (the operator's largest "
                         f"state), got {config.d_state}")
    if not config.lr > 0:
        raise UsageError(f"--lr: expected a value > 0, got {config.lr}")
    if not config.weight_decay >= 0:
        raise UsageError(f"--weight-decay: expected a value >= 0, got {config.weight_decay}")
    if not 0 <= config.dropout < 1:
        raise UsageError(f"--dropout: expected a value in [0, 1), got {config.dropout}")
    if config.synthetic_train_size is not None and config.data != "synthetic":
        raise UsageError("--synthetic-train-size: only for --data synthetic")
    # Called before the dataset's defaults are filled in (to fail before loading the data)
    # and after (for a given bound against a default one): a None is not checked yet.
    if config.dt_min is not None and config.dt_max is not None and \
            not 0 < config.dt_min <= config.dt_max:
        raise UsageError(f"--dt-min / --dt-max: expected 0 < dt_min <= dt_max, got "
                         f"{config.dt_min} and {config.dt_max}")
    if config.weight_decay_on is not None and config.weight_decay_on not in WEIGHT_DECAY_ON:
        raise UsageError(f"--weight-decay-on: expected one of {WEIGHT_DECAY_ON}, got "
                         f"{config.weight_decay_on!r}")
    if config.fusion in ATTENTION_FUSIONS and config.d_model is not None and \
            config.d_model % ATTENTION_HEADS:
        raise UsageError(f"--d-model {config.d_model}: --fusion {config.fusion} splits it over "
                         f"{ATTENTION_HEADS} attention heads, expected a multiple of "
                         f"{ATTENTION_HEADS}")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard: the tensorboard package is not installed "
                         "(pip install tensorboard)")
    if config.coupling != "learned" and config.fusion != "coupled":
        raise UsageError(f"--coupling {config.coupling}: only --fusion coupled has a coupling, "
                         f"this run has --fusion {config.fusion}")


# The attention baselines' heads (the model's default); d_model must be a multiple.
ATTENTION_HEADS = 4
ATTENTION_FUSIONS = ("cross_attention", "transformer")


def build_model(config: TrainConfig, input_dims: List[int], num_classes: int) -> CoupledMamba:
    """The model of a (resolved) configuration; a layer setting left None takes the
    model's own default (Mamba's)."""
    layer_settings = {k: getattr(config, k) for k in ("dt_min", "dt_max", "bc_norm")
                      if getattr(config, k) is not None}
    return CoupledMamba(
        input_dims, d_model=config.d_model, n_layers=config.n_layers, d_state=config.d_state,
        fusion=config.fusion, task=config.task,
        num_classes=num_classes if config.task == "classification" else None,
        dropout=config.dropout, seq_len=config.seq_len, coupling=config.coupling,
        n_heads=ATTENTION_HEADS, dt_rank="auto" if config.dt_rank is None else config.dt_rank,
        **layer_settings)


WEIGHT_DECAY_ON = ("all", "weights")
# Parameters that "--weight-decay-on weights" leaves undecayed besides those marked
# `_no_weight_decay` (A_log, D) and the norms': biases (names ending in "bias", the Δ bias
# included) and the coupling logits.
_NO_DECAY_NAMES = ("coupling_logits",)


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_on: str) -> List[dict]:
    """Optimizer parameter groups. decay_on "all": every parameter gets `weight_decay` (the
    paper's plain Adam). "weights": only weight matrices and kernels (linear, convolution,
    embedding); biases, the Δ bias, LayerNorm weights, the coupling logits, and A_log and D
    (marked `_no_weight_decay`, as mamba_ssm marks them) get none."""
    if decay_on == "all":
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    norms = (torch.nn.LayerNorm, StackedLayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            exempt = (getattr(param, "_no_weight_decay", False) or name.endswith("bias")
                      or name in _NO_DECAY_NAMES or isinstance(module, norms))
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _memory_of(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(config: TrainConfig, data: MMSAData, process: "Process") -> None:
    """Refuse, before anything is allocated, a (resolved) configuration whose model cannot
    fit on the device. The model is built on the meta device to count its parameters; the
    estimate is a lower bound (float32 weights, gradients and Adam's two moments, plus each
    layer's input of one batch, which the backward keeps), so a refused run could not
    have run."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in
                         build_model(config, data.feature_dims, data.num_classes).parameters())
    steps = config.seq_len or max(f.shape[1] for f in data.splits["train"].features)
    batch = config.batch_size // process.world_size
    activations = batch * steps * len(data.feature_dims) * config.d_model * config.n_layers
    needed = 4 * (4 * parameters + activations)
    available = _memory_of(process.device)
    if needed > available:
        raise UsageError(
            f"model size: --d-model {config.d_model}, --n-layers {config.n_layers}, --d-state "
            f"{config.d_state}, --batch-size {config.batch_size} need at least "
            f"{needed / 2 ** 30:.1f} GiB ({parameters} parameters with their gradients and "
            f"Adam state, and one batch's layer inputs), more than the "
            f"{available / 2 ** 30:.1f} GiB of {process.device}")


# ----------------------------------------------------------------------------- process setup
@dataclass
class Process:
    """Where this process runs: its rank among world_size processes, and its device."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` as a torch.device, checked: cuda when available if None."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here; "
                             f"pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def setup_process(device: Optional[str]) -> Process:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world_size == 1:
        return Process(0, 1, dev)
    local_rank = int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Process(dist.get_rank(), dist.get_world_size(), dev)


# ----------------------------------------------------------------------------- files
def save_torch(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def _json_safe(obj):
    """NaN (an undefined metric, e.g. Corr of constant predictions) becomes null: strict JSON
    has no NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def save_json(obj, path: str) -> None:
    save_text(json.dumps(_json_safe(obj), indent=2) + "\n", path)


# What every file of ``train`` holds (best.pt, checkpoint.pt), and what resuming needs more.
MODEL_FILE_KEYS = ("model", "epoch", "config", "input_dims", "num_classes")
RESUME_KEYS = MODEL_FILE_KEYS + ("optimizer", "rng", "history", "best", "train_seconds")


def load_checkpoint(path: str, keys: Tuple[str, ...] = MODEL_FILE_KEYS) -> dict:
    """A checkpoint or best-model file written by ``train``, read with
    ``torch.load(weights_only=True)`` (tensors and plain Python only). An empty, truncated
    or corrupted file, one the loader refuses, or one without ``keys`` (a .pt from
    elsewhere) raises UsageError naming the file; a missing one FileNotFoundError."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UsageError(f"{path}: the file is empty, not a checkpoint")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines()
                       if "Unsupported global" in line), str(err).splitlines()[0])
        raise UsageError(f"{path}: torch.load(weights_only=True) refuses it ({reason}); the "
                         f"files of coupled-mamba train hold only tensors and plain Python "
                         f"values") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:  # torch.load fails in many ways on a damaged file
        first = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
        raise UsageError(f"{path}: cannot read it as a checkpoint, the file is truncated or "
                         f"corrupted ({type(err).__name__}: {first})") from None
    missing = [k for k in keys if k not in saved] if isinstance(saved, dict) else list(keys)
    if missing:
        raise UsageError(f"{path}: not a file of coupled-mamba train (it lacks "
                         f"{', '.join(repr(k) for k in missing)})")
    return saved


def saved_config(saved: dict, path: str) -> "TrainConfig":
    """The TrainConfig of a loaded checkpoint (fields it predates filled in); UsageError
    naming ``path`` when its configuration is not one of this package's."""
    try:
        return TrainConfig(**_with_fields_added_since(saved["config"]))
    except TypeError as err:
        raise UsageError(f"{path}: its 'config' is not a configuration of coupled-mamba "
                         f"train ({err})") from None


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Hold ``out``'s lock for the time of a run: a second run into the same folder while
    this one lives raises UsageError naming the holder's pid. The lock is an advisory
    ``flock`` on ``out/.lock`` (which holds the pid): the kernel drops it when its process
    dies, so the lock of a killed run is taken over."""
    path = os.path.join(out, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"--out {out}: another run (pid {holder}) is writing there; wait "
                             f"for it to end or choose another --out") from None
        # The holder before us deletes the file as it lets go: a lock on a deleted file
        # would lock nothing, so check that the path is still this file.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def save_metrics_csv(history: List[dict], path: str) -> None:
    """The per-epoch history as CSV: epoch, train_loss, valid_loss, then valid_<metric> for
    every validation metric; full float precision, NaN as ``nan``."""
    names = list(history[0]["valid"]) if history else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", "train_loss", "valid_loss", *(f"valid_{n}" for n in names)])
    for h in history:
        writer.writerow([h["epoch"], h["train_loss"], h["valid_loss"],
                         *(h["valid"][n] for n in names)])
    save_text(buffer.getvalue(), path)


# ----------------------------------------------------------------------------- loops
def _autocast(device: torch.device, amp: Optional[str]):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _loss(output: torch.Tensor, batch, task: str) -> torch.Tensor:
    output = output.float()  # the loss in fp32 even under bf16 autocast
    if task == "regression":
        return F.l1_loss(output, batch.regression)
    return F.cross_entropy(output, batch.classification)


def train_one_epoch(model, loader, optimizer, config: TrainConfig, process: Process,
                    epoch: int) -> float:
    """One pass over ``loader``; returns the mean training loss of this process's batches."""
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not (process.is_main and _interactive()), dynamic_ncols=True)
    for step, batch in enumerate(bar):
        batch = batch.to(process.device)
        with _autocast(process.device, config.amp):
            output = model(batch.xs, batch.lengths)
        loss = _loss(output, batch, config.task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _stop_if_diverged(model, loss, process, epoch, step)
        optimizer.step()
        total += loss.item() * len(batch.regression)
        count += len(batch.regression)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(count, 1)


def _interactive() -> bool:
    """A progress bar only on a terminal: redirected to a file, its frames would bury the
    one line per epoch."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _stop_if_diverged(model, loss: torch.Tensor, process: Process, epoch: int,
                      step: int) -> None:
    """Raises FloatingPointError, before the optimizer step, when the loss or a gradient is
    not finite: one such step would turn every weight into NaN and the run would go on
    training and reporting nothing. Decided by all ranks together (a rank raising alone
    would leave the others waiting in the next all-reduce). The checkpoint of the last
    finished epoch stays on disk."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # One norm over all gradients (a foreach kernel): not finite iff some entry is not (or
    # the gradients are past 1e19, diverged all the same).
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
    diverged = (~finite).to(torch.float32)
    if process.world_size > 1:
        dist.all_reduce(diverged, op=dist.ReduceOp.MAX)
    if diverged.item():
        raise FloatingPointError(
            f"training diverged at epoch {epoch + 1}, batch {step + 1}: loss {loss.item()}, "
            "a loss or gradient on some rank is not finite. The checkpoint of the last "
            "finished epoch is kept. Try a new run with a lower --lr, without --amp, or with "
            "--coupling learned or mean (the plain sum grows with the length, docs/math.md "
            "§5)")


@torch.no_grad()
def evaluate(model, loader, task: str, metrics_dataset: str, device: torch.device,
             amp: Optional[str] = None) -> Tuple[float, Dict[str, float]]:
    """Mean loss and the metrics (``msa_metrics`` for regression, ``classification_metrics``
    for classification) of ``model`` over every sample of ``loader``."""
    model.eval()
    outputs, regression, classification = [], [], []
    for batch in loader:
        batch = batch.to(device)
        with _autocast(device, amp):
            outputs.append(model(batch.xs, batch.lengths).float().cpu())
        regression.append(batch.regression.cpu())
        classification.append(batch.classification.cpu())
    output, regression = torch.cat(outputs), torch.cat(regression)
    classification = torch.cat(classification)
    if task == "regression":
        loss = F.l1_loss(output, regression).item()
        return loss, msa_metrics(output, regression, metrics_dataset)
    loss = F.cross_entropy(output, classification).item()
    return loss, classification_metrics(output.argmax(-1), classification)


def key_metric(task: str, metrics_dataset: str) -> str:
    """The accuracy shown in the learning curves and the epoch log."""
    if task == "classification":
        return "Acc"
    return "Has0_acc_2" if metrics_dataset in ("mosi", "mosei") else "Mult_acc_2"


def eval_loader(data: MMSAData, split: str, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(MMSADataset(data.splits[split]), batch_size=batch_size, shuffle=False,
                      collate_fn=collate_mmsa, num_workers=num_workers)


# ----------------------------------------------------------------------------- outputs
def format_metrics_table(columns: Dict[str, Dict[str, float]]) -> str:
    """A plain-text table: one row per metric, one column per split."""
    names = list(next(iter(columns.values())))
    width = max(len(n) for n in names) + 2
    lines = ["metric".ljust(width) + "".join(c.rjust(10) for c in columns)]
    for name in names:
        lines.append(name.ljust(width) + "".join(f"{columns[c][name]:10.4f}" for c in columns))
    return "\n".join(lines)


def write_report(results: dict, table: str, path: str) -> None:
    config = results["config"]
    text = (f"# {config['fusion']} fusion on {config['dataset']} ({config['task']})\n\n"
            f"Best epoch on the validation split: {results['best_epoch']} of "
            f"{config['epochs']}; training time {results['train_seconds']:.1f} s.\n\n"
            f"```\n{table}\n```\n\n![learning curves]({CURVES})\n\n"
            f"Configuration: `{json.dumps(config)}`\n")
    save_text(text, path)


# ----------------------------------------------------------------------------- train
def _with_fields_added_since(saved: dict) -> dict:
    """A saved configuration with the fields it predates set to what its run used: the layer
    options' former meaning (PAPER_LAYER_DEFAULTS, for every dataset), else the field's
    default."""
    saved = {**dataclasses.asdict(TrainConfig(data="", out="")), **PAPER_LAYER_DEFAULTS, **saved}
    if saved["data"] == "synthetic" and saved["synthetic_train_size"] is None:
        # Before SYNTHETIC_TRAIN_SIZE, `--data synthetic` trained on the generator's default.
        saved["synthetic_train_size"] = SYNTHETIC_DEFAULT_SIZES["train"]
    return saved


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    current = dataclasses.asdict(config)
    saved = _with_fields_added_since(saved)
    changed = [k for k in _RUN_IDENTITY if saved[k] != current[k]]
    if changed:
        raise UsageError("--resume: the checkpoint was trained with different settings: " +
                         ", ".join(f"{k}={saved[k]!r} (now {current[k]!r})" for k in changed))


def train(config: TrainConfig, data: Optional[MMSAData] = None) -> Optional[dict]:
    """Train, select on the validation split, test; write the outputs into ``config.out``.

    Files: checkpoint.pt (resumable state, every epoch), best.pt (selected model),
    metrics.csv (every epoch's losses and validation metrics), results.json (test and valid
    metrics, configuration, history), learning_curves.png, report.md. ``data``: the dataset
    of ``config.data`` when the caller has loaded it already (``train_seeds``); loaded here
    when None. Resuming a run that had finished returns its results.json without training or
    testing again. Returns the results dict on rank 0, None on other ranks.
    """
    with deterministic_algorithms(config.deterministic):
        process = setup_process(config.device)
        try:
            return _train(config, process, data)
        finally:
            if process.world_size > 1:
                dist.destroy_process_group()


SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"


def seed_folder(out: str, seed: int) -> str:
    """Where ``train_seeds`` writes the run of ``seed``: out/seed-S."""
    return os.path.join(out, f"seed-{seed}")


def train_seeds(config: TrainConfig, seeds: Sequence[int]) -> Optional[dict]:
    """``train`` once per seed (``config.seed`` ignored), each run in out/seed-S with every
    output of a single run, then summary.json and summary.csv (per split and metric: mean,
    standard deviation and every seed's value, ``summarise_seeds``) and the learning curves
    of all seeds (mean and spread) in ``config.out``. With ``config.resume`` a finished
    seed is kept, an interrupted one continues. The data are loaded once. Returns the
    summary on rank 0, None on other ranks."""
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise UsageError(f"--seeds: expected each seed once, got seed {repeated[0]} "
                         f"{list(seeds).count(repeated[0])} times")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise UsageError(f"--seeds: expected ints >= 0, got {negative[0]}")
    first = dataclasses.replace(config, seed=seeds[0], out=seed_folder(config.out, seeds[0]))
    first, data = _resolved_with_data(first)
    runs = {}
    for seed in seeds:
        run = dataclasses.replace(first, seed=seed, out=seed_folder(config.out, seed))
        runs[seed] = train(run, data)
    if any(results is None for results in runs.values()):
        return None  # not rank 0
    with output_lock(config.out):
        remove_temporary_files(config.out, (SUMMARY_JSON, SUMMARY_CSV, CURVES))
        summary = summarise_seeds(runs)
        save_json(summary, os.path.join(config.out, SUMMARY_JSON))
        save_text(summary_csv(summary), os.path.join(config.out, SUMMARY_CSV))
        metric = key_metric(first.task, data.info.metrics_dataset)
        figure = seed_curves_figure({seed: r["history"] for seed, r in runs.items()}, metric,
                                    run_title(first.fusion, first.dataset, seeds), first.fusion,
                                    chance_level(metric, data.num_classes))
        save_figure(figure, os.path.join(config.out, CURVES))
    table = format_summary_table(summary["test"])
    tqdm.write(f"\n{len(seeds)} seeds, test split, mean and standard deviation:\n{table}\n"
               f"wrote {os.path.join(config.out, SUMMARY_JSON)}, {SUMMARY_CSV}, {CURVES}")
    return summary


def summarise_seeds(runs: Dict[int, dict]) -> dict:
    """Per split ("test", "valid") and metric of the runs' results (seed -> results dict):
    {"mean", "std" (the sample standard deviation, ddof 1; NaN for one seed), "values"
    {seed: value}}; also the seeds, each seed's selected epoch and the configuration the
    runs share (without seed and out)."""
    seeds = list(runs)
    config = {k: v for k, v in next(iter(runs.values()))["config"].items()
              if k not in ("seed", "out", "resume")}
    summary = {"seeds": seeds, "config": config,
               "best_epoch": {str(s): runs[s]["best_epoch"] for s in seeds}}
    for split in ("test", "valid"):
        summary[split] = {}
        for name in runs[seeds[0]][split]:
            values = np.array([_nan_if_none(runs[s][split][name]) for s in seeds], np.float64)
            summary[split][name] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                "values": {str(s): float(v) for s, v in zip(seeds, values)}}
    return summary


def _nan_if_none(value) -> float:
    """A metric read back from results.json: null (an undefined metric) is NaN."""
    return float("nan") if value is None else value


def summary_csv(summary: dict) -> str:
    """summary.csv: one row per split and metric: split, metric, mean, std, then one column
    seed_S per seed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "metric", "mean", "std", *(f"seed_{s}" for s in summary["seeds"])])
    for split in ("test", "valid"):
        for name, stats in summary[split].items():
            writer.writerow([split, name, stats["mean"], stats["std"],
                             *(stats["values"][str(s)] for s in summary["seeds"])])
    return buffer.getvalue()


def format_summary_table(metrics: Dict[str, dict]) -> str:
    """A plain-text table: one row per metric, its mean and standard deviation."""
    width = max(len(n) for n in metrics) + 2
    lines = ["metric".ljust(width) + "mean".rjust(10) + "std".rjust(10)]
    for name, stats in metrics.items():
        lines.append(name.ljust(width) + f"{stats['mean']:10.4f}{stats['std']:10.4f}")
    return "\n".join(lines)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True, warn_only: bool = False) -> Iterator[None]:
    """``--deterministic`` (also for the tests and benchmarks): PyTorch's deterministic
    algorithms inside (the scan's CUDA backward then sums over blocks in a fixed order,
    docs/api.md; an operation with no deterministic form raises, or with ``warn_only``
    warns), cuBLAS's deterministic workspace, no cuDNN autotuning; the settings before
    restored after. Not enabled: nothing changes."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    # Read when cuBLAS first runs; set before, it makes cuBLAS's reductions reproducible.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def _resolved_with_data(config: TrainConfig,
                        data: Optional[MMSAData] = None) -> Tuple[TrainConfig, MMSAData]:
    """The configuration checked and completed with its dataset's defaults, and the dataset
    (loaded unless given)."""
    if config.data == "synthetic" and config.synthetic_train_size is None:
        config = dataclasses.replace(config, synthetic_train_size=SYNTHETIC_TRAIN_SIZE)
    check_config(config)
    if data is None:
        data = load_data(config.data, config.dataset, config.data_seed,
                         config.synthetic_train_size)
    config = resolve_defaults(config, data)
    check_config(config)
    return config, data


def _train(config: TrainConfig, process: Process, data: Optional[MMSAData]) -> Optional[dict]:
    config, data = _resolved_with_data(config, data)
    if config.batch_size % process.world_size:
        raise UsageError(f"--batch-size {config.batch_size} (the global batch) must be divisible "
                         f"by the number of processes {process.world_size}")
    check_memory(config, data, process)
    os.makedirs(config.out, exist_ok=True)
    with output_lock(config.out) if process.is_main else contextlib.nullcontext():
        checkpoint_path = os.path.join(config.out, CHECKPOINT)
        if os.path.exists(checkpoint_path) and not config.resume:
            raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue that "
                                  f"run, or choose another --out")
        if process.is_main:
            remove_temporary_files(config.out, RUN_FILES)  # of a run killed while saving
        return _train_locked(config, data, process)


def _train_locked(config: TrainConfig, data: MMSAData, process: Process) -> Optional[dict]:
    """The epochs and the outputs of ``train``, the output folder held (rank 0).

    Each epoch saves, in order: checkpoint.pt (the record of the run: weights, optimizer,
    random state, history and the best model so far), then best.pt when the epoch is the
    best, then metrics.csv. Each file is replaced atomically; a run killed between two of
    them resumes from checkpoint.pt and writes the others again from it."""
    checkpoint_path = os.path.join(config.out, CHECKPOINT)

    def log(message: str) -> None:
        if process.is_main:
            tqdm.write(message)
            with open(os.path.join(config.out, "train.log"), "a") as f:
                f.write(message + "\n")

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, data.feature_dims, data.num_classes).to(process.device)
    optimizer = torch.optim.Adam(
        parameter_groups(model, config.weight_decay, config.weight_decay_on), lr=config.lr)
    state = {"epoch": 0, "history": [], "best": None, "train_seconds": 0.0}
    if config.resume and os.path.exists(checkpoint_path):
        saved = load_checkpoint(checkpoint_path, RESUME_KEYS)
        _check_resumable(saved["config"], config)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        state = {k: saved[k] for k in state}
        if state["epoch"] >= config.epochs:
            finished = _finished_results(config, state)
            if finished is not None:
                log(f"{config.out} holds a finished run of {config.epochs} epochs: kept")
                return finished if process.is_main else None
        if process.is_main and state["best"] is not None:
            # A kill after checkpoint.pt and before these left them an epoch behind.
            _save_best(state["best"], config, data)
            save_metrics_csv(state["history"], os.path.join(config.out, METRICS))
        log(f"resuming {checkpoint_path} after epoch {state['epoch']}")

    trained = model
    if process.world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[process.device.index] if process.device.type == "cuda" else None)
    sampler = DistributedSampler(MMSADataset(data.splits["train"]), process.world_size,
                                 process.rank, shuffle=True, seed=config.seed)
    train_loader = DataLoader(sampler.dataset, batch_size=config.batch_size // process.world_size,
                              sampler=sampler, collate_fn=collate_mmsa,
                              num_workers=config.num_workers)
    valid_loader = eval_loader(data, "valid", config.batch_size, config.num_workers)
    metrics_dataset = data.info.metrics_dataset
    shown = key_metric(config.task, metrics_dataset)
    log(f"{config.fusion} fusion, {config.task}, {data.info.name}, seed {config.seed}: "
        f"{sum(p.numel() for p in model.parameters())} parameters, "
        f"{len(data.splits['train'])} training samples, {process.world_size} process(es) on "
        f"{process.device}")

    with _tensorboard(config, process, state["epoch"]) as board:
        for epoch in range(state["epoch"], config.epochs):
            started = time.time()
            sampler.set_epoch(epoch)  # a new order every epoch, the same on every rank
            train_loss = train_one_epoch(trained, train_loader, optimizer, config, process, epoch)
            state["train_seconds"] += time.time() - started
            state["epoch"] = epoch + 1
            if not process.is_main:
                continue
            valid_loss, valid = evaluate(model, valid_loader, config.task, metrics_dataset,
                                         process.device, config.amp)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "valid_loss": valid_loss,
                      "valid": valid}
            state["history"].append(record)
            improved = state["best"] is None or valid_loss < state["best"]["valid_loss"]
            if improved:  # model selection on the validation loss, as MMSA does
                state["best"] = {"epoch": epoch + 1, "valid_loss": valid_loss,
                                 "model": {k: v.detach().cpu().clone()
                                           for k, v in model.state_dict().items()}}
            save_torch({**state, **_model_file(model.state_dict(), epoch + 1, config, data),
                        "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
                       checkpoint_path)
            if improved:
                _save_best(state["best"], config, data)
            save_metrics_csv(state["history"], os.path.join(config.out, METRICS))
            if board is not None:
                _log_to_tensorboard(board, record)
            log(f"epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f}  valid loss "
                f"{valid_loss:.4f}  valid {shown} {valid[shown]:.4f}  "
                f"({time.time() - started:.1f} s){'  *best*' if improved else ''}")

    if process.world_size > 1:
        dist.barrier()  # other ranks wait for rank 0's last evaluation before leaving
    if not process.is_main:
        return None
    return _finish(config, data, model, state, process, log)


def _finished_results(config: TrainConfig, state: dict) -> Optional[dict]:
    """results.json of the run in config.out when it was written from this checkpoint's
    final state (a run killed while writing it has none, or an older one); else None."""
    path = os.path.join(config.out, RESULTS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    best = state["best"]["epoch"] if state["best"] else None
    if len(results.get("history", ())) != state["epoch"] or results.get("best_epoch") != best:
        return None
    return results


def _save_best(best: dict, config: TrainConfig, data: MMSAData) -> None:
    save_torch(_model_file(best["model"], best["epoch"], config, data),
               os.path.join(config.out, BEST))


@contextlib.contextmanager
def _tensorboard(config: TrainConfig, process: Process, epochs_done: int):
    """A TensorBoard SummaryWriter on out/tensorboard with --tensorboard (rank 0), else
    None. Resuming after epoch k drops the events a killed run wrote after step k, so that
    every epoch appears once."""
    if not (config.tensorboard and process.is_main):
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter
    board = SummaryWriter(os.path.join(config.out, TENSORBOARD), purge_step=epochs_done + 1)
    try:
        yield board
    finally:
        board.close()


def _log_to_tensorboard(board, record: dict) -> None:
    """One epoch's losses and validation metrics, at step = the epoch."""
    step = record["epoch"]
    board.add_scalar("loss/train", record["train_loss"], step)
    board.add_scalar("loss/valid", record["valid_loss"], step)
    for name, value in record["valid"].items():
        board.add_scalar(f"valid/{name}", value, step)


def _model_file(model_state: dict, epoch: int, config: TrainConfig, data: MMSAData) -> dict:
    """What ``evaluate_checkpoint`` needs to rebuild a model: weights, configuration, shapes."""
    return {"model": model_state, "epoch": epoch, "config": dataclasses.asdict(config),
            "input_dims": data.feature_dims, "num_classes": data.num_classes}


def _finish(config, data, model, state, process, log) -> dict:
    """Test the selected model; write results.json, the curves and the report; print the table."""
    model.load_state_dict(state["best"]["model"])
    columns = {}
    for split in ("valid", "test"):
        _, columns[split] = evaluate(model, eval_loader(data, split, config.batch_size), config.task,
                                     data.info.metrics_dataset, process.device, config.amp)
    results = {"config": dataclasses.asdict(config), "best_epoch": state["best"]["epoch"],
               "test": columns["test"], "valid": columns["valid"],
               "train_seconds": state["train_seconds"], "history": state["history"]}
    save_json(results, os.path.join(config.out, RESULTS))
    metric = key_metric(config.task, data.info.metrics_dataset)
    figure = learning_curves_figure(
        state["history"], metric, run_title(config.fusion, config.dataset, [config.seed]),
        config.fusion, results["best_epoch"], chance_level(metric, data.num_classes))
    save_figure(figure, os.path.join(config.out, CURVES))
    table = format_metrics_table(columns)
    write_report(results, table, os.path.join(config.out, REPORT))
    log(f"\nselected epoch {results['best_epoch']} (lowest valid loss)\n{table}\n"
        f"wrote {os.path.join(config.out, RESULTS)}, {METRICS}, {CURVES}, {REPORT}")
    return results


# ----------------------------------------------------------------------------- eval
def evaluate_checkpoint(checkpoint: str, data: str, dataset: Optional[str] = None,
                        splits=("test",), device: Optional[str] = None,
                        batch_size: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Metrics of a saved model (best.pt or checkpoint.pt) on the given splits of ``data``."""
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size: expected an int >= 1, got {batch_size}")
    saved = load_checkpoint(checkpoint)
    config = saved_config(saved, checkpoint)
    loaded = load_data(data, dataset or config.dataset, config.data_seed,
                       config.synthetic_train_size if data == "synthetic" else None)
    if loaded.feature_dims != list(saved["input_dims"]):
        raise UsageError(f"{checkpoint} was trained on feature sizes {saved['input_dims']}, "
                         f"but {data} has {loaded.feature_dims}")
    dev = resolve_device(device)
    model = build_model(config, loaded.feature_dims, saved["num_classes"]).to(dev)
    model.load_state_dict(saved["model"])
    return {split: evaluate(model, eval_loader(loaded, split, batch_size or config.batch_size),
                            config.task, loaded.info.metrics_dataset, dev, config.amp)[1]
            for split in splits}


def export_checkpoint(checkpoint: str, out: str, device: Optional[str] = None,
                      max_steps: int = 4096) -> None:
    """torch.export of a saved model (best.pt or checkpoint.pt), for inference, written to
    ``out`` (a .pt2 file for ``torch.export.load``). The program takes what the model takes,
    ``(xs, lengths)``: M tensors (batch, L_m, features) and M integer tensors (batch,), with
    the batch and every L_m dynamic (L_m from 2 to ``max_steps``). It runs in float32 (no
    autocast, whatever the training's --amp); loading it needs this package imported, for
    its operators. Outputs match the model run eagerly up to rounding (docs/api.md)."""
    saved = load_checkpoint(checkpoint)
    input_dims = list(saved["input_dims"])
    # Example steps differ per modality (and from 1): export must not tie them together.
    steps = [8 + 3 * m for m in range(len(input_dims))]
    if max_steps < max(steps):
        raise UsageError(f"max_steps: expected at least {max(steps)}, got {max_steps}")
    config = saved_config(saved, checkpoint)
    dev = resolve_device(device)
    model = build_model(config, input_dims, saved["num_classes"]).to(dev).eval()
    model.load_state_dict(saved["model"])
    xs = [torch.zeros(3, n, d, device=dev) for n, d in zip(steps, input_dims)]
    lengths = [torch.full((3,), n, dtype=torch.long, device=dev) for n in steps]
    batch = torch.export.Dim("batch", min=1, max=2 ** 20)
    length_dims = [torch.export.Dim(f"steps_{m}", min=2, max=max_steps)
                   for m in range(len(input_dims))]
    program = torch.export.export(
        model, (xs, lengths),
        dynamic_shapes=([{0: batch, 1: dim} for dim in length_dims], [{0: batch}] * len(xs)))
    torch.export.save(program, out)
