"""Peak training memory of GLOW against depth: standard backprop, invertible backprop, and TFP's tfb.Glow.

Every configuration trains in its own subprocess (a fresh interpreter, so one run's allocations cannot raise
another's peak) on random 32x32x3 images in [0, 1): build the flow, initialise ActNorm on one batch, trace
the training step (a `tf.function`: gradient of the mean negative log-likelihood, plain SGD update), then run
it `--train-steps` + 1 times. The depth is `num_steps_per_level` at 1x, 2x and 4x a base depth, three levels
each (batch 128, 64 hidden channels by default).

Two memory figures per configuration:
- **tensor peak of a step**: the most memory TensorFlow's CPU allocator held for tensors during one training
  step, above what it held before the step (`tf.config.experimental.get_memory_info`, after
  `reset_memory_stats`, on a step after the first). This is the activation memory the backward pass keeps,
  plus the gradients; the workers turn on TF's BFC allocator for the CPU (`TF_CPU_ALLOCATOR_USE_BFC=true`),
  the one that keeps these statistics.
- **process peak RSS** (`resource.getrusage(RUSAGE_SELF).ru_maxrss`): everything the process ever held, the
  TensorFlow runtime (~0.75 GB here before any model) and the executable graph included. Invertible backprop's
  graph is about three times larger (every step appears in the density pass, its rebuild and its
  recomputation), and instantiating and optimising a graph costs memory that grows with its size, so this
  figure grows with depth even where the tensor peak does not.
Time per step is the median of the runs after the first; on a shared machine only the memory figures are
reliable.

A second table measures the float32 error invertible backprop adds: on a smaller GLOW with random non-identity
weights, the reconstruction error of `forward(inverse(x))` and the gradient difference between invertible and
standard backprop, both relative, against depth; the float32 standard gradient's own error against a float64
run of the same weights is shown for scale.

    python benchmarks/memory.py            # ~20 minutes on 2 busy cores (fewer when idle)
    python benchmarks/memory.py --quick    # smoke run (small model, seconds per configuration)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

VARIANTS = ("standard", "invertible", "tfb.Glow")


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; the peak comes from getrusage)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB


def sgd_step(flow):
    """A `tf.function` training step on `flow`'s mean NLL by plain SGD: the workload whose memory is measured
    (no optimizer slots, so the peak is the step's own tensors). Also used by tests/_memory_probe.py."""
    import tensorflow as tf

    variables = flow.trainable_variables
    # Per dimension (nats/dim), so plain SGD at 1e-4 stays stable over the timed steps at any image size; the
    # summed NLL of a 32x32x3 image (~3600 nats) diverged within a few steps.
    size = float(flow.event_shape.num_elements())

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(x)) / size
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(1e-4 * g)
        return loss

    return step


