"""Steps per second of `FlowModel.fit` against a hand-written training step on the same flow.

Both sides train the same RealNVP (same builder arguments and seed), with the same optimizer (Adam), batch
size and data; the hand-written side is the shortest honest loop: one `tf.function` per step that computes the
mean negative log-likelihood, its gradient and the Adam update, fed by pre-shuffled batches. Each variant is
timed over a few epochs after a warm-up epoch (which pays for tracing and XLA compilation), several times in
interleaved rounds; the best round is reported, since on a shared machine noise only ever slows a run down.

    python benchmarks/fit_speed.py            # about 2-4 minutes on 2 cores
    python benchmarks/fit_speed.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp.data import two_moons  # noqa: E402


def build_flow(args):
    return tfp_nvp.real_nvp([2], num_coupling_layers=args.couplings, hidden_units=(args.width,) * args.depth,
                            seed=0)


class FitRunner:
    """`FlowModel.fit` with a given compile configuration; one call = `epochs` epochs."""

    def __init__(self, args, x, jit_compile, steps_per_execution, keras_path=False):
        self.model = tfp_nvp.FlowModel(build_flow(args))
        self.model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=jit_compile,
                           steps_per_execution=steps_per_execution)
        self.x, self.batch = x, args.batch
        # keras.Model.fit bypasses FlowModel's single-iterator input path: the "before" row.
        self.fit = (lambda *a, **k: keras.Model.fit(self.model, *a, **k)) if keras_path else self.model.fit

    def __call__(self, epochs):
        self.fit(self.x, batch_size=self.batch, epochs=epochs, shuffle=True, verbose=0)


class HandRunner:
    """A hand-written loop: `tf.function` training step over pre-shuffled, equal-sized batches."""

    def __init__(self, args, x, jit_compile):
        model = tfp_nvp.FlowModel(build_flow(args))  # only to collect the Keras weights of the flow
        self.dist = model.distribution
        self.weights = model.trainable_weights
        self.optimizer = keras.optimizers.Adam(1e-4)
        self.optimizer.build(self.weights)
        self.x, self.batch = x, args.batch
        self.rng = np.random.default_rng(0)
        self.step = tf.function(self._step, jit_compile=jit_compile)

    def _step(self, xb):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(self.dist.log_prob(xb))
        grads = tape.gradient(loss, [w.value for w in self.weights])
        self.optimizer.apply(grads, self.weights)
        return loss

    def __call__(self, epochs):
        n = len(self.x) // self.batch
        for _ in range(epochs):
            batches = tf.constant(self.x[self.rng.permutation(len(self.x))[: n * self.batch]])
            for i in range(n):
                self.step(batches[i * self.batch:(i + 1) * self.batch])


def measure(runner, epochs, steps_per_epoch, warmup_epochs=1):
    t = time.perf_counter()
    runner(warmup_epochs)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    runner(epochs)
    return warm, epochs * steps_per_epoch / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--couplings", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-jit-rows", action="store_true", help="skip the rows without XLA")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, one short round")
    p.add_argument("--json", default=None, help="also write the table's numbers to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.couplings, args.width, args.steps_per_epoch, args.epochs, args.rounds = 2, 16, 4, 1, 1

    # A whole number of batches, so fit never sees a short last batch (which would trace a second time).
    x = two_moons(args.batch * args.steps_per_epoch, seed=0)
    spe_all = args.steps_per_epoch
    variants = []
    for jit in ([True] if args.no_jit_rows else [False, True]):
        tag = "XLA" if jit else "no XLA"
        variants += [
            (f"hand-written tf.function step ({tag})", lambda jit=jit: HandRunner(args, x, jit)),
            (f"keras.Model.fit input path, steps_per_execution=1 ({tag})",
             lambda jit=jit: FitRunner(args, x, jit, 1, keras_path=True)),
            (f"FlowModel.fit, steps_per_execution=1 ({tag})", lambda jit=jit: FitRunner(args, x, jit, 1)),
            (f"FlowModel.fit, steps_per_execution={spe_all} ({tag})",
             lambda jit=jit: FitRunner(args, x, jit, spe_all)),
        ]
    runners, warmups = {}, {}
    best = {name: 0.0 for name, _ in variants}
    for r in range(args.rounds):
        for name, make in variants:
            if name not in runners:
                runners[name] = make()
                warmups[name], rate = measure(runners[name], args.epochs, args.steps_per_epoch)
            else:
                _, rate = measure(runners[name], args.epochs, args.steps_per_epoch, warmup_epochs=0)
            best[name] = max(best[name], rate)
            print(f"round {r + 1}: {name}: {rate:.1f} steps/s", flush=True)

    print()
    print(f"RealNVP {args.couplings} couplings, hidden {(args.width,) * args.depth}, batch {args.batch}, "
          f"{args.steps_per_epoch} steps/epoch, Adam; best of {args.rounds} rounds of {args.epochs} epochs. "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), TF {tf.__version__}, "
          f"Keras {keras.__version__}.")
    print()
    print("| training path | steps/s | vs hand-written (same XLA setting) | first epoch (trace + compile) s |")
    print("|---|---:|---:|---:|")
    rows = []
    for name, _ in variants:
        ref = best[f"hand-written tf.function step ({'no XLA' if 'no XLA' in name else 'XLA'})"]
        print(f"| {name} | {best[name]:.1f} | {best[name] / ref:.2f} | {warmups[name]:.1f} |")
        rows.append(dict(path=name, steps_per_second=best[name], vs_hand_written=best[name] / ref,
                         first_epoch_seconds=warmups[name]))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump(dict(benchmark="fit_speed", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), config=config,
                           cpus=os.cpu_count(), machine=platform.processor() or platform.machine(),
                           tensorflow=tf.__version__, keras=keras.__version__, load_average=os.getloadavg(),
                           rows=rows), f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
