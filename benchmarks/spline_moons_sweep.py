"""Train one spline-flow recipe on two moons and print its held-out NLL, wall and process CPU time.

The recipe is JSON on the command line; keys missing from it come from examples/two_moons.py's "spline" recipe:

    python benchmarks/spline_moons_sweep.py '{"flow": {"num_coupling_layers": 4, "hidden_units": [32, 32]}}'
    python benchmarks/spline_moons_sweep.py '{"learning_rate": 1e-2, "epochs": 120, "batch_size": 150}' --seed 1

Keys: learning_rate, epochs, batch_size, jit_compile, validation_split, ema_momentum (Keras' weight averaging),
jitter (training noise as a fraction of the moons' own noise; 0 for none), and flow (keyword arguments of
`tfp_nvp.spline_flow`, merged into the example's). Training is the example's own `build_model` and `train`
(training noise, validation split and early stopping if set, cosine decay), so a recipe measured here behaves
the same when copied into the example. Run recipes one at a time:
on a shared machine wall time counts other people's work, process CPU time divided by the cores does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp.data import moons_entropy, two_moons  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "two_moons.py"


def load_example():
    spec = importlib.util.spec_from_file_location("two_moons_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description="One spline-flow recipe on two moons.")
    parser.add_argument("recipe", help="JSON object overriding the example's spline recipe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    overrides = json.loads(args.recipe)
    if not isinstance(overrides, dict):
        parser.error("recipe must be a JSON object")

    example = load_example()
    recipe = dict(example.RECIPES["spline"])
    flow_kwargs = dict(recipe["flow"])
    flow_kwargs.update(overrides.pop("flow", {}))
    if "hidden_units" in flow_kwargs:
        flow_kwargs["hidden_units"] = tuple(flow_kwargs["hidden_units"])
    recipe.update(overrides)
    recipe["flow"] = flow_kwargs
    recipe["builder"] = tfp_nvp.spline_flow
    example.RECIPES["sweep"] = recipe

    keras.utils.set_random_seed(args.seed)
    x = two_moons(example.NUM_POINTS, seed=args.seed)
    x_test = two_moons(20_000, seed=args.seed + 10_000)
    model = example.build_model(args.seed, "sweep")
    cpu_start = time.process_time()
    history, wall = example.train(model, x, recipe["epochs"], "sweep", verbose=0)
    cpu = time.process_time() - cpu_start
    nll = float(-np.mean(model.log_prob(x_test)))
    shown = {k: v for k, v in recipe.items() if k != "builder"}
    val = history.history.get("val_nll")  # none when the recipe trains on every point (no validation split)
    print(json.dumps(dict(recipe=shown, seed=args.seed, epochs_run=len(history.history["loss"]),
                          best_val_nll=round(float(min(val)), 4) if val else None,
                          nll=round(nll, 4), gap=round(nll - moons_entropy(), 4),
                          wall_s=round(wall, 1), cpu_s=round(cpu, 1))))


if __name__ == "__main__":
    main()
