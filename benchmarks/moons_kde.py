"""What 3000 moons allow: held-out NLL of a Gaussian kernel density estimate against the exact bound.

A yardstick for the flows of `examples/two_moons.py`, on the same data (3000 standardized moons per seed, as
`benchmarks/two_moons_recipes.py` draws them; 20 000 fresh test moons). The bandwidth is picked on the test set
itself, so the figure is optimistic for the KDE; it still shows how far above the bound a flexible estimator
stays with this many points.

    python benchmarks/moons_kde.py                      # seeds 0, 1, 2; a few seconds
    python benchmarks/moons_kde.py --num-points 30000
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.neighbors import KernelDensity

from tfp_nvp.data import moons_entropy, two_moons

BANDWIDTHS = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-points", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if args.num_points < 10:
        parser.error(f"--num-points must be at least 10; got {args.num_points}")
    bound = moons_entropy()
    print(f"| seed | best bandwidth | held-out NLL | gap to bound ({bound:.4f}) |")
    print("|---:|---:|---:|---:|")
    for seed in args.seeds:
        x, x_test = two_moons(args.num_points, seed=seed), two_moons(20_000, seed=seed + 10_000)
        nll, bandwidth = min((-KernelDensity(bandwidth=b).fit(x).score_samples(x_test).mean(), b) for b in BANDWIDTHS)
        print(f"| {seed} | {bandwidth} | {nll:.4f} | {nll - bound:.4f} |")


if __name__ == "__main__":
    main()
