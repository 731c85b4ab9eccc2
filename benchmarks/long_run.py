"""Long runs stay finite: 10 000 Adam steps at a constant 1e-3 on two moons and on the digits, then checks.

Two models, each trained for `--steps` optimizer steps with `FlowModel.fit` (XLA), `keras.callbacks.TerminateOnNaN`
watching every batch:
  moons   `tfp_nvp.real_nvp([2], num_coupling_layers=8, hidden_units=(128, 128))` (the figures in README.md
          were measured with this network), 3000 standardized moons, the example's recipe (10 %
          validation split, batch 300);
  digits  `tfp_nvp.glow([8, 8, 1])` with its defaults, `FlowModel(levels=17)`, ActNorm initialised from 512
          training images, batch 64, the 200-image validation split of `tfp_nvp.images.load_digits_splits`.

Reported as a markdown table: steps run, whether any batch loss or any weight went NaN/Inf, final training /
validation / test NLL (bits/dim for the digits), and the round trip `|f(f^-1(x)) - x| / |x|` (f = forward,
latent -> data) at growing input norms:
  moons   data-side points in random directions scaled to norms 1, 10, 100, 1000 (far outside the data,
          where the couplings' networks see inputs they were never trained on);
  digits  (a) dequantized test images, the flow's support `[0, 1)`; (b) the flow inside the logit transform,
          whose inputs are unbounded: logit-space test images rescaled to norms 1, 10, 100, 1000.

    python benchmarks/long_run.py                    # 10 000 steps each (the digits take ~20 min on 2 cores)
    python benchmarks/long_run.py --quick            # a few hundred steps each, a smoke run
    python benchmarks/long_run.py --only moons --steps 2000 --clipnorm 1.0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp import images  # noqa: E402
from tfp_nvp.data import moons_entropy, two_moons  # noqa: E402

NORMS = (1.0, 10.0, 100.0, 1000.0)


class StepBudget(keras.callbacks.Callback):
    """Stops after exactly `steps` optimizer steps and remembers the first step whose loss was not finite."""

    def __init__(self, steps: int, name: str, report_every: int = 1000):
        super().__init__()
        self.steps, self.name, self.report_every = steps, name, report_every
        self.start = time.perf_counter()
        self.done = 0
        self.first_bad_step = None
        self.after_first_epoch = None  # (steps, time) when the first epoch (tracing, compilation) ended

    def on_epoch_end(self, epoch, logs=None):
        if self.after_first_epoch is None:
            self.after_first_epoch = (self.done, time.perf_counter())

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        loss = (logs or {}).get("loss")
        if self.first_bad_step is None and loss is not None and not math.isfinite(float(loss)):
            self.first_bad_step = self.done
        if self.done % self.report_every == 0:
            # Progress for long runs on a shared machine: the epoch's running mean loss so far.
            print(f"  {self.name}: step {self.done}, loss {float(loss):.4f}, "
                  f"{time.perf_counter() - self.start:.0f} s", flush=True)
        if self.done >= self.steps:
            self.model.stop_training = True


def fit(model, x, steps: int, batch_size: int, clipnorm, name: str, **fit_kwargs):
    optimizer = keras.optimizers.Adam(1e-3, clipnorm=clipnorm)  # constant rate: no schedule on purpose
    model.compile(optimizer=optimizer, jit_compile=True)
    n_train = len(x) if fit_kwargs.get("validation_split") is None else \
        int(math.floor(len(x) * (1 - fit_kwargs["validation_split"])))
    epochs = math.ceil(steps / math.ceil(n_train / batch_size))
    budget = StepBudget(steps, name)
    start = time.perf_counter()
    history = model.fit(x, batch_size=batch_size, epochs=epochs, verbose=0,
                        callbacks=[keras.callbacks.TerminateOnNaN(), budget], **fit_kwargs)
    end = time.perf_counter()
    seconds = end - start
    first_steps, first_end = budget.after_first_epoch or (0, start)
    steady = (budget.done - first_steps) / (end - first_end) if budget.done > first_steps else float("nan")
    finite_history = all(math.isfinite(v) for values in history.history.values() for v in values)
    finite_weights = all(bool(np.all(np.isfinite(w.numpy()))) for w in model.weights)
    return dict(steps=budget.done, seconds=seconds, steady=steady, bad_step=budget.first_bad_step,
                finite_history=finite_history, finite_weights=finite_weights, history=history.history)


def round_trip(bijector, x) -> np.ndarray:
    """Per-example `|forward(inverse(x)) - x| / |x|`, computed without TFP's bijector cache."""
    # TFP caches inverse(x) -> x; feeding a fresh copy of the latent makes forward really recompute.
    z = tf.constant(bijector.inverse(tf.constant(x)).numpy())
    back = bijector.forward(z).numpy()
    axes = tuple(range(1, x.ndim))
    err = np.sqrt(((back.astype(np.float64) - x) ** 2).sum(axes)) / np.sqrt((x.astype(np.float64) ** 2).sum(axes))
    return np.where(np.isfinite(err), err, np.inf)


