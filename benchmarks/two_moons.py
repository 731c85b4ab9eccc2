"""Two moons in one run: the book's Keras RealNVP, TFP's tfb.RealNVP, and tfp_nvp's example recipes.

Every model sees the same 3000 standardized training moons (noise 0.05) and is scored on the same 20000
fresh moons: held-out NLL in nats per point, its gap to the exact entropy bound `tfp_nvp.data.moons_entropy()`
(no model can go below it), and training wall time. Ratios are against the book's model.

    python benchmarks/two_moons.py                  # the book's 300 epochs: several minutes on 2 cores
    python benchmarks/two_moons.py --quick          # smoke run (a few epochs each)
    python benchmarks/two_moons.py --epochs-book 100 --epochs-tfp 100 --epochs-ours 100

(a) "book": a re-implementation of the chapter's model in Keras 3: six couplings with separate 4x256 ReLU
    towers for s (tanh head) and t, L2 0.01 declared on every kernel, alternating masks [0,1] / [1,0], a custom
    `train_step`, Adam 1e-4, batch 256, no validation. Like the book's own `train_step`, the loss is the NLL
    alone: the declared L2 penalties are never added to it, so they do not act.
(b) "tfp": `tfb.RealNVP` couplings (one masked dimension) interleaved with `tfb.Permute`, each with a
    `tf.Module` MLP conditioner (two 256-unit ReLU layers, linear shift and log-scale heads), trained with the
    book's optimizer and batch size by a `tf.function(jit_compile=True)` loop.
(c) "ours", "spline", "ffjord": examples/two_moons.py's recipes for `--flow real_nvp / spline / ffjord`
    (FlowModel.fit, cosine decay, no XLA; spline and FFJORD with a validation split and early stopping),
    each run for `--seeds` seeds; the table gives the median NLL over seeds with min and max, and the median time.

Learning curves for (c): at every epoch end a callback scores the held-out NLL of a fixed subsample of
`--curve-points` test points (default 5000) and stamps it with the training seconds so far; the time spent
scoring is taken off the clock, so a curve shows what training alone bought. A second table compares the
flows at equal wall time: each one's curve point at the last evaluation at or before a common budget (default:
the shortest of the recipes' median training times; `--budget-seconds` sets it). `--json PATH` writes both
tables and every curve.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from keras import layers, regularizers  # noqa: E402

from tfp_nvp.data import moons_entropy, two_moons  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions


# ------------------------------------------------------------------------------------------------ (a) book
def book_coupling(dim: int = 2, units: int = 256, reg: float = 0.01) -> keras.Model:
    def tower(h, head_activation):
        for _ in range(4):
            h = layers.Dense(units, activation="relu", kernel_regularizer=regularizers.l2(reg))(h)
        return layers.Dense(dim, activation=head_activation, kernel_regularizer=regularizers.l2(reg))(h)

    inputs = keras.Input(shape=(dim,))
    return keras.Model(inputs, [tower(inputs, "tanh"), tower(inputs, "linear")])


class BookRealNVP(keras.Model):
    """The chapter's model: `call(x, training=True)` maps data to latent and returns the inverse log-det."""

    def __init__(self, num_couplings: int = 6, units: int = 256, reg: float = 0.01):
        super().__init__()
        self.num_couplings = num_couplings
        self.base = tfd.MultivariateNormalDiag(loc=[0.0, 0.0], scale_diag=[1.0, 1.0])
        self.masks = np.array([[0, 1], [1, 0]] * (num_couplings // 2), dtype="float32")
        self.couplings = [book_coupling(2, units, reg) for _ in range(num_couplings)]
        self.loss_tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, x, training=True):
        # direction -1 (training): data -> latent, couplings in reverse order; +1: latent -> data.
        direction = -1 if training else 1
        log_det = tf.zeros(tf.shape(x)[:1])
        for i in range(self.num_couplings)[::direction]:
            mask = self.masks[i]
            x_masked = x * mask
            s, t = self.couplings[i](x_masked)
            s, t = s * (1 - mask), t * (1 - mask)
            if training:
                x = (1 - mask) * (x - t) * tf.exp(-s) + x_masked
                log_det -= tf.reduce_sum(s, axis=1)
            else:
                x = (1 - mask) * (x * tf.exp(s) + t) + x_masked
                log_det += tf.reduce_sum(s, axis=1)
        return x, log_det

    def log_prob(self, x):
        z, log_det = self(x, training=True)
        return self.base.log_prob(z) + log_det

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(self.log_prob(data))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        self.loss_tracker.update_state(-tf.reduce_mean(self.log_prob(data)))
        return {"loss": self.loss_tracker.result()}


def run_book(x, x_test, epochs, seed):
    keras.utils.set_random_seed(seed)
    model = BookRealNVP()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-4))
    start = time.perf_counter()
    model.fit(x, batch_size=256, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    return seconds, float(-np.mean(model.log_prob(x_test)))


# ------------------------------------------------------------------------------------------------ (b) TFP
class MLP(tf.Module):
    """Conditioner for tfb.RealNVP: `(x_masked, output_units) -> (shift, log_scale)`."""

    def __init__(self, in_units, out_units, hidden=(256, 256), seed=0, name=None):
        super().__init__(name=name)
        init = keras.initializers.GlorotUniform(seed=seed)
        sizes = [in_units, *hidden, 2 * out_units]
        self.kernels = [tf.Variable(init((a, b)), name=f"w{i}") for i, (a, b) in enumerate(zip(sizes, sizes[1:]))]
        self.biases = [tf.Variable(tf.zeros([b]), name=f"b{i}") for i, b in enumerate(sizes[1:])]

    def __call__(self, x, output_units, **_):
        h = x
        for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
            h = h @ w + b
            if i < len(self.kernels) - 1:
                h = tf.nn.relu(h)
        shift, log_scale = tf.split(h, 2, axis=-1)
        return shift, log_scale


def tfp_flow(num_couplings=6, seed=0, conditioner=MLP):
    """`tfb.RealNVP` couplings (one masked dimension) interleaved with `tfb.Permute([1, 0])` on 2-D data.

    `conditioner(in_units, out_units, seed=...)` makes each coupling's shift-and-log-scale function.
    """
    bijectors = []
    for i in range(num_couplings):
        bijectors.append(tfb.RealNVP(num_masked=1, shift_and_log_scale_fn=conditioner(1, 1, seed=seed + i)))
        if i < num_couplings - 1:
            bijectors.append(tfb.Permute([1, 0]))
    return tfd.TransformedDistribution(tfd.MultivariateNormalDiag(loc=tf.zeros(2)), tfb.Chain(bijectors))


def xla_adam_step(flow, learning_rate=1e-4):
    """A `tf.function(jit_compile=True)` Adam step on the mean NLL of a batch, over the flow's variables."""
    variables = flow.trainable_variables
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def step(xb):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(xb))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return step