def worker(config: dict) -> dict:
    """One configuration, in this process: returns peak RSS and time per step."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_probability as tfp

    import tfp_nvp

    tfb, tfd = tfp.bijectors, tfp.distributions
    shape = tuple(config["shape"])
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0.0, 1.0, size=(config["batch"], *shape)).astype("float32"))
    if config["variant"] == "tfb.Glow":
        glow = tfb.Glow(output_shape=shape, num_glow_blocks=config["levels"], num_steps_per_block=config["steps"],
                        coupling_bijector_fn=lambda s: tfb.GlowDefaultNetwork(s, num_hidden=config["hidden"]),
                        exit_bijector_fn=tfb.GlowDefaultExitNetwork, seed=0)
        flow = tfd.TransformedDistribution(tfd.Sample(tfd.Normal(0.0, 1.0), glow.inverse_event_shape(shape)), glow)
    else:
        flow = tfp_nvp.glow(shape, num_levels=config["levels"], num_steps_per_level=config["steps"],
                            hidden_channels=config["hidden"], seed=0,
                            invertible_backprop=config["variant"] == "invertible")
        tfp_nvp.initialize(flow, x)
    step = sgd_step(flow)

    # Tracing grows the process by an amount that scales with the graph (larger for invertible backprop, which
    # traces every step three times): recorded separately from what running the step adds.
    untraced = _rss_mb()
    step.get_concrete_function(x)
    before = _rss_mb()
    losses, times, tensor_peaks = [], [], []
    after_first = float("nan")
    for index in range(config["train_steps"] + 1):
        if index >= 1:
            # The first run also instantiates and optimises the graph (Grappler); the tensor peak is measured
            # on the later runs only.
            tf.config.experimental.reset_memory_stats("CPU:0")
            held = tf.config.experimental.get_memory_info("CPU:0")["current"]
            if index == 1:
                after_first = _rss_mb()
        start = time.perf_counter()
        losses.append(float(step(x)))
        times.append(time.perf_counter() - start)
        if index >= 1:
            tensor_peaks.append((tf.config.experimental.get_memory_info("CPU:0")["peak"] - held) / 2**20)
    return {**config, "rss_untraced_mb": untraced, "rss_before_mb": before, "rss_after_first_step_mb": after_first,
            "peak_rss_mb": _peak_mb(), "tensor_peak_mb": max(tensor_peaks),
            "s_per_step": statistics.median(times[1:]),
            "final_loss": losses[-1], "losses_finite": bool(np.all(np.isfinite(losses))),
            "num_variables": sum(int(np.prod(v.shape)) for v in flow.trainable_variables)}


def run_isolated(config: dict) -> dict:
    # TF keeps allocator statistics on the CPU only with its BFC allocator; the variable is read at start-up.
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True,
                         env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = "\n".join(out.stderr.strip().splitlines()[-3:])
        return {**config, "error": f"exit {out.returncode}: {tail}"}
    return json.loads(lines[-1])


def reconstruction_table(args) -> list[dict]:
    """Float32 error of invertible backprop against depth, on a GLOW with random non-identity weights."""
    import numpy as np
    import tensorflow as tf

    import tfp_nvp

    shape, batch = (8, 8, 3), 8
    rng = np.random.default_rng(1)
    x64 = rng.uniform(0.05, 0.95, size=(batch, *shape))
    rows = []
    for multiple in (1, 2, 4):
        steps = args.base_steps * multiple
        kwargs = dict(num_levels=2, num_steps_per_level=steps, hidden_channels=16, seed=0)
        flows = {
            "std32": tfp_nvp.glow(shape, **kwargs),
            "inv32": tfp_nvp.glow(shape, invertible_backprop=True, **kwargs),
            "std64": tfp_nvp.glow(shape, dtype="float64", **kwargs),
        }
        for name, flow in flows.items():
            tfp_nvp.initialize(flow, tf.constant(x64, flow.dtype))
        # Same random weights everywhere (the builders list variables in the same order); vectors keep their
        # ActNorm-initialised values plus noise, so the activations stay normalised.
        values = []
        for v in flows["std64"].trainable_variables:
            shape_v = tuple(v.shape)
            std = 0.3 / np.sqrt(np.prod(shape_v[:-1])) if len(shape_v) >= 2 else 0.1
            values.append(rng.normal(0.0, std, size=shape_v) + (v.numpy() if len(shape_v) < 2 else 0.0))
        for flow in flows.values():
            for v, value in zip(flow.trainable_variables, values, strict=True):
                v.assign(value.astype(v.dtype.as_numpy_dtype))
        grads = {}
        for name, flow in flows.items():
            xt = tf.constant(x64, flow.dtype)
            with tf.GradientTape() as tape:
                loss = -tf.reduce_mean(flow.log_prob(xt))
            grads[name] = np.concatenate([np.ravel(g.numpy()).astype("float64")
                                          for g in tape.gradient(loss, flow.trainable_variables)])
        inv = flows["inv32"]
        x32 = tf.constant(x64, tf.float32)
        rebuilt = inv.bijector.forward(tf.identity(inv.bijector.inverse(x32)))
        ref = grads["std64"]
        norm = np.linalg.norm(ref)
        rows.append({
            "steps_per_level": steps,
            "recon_rel": float(np.max(np.abs(rebuilt.numpy() - x64)) / np.max(np.abs(x64))),
            "inv_vs_std32": float(np.linalg.norm(grads["inv32"] - grads["std32"]) / np.linalg.norm(grads["std32"])),
            "std32_vs_64": float(np.linalg.norm(grads["std32"] - ref) / norm),
            "inv32_vs_64": float(np.linalg.norm(grads["inv32"] - ref) / norm),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke run")
    parser.add_argument("--base-steps", type=int, default=None, help="steps per level at 1x (default 1)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps per configuration")
    parser.add_argument("--json", default="benchmarks/results/memory.json", help="where to write the results")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-reconstruction", action="store_true", help="skip the float32 error table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    args.base_steps = args.base_steps or 1
    batch = args.batch or (4 if args.quick else 128)
    hidden = args.hidden or (8 if args.quick else 64)
    train_steps = args.train_steps or (1 if args.quick else 20)
    shape = [8, 8, 3] if args.quick else [32, 32, 3]

    results = []
    for variant in args.variants:
        for multiple in (1, 2, 4):
            config = dict(variant=variant, shape=shape, levels=3 if not args.quick else 2,
                          steps=args.base_steps * multiple, multiple=multiple, batch=batch, hidden=hidden,
                          train_steps=train_steps)
            results.append(run_isolated(config))
            print(json.dumps(results[-1]), flush=True)

    print(f"\nGLOW {shape}, {results[0]['levels']} levels, hidden {hidden}, batch {batch}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| variant | steps/level | tensor peak of a step MB | vs 1x | process peak RSS MB | vs 1x | "
          "RSS after tracing MB | RSS after first step MB | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant in args.variants:
        rows = [r for r in results if r["variant"] == variant]
        base = next((r for r in rows if r["multiple"] == 1 and "error" not in r), None)
        for r in rows:
            if "error" in r:
                print(f"| {variant} | {r['steps']} | failed: {r['error'].splitlines()[-1][:120]} | | | | | | |")
                continue
            tensor_ratio = r["tensor_peak_mb"] / base["tensor_peak_mb"] if base else float("nan")
            rss_ratio = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
            print(f"| {variant} | {r['steps']} | {r['tensor_peak_mb']:.0f} | {tensor_ratio:.2f} | "
                  f"{r['peak_rss_mb']:.0f} | {rss_ratio:.2f} | {r['rss_before_mb']:.0f} | "
                  f"{r['rss_after_first_step_mb']:.0f} | {r['s_per_step']:.3f}"
                  f"{'' if r.get('losses_finite', True) else ' (loss not finite)'} |")

    recon = []
    if not args.no_reconstruction:
        print("\nFloat32 error of invertible backprop "
              "(GLOW [8, 8, 3], batch 8, 2 levels, hidden 16, random weights)\n")
        recon = reconstruction_table(args)
        print("| steps/level | max rel. error of forward(inverse(x)) | grad rel. diff inv vs std (f32) | "
              "std f32 vs f64 | inv f32 vs f64 |")
        print("|---:|---:|---:|---:|---:|")
        for r in recon:
            print(f"| {r['steps_per_level']} | {r['recon_rel']:.1e} | {r['inv_vs_std32']:.1e} | "
                  f"{r['std32_vs_64']:.1e} | {r['inv32_vs_64']:.1e} |")
    with open(args.json, "w") as f:
        json.dump({"memory": results, "reconstruction": recon}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
