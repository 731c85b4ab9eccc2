"""Throughput at the book's RealNVP architecture: tfp_nvp against TFP's `tfb.RealNVP`.

Both flows are two-moons RealNVPs (2-D events, 6 affine couplings, each with separate shift and log-scale MLP
towers of 4 hidden ReLU layers x 256 units, batch 256):

* tfp_nvp: `real_nvp([2], 6, hidden_units=(256,) * 4, separate_towers=True)` trained by `FlowModel.fit`
  (default `compile()`, i.e. Adam with the warmup-cosine schedule; `compile(jit_compile=True)`, since Keras'
  default leaves XLA off on CPU; that with `tfp_nvp.FusedAdam`; and with `steps_per_execution` = steps per
  epoch, one call per epoch);
* TFP: `tfb.RealNVP(num_masked=1)` couplings interleaved with `tfb.Permute([1, 0])`, each with a `tf.Module`
  conditioner holding the same two towers as two independent MLPs, trained with Adam by a
  `tf.function(jit_compile=True)` step over pre-shuffled batches (the loop of `two_moons.py`'s `run_tfp`).

Training is timed in steps per second over a few epochs after a warm-up (tracing and XLA compilation excluded);
`log_prob` and `sample` in points per second for one `tf.function` call on `--points` points each side, both
jit-compiled and not (without XLA the graph runs as written, so what each flow computes shows; with XLA both
spend nearly all their time in the same matmuls), and each side's faster mode against the other's. Every
figure is the best of `--rounds` interleaved rounds (on a shared machine noise only slows a run down), and
each ratio is also given within each round, where the two sides ran back to back: the median and range of
those say whether a difference is more than the machine's drift.

    python benchmarks/throughput.py            # a few minutes on 2 cores
    python benchmarks/throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp.data import two_moons  # noqa: E402
from two_moons import tfp_flow, xla_adam_step  # noqa: E402  (benchmarks/two_moons.py, beside this script)


COUPLINGS, HIDDEN = 6, (256,) * 4


def matmul_flops_per_point() -> int:
    """Multiply-adds x 2 in one pass of every coupling's two towers for one 2-D point (1 unit in, 1 out)."""
    sizes = [1, *HIDDEN, 1]
    return COUPLINGS * 2 * sum(2 * a * b for a, b in zip(sizes, sizes[1:]))


# ------------------------------------------------------------------------------------------------ TFP side
class Towers(tf.Module):
    """`tfb.RealNVP` conditioner: independent shift and log-scale MLPs on the masked half."""

    def __init__(self, in_units, out_units, hidden=HIDDEN, seed=0, name=None):
        super().__init__(name=name)
        self.towers = []
        for t in range(2):
            init = keras.initializers.GlorotUniform(seed=seed * 10 + t)
            sizes = [in_units, *hidden, out_units]
            kernels = [tf.Variable(init((a, b)), name=f"t{t}w{i}") for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
            biases = [tf.Variable(tf.zeros([b]), name=f"t{t}b{i}") for i, b in enumerate(sizes[1:])]
            self.towers.append((kernels, biases))

    def __call__(self, x, output_units, **_):
        outs = []
        for kernels, biases in self.towers:
            h = x
            for i, (w, b) in enumerate(zip(kernels, biases)):
                h = h @ w + b
                if i < len(kernels) - 1:
                    h = tf.nn.relu(h)
            outs.append(h)
        return outs[0], outs[1]


def tfb_flow(seed=0):
    return tfp_flow(COUPLINGS, seed=seed, conditioner=Towers)


class TfbTrainer:
    """The XLA loop of `two_moons.py`'s `run_tfp` on the book-sized `tfb.RealNVP`; one call = `epochs` epochs."""

    def __init__(self, x, batch, seed=0):
        tf.random.set_seed(seed)
        self.flow = tfb_flow(seed)
        self.step, self.x, self.batch = xla_adam_step(self.flow), x, batch
        self.rng = np.random.default_rng(seed)

    def __call__(self, epochs):
        for _ in range(epochs):
            xs = self.x[self.rng.permutation(len(self.x))]
            for i in range(0, len(xs), self.batch):
                self.step(tf.constant(xs[i:i + self.batch]))


# ------------------------------------------------------------------------------------------------ tfp_nvp side
def ours_model(seed=0):
    return tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], COUPLINGS, hidden_units=HIDDEN, separate_towers=True, seed=seed))


