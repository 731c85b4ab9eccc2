"""Conditional density estimation for a multimodal regression: an encoder and a conditional RealNVP trained together.

The task: x ~ U(-1, 1), and y in R^2 given x is a two-component Gaussian mixture whose modes sit opposite each
other on a circle and turn with x, with a weight that also depends on x:

    y | x ~ w(x) N(m(x), s^2 I) + (1 - w(x)) N(-m(x), s^2 I),   m(x) = R (cos 3x, sin 3x),   w(x) = sigmoid(2x)

A mean regression would predict the origin, where no data lie. Here an MLP encodes x into a context vector,
`tfp_nvp.FlowLayer` turns (y, context) into log p(y | x), and Keras `fit` trains encoder and flow together on
the layer's negative log-likelihood. The true density is known, so the held-out NLL is printed next to the
exact NLL of the true conditional density (the best any model can do on that data).

    python examples/conditional_density.py            # defaults: one to two minutes on 2 CPU cores
    python examples/conditional_density.py --quick    # a few seconds of training, to check it runs

Figures (PNG) in the output folder:
  conditional_densities.png  p(y | x) at four values of x: learned (top) and true (bottom)
  samples.png                y against x: data from the true model and samples from the learned one
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

RADIUS, NOISE = 1.5, 0.2
CONTEXT = 16
SLICES = (-0.75, -0.25, 0.25, 0.75)
SETTINGS = {
    # (training points, epochs, batch size)
    "default": (50_000, 16, 500),
    "quick": (4_000, 3, 500),
}


def expit(t):
    return 1.0 / (1.0 + np.exp(-t))


def modes(x):
    angle = 3.0 * x
    return RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def sample_data(n: int, rng):
    """x ~ U(-1, 1) and y | x from the true mixture; x is [n, 1], y is [n, 2]."""
    x = rng.uniform(-1.0, 1.0, n)
    sign = np.where(rng.uniform(size=n) < expit(2.0 * x), 1.0, -1.0)
    y = sign[:, None] * modes(x) + NOISE * rng.standard_normal((n, 2))
    return x[:, None].astype("float32"), y.astype("float32")


def true_log_prob(x, y):
    """log p(y | x) of the true mixture, exactly; x is [n] or [n, 1], y is [n, 2]."""
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64)
    m = modes(x)
    log_norm = -np.log(2 * np.pi * NOISE ** 2)
    near = log_norm - np.sum((y - m) ** 2, -1) / (2 * NOISE ** 2)
    far = log_norm - np.sum((y + m) ** 2, -1) / (2 * NOISE ** 2)
    w = expit(2.0 * x)
    return np.logaddexp(np.log(w) + near, np.log1p(-w) + far)


def build_model(seed: int):
    """Encoder MLP x -> context, and a conditional RealNVP giving log p(y | context); returns (model, encoder)."""
    encoder = keras.Sequential([
        keras.Input([1]),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(CONTEXT),
    ], name="encoder")
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=8, hidden_units=(64, 64), conditional_shape=[CONTEXT],
                            seed=seed, name="conditional_nvp")
    x_in, y_in = keras.Input([1], name="x"), keras.Input([2], name="y")
    # nll_loss=True: the layer adds -mean(log p(y | x)) to the model's losses, so fit needs no targets.
    log_prob = tfp_nvp.FlowLayer(flow, nll_loss=True, name="density")(y_in, context=encoder(x_in))
    return keras.Model([x_in, y_in], log_prob, name="conditional_density"), encoder


def density_figure(model, path: Path, extent: float = 2.5, n: int = 150):
    g = np.linspace(-extent, extent, n, dtype="float32")
    gx, gy = np.meshgrid(g, g)
    grid = np.stack([gx.ravel(), gy.ravel()], -1)
    fig, axes = plt.subplots(2, len(SLICES), figsize=(3.2 * len(SLICES), 6.6))
    for column, x_value in enumerate(SLICES):
        xs = np.full((len(grid), 1), x_value, "float32")
        learned = np.exp(model.predict([xs, grid], batch_size=len(grid), verbose=0)).reshape(n, n)
        true = np.exp(true_log_prob(xs, grid)).reshape(n, n)
        vmax = max(learned.max(), true.max())
        for row, (density, label) in enumerate(((learned, "learned"), (true, "true"))):
            ax = axes[row, column]
            ax.pcolormesh(gx, gy, density, shading="auto", cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"{label} p(y | x = {x_value:+.2f})", fontsize=10)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def samples_figure(x, y, y_model, path: Path):
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True, sharey=True)
    for column, (points, label) in enumerate(((y, "data (true model)"), (y_model, "samples from the learned model"))):
        for row in range(2):
            ax = axes[row, column]
            ax.scatter(x[:, 0], points[:, row], s=1.5, alpha=0.4)
            ax.set_ylabel(f"y{row + 1}")
            if row == 0:
                ax.set_title(label)
            else:
                ax.set_xlabel("x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Conditional density estimation with tfp_nvp.FlowLayer.")
    parser.add_argument("--quick", action="store_true", help="a short run to check everything works")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/conditional_density"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32); got {args.seed}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    num_train, epochs, batch_size = SETTINGS["quick" if args.quick else "default"]

    rng = np.random.default_rng(args.seed)
    x, y = sample_data(num_train, rng)
    x_val, y_val = sample_data(2_000, rng)
    x_test, y_test = sample_data(20_000, rng)  # fresh points the model never saw

    model, encoder = build_model(args.seed)
    steps = epochs * int(np.ceil(num_train / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps, alpha=0.02)
    # XLA: a few seconds of compilation buy about twice the steps per second on CPU.
    model.compile(optimizer=keras.optimizers.Adam(schedule), jit_compile=not args.quick)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit([x, y], batch_size=batch_size, epochs=epochs, validation_data=([x_val, y_val],),
                        verbose=2 if not args.quick else 0)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    nll = float(-np.mean(model.predict([x_test, y_test], batch_size=5_000, verbose=0)))
    exact = float(-np.mean(true_log_prob(x_test, y_test)))
    # CPU time next to wall time: on a shared machine the wall clock also counts other people's work.
    print(f"training: {len(history.history['loss'])} epochs, wall {seconds:.1f} s, process CPU {cpu_seconds:.1f} s")
    print(f"held-out NLL on {len(x_test)} fresh points: {nll:.4f} nats")
    print(f"exact NLL of the true conditional density:  {exact:.4f} nats   gap: {nll - exact:.4f} nats")

    # One draw from the learned p(y | x) for every held-out x.
    layer = model.get_layer("density")
    y_model = layer.sample(1, context=encoder(x_test[:4_000]), seed=(args.seed, 1))[0].numpy()
    density_figure(model, args.output_dir / "conditional_densities.png")
    samples_figure(x_test[:4_000], y_test[:4_000], y_model, args.output_dir / "samples.png")
    model.save(args.output_dir / "conditional_density.keras")
    print(f"figures and the trained model written to {args.output_dir}/")


if __name__ == "__main__":
    main()