def scaled(directions: np.ndarray, norm: float) -> np.ndarray:
    axes = tuple(range(1, directions.ndim))
    unit = directions / np.sqrt((directions**2).sum(axes, keepdims=True))
    return (unit * norm).astype(np.float32)


def summarize(err: np.ndarray) -> str:
    return f"{np.median(err):.1e} / {np.max(err):.1e}"


def run_moons(steps: int, seed: int, clipnorm) -> dict:
    keras.utils.set_random_seed(seed)
    x = two_moons(3000, seed=seed)
    model = tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=8, hidden_units=(128, 128), seed=seed))
    out = fit(model, x, steps, batch_size=300, clipnorm=clipnorm, name="moons", validation_split=0.1)
    x_test = two_moons(20_000, seed=seed + 10_000)
    out["train"] = float(-np.mean(model.log_prob(x[:2700])))
    out["validation"] = float(-np.mean(model.log_prob(x[2700:])))
    out["test"] = float(-np.mean(model.log_prob(x_test)))
    out["unit"] = f"nats (bound {moons_entropy():.3f})"
    directions = np.random.default_rng(seed).standard_normal((1000, 2))
    out["round_trip"] = {f"|x| = {n:g}": round_trip(model.distribution.bijector, scaled(directions, n))
                         for n in NORMS}
    out["round_trip"]["data"] = round_trip(model.distribution.bijector, x_test[:1000])
    return out


def run_digits(steps: int, seed: int, clipnorm) -> dict:
    keras.utils.set_random_seed(seed)
    data = images.load_digits_splits(num_validation=200, seed=seed)
    levels = images.DIGITS_LEVELS
    flow = tfp_nvp.glow(data["train"].shape[1:], seed=seed)
    model = tfp_nvp.FlowModel(flow, levels=levels)
    tfp_nvp.initialize(model, images.dequantize(data["train"][:512], levels, seed=(seed, 0)))
    out = fit(model, data["train"], steps, batch_size=64, clipnorm=clipnorm, name="digits",
              validation_data=(data["validation"],))
    num_dims = int(np.prod(data["train"].shape[1:]))
    for index, split in enumerate(("train", "validation", "test")):
        # Per image, on one seeded dequantization: an image the flow maps beyond float32 has log-density -inf
        # and would make the mean infinite; the table gives the mean over the others and their count.
        x_split = images.dequantize(data[split], levels, seed=(seed, 10 + index))
        bpd = images.bits_per_dim(-model.log_prob(x_split).numpy(), num_dims, levels)
        out[split] = (float(np.mean(bpd[np.isfinite(bpd)])), int(np.sum(~np.isfinite(bpd))), len(bpd))
    out["unit"] = "bits/dim"
    x_test = images.dequantize(data["test"], levels, seed=(seed, 3)).numpy()
    full = flow.bijector
    # glow's data-side chain is [LogitTransform, inner flow]; the inner flow models logit space.
    inner = full.bijectors[-1]
    u = tfp.bijectors.Chain(full.bijectors[:-1]).inverse(x_test).numpy()
    out["round_trip"] = {"data in [0, 1)": round_trip(full, x_test)}
    out["round_trip"].update({f"logit space |u| = {n:g}": round_trip(inner, scaled(u, n)) for n in NORMS})
    out["round_trip"]["logit space, data"] = round_trip(inner, u)
    return out