class FitTrainer:
    """`FlowModel.fit` with the given `compile` arguments; one call = `epochs` epochs."""

    def __init__(self, x, batch, seed=0, **compile_kwargs):
        keras.utils.set_random_seed(seed)
        self.model = ours_model(seed)
        self.model.compile(**compile_kwargs)
        self.x, self.batch = x, batch

    def __call__(self, epochs):
        self.model.fit(self.x, batch_size=self.batch, epochs=epochs, verbose=0)


# ------------------------------------------------------------------------------------------------ timing
def best_rate(runners, warmup, work, rounds, amount):
    """Best `amount / seconds` of each runner over interleaved rounds, after one warm-up call each, and every
    round's rates (`{name: [rate per round]}`): runners timed back to back in one round saw the same machine."""
    for name, run in runners.items():
        print(f"  warming up {name} ...", flush=True)
        start = time.perf_counter()
        run(warmup)
        print(f"    {time.perf_counter() - start:.1f} s (trace + compile + {warmup} units)", flush=True)
    per_round = {name: [] for name in runners}
    for r in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(work)
            per_round[name].append(amount / (time.perf_counter() - start))
            print(f"  round {r + 1}: {name}: {per_round[name][-1]:,.1f}", flush=True)
    return {name: max(rates) for name, rates in per_round.items()}, per_round


def paired_ratios(per_round, name, reference):
    """Median, lowest and highest of `name`'s rate over `reference`'s within each round."""
    ratios = np.array(per_round[name]) / np.array(per_round[reference])
    return float(np.median(ratios)), float(ratios.min()), float(ratios.max())


