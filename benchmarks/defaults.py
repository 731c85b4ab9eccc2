"""Which defaults reach a good two-moons density fast: candidate recipes, several seeds each.

Every run trains a RealNVP on `two_moons(3000, seed=s)` and scores the mean negative log-likelihood of 20 000
fresh points `two_moons(20000, seed=10000 + s)` against the exact bound `moons_entropy()` (1.1312 nats).
Each (recipe, seed) runs in a fresh process pinned to one TensorFlow thread, so process CPU time is close to
what the run costs on a quiet machine even when the machine is shared (wall time then counts other people's
work too). Reported per run: held-out NLL, optimizer steps, epochs, process CPU seconds (all, and after the
first step, which pays for tracing and XLA compilation), wall seconds, and the learning curve: held-out NLL on
5000 of the fresh points at every epoch end, with the CPU seconds until it first reaches 1.20 (the clocks
leave the scoring out).

    python benchmarks/defaults.py                               # every recipe, seeds 0 1 2, 3 processes at a time
    python benchmarks/defaults.py --recipes package quickstart --seeds 0 1 2 3
    python benchmarks/defaults.py --list
    python benchmarks/defaults.py --quick --out /tmp/runs.jsonl --json /tmp/defaults.json   # smoke run

Results are appended as JSON lines to --out (default benchmarks/defaults_results.jsonl) and summarised as a
markdown table (mean +/- sd over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# A recipe: the flow (`couplings` x `hidden`), Adam's peak rate `lr` with `schedule` ("const", or "cosine":
# linear warmup over `warmup` of the steps, then cosine decay to `alpha` x peak at the last step), `batch`,
# `epochs`, an optional validation split with early stopping on val_nll (`val`, `patience`), XLA (`jit`).
# "package" recipes use the package's defaults instead: `real_nvp([2])`, `FlowModel.compile()` and `fit(x,
# epochs=...)` with nothing else; "quickstart" is the README quick start exactly as proposed.
BASE = dict(couplings=8, hidden=(128, 128), lr=1e-3, schedule="const", warmup=0.0, alpha=0.01, batch=256,
            epochs=50, val=0.0, patience=None, jit=True)
RECIPES = {
    # the README quick start before this change (8 x (128, 128), Adam 1e-3, 50 epochs, val 0.1, patience 10)
    "old-quickstart": dict(val=0.1, patience=10),
    # examples/two_moons.py's recipe when it held 10% out (it now trains on all 3000 points, no early stopping):
    # 16 x (64, 64), 5e-3 cosine, batch 300, 170 epochs, val 0.1
    "example": dict(couplings=16, hidden=(64, 64), lr=5e-3, schedule="cosine", batch=300, epochs=170, val=0.1,
                    patience=85),
    # short cosine runs on all 3000 points, no validation; 3000 / batch steps per epoch
    "8x128-lr5e-3-b300-600": dict(lr=5e-3, schedule="cosine", warmup=0.05, batch=300, epochs=60),
    "8x128-lr5e-3-b300-1000": dict(lr=5e-3, schedule="cosine", warmup=0.05, batch=300, epochs=100),
    "8x128-lr1e-2-b300-1000": dict(lr=1e-2, schedule="cosine", warmup=0.05, batch=300, epochs=100),
    "16x64-lr5e-3-b300-600": dict(couplings=16, hidden=(64, 64), lr=5e-3, schedule="cosine", warmup=0.05,
                                  batch=300, epochs=60),
    "16x64-lr5e-3-b300-1000": dict(couplings=16, hidden=(64, 64), lr=5e-3, schedule="cosine", warmup=0.05,
                                   batch=300, epochs=100),
    "16x64-lr1e-2-b300-600": dict(couplings=16, hidden=(64, 64), lr=1e-2, schedule="cosine", warmup=0.05,
                                  batch=300, epochs=60),
    "16x64-lr5e-3-b600-600": dict(couplings=16, hidden=(64, 64), lr=5e-3, schedule="cosine", warmup=0.05,
                                  batch=600, epochs=120),
    "12x64-lr5e-3-b300-1000": dict(couplings=12, hidden=(64, 64), lr=5e-3, schedule="cosine", warmup=0.05,
                                   batch=300, epochs=100),
    # the same without XLA (FlowModel's default on CPU), 720 steps: peak rate and batch size
    "16x64-lr1e-2-b256-720-noxla": dict(couplings=16, hidden=(64, 64), lr=1e-2, schedule="cosine", warmup=0.05,
                                        batch=256, epochs=60, jit=False),
    "16x64-lr5e-3-b512-720-noxla": dict(couplings=16, hidden=(64, 64), lr=5e-3, schedule="cosine", warmup=0.05,
                                        batch=512, epochs=120, jit=False),
    "16x64-lr1e-2-b512-720-noxla": dict(couplings=16, hidden=(64, 64), lr=1e-2, schedule="cosine", warmup=0.05,
                                        batch=512, epochs=120, jit=False),
    "16x64-lr5e-3-b1000-720-noxla": dict(couplings=16, hidden=(64, 64), lr=5e-3, schedule="cosine", warmup=0.05,
                                         batch=1000, epochs=240, jit=False),
    "16x64-lr5e-3-b256-1200-noxla": dict(couplings=16, hidden=(64, 64), lr=5e-3, schedule="cosine", warmup=0.05,
                                         batch=256, epochs=100, jit=False),
    # the package's defaults: real_nvp([2]) + FlowModel.compile() + fit(x, epochs=E)
    "package-e40": dict(package=True, epochs=40),
    "package-e60": dict(package=True, epochs=60),
    "package-e100": dict(package=True, epochs=100),
    "package-e150": dict(package=True, epochs=150),
    # the proposed README quick start, verbatim in spirit (see run_quickstart)
    "quickstart": dict(quickstart=True),
    # the README quick start with Keras' own Adam (compile()'s default) in place of the quick start's
    # tfp_nvp.FusedAdam (the same update rule; FusedAdam runs it as one op per weight)
    "quickstart-noise0.03-kerasadam": dict(quickstart=True, noise=0.03, keras_adam=True),
    # the quick start's loop on spline_flow([2]): its builder defaults (4 spline couplings of (128, 128)), and
    # the layout of examples/two_moons.py's spline recipe (8 couplings of (64, 64))
    "quickstart-spline": dict(quickstart=True, noise=0.03, builder="spline_flow"),
    "quickstart-spline-8x64": dict(quickstart=True, noise=0.03, builder="spline_flow",
                                   builder_kwargs=dict(num_coupling_layers=8, hidden_units=(64, 64))),
    # the same with FlowModel(training_noise=s): every training batch jittered by N(0, s^2) (standardized units)
    "quickstart-noise0.02": dict(quickstart=True, noise=0.02),
    "quickstart-noise0.03": dict(quickstart=True, noise=0.03),
    "quickstart-noise0.04": dict(quickstart=True, noise=0.04),
    "quickstart-noise0.05": dict(quickstart=True, noise=0.05),
    # the quick start with a longer cosine budget (its slow seeds' curves still fall at epoch 150)
    "quickstart-noise0.03-e200": dict(quickstart=True, noise=0.03, epochs=200),
    "quickstart-noise0.03-e250": dict(quickstart=True, noise=0.03, epochs=250),
    # the quick start with one optimizer or batch setting changed (`optimizer`: FusedAdam keyword arguments,
    # `peak`: the schedule's peak rate, `batch_size`: fit's); "-clip1" is the README quick start as written
    "quickstart-noise0.03-clip1": dict(quickstart=True, noise=0.03, optimizer=dict(clipnorm=1.0)),
    "quickstart-noise0.03-peak1e-2": dict(quickstart=True, noise=0.03, peak=1e-2),
    "quickstart-noise0.03-b128": dict(quickstart=True, noise=0.03, batch_size=128),
}


class _FirstStepClock:
    """Process CPU time when the first training step ends (tracing and XLA compilation included)."""

    def __init__(self, keras):
        clock = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if clock.first is None:
                    clock.first = time.process_time()

        self.first = None
        self.callback = Callback()


TARGET = 1.20  # held-out NLL the time-to-quality figures are measured to


def _first_reaching(seconds, nll):
    return next((t for t, v in zip(seconds, nll) if v <= TARGET), None)


def run_one(name: str, seed: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import tfp_nvp
    from tfp_nvp.data import moons_entropy, two_moons

    recipe = {**BASE, **RECIPES[name]}
    keras.utils.set_random_seed(seed)
    x = two_moons(3000, seed=seed)
    x_test = two_moons(20_000, seed=10_000 + seed)
    from two_moons import LearningCurve  # benchmarks/two_moons.py's held-out curve (its clocks skip the scoring)

    clock = _FirstStepClock(keras)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    # Nothing scored before the first step, so the first-step clock counts training alone; the scoring's tracing
    # happens at the first epoch end, off the clocks like every scoring.
    curve = LearningCurve(x_test[:5000], start=(wall0, cpu0), score_untrained=False)
    if recipe.get("quickstart"):
        model, history = run_quickstart(x, seed, extra_callbacks=[clock.callback, curve],
                                        keras_adam=recipe.get("keras_adam", False), noise=recipe.get("noise"),
                                        builder=recipe.get("builder", "real_nvp"),
                                        builder_kwargs=recipe.get("builder_kwargs", {}),
                                        epochs=RECIPES[name].get("epochs", 150),  # not BASE's 50
                                        optimizer=recipe.get("optimizer"), peak=recipe.get("peak"),
                                        batch_size=recipe.get("batch_size"))
    elif recipe.get("package"):
        model = tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], seed=seed))
        model.compile()
        history = model.fit(x, epochs=recipe["epochs"], verbose=0, callbacks=[clock.callback, curve])
    else:
        flow = tfp_nvp.real_nvp([2], num_coupling_layers=recipe["couplings"], hidden_units=recipe["hidden"],
                                seed=seed)
        model = tfp_nvp.FlowModel(flow)
        n_train = int(len(x) * (1 - recipe["val"]))
        steps = recipe["epochs"] * -(-n_train // recipe["batch"])
        if recipe["schedule"] == "cosine":
            warmup = int(recipe["warmup"] * steps)
            lr = keras.optimizers.schedules.CosineDecay(
                recipe["lr"] if not warmup else 0.0, decay_steps=steps - warmup, alpha=recipe["alpha"],
                warmup_target=recipe["lr"] if warmup else None, warmup_steps=warmup)
        else:
            lr = recipe["lr"]
        model.compile(optimizer=keras.optimizers.Adam(lr), jit_compile=recipe["jit"])
        callbacks = [clock.callback, curve]
        if recipe["patience"]:
            callbacks.append(keras.callbacks.EarlyStopping("val_nll", patience=recipe["patience"],
                                                           restore_best_weights=True))
        history = model.fit(x, epochs=recipe["epochs"], batch_size=recipe["batch"], validation_split=recipe["val"],
                            callbacks=callbacks, verbose=0)
    cpu = time.process_time() - cpu0 - curve.paused_cpu
    wall = time.perf_counter() - wall0 - curve.paused
    steps = int(model.optimizer.iterations.numpy())
    nll = float(-np.mean(model.log_prob(x_test)))
    # The first step ends inside the first epoch, before any scoring: nothing to exclude from it.
    return dict(recipe=name, seed=seed, nll=nll, gap=nll - moons_entropy(), steps=steps,
                epochs=len(history.history["loss"]), cpu=cpu, cpu_after_first=cpu - (clock.first - cpu0),
                wall=wall, finite=bool(np.isfinite(nll)), cpu_to_target=_first_reaching(curve.cpu_seconds, curve.nll),
                wall_to_target=_first_reaching(curve.seconds, curve.nll), target=TARGET,
                curve=dict(cpu=curve.cpu_seconds, wall=curve.seconds, nll=curve.nll, points=5000))


def run_quickstart(x, seed, extra_callbacks=(), keras_adam=False, noise=None, builder="real_nvp",
                   builder_kwargs=None, epochs=150, optimizer=None, peak=None, batch_size=None):
    """The README quick start: the package's defaults, 150 epochs (1800 steps of 256); another builder or
    budget if asked."""
    import keras
    import tfp_nvp

    flow = getattr(tfp_nvp, builder)([2], seed=seed, **(builder_kwargs or {}))
    model = tfp_nvp.FlowModel(flow, training_noise=noise)
    schedule = tfp_nvp.WarmupCosineDecay(**({} if peak is None else dict(peak_learning_rate=peak)))
    if keras_adam:
        model.compile(optimizer=keras.optimizers.Adam(schedule))
    elif optimizer is not None or peak is not None:
        model.compile(optimizer=tfp_nvp.FusedAdam(schedule, **(optimizer or {})))
    else:
        model.compile()
    history = model.fit(x, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=list(extra_callbacks))
    return model, history


def summary_rows(rows: list[dict]) -> list[dict]:
    """The numbers of `summarise`'s table, one dict per recipe."""
    import numpy as np

    out = []
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == name]
        nll = np.array([r["nll"] for r in rs])
        mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
        out.append(dict(recipe=name, seeds=len(rs), nll_mean=float(nll.mean()),
                         nll_sd=float(nll.std(ddof=1)) if len(rs) > 1 else 0.0, nll_worst=float(nll.max()),
                         steps=mean("steps"), epochs=mean("epochs"), cpu_seconds=mean("cpu"),
                         cpu_seconds_after_first_step=mean("cpu_after_first"),
                         steps_per_cpu_second=float(np.mean([(r["steps"] - 1) / r["cpu_after_first"] for r in rs])),
                         wall_seconds=mean("wall"), cpu_seconds_to_target=[r.get("cpu_to_target") for r in rs]))
    return out


