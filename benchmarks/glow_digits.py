"""GLOW on sklearn digits: tfp_nvp.glow against TFP's tfb.Glow, measured in one run.

    python benchmarks/glow_digits.py                      # speed table (a few minutes)
    python benchmarks/glow_digits.py --quality-minutes 4  # also train both for 4 minutes, report test bits/dim

Speed: training steps/s of a `tf.function(jit_compile=True)` Adam step (batch 64, dequantized 8x8 digits) for
`tfb.Glow` and `tfp_nvp.glow` at the same levels, steps per level and hidden width, plus tfp_nvp's
`FlowModel.fit` on the same flow. Quality (optional): each model trained for the same wall time with fresh
dequantization noise per batch and early stopping on 200 validation images; test bits/dim next to the
uniform and full-covariance Gaussian baselines.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp import images  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions
LEVELS = images.DIGITS_LEVELS
SHAPE = (8, 8, 1)
DIMS = int(np.prod(SHAPE))


def tfp_glow(args):
    glow = tfb.Glow(
        output_shape=SHAPE, num_glow_blocks=args.levels, num_steps_per_block=args.steps,
        coupling_bijector_fn=lambda s: tfb.GlowDefaultNetwork(s, num_hidden=args.hidden),
        exit_bijector_fn=tfb.GlowDefaultExitNetwork, seed=args.seed,
    )
    base = tfd.Sample(tfd.Normal(0.0, 1.0), glow.inverse_event_shape(SHAPE))
    return tfd.TransformedDistribution(base, glow)


def ours(args, num_blocks):
    return tfp_nvp.glow(SHAPE, num_levels=args.levels, num_steps_per_level=args.steps,
                        hidden_channels=args.hidden, num_blocks=num_blocks, seed=args.seed)


def make_step(flow, lr):
    opt = keras.optimizers.Adam(lr)
    variables = flow.trainable_variables

    @tf.function(jit_compile=True)
    def step(x_int):
        x = images.dequantize(x_int, LEVELS)
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(x))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def steps_per_second(step, data, batch, n_steps):
    rng = np.random.default_rng(0)
    batches = [data[rng.choice(len(data), batch, replace=False)] for _ in range(16)]
    for b in batches[:3]:  # compile and warm up
        step(b).numpy()
    start = time.perf_counter()
    for i in range(n_steps):
        loss = step(batches[i % 16])
    loss.numpy()
    return n_steps / (time.perf_counter() - start)


def fit_steps_per_second(flow, data, args):
    model = tfp_nvp.FlowModel(flow, levels=LEVELS)
    model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=True)
    x = data[np.random.default_rng(0).choice(len(data), args.batch * 16)]
    model.fit(x, batch_size=args.batch, epochs=1, verbose=0)  # compile
    epochs = max(1, args.speed_steps // 16)
    start = time.perf_counter()
    model.fit(x, batch_size=args.batch, epochs=epochs, verbose=0)
    return epochs * 16 / (time.perf_counter() - start)


def train_for(flow, data, args, minutes):
    """Adam with fresh dequantization noise per batch; keeps the best validation weights (early stopping)."""
    step = make_step(flow, args.lr)

    @tf.function(jit_compile=True)
    def nll(x):
        return -tf.reduce_mean(flow.log_prob(x))

    x_val = images.dequantize(data["validation"], LEVELS, seed=(args.seed, 1))
    x_test = images.dequantize(data["test"], LEVELS, seed=(args.seed, 2))
    best, best_weights, stale = np.inf, None, 0
    rng, train, start = np.random.default_rng(args.seed), data["train"], time.perf_counter()
    while time.perf_counter() - start < 60 * minutes and stale < 20:
        perm = rng.permutation(len(train))
        for i in range(0, len(train) - args.batch + 1, args.batch):
            step(train[perm[i:i + args.batch]])
        val = float(nll(x_val))
        if val < best:
            best, best_weights, stale = val, [v.numpy() for v in flow.trainable_variables], 0
        else:
            stale += 1
    for v, w in zip(flow.trainable_variables, best_weights):
        v.assign(w)
    return float(images.bits_per_dim(float(nll(x_test)), DIMS, LEVELS)), time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--speed-steps", type=int, default=300)
    p.add_argument("--quality-minutes", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = images.load_digits_splits(num_validation=200, seed=args.seed)

    rows = []
    for label, build in [
        ("tfb.Glow (GlowDefaultNetwork)", lambda: tfp_glow(args)),
        ("tfp_nvp.glow, num_blocks=0", lambda: ours(args, 0)),
        ("tfp_nvp.glow, num_blocks=1 (default)", lambda: ours(args, 1)),
    ]:
        flow = build()
        if isinstance(flow.bijector, tfb.Bijector) and label.startswith("tfp_nvp"):
            tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
        n_params = sum(int(np.prod(v.shape)) for v in flow.trainable_variables)
        rate = steps_per_second(make_step(flow, args.lr), data["train"], args.batch, args.speed_steps)
        rows.append([label, n_params, rate])
    reference = rows[0][2]
    flow = ours(args, 1)
    tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
    fit_rate = fit_steps_per_second(flow, data["train"], args)
    rows.append(["tfp_nvp.glow default via FlowModel.fit", rows[-1][1], fit_rate])

    print(f"\nGLOW on digits, {args.levels} levels x {args.steps} steps, {args.hidden} hidden channels, "
          f"batch {args.batch}, XLA, {os.cpu_count()} cores\n")
    print("| model | parameters | steps/s | vs tfb.Glow |")
    print("|---|---:|---:|---:|")
    for label, n, rate in rows:
        print(f"| {label} | {n:,} | {rate:.1f} | {rate / reference:.2f}x |")

    if args.quality_minutes > 0:
        print(f"\nTest bits/dim after {args.quality_minutes:g} min of training each (early stopping on "
              "200 validation images)\n")
        print("| model | test bits/dim | seconds |")
        print("|---|---:|---:|")
        for label, build in [("tfb.Glow (GlowDefaultNetwork)", lambda: tfp_glow(args)),
                             ("tfp_nvp.glow (defaults)", lambda: ours(args, 1))]:
            flow = build()
            if label.startswith("tfp_nvp"):
                tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
            bpd, seconds = train_for(flow, data, args, args.quality_minutes)
            print(f"| {label} | {bpd:.3f} | {seconds:.0f} |")
        gauss = images.gaussian_bits_per_dim(data["train"], data["test"], LEVELS)
        print(f"| full-covariance Gaussian | {gauss:.3f} | |")
        print(f"| uniform | {images.uniform_bits_per_dim(LEVELS):.3f} | |")


if __name__ == "__main__":
    main()