def eval_runners(points, seed=0, jit_compile=True):
    """`log_prob` and `sample` calls on `points` points for each side, as `tf.function`s with or without XLA."""
    ours = ours_model(seed).distribution
    theirs = tfb_flow(seed)
    x = tf.constant(two_moons(points, seed=seed + 1))
    out = {}
    for side, dist in (("tfp_nvp", ours), ("tfb.RealNVP", theirs)):
        log_prob = tf.function(lambda x, dist=dist: dist.log_prob(x), jit_compile=jit_compile)
        sample = tf.function(lambda s, dist=dist: dist.sample(points, seed=s), jit_compile=jit_compile)
        seeds = iter(range(1, 10**9))

        def run_log_prob(n, f=log_prob):
            for _ in range(n):
                f(x).numpy()

        def run_sample(n, f=sample):
            for _ in range(n):
                f(tf.constant([next(seeds), 0])).numpy()

        out[side] = (run_log_prob, run_sample)
    return out


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps-per-epoch", type=int, default=20, help="data size = batch x this (no partial batch)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per timed training round")
    p.add_argument("--points", type=int, default=10_000, help="points per log_prob / sample call")
    p.add_argument("--calls", type=int, default=10, help="log_prob / sample calls per timed round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "throughput.json"),
                   help="where to write the results (default: benchmarks/results/throughput.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, one round, no JSON")
    args = p.parse_args()
    if args.quick:
        args.steps_per_epoch, args.epochs, args.points, args.calls, args.rounds = 4, 1, 1000, 2, 1
        args.json = None

    load_before = load_average()
    x = two_moons(args.batch * args.steps_per_epoch, seed=0).astype("float32")
    steps = args.epochs * args.steps_per_epoch
    print("training (steps/s) ...", flush=True)
    train, train_rounds = best_rate({
        "FlowModel.fit, compile()": FitTrainer(x, args.batch),
        "FlowModel.fit, compile(jit_compile=True)": FitTrainer(x, args.batch, jit_compile=True),
        "FlowModel.fit, compile(FusedAdam, jit_compile=True)": FitTrainer(
            x, args.batch, optimizer=tfp_nvp.FusedAdam(tfp_nvp.WarmupCosineDecay()), jit_compile=True),
        f"FlowModel.fit, compile(jit_compile=True, steps_per_execution={args.steps_per_epoch})": FitTrainer(
            x, args.batch, jit_compile=True, steps_per_execution=args.steps_per_epoch),
        "tfb.RealNVP, tf.function(jit_compile=True) loop": TfbTrainer(x, args.batch),
    }, warmup=1, work=args.epochs, rounds=args.rounds, amount=steps)
    print("log_prob and sample (points/s) ...", flush=True)
    evaluation, evaluation_rounds = {}, {}  # (mode, "log_prob" | "sample") -> {side: rate}, {side: [rates]}
    for mode, jit in (("jit-compiled", True), ("no XLA", False)):
        ev = eval_runners(args.points, jit_compile=jit)
        for i, label in enumerate(("log_prob", "sample")):
            evaluation[(mode, label)], evaluation_rounds[(mode, label)] = best_rate(
                {side: fns[i] for side, fns in ev.items()}, warmup=1, work=args.calls, rounds=args.rounds,
                amount=args.calls * args.points)
    load_after = load_average()

    ref_name = "tfb.RealNVP, tf.function(jit_compile=True) loop"
    rows = [(f"train: {name}", "steps/s", rate, rate / train[ref_name], paired_ratios(train_rounds, name, ref_name))
            for name, rate in train.items()]
    for label in ("log_prob", "sample"):
        for mode in ("jit-compiled", "no XLA"):
            results = evaluation[(mode, label)]
            for side, rate in results.items():
                rows.append((f"{label}: {side} ({mode} tf.function, {args.points} points)", "points/s", rate,
                             rate / results["tfb.RealNVP"],
                             paired_ratios(evaluation_rounds[(mode, label)], side, "tfb.RealNVP")))
        best = {side: max(evaluation[(m, label)][side] for m in ("jit-compiled", "no XLA"))
                for side in ("tfp_nvp", "tfb.RealNVP")}
        rows.append((f"{label}: tfp_nvp's faster mode against tfb.RealNVP's", "points/s", best["tfp_nvp"],
                     best["tfp_nvp"] / best["tfb.RealNVP"], None))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    conditions = (f"{when}; {os.cpu_count()} CPUs ({platform.machine()}), load average (1, 5, 15 min) "
                  f"{load_before} before, {load_after} after; TF {tf.__version__}, Keras {keras.__version__}, "
                  f"TFP {tfp.__version__}; best of {args.rounds} interleaved rounds, and the median (lowest-highest) "
                  f"of the ratios within a round; training: batch {args.batch}, {args.steps_per_epoch} steps/epoch, "
                  f"{args.epochs} epochs per round")
    print()
    print(conditions)
    print()
    # A flow needs one pass of every tower per point for log_prob or sample; counting just that work, the rate
    # in GFLOP/s shows how close each side comes to what the cores can do (and whether it computes more).
    flops = matmul_flops_per_point()
    print(f"log_prob / sample: {flops / 1e6:.2f} MFLOP of matmuls needed per point (one pass of every tower)")
    print()
    print("| what | unit | best rate | best vs best tfb.RealNVP | ratio within a round: median (range) | "
          "needed matmul GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    for what, unit, rate, ratio, paired in rows:
        gflops = f"{rate * flops / 1e9:.0f}" if unit == "points/s" else "-"
        within = "-" if paired is None else f"{paired[0]:.3f} ({paired[1]:.3f}-{paired[2]:.3f})"
        print(f"| {what} | {unit} | {rate:,.1f} | {ratio:.3f} | {within} | {gflops} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conditions": conditions, "args": vars(args), "matmul_flops_per_point": flops,
                       "rows": [dict(what=w, unit=u, rate=r, ratio=q, ratio_within_round=m)
                                for w, u, r, q, m in rows]}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