def summarise(rows: list[dict]) -> str:
    import numpy as np

    lines = ["| recipe | seeds | held-out NLL mean +/- sd | worst | steps | epochs | CPU s | CPU s after 1st step "
             f"| steps / CPU s | wall s (shared) | CPU s to {TARGET:.2f}, per seed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_recipe: dict[str, list[dict]] = {}
    for row in rows:
        by_recipe.setdefault(row["recipe"], []).append(row)
    for name, rs in by_recipe.items():
        nll = np.array([r["nll"] for r in rs])
        mean = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
        rate = np.mean([(r["steps"] - 1) / r["cpu_after_first"] for r in rs])
        lines.append(f"| {name} | {len(rs)} | {nll.mean():.4f} +/- {nll.std(ddof=1) if len(rs) > 1 else 0:.4f} "
                     f"| {nll.max():.4f} | {mean('steps'):.0f} | {mean('epochs'):.0f} | {mean('cpu'):.1f} "
                     f"| {mean('cpu_after_first'):.1f} | {rate:.0f} | {mean('wall'):.1f} | {_to_target(rs)} |")
    return "\n".join(lines)


def _to_target(rows) -> str:
    """Per seed: CPU seconds until the held-out curve first reached TARGET, "never", or "-" (not recorded)."""
    def one(r):
        if "curve" not in r:
            return "-"
        return "never" if r.get("cpu_to_target") is None else f"{r['cpu_to_target']:.1f}"
    return ", ".join(one(r) for r in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=3, help="processes at a time")
    parser.add_argument("--out", default=None,
                        help="JSON lines file the runs are appended to (default benchmarks/defaults_results.jsonl; "
                             "with --quick a fresh file in the temporary folder)")
    parser.add_argument("--summary", action="store_true", help="only print the table of --out")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: recipe package-e40, seed 0, one process")
    parser.add_argument("--json", default=None,
                        help="also write the summary table and the rows it summarises to this JSON file")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for name, recipe in RECIPES.items():
            print(name, {**BASE, **recipe})
        return
    if args.run:
        print(json.dumps(run_one(args.run, args.seed)), flush=True)
        return
    if args.quick:
        args.recipes, args.seeds, args.jobs = args.recipes or ["package-e40"], [0], 1
        if args.out is None:
            # A smoke run must not land in the real results file.
            args.out = os.path.join(tempfile.gettempdir(), "defaults_quick.jsonl")
            open(args.out, "w").close()
    args.out = args.out or "benchmarks/defaults_results.jsonl"
    if not args.summary:
        names = args.recipes or list(RECIPES)
        unknown = [n for n in names if n not in RECIPES]
        if unknown:
            parser.error(f"unknown recipes {unknown}; --list shows them")
        # seeds outermost: a first pass over every recipe finishes before any second seed
        queue = [(n, s) for s in args.seeds for n in names]
        running: list[tuple[subprocess.Popen, str, int]] = []
        while queue or running:
            while queue and len(running) < args.jobs:
                name, seed = queue.pop(0)
                proc = subprocess.Popen([sys.executable, __file__, "--run", name, "--seed", str(seed)],
                                        stdout=subprocess.PIPE, text=True)
                running.append((proc, name, seed))
            time.sleep(1.0)
            for item in list(running):
                proc, name, seed = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                out = proc.stdout.read().strip().splitlines()
                if proc.returncode or not out:
                    print(f"{name} seed {seed}: failed (exit {proc.returncode})", flush=True)
                    continue
                with open(args.out, "a") as f:
                    f.write(out[-1] + "\n")
                r = json.loads(out[-1])
                print(f"{name} seed {seed}: NLL {r['nll']:.4f}, {r['steps']} steps, {r['cpu']:.1f} s CPU, "
                      f"{r['wall']:.1f} s wall", flush=True)
    with open(args.out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print()
    print(summarise(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(benchmark="defaults", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), runs_file=args.out,
                           summary=summary_rows(rows), rows=rows), f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
