"""Figures of docs/math.md, computed with the compiled operator.

    PYTHONPATH=. python docs/figures/make_math_figures.py   # writes docs/figures/*.png

coupled_state_norm.png: the norm of the coupled state G[t] over time for M = 3 modalities
under the paper's plain sum (w = 1; also M = 2), the mean (w = 1/M) and a softmax of fixed,
unequal logits (what a learned coupling can become). Mamba's initialisation: A[n] = -n
(n = 1..N),
Δ = softplus(dt_bias) with softplus(dt_bias) log-uniform in [1e-3, 1e-1], the raw dt zero;
u, B standard normal. G is advanced one step at a time with
coupled_selective_state_update and checked against coupled_selective_scan's final state.
"""
import math
import os
import sys

import torch

try:
    import coupled_mamba_ext as cm
except ImportError:  # source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import coupled_mamba_ext as cm

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, DIM, N, L = 4, 32, 16, 300


def mamba_init(M: int, generator: torch.Generator):
    """A (M, DIM, N) = -(1..N) and dt_bias (M, DIM) whose softplus is log-uniform in
    [1e-3, 1e-1], as Mamba initialises them."""
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(M, DIM, 1)
    log_dt = torch.rand(M, DIM, generator=generator) * (math.log(0.1) - math.log(1e-3)) \
        + math.log(1e-3)
    dt = log_dt.exp()
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    return A, dt_bias


def state_norms(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """‖G[t]‖ (Frobenius over dim and N, mean over the batch) for t = 1..L; inf once the
    float32 state has overflowed."""
    M = w.shape[0]
    g = torch.Generator().manual_seed(seed)
    A, dt_bias = mamba_init(M, g)
    u = torch.randn(M, BATCH, DIM, L, generator=g)
    delta = torch.zeros(M, BATCH, DIM, L)
    B = torch.randn(M, BATCH, N, L, generator=g)
    C = torch.randn(M, BATCH, N, L, generator=g)
    kwargs = dict(A=A, delta_bias=dt_bias, delta_softplus=True, coupling=w)
    state = torch.zeros(BATCH, DIM, N)
    norms = []
    for t in range(L):
        _, state = cm.coupled_selective_state_update(state, u[..., t], delta[..., t],
                                                     B=B[..., t], C=C[..., t], **kwargs)
        # float64 for the norm: squaring a float32 state near 1e19 would overflow by itself.
        norms.append(state.double().flatten(1).norm(dim=1).mean())
    _, final = cm.coupled_selective_scan(u, delta, B=B, C=C, return_final_state=True, **kwargs)
    if torch.isfinite(final).all():
        torch.testing.assert_close(state, final, rtol=1e-4, atol=1e-4)
    return torch.stack(norms)


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logits = torch.tensor([1.0, 0.0, -0.5])
    cases = [
        ("sum, M = 3 (w = 1, paper Eq. 6)", torch.ones(3), "C3", "-"),
        ("sum, M = 2 (w = 1)", torch.ones(2), "C1", "--"),
        ("mean, M = 3 (w = 1/3)", torch.full((3,), 1 / 3), "C0", "-"),
        (f"softmax{tuple(logits.tolist())}, M = 3", torch.softmax(logits, 0), "C2", ":"),
    ]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    t = torch.arange(1, L + 1)
    for label, w, color, style in cases:
        norms = state_norms(w)
        finite = torch.isfinite(norms)
        ax.plot(t[finite], norms[finite], style, color=color, label=label)
        if not finite.all():
            first = int(t[~finite][0])
            ax.axvline(first, color=color, alpha=0.3, lw=0.8)
            print(f"{label}: state not finite from t = {first}")
        else:
            print(f"{label}: max norm {float(norms.max()):.3g}, final {float(norms[-1]):.3g}")
    ax.axhline(torch.finfo(torch.float32).max, color="gray", lw=0.8, ls="--")
    ax.text(L * 0.6, torch.finfo(torch.float32).max * 1e-4, "float32 max", color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("‖G[t]‖ (mean over batch)")
    ax.set_title(f"Coupled state norm, Mamba init (A = -(1..{N}), Δ ∈ [1e-3, 1e-1])")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    path = os.path.join(HERE, "coupled_state_norm.png")
    fig.savefig(path, dpi=90)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB)")


if __name__ == "__main__":
    main()
