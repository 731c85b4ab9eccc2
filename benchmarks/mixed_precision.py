"""GLOW training step time, float32 against mixed bfloat16 (and optionally mixed float16), in one run.

    python benchmarks/mixed_precision.py                 # about two minutes on 2 cores
    python benchmarks/mixed_precision.py --quick         # smoke run
    python benchmarks/mixed_precision.py --json out.json --markdown out.md

Two configurations: `tfp_nvp.glow([8, 8, 1])` with its defaults (digits-sized, batch 256, 17 levels) and
`tfp_nvp.glow([32, 32, 3], num_levels=3)` otherwise at its defaults (batch 64, 256 levels). For each, one
`FlowModel` per policy is built after `keras.mixed_precision.set_global_policy(policy)` (so its networks take
the policy, see `tfp_nvp.nn.network_dtype`) and trained with `compile()`'s defaults through `FlowModel.fit`
(no XLA). After one untimed `fit` (tracing), every round times one `fit` of `--steps` steps for each policy in
turn, so the policies share the machine's load; the table gives the median and the best seconds per step over
the rounds (on a shared machine timings only get slower, so the best is the less noisy figure) and their ratios
to float32 of the same run. Inputs are random integer images: the step's cost does not depend on the
pixel values, and no density or bits/dim figure is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfp_nvp  # noqa: E402

CONFIGS = {
    "8x8x1": dict(shape=(8, 8, 1), glow={}, batch=256, levels=17),
    "32x32x3": dict(shape=(32, 32, 3), glow=dict(num_levels=3), batch=64, levels=256),
}


def build(config, policy, seed=0):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = tfp_nvp.FlowModel(tfp_nvp.glow(list(config["shape"]), seed=seed, **config["glow"]),
                                  levels=config["levels"])
        model.compile()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    computes = sorted({layer.compute_dtype for layer in model.flow_layers})
    return model, computes


def timed_fit(model, x, batch):
    start = time.perf_counter()
    history = model.fit(x, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    loss = history.history["loss"][-1]
    if not np.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {loss}")
    return seconds / (len(x) // batch)


def run_config(name, config, policies, steps, rounds):
    rng = np.random.default_rng(0)
    batch = config["batch"]
    x = rng.integers(0, config["levels"], size=(steps * batch, *config["shape"])).astype("int32")
    models = {}
    for policy in policies:
        model, computes = build(config, policy)
        start = time.perf_counter()
        timed_fit(model, x[:2 * batch], batch)  # traces the step
        models[policy] = (model, computes, time.perf_counter() - start)
        print(f"  {name} {policy}: first fit {models[policy][2]:.1f} s, layers compute in {computes}", flush=True)
    times = {policy: [] for policy in policies}
    for r in range(rounds):
        for policy in policies:
            times[policy].append(timed_fit(models[policy][0], x, batch))
        print(f"  {name} round {r + 1}: " + ", ".join(f"{p} {times[p][-1] * 1e3:.1f} ms" for p in policies),
              flush=True)
    base, base_best = statistics.median(times[policies[0]]), min(times[policies[0]])
    rows = []
    for policy in policies:
        median = statistics.median(times[policy])
        rows.append(dict(config=name, policy=policy, batch=batch, steps_per_round=steps, rounds=rounds,
                         compute_dtypes=models[policy][1], first_fit_s=models[policy][2],
                         s_per_step_rounds=times[policy], s_per_step_median=median,
                         s_per_step_best=min(times[policy]), speedup_vs_float32=base / median,
                         best_speedup_vs_float32=base_best / min(times[policy])))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--policies", nargs="+", default=["float32", "mixed_bfloat16"],
                   choices=["float32", "mixed_bfloat16", "mixed_float16"], help="the first is the baseline")
    p.add_argument("--steps", type=int, default=None, help="steps per timed fit (default 50 for 8x8, 8 for 32x32)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 round")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also write the caption and table to this file")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 3, 1
    start = time.time()
    rows = []
    for name in args.configs:
        steps = args.steps or (50 if name == "8x8x1" else 8)
        rows += run_config(name, CONFIGS[name], args.policies, steps, args.rounds)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        f"GLOW training step (`FlowModel.fit`, `compile()` defaults, no XLA), ms per step: median and best of "
        f"{args.rounds} interleaved rounds; speedups = float32's figure / this policy's, same run. "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average at the end {load}, {time.time() - start:.0f} s.",
        "",
        "| input | batch | policy | networks compute in | median | best | rounds | speedup (median) | "
        "speedup (best) |",
        "|---|---:|---|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        networks = [d for d in r["compute_dtypes"] if d != "float32"] or ["float32"]
        lines.append(f"| {r['config']} | {r['batch']} | {r['policy']} | {', '.join(networks)} | "
                     f"{r['s_per_step_median'] * 1e3:.1f} | {r['s_per_step_best'] * 1e3:.1f} | "
                     f"{' / '.join(f'{t * 1e3:.0f}' for t in r['s_per_step_rounds'])} | "
                     f"{r['speedup_vs_float32']:.2f}x | {r['best_speedup_vs_float32']:.2f}x |")
    print("\n" + "\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"<!-- python benchmarks/mixed_precision.py {' '.join(os.sys.argv[1:])}; "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -->\n\n" + "\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "cpus": os.cpu_count(), "load_average_end": os.getloadavg(),
                       "seconds": time.time() - start}, f, indent=1)


if __name__ == "__main__":
    main()
