"""Flows on two moons: train with Keras `fit`, check the held-out NLL against the exact bound, draw figures.

The book chapter's experiment (3000 standardized moons, noise 0.05) with a flow sized to the task and a
warmup-and-cosine learning-rate schedule. Three flow families, each with the recipe measured for it
(benchmarks/README.md has the sweeps); the RealNVP and spline recipes train on all 3000 points for a fixed
budget with a little training noise (FlowModel's `training_noise`), FFJORD holds 10% out for early stopping.

    python examples/two_moons.py                     # RealNVP (affine couplings): under a minute on 2 CPU cores
    python examples/two_moons.py --flow spline       # rational-quadratic spline couplings
    python examples/two_moons.py --flow ffjord       # continuous flow (ODE solves: minutes)
    python examples/two_moons.py --epochs 50 --output-dir /tmp/moons
    python examples/two_moons.py --flow spline --num-points 30000   # more moons, the same number of steps

On the book's 3000 points the training NLL of a flow goes below the bound while the held-out NLL stalls:
3000 points are what limits it (a kernel density estimate with the bandwidth picked on the test set does worse
still). Jittering each training batch with a fraction of the moons' own noise closes about half of that gap
(the spline recipe ends about 0.02 nats above the bound, from 0.045). Fresh moons cost nothing:
`--num-points 30000` keeps each recipe's number of training steps (fewer, longer epochs).

Figures (PNG) in the output folder:
  before_training.png / after_training.png  data -> latent (top) and latent -> data (bottom), inputs left
  loss.png                                   training (and validation) NLL per epoch, final held-out NLL
  density.png                                exp(log_prob) of the trained flow on a grid
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp.data import MOONS_NOISE, moons_entropy, moons_standardizer, two_moons  # noqa: E402

# Chosen by measurement on 2 CPU cores (benchmarks/README.md has the sweep). A step's cost here is per-op
# overhead, so depth is what costs time; it is also what fits the thin arcs: 16 couplings of (64, 64) beat
# 8 of (128, 128) by 0.15 nats. A short cosine schedule at a high rate beat longer runs: validation NLL
# stopped improving by epoch ~110 of 260 at this rate; 170 epochs of cosine decay fit the minute.
# At this rate single runs swing by +-0.03 nats with the seed (and even with float rounding: XLA or not); a 5%
# warmup and clipping each gradient's norm to 1 gave the best median of the variants measured over three seeds.
# Holding 10% out for early stopping did not pay: trained on all 3000 points for the fixed budget, the
# median held-out NLL was 0.006 nats lower, and 1.20 came about twice as soon (the validation pass costs a
# second and a half of tracing and a fifth of every later epoch).
# XLA does not pay here: these steps are too small for its fusion to win back its compile time (measured:
# 17 s against 7 s for the first epoch, and each later epoch about 20% slower). It does for wide networks.
NUM_POINTS = 3000
VALIDATION_SPLIT = 0.1
# 300 divides 3000, and both the 2700 training and the 300 validation points of a 10% split: every batch has
# one shape, so the step is traced (and, with XLA, compiled) once, never again for a short last batch.
BATCH_SIZE = 300
# Noise regularization (`jitter`, FlowModel's `training_noise`): each training batch is jittered by Gaussian
# noise of 40% of the moons' own noise (0.02 before standardizing). On 3000 points the flows' held-out NLL is
# limited by the sample, not the flow (the training NLL ends below the bound); the jitter smooths the sample a
# little, at a bias of ~0.005 nats, and lowered the median held-out NLL by 0.02-0.03 (benchmarks/README.md).
# With it the spline flow no longer needs early stopping, and twice as many epochs kept improving where the
# validation NLL had turned up.
RECIPES = {
    "real_nvp": dict(builder=tfp_nvp.real_nvp, learning_rate=5e-3, warmup=0.05, clipnorm=1.0, epochs=170,
                     jit_compile=False, validation_split=0.0, jitter=0.4,
                     flow=dict(num_coupling_layers=16, hidden_units=(64, 64), log_scale_bound="tanh")),
    "spline": dict(builder=tfp_nvp.spline_flow, learning_rate=5e-3, epochs=260, jit_compile=False,
                   validation_split=0.0, jitter=0.4,
                   flow=dict(num_coupling_layers=8, hidden_units=(64, 64), num_bins=8)),
    # XLA cannot compile the ODE solver's loop; each step solves the ODE and its adjoint.
    "ffjord": dict(builder=tfp_nvp.ffjord, learning_rate=5e-3, epochs=60, jit_compile=False,
                   flow=dict(hidden_units=(64, 64), atol=1e-4, rtol=1e-4)),
}


def default_epochs(flow: str, num_points: int) -> int:
    """The recipe's epochs, rescaled to `num_points` so that the run takes the recipe's number of steps."""
    return max(1, round(RECIPES[flow]["epochs"] * NUM_POINTS / num_points))


def build_model(seed: int, flow: str = "real_nvp") -> tfp_nvp.FlowModel:
    recipe = RECIPES[flow]
    jitter = recipe.get("jitter", 0.0)
    # The data are standardized per coordinate, so the same jitter in moons units is a different width in each.
    noise = jitter * MOONS_NOISE / moons_standardizer()[1] if jitter else None
    return tfp_nvp.FlowModel(recipe["builder"]([2], seed=seed, **recipe["flow"]), training_noise=noise)


def train(model, x, epochs: int, flow: str = "real_nvp", verbose="auto", callbacks=()):
    recipe = RECIPES[flow]
    batch_size = recipe.get("batch_size", BATCH_SIZE)
    # Cosine decay to 1% of the peak over the run (FlowModel.fit sizes it to `epochs`): big steps find the
    # moons, small ones settle the thin arcs.
    schedule = tfp_nvp.WarmupCosineDecay(recipe["learning_rate"], warmup_fraction=recipe.get("warmup", 0.0),
                                         final_fraction=0.01)
    # `ema_momentum` (no recipe sets it; benchmarks/spline_moons_sweep.py tries it): Keras' weight averaging,
    # validated and finally kept with the averaged weights.
    ema = recipe.get("ema_momentum")
    optimizer = tfp_nvp.FusedAdam(schedule, clipnorm=recipe.get("clipnorm"), use_ema=ema is not None,
                                  ema_momentum=0.99 if ema is None else ema)
    model.compile(optimizer=optimizer, jit_compile=recipe["jit_compile"],
                  steps_per_execution=recipe.get("steps_per_execution", 1))
    validation_split = recipe.get("validation_split", VALIDATION_SPLIT)
    if validation_split:
        callbacks = [keras.callbacks.EarlyStopping("val_nll", patience=max(10, epochs // 2),
                                                   restore_best_weights=True), *callbacks]
        if ema is not None:
            callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    start = time.perf_counter()
    history = model.fit(x, batch_size=batch_size, epochs=epochs, validation_split=validation_split,
                        callbacks=list(callbacks), verbose=verbose)
    return history, time.perf_counter() - start


def transport_figure(model, x, z, title: str, path: Path):
    """The book's figure: data -> latent (inverse, top row) and latent -> data (forward, bottom row)."""
    bijector = model.distribution.bijector
    rows = [
        ("data x", x, "latent f(x) = inverse(x)", bijector.inverse(x).numpy(), "tab:blue"),
        ("latent z ~ N(0, I)", z, "data g(z) = forward(z)", bijector.forward(z).numpy(), "tab:green"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.5))
    for (in_label, a, out_label, b, colour), (ax_in, ax_out) in zip(rows, axes):
        for ax, pts, label in ((ax_in, a, in_label), (ax_out, b, out_label)):
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color=colour)
            ax.set_title(label)
            ax.set_xlim(-4, 4)
            ax.set_ylim(-4, 4)
            ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_figure(history, bound: float, held_out: float, path: Path, jittered: bool = False):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = history.history
    # With training noise the training NLL is that of the jittered batches: a smoother, wider density than the
    # data's, so it ends above the held-out NLL of the clean moons.
    ax.plot(curves["nll"], label="training NLL (jittered batches)" if jittered else "training NLL")
    if "val_nll" in curves:
        ax.plot(curves["val_nll"], label="validation NLL")
    ax.axhline(held_out, color="tab:red", lw=1, label=f"final held-out NLL {held_out:.4f}")
    ax.axhline(bound, color="k", ls="--", lw=1, label=f"entropy bound {bound:.4f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("NLL (nats per point)")
    ax.set_ylim(bound - 0.1, max(curves.get("val_nll", curves["nll"])[0], curves["nll"][0]) + 0.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def density_figure(model, path: Path, extent: float = 3.0, n: int = 300):
    g = np.linspace(-extent, extent, n, dtype="float32")
    gx, gy = np.meshgrid(g, g)
    grid = np.stack([gx.ravel(), gy.ravel()], -1)
    density = np.exp(model.log_prob(grid).numpy()).reshape(n, n)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    mesh = ax.pcolormesh(gx, gy, density, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="p(x)")
    ax.set_aspect("equal")
    ax.set_title("learned density exp(log_prob(x))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Normalizing flows on two moons with tfp_nvp.FlowModel.")
    parser.add_argument("--flow", choices=sorted(RECIPES), default="real_nvp", help="which flow family to train")
    parser.add_argument("--epochs", type=int, default=None,
                        help="maximum epochs (default: the flow's recipe; early stopping may end sooner)")
    parser.add_argument("--num-points", type=int, default=NUM_POINTS,
                        help=f"training moons (default {NUM_POINTS}, the book's); the default --epochs keep the "
                             "recipe's number of steps")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: outputs/two_moons[_FLOW]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_points < 10:
        parser.error(f"--num-points must be at least 10; got {args.num_points}")
    if args.epochs is None:
        args.epochs = default_epochs(args.flow, args.num_points)
    if args.epochs <= 0:
        parser.error(f"--epochs must be positive; got {args.epochs}")
    if not 0 <= args.seed < 2**32 - 10_000:  # the held-out moons use seed + 10 000
        parser.error(f"--seed must be in [0, 2**32 - 10000); got {args.seed}")
    if args.output_dir is None:
        args.output_dir = Path("outputs/two_moons" + ("" if args.flow == "real_nvp" else f"_{args.flow}"))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    x = two_moons(args.num_points, seed=args.seed)
    x_test = two_moons(20_000, seed=args.seed + 10_000)  # fresh moons the model never saw
    z = np.random.default_rng(args.seed).standard_normal((NUM_POINTS, 2)).astype("float32")
    model = build_model(args.seed, args.flow)
    transport_figure(model, x[:NUM_POINTS], z, f"{args.flow} before training (the flow starts at the identity)",
                     args.output_dir / "before_training.png")

    cpu_start = time.process_time()
    history, seconds = train(model, x, args.epochs, args.flow)
    cpu_seconds = time.process_time() - cpu_start
    nll = float(-np.mean(model.log_prob(x_test)))
    bound = moons_entropy()
    # CPU time next to wall time: on a shared machine the wall clock also counts other people's work.
    print(f"training wall time: {seconds:.1f} s, process CPU time {cpu_seconds:.1f} s "
          f"({len(history.history['loss'])} epochs)")
    print(f"{args.flow} trained on {len(x)} points: held-out NLL on {len(x_test)} fresh points: {nll:.4f} nats")
    print(f"exact lower bound (entropy of the moons): {bound:.4f} nats   gap: {nll - bound:.4f} nats")

    transport_figure(model, x[:NUM_POINTS], z, f"{args.flow} after training", args.output_dir / "after_training.png")
    loss_figure(history, bound, nll, args.output_dir / "loss.png", jittered=model.training_noise is not None)
    density_figure(model, args.output_dir / "density.png")
    print(f"figures written to {args.output_dir}/")


if __name__ == "__main__":
    main()