def score(value) -> str:
    """A mean, or (mean over finite examples, number not finite, number of examples)."""
    if isinstance(value, tuple):
        mean, bad, total = value
        return f"{mean:.4f}" + (f" ({bad} of {total} at -inf log-density)" if bad else "")
    return f"{value:.4f}"


def table(results: dict, clipnorm) -> str:
    lines = [
        f"clipnorm={clipnorm}; round trip: median / max of `|f(f^-1(x)) - x| / |x|` over the inputs "
        "(inf = not finite)", "",
        "| model | steps run | wall s | steps/s after epoch 1 | NaN/Inf in loss | NaN/Inf in weights "
        "| train | validation | test | unit |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        loss_bad = "no" if r["bad_step"] is None and r["finite_history"] else f"yes (first at step {r['bad_step']})"
        lines.append(
            f"| {name} | {r['steps']} | {r['seconds']:.0f} | {r['steady']:.1f} | {loss_bad} | "
            f"{'no' if r['finite_weights'] else 'yes'} | {score(r['train'])} | {score(r['validation'])} | "
            f"{score(r['test'])} | {r['unit']} |"
        )
    lines += ["", "| model | inputs | round trip median / max |", "|---|---|---:|"]
    for name, r in results.items():
        lines += [f"| {name} | {label} | {summarize(err)} |" for label, err in r["round_trip"].items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000, help="optimizer steps per model")
    parser.add_argument("--quick", action="store_true", help="300 steps each (smoke run)")
    parser.add_argument("--only", choices=("moons", "digits"), help="run one model only")
    parser.add_argument("--clipnorm", type=float, default=None, help="Adam's clipnorm (default: no clipping)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the tables' numbers to this JSON file")
    args = parser.parse_args()
    steps = 300 if args.quick else args.steps
    if steps <= 0:
        parser.error("--steps must be positive")
    runners = {"moons": ("two moons, real_nvp defaults", run_moons),
               "digits": ("digits, glow defaults", run_digits)}
    results = {}
    for key, (name, run) in runners.items():
        if args.only in (None, key):
            results[name] = run(steps, args.seed, args.clipnorm)
            print(f"{name}: {results[name]['steps']} steps in {results[name]['seconds']:.0f} s", flush=True)
    print(f"\nTF {tf.__version__}, Keras {keras.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Adam 1e-3 constant, XLA\n")
    print(table(results, args.clipnorm))
    if args.json:
        write_json(args, results)


def write_json(args, results: dict):
    """The tables' numbers; each round trip as its median and max, like the table."""
    def number(value):
        # Digits scores are (mean over finite images, images not finite, images).
        if isinstance(value, tuple):
            return dict(mean=value[0], not_finite=value[1], total=value[2])
        return value

    models = {}
    for name, r in results.items():
        models[name] = dict(
            steps=r["steps"], seconds=r["seconds"], steps_per_second_after_epoch_1=r["steady"],
            first_non_finite_step=r["bad_step"], finite_history=r["finite_history"],
            finite_weights=r["finite_weights"], train=number(r["train"]), validation=number(r["validation"]),
            test=number(r["test"]), unit=r["unit"],
            round_trip={label: dict(median=float(np.median(err)), max=float(np.max(err)))
                        for label, err in r["round_trip"].items()})
    config = {k: v for k, v in vars(args).items() if k != "json"}
    with open(args.json, "w") as f:
        # Infinite round-trip errors become the JSON extension Infinity, which Python's json reads back.
        json.dump(dict(benchmark="long_run", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), config=config,
                       tensorflow=tf.__version__, keras=keras.__version__, cpus=os.cpu_count(),
                       load_average=os.getloadavg(), models=models), f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