def run_tfp(x, x_test, epochs, seed, batch=256):
    tf.random.set_seed(seed)
    flow = tfp_flow(seed=seed)
    step = xla_adam_step(flow)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        xs = x[rng.permutation(len(x))]
        for i in range(0, len(xs), batch):
            step(tf.constant(xs[i:i + batch]))
    seconds = time.perf_counter() - start
    return seconds, float(-np.mean(flow.log_prob(x_test)))


# ------------------------------------------------------------------------------------------------ (c) ours
def load_example():
    spec = importlib.util.spec_from_file_location(
        "two_moons_example", Path(__file__).resolve().parents[1] / "examples" / "two_moons.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


class LearningCurve(keras.callbacks.Callback):
    """Held-out NLL of `x_eval` against training seconds, recorded before training and at every epoch end.

    Two clocks, wall (`seconds`) and process CPU (`cpu_seconds`), start when the callback is made (just before
    training) or at `start=(wall, cpu)`, and stop while it scores, so the seconds it reports are training's alone
    (Keras' own validation pass included, as it is part of the recipe); `paused` and `paused_cpu` are the
    scoring's. `score_untrained=False` skips the point before training (so nothing is scored before the first
    step). Also used by benchmarks/defaults.py.
    """

    def __init__(self, x_eval, start=None, score_untrained=True):
        super().__init__()
        self.x_eval = tf.constant(x_eval)
        self.seconds, self.cpu_seconds, self.nll, self.epochs = [], [], [], []
        self._scored = None
        self.paused = self.paused_cpu = 0.0
        self._start, self._start_cpu = start or (time.perf_counter(), time.process_time())
        self._score_untrained = score_untrained

    def _record(self, epoch):
        pause, pause_cpu = time.perf_counter(), time.process_time()
        if self._scored is None:
            # One graph for the scoring: the eager path of a deep flow or an ODE solve would dominate the pauses.
            self._scored = tf.function(lambda x: -tf.reduce_mean(self.model.log_prob(x)))
        self.nll.append(float(self._scored(self.x_eval)))
        self.seconds.append(pause - self._start - self.paused)
        self.cpu_seconds.append(pause_cpu - self._start_cpu - self.paused_cpu)
        self.epochs.append(epoch)
        self.paused += time.perf_counter() - pause
        self.paused_cpu += time.process_time() - pause_cpu

    def on_train_begin(self, logs=None):
        if self._score_untrained:
            self._record(0)

    def on_epoch_end(self, epoch, logs=None):
        self._record(epoch + 1)

    @property
    def training_seconds(self):
        return time.perf_counter() - self._start - self.paused


def run_ours(x, x_test, epochs, seed, flow="real_nvp", x_curve=None):
    example = load_example()
    keras.utils.set_random_seed(seed)
    model = example.build_model(seed, flow)
    curve = LearningCurve(x_test[:5000] if x_curve is None else x_curve)
    example.train(model, x, epochs or example.RECIPES[flow]["epochs"], flow, verbose=0, callbacks=[curve])
    seconds = curve.training_seconds  # train() returns wall time with the scoring pauses in it
    nll = float(-np.mean(model.log_prob(x_test)))
    return seconds, nll, dict(seed=seed, flow=flow, seconds=curve.seconds, nll=curve.nll, epochs=curve.epochs,
                              final_nll=nll, train_seconds=seconds)


def run_seeds(x, x_test, epochs, seeds, flow, x_curve=None, curves=None):
    """Median time and NLL over `seeds` runs (the data stay those of `--seed`), plus the NLL range.

    Each run's learning curve is appended to `curves` when given.
    """
    results = [run_ours(x, x_test, epochs, seed, flow, x_curve) for seed in seeds]
    if curves is not None:
        curves.extend(r[2] for r in results)
    seconds, nlls = np.median([r[0] for r in results]), [r[1] for r in results]
    return float(seconds), float(np.median(nlls)), min(nlls), max(nlls)


def nll_at(curve: dict, budget: float):
    """(NLL, seconds, epoch) of the curve's last evaluation at or before `budget` seconds, or None."""
    points = [(n, s, e) for s, n, e in zip(curve["seconds"], curve["nll"], curve["epochs"]) if s <= budget]
    return points[-1] if points else None


def equal_time(curves: dict[str, list[dict]], budget: float | None):
    """Per recipe: median over seeds of the curve NLL at the budget (default: the shortest median run)."""
    if not curves:
        return None
    if budget is None:
        budget = min(float(np.median([c["train_seconds"] for c in cs])) for cs in curves.values())
    rows = []
    for key, cs in curves.items():
        hits = [nll_at(c, budget) for c in cs]
        hits = [h for h in hits if h is not None]
        rows.append(dict(key=key, flow=cs[0]["flow"], seeds=len(cs), seeds_scored=len(hits),
                         nll=float(np.median([h[0] for h in hits])) if hits else None,
                         seconds=float(np.median([h[1] for h in hits])) if hits else None,
                         epoch=int(np.median([h[2] for h in hits])) if hits else None))
    return dict(budget_seconds=budget, rows=rows)


def print_budget_table(curves: dict[str, list[dict]], bound: float, curve_points: int) -> dict:
    """Held-out NLL of every recipe at each recipe's own (median) training time: the equal-time comparison at
    every budget one of the recipes needed, so a slow starter (FFJORD) is compared where it has finished."""
    budgets = sorted({float(np.median([c["train_seconds"] for c in cs])) for cs in curves.values()})
    tables = [equal_time(curves, b) for b in budgets]
    print(f"\nHeld-out NLL ({curve_points} test points, median over seeds) after each recipe's training time; "
          "\"untrained\": no epoch had ended, the value is the flow's before training.\n")
    print("| flow | " + " | ".join(f"after {b:.1f} s" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for i, key in enumerate(curves):
        cells = []
        for t in tables:
            row = t["rows"][i]
            cells.append("" if row["nll"] is None else
                         f"{row['nll']:.4f}" + (" (untrained)" if row["epoch"] == 0 else ""))
        print(f"| {curves[key][0]['flow']} | " + " | ".join(cells) + " |")
    print("| exact bound | " + " | ".join(f"{bound:.4f}" for _ in budgets) + " |")
    return dict(budgets=budgets, tables=tables)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs-book", type=int, default=300, help="the book trains 300 epochs")
    p.add_argument("--epochs-tfp", type=int, default=300)
    p.add_argument("--epochs-ours", type=int, default=None, help="default: each example recipe's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3, help="seeds per example recipe (median reported)")
    p.add_argument("--only", nargs="*", choices=["book", "tfp", "ours", "spline", "ffjord"],
                   default=["book", "tfp", "ours", "spline", "ffjord"])
    p.add_argument("--quick", action="store_true", help="smoke run: 3 epochs each, one seed")
    p.add_argument("--curve-points", type=int, default=5000,
                   help="test points scored at each epoch end for the learning curves")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="training budget of the equal-wall-time table (default: the shortest recipe's time)")
    p.add_argument("--json", default=None, help="also write the tables and learning curves to this JSON file")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="train nothing: print the equal-time tables of the curves saved in PATH by --json")
    args = p.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        if not saved.get("curves"):
            p.error(f"{args.from_json} holds no learning curves (run with --only ours spline ffjord and --json)")
        print_budget_table(saved["curves"], saved["bound"], saved["curve_points"])
        return
    if args.curve_points <= 0:
        p.error(f"--curve-points must be a positive number of test points; got {args.curve_points}")
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        p.error(f"--budget-seconds must be positive; got {args.budget_seconds}")
    if args.quick:
        args.epochs_book = args.epochs_tfp = args.epochs_ours = 3
        args.seeds = 1
    seeds = [args.seed + i for i in range(args.seeds)]
    example = load_example()
    recipes = example.RECIPES

    x = two_moons(3000, seed=args.seed)
    x_test = two_moons(20_000, seed=args.seed + 10_000)
    x_curve = x_test[:args.curve_points]
    bound = moons_entropy()
    load_start = os.getloadavg()
    curves: dict[str, list[dict]] = {}
    runs = {
        "book": (f"book Keras RealNVP (6x separate 4x256, Adam 1e-4, batch 256, {args.epochs_book} epochs)",
                 lambda: run_book(x, x_test, args.epochs_book, args.seed)),
        "tfp": (f"TFP tfb.RealNVP (6x MLP 2x256, Adam 1e-4, batch 256, {args.epochs_tfp} epochs, XLA loop)",
                lambda: run_tfp(x, x_test, args.epochs_tfp, args.seed)),
    }
    for key, flow in (("ours", "real_nvp"), ("spline", "spline"), ("ffjord", "ffjord")):
        epochs = args.epochs_ours or recipes[flow]["epochs"]
        stopping = ("max {} epochs, early stopping" if recipes[flow].get("validation_split", example.VALIDATION_SPLIT)
                    else "{} epochs").format(epochs)
        runs[key] = (f"tfp_nvp `--flow {flow}` ({stopping}; median of {len(seeds)} seeds)",
                     lambda key=key, flow=flow, epochs=epochs: run_seeds(
                         x, x_test, epochs, seeds, flow, x_curve, curves.setdefault(key, [])))
    results = {}
    for key in args.only:
        label, fn = runs[key]
        print(f"running {key} ...", flush=True)
        results[key] = fn()
        print(f"  {results[key][0]:.1f} s, held-out NLL {results[key][1]:.4f}", flush=True)  # medians

    load_end = os.getloadavg()
    print()
    print(f"{time.strftime('%Y-%m-%d')}; {os.cpu_count()} CPUs ({platform.machine()}), TF {tf.__version__}, "
          f"Keras {keras.__version__}, TFP {tfp.__version__}. Held-out: 20000 fresh moons; "
          f"entropy bound {bound:.4f} nats. 1-min load average {load_start[0]:.1f} at start, "
          f"{load_end[0]:.1f} at end.")
    print()
    print("| model | train s | held-out NLL | seeds' range | gap to bound | time / book | gap / book |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ref = results.get("book")
    rows = []
    for key, (seconds, nll, *spread) in results.items():
        gap = nll - bound
        t_ratio = f"{seconds / ref[0]:.2f}" if ref else "-"
        g_ratio = f"{gap / (ref[1] - bound):.2f}" if ref else "-"
        span = f"{spread[0]:.4f}-{spread[1]:.4f}" if spread else "-"
        print(f"| {runs[key][0]} | {seconds:.1f} | {nll:.4f} | {span} | {gap:.4f} | {t_ratio} | {g_ratio} |")
        rows.append(dict(key=key, model=runs[key][0], train_seconds=seconds, nll=nll,
                         nll_min=spread[0] if spread else None, nll_max=spread[1] if spread else None,
                         gap=gap, time_ratio=seconds / ref[0] if ref else None,
                         gap_ratio=gap / (ref[1] - bound) if ref else None))

    same_time = equal_time(curves, args.budget_seconds)
    if same_time:
        budget = same_time["budget_seconds"]
        print()
        print(f"Equal wall time: held-out NLL ({len(x_curve)} test points) at the last epoch end within "
              f"{budget:.1f} s of training (evaluation time excluded; median over seeds).")
        print()
        print("| flow | NLL at budget | gap to bound | at s | epoch |")
        print("|---|---:|---:|---:|---:|")
        for r in same_time["rows"]:
            if r["nll"] is None:
                print(f"| {r['flow']} | no epoch ended within the budget | | | |")
            else:
                print(f"| {r['flow']} | {r['nll']:.4f} | {r['nll'] - bound:.4f} | {r['seconds']:.1f} "
                      f"| {r['epoch']} |")

    by_budget = print_budget_table(curves, bound, len(x_curve)) if curves else None

    if args.json:
        out = dict(
            benchmark="two_moons", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), cpus=os.cpu_count(),
            machine=platform.machine(), tensorflow=tf.__version__, keras=keras.__version__, tfp=tfp.__version__,
            load_average_start=load_start, load_average_end=load_end, bound=bound, test_points=len(x_test),
            curve_points=len(x_curve), seeds=seeds, quick=args.quick, rows=rows, curves=curves,
            equal_time=same_time, equal_time_by_budget=by_budget)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
