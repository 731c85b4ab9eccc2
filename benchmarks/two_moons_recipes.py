"""Variants of `examples/two_moons.py`'s recipes: held-out NLL, time to 1.20 and first-epoch seconds.

Each run trains the example's recipe with some entries overridden, through the learning-curve runner of
`benchmarks/two_moons.py` (held-out NLL of 5000 test points at every epoch end, on a clock that excludes the
scoring), and appends one JSON line to `--out`:

    python benchmarks/two_moons_recipes.py --name no-xla --seeds 0 1 2 jit_compile=False
    python benchmarks/two_moons_recipes.py --name warmup-clip --seeds 0 1 2 warmup=0.05 clipnorm=1.0
    python benchmarks/two_moons_recipes.py --name c12 --seeds 0 num_coupling_layers=12

Overrides are `key=value` with a Python literal value: the recipe's own keys (`learning_rate`, `epochs`,
`jit_compile`, `warmup`, `clipnorm`, `batch_size`, `steps_per_execution`, `validation_split`, `jitter`:
training noise as a fraction of the moons' own, 0 for none), `num_points` (training moons, default 3000;
without `epochs=` the recipe's number of steps is kept, as in the example's `--num-points`) or the flow
builder's (`num_coupling_layers`, `hidden_units`, ...). Every seed runs in its own process, one after
another.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Recipe entries `examples/two_moons.py`'s train() reads when present; anything else goes to the flow builder.
TRAINING_KEYS = ("learning_rate", "epochs", "jit_compile", "warmup", "clipnorm", "batch_size", "steps_per_execution",
                 "validation_split", "jitter", "num_points")


def run_one(name: str, seed: int, overrides: list[str], flow: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(HERE))
    import two_moons as bench  # noqa: E402  (imports TensorFlow: only in the worker process)
    from tfp_nvp.data import two_moons  # noqa: E402

    example = bench.load_example()
    bench.load_example = lambda: example  # the runner reloads the example; keep the overridden recipe
    recipe = example.RECIPES[flow]
    for item in overrides:
        key, value = item.split("=", 1)
        target = recipe if key in recipe or key in TRAINING_KEYS else recipe["flow"]
        target[key] = ast.literal_eval(value)
    # `num_points` (default: the example's 3000) is the training set's size: fresh moons cost nothing, and a
    # larger set separates what the flow can fit from what 3000 points let it generalise. As in the example's
    # --num-points, epochs not given keep the recipe's number of steps.
    num_points = recipe.pop("num_points", example.NUM_POINTS)
    if not any(item.startswith("epochs=") for item in overrides):
        recipe["epochs"] = example.default_epochs(flow, num_points)
    x = two_moons(num_points, seed=seed)
    x_test = two_moons(20_000, seed=seed + 10_000)
    seconds, nll, curve = bench.run_ours(x, x_test, None, seed, flow)
    reached = [(s, e) for s, e, n in zip(curve["seconds"], curve["epochs"], curve["nll"]) if n <= 1.20]
    return dict(name=name, flow=flow, seed=seed, overrides=overrides, final_nll=round(nll, 4),
                train_seconds=round(seconds, 1), seconds_to_1_20=round(reached[0][0], 1) if reached else None,
                epochs_to_1_20=reached[0][1] if reached else None, first_epoch_seconds=round(curve["seconds"][1], 1),
                epochs=curve["epochs"][-1], load_average=round(os.getloadavg()[0], 2))


def parse_args(parser, argv):
    """Parse `argv`, taking every `key=value` word as an override wherever it stands.

    Overrides may follow `--seeds 0 1 2`, where argparse alone would read them as more seeds.
    """
    takes_value = {"--name", "--flow", "--out", "--worker"}  # their value may itself contain "="
    overrides, rest = [], []
    for i, a in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in takes_value
        (overrides if "=" in a and not a.startswith("-") and not is_value else rest).append(a)
    args = parser.parse_args(rest)
    if args.overrides:
        parser.error(f"overrides are key=value; got {args.overrides}")
    args.overrides = overrides
    return args


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe entries as key=value")
    parser.add_argument("--name", default="variant")
    parser.add_argument("--flow", default="real_nvp", choices=["real_nvp", "spline"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default=str(HERE / "results" / "two_moons_recipes.jsonl"))
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main():
    args = parse_args(build_parser(), sys.argv[1:])
    if args.worker is not None:
        print(json.dumps(run_one(args.name, args.worker, args.overrides, args.flow)))
        return
    for seed in args.seeds:
        done = subprocess.run([sys.executable, __file__, "--worker", str(seed), "--name", args.name,
                               "--flow", args.flow, *args.overrides], capture_output=True, text=True, check=True)
        line = done.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
