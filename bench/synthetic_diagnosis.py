"""Why coupled fusion stays at chance on the synthetic task (reports/, fusion study): how strong the
scan's state path, the coupled model's only cross-modal path, is at initialisation, whether
an untrained encoder already exposes the label, and what training did to the scan's weights.

    OMP_NUM_THREADS=1 python bench/synthetic_diagnosis.py                 # ~1 minute
    OMP_NUM_THREADS=1 python bench/synthetic_diagnosis.py --noise 0.1     # nearly noise-free data
    OMP_NUM_THREADS=1 python bench/synthetic_diagnosis.py --dt-min 0.0625 --dt-max 1  # Δ init
    python bench/synthetic_diagnosis.py --runs runs/coupled runs/average  # weights of finished runs

Prints, for the demo model (d_model 32, 2 layers, d_state 8, 16 steps, seed --seed):
- state path: rms of the scan output without D·u, and of D·u, on one batch of 64 random
  inputs, first layer;
- cross / own: norm of d(audio block output at step 10, residual excluded) / d(vision
  inputs) over that of the same / d(audio inputs), first layer;
- probe: validation accuracy of a logistic regression on the pooled features of the
  untrained encoder for the classification label (train 2000 clips, valid 400), per fusion;
- with --runs: rms of the scan's weights at initialisation (rebuilt from the run's seed)
  and at the run's last epoch (its checkpoint.pt).
"""
import argparse

import torch
import torch.nn.functional as F

import coupled_mamba_ext.data.synthetic as synthetic
from coupled_mamba_ext import train as training
from coupled_mamba_ext.data import MMSADataset, collate_mmsa, load_synthetic
from coupled_mamba_ext.models import CoupledMamba, CoupledMambaLayer, masked_pool
from coupled_mamba_ext.reference import coupled_scan_ref

DEMO = dict(d_model=32, n_layers=2, d_state=8, seq_len=16, dropout=0.0)


def state_path_strength(seed: int, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
    torch.manual_seed(seed)
    layer = CoupledMambaLayer(32, 3, d_state=8, dt_min=dt_min, dt_max=dt_max)
    x = torch.randn(3, 64, 16, 32, requires_grad=True)
    u, _ = layer.in_proj(layer.norm(x)).chunk(2, dim=-1)
    u = F.silu(layer._causal_conv(u))
    dt_low, B, C = layer.x_proj(u.transpose(-1, -2)).split(
        [layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    dt = layer.dt_proj(dt_low)
    p = layer._scan_parameters(u.dtype)
    args = (u, dt.transpose(-1, -2), p["A"], B.transpose(-1, -2), C.transpose(-1, -2))
    kwargs = dict(delta_bias=p["delta_bias"], delta_softplus=True, coupling=p["coupling"])
    with torch.no_grad():
        state = coupled_scan_ref(*args, **kwargs)
    print(f"state path rms {state.pow(2).mean().sqrt():.2e}, D*u rms "
          f"{(p['D'][:, None, :, None] * u).pow(2).mean().sqrt():.2e}, mean delta "
          f"{F.softplus(dt + layer.dt_bias[:, None, None, :]).mean():.3f}")
    audio, vision, t = 1, 2, 10
    block = layer(x) - x  # the block's output without its residual
    grad, = torch.autograd.grad(block[audio, :, t].square().sum(), x)
    own, cross = grad[audio, :, :t + 1].norm(), grad[vision, :, :t + 1].norm()
    print(f"cross / own sensitivity (audio stream, step {t}): {cross / own:.2e}")


def linear_probe(fusion: str, seed: int, dt_min: float = 1e-3, dt_max: float = 1e-1) -> float:
    data = load_synthetic(0)
    torch.manual_seed(seed)
    model = CoupledMamba(data.feature_dims, fusion=fusion, dt_min=dt_min, dt_max=dt_max,
                         **DEMO).eval()

    def features(split):
        batch = collate_mmsa([item for item in MMSADataset(data.splits[split])])
        with torch.no_grad():
            xs, lengths = model._to_common_length(batch.xs, model._check_lengths(
                batch.xs, batch.lengths))
            h = torch.stack([p(x) for p, x in zip(model.input_projections, xs)])
            pooled = masked_pool(model.final_norm(model.encoder(h)), lengths, "mean")
        return pooled.transpose(0, 1).flatten(1), batch.classification.float()

    x_train, y_train = features("train")
    x_valid, y_valid = features("valid")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    x_train, x_valid = (x_train - mean) / std, (x_valid - mean) / std
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x_train @ w + b, y_train)
                + 1e-2 * w.square().sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return (((x_valid @ w + b) > 0).float() == y_valid).float().mean().item()


def scan_weights(run: str) -> None:
    saved = training.load_checkpoint(f"{run}/checkpoint.pt")
    config = training.TrainConfig(**saved["config"])
    torch.manual_seed(config.seed)
    initial = training.build_model(config, saved["input_dims"], saved["num_classes"])
    print(f"{run} ({config.fusion}, seed {config.seed}, {saved['epoch']} epochs): rms at "
          f"initialisation -> at the last epoch")
    for name, value in initial.state_dict().items():
        if name.rsplit(".", 2)[-2:][0] in ("x_proj", "dt_proj") or \
                name.split(".")[-1] in ("A_log", "D", "dt_bias"):
            before, after = value.float(), saved["model"][name].float()
            print(f"  {name:42s} {before.square().mean().sqrt():.4f} -> "
                  f"{after.square().mean().sqrt():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=synthetic.NOISE_STD,
                        help="noise std of the synthetic data for the probe (default: the "
                        "dataset's)")
    parser.add_argument("--fusions", nargs="*", default=["average", "coupled", "mamba"])
    parser.add_argument("--dt-min", type=float, default=1e-3,
                        help="initial Δ range of the untrained models (default Mamba's)")
    parser.add_argument("--dt-max", type=float, default=1e-1)
    parser.add_argument("--runs", nargs="*", default=[],
                        help="finished `train` output directories to compare weights of")
    args = parser.parse_args()
    state_path_strength(args.seed, args.dt_min, args.dt_max)
    synthetic.NOISE_STD = args.noise
    for fusion in args.fusions:
        print(f"linear probe on the untrained {fusion} encoder (noise {args.noise}): "
              f"valid accuracy {linear_probe(fusion, args.seed, args.dt_min, args.dt_max):.3f}")
    for run in args.runs:
        scan_weights(run)


if __name__ == "__main__":
    main()
