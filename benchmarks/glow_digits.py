"""GLOW on sklearn digits: tfp_nvp.glow against TFP's tfb.Glow, measured in one run.

    python benchmarks/glow_digits.py                      # speed table (a few minutes)
    python benchmarks/glow_digits.py --quality-minutes 4  # also train both for 4 minutes, report test bits/dim
    python benchmarks/glow_digits.py --compare-with /tmp/old_checkout   # default GLOW steps/s, old code vs this
    python benchmarks/glow_digits.py --compare-with /tmp/old_checkout --compare-path fit   # through FlowModel.fit
    python benchmarks/glow_digits.py --profile            # where the default GLOW step's time goes, by op type

Speed: training steps/s of a `tf.function(jit_compile=True)` Adam step (batch 64, dequantized 8x8 digits) for
`tfb.Glow` and `tfp_nvp.glow` at the same levels, steps per level and hidden width, plus tfp_nvp's
`FlowModel.fit` on the same flow; `--no-xla` times them all without XLA (on x86 CPUs TensorFlow then runs the
convolutions with oneDNN). Quality (optional): each model trained for the same wall time with fresh
dequantization noise per batch and early stopping on 200 validation images; test bits/dim next to the
uniform and full-covariance Gaussian baselines.

Before/after (`--compare-with DIR`): DIR is another copy of the repository (e.g. the previous commit). The
default digits GLOW's training step is timed in fresh processes, alternately importing `tfp_nvp` from DIR
and from this repository (`--compare-rounds` times each), so both see the same machine load; the table gives
each round and the median speed-up. `--compare-path step` (the default) times the hand-written Adam step above,
so only the flow's own code differs; `--compare-path fit` times what a user of each version gets from
`FlowModel(glow(...), levels=17).compile()` with the package's default optimizer and `fit` (with
`jit_compile=True` unless `--no-xla`), so changes to the defaults count too. The speed table and quality runs
are skipped in that mode.

Profile (`--profile`): the default GLOW's Adam step under TensorFlow's profiler for `--profile-steps` steps;
the kernels' time is summed by op type over all threads (TensorFlow ops without XLA, the compiled HLO
instructions with it) and printed per step with each type's share of the kernel time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp import images  # noqa: E402

tfb, tfd = tfp.bijectors, tfp.distributions
LEVELS = images.DIGITS_LEVELS
SHAPE = (8, 8, 1)
DIMS = int(np.prod(SHAPE))


def tfp_glow(args):
    glow = tfb.Glow(
        output_shape=SHAPE, num_glow_blocks=args.levels, num_steps_per_block=args.steps,
        coupling_bijector_fn=lambda s: tfb.GlowDefaultNetwork(s, num_hidden=args.hidden),
        exit_bijector_fn=tfb.GlowDefaultExitNetwork, seed=args.seed,
    )
    base = tfd.Sample(tfd.Normal(0.0, 1.0), glow.inverse_event_shape(SHAPE))
    return tfd.TransformedDistribution(base, glow)


def ours(args, num_blocks):
    return tfp_nvp.glow(SHAPE, num_levels=args.levels, num_steps_per_level=args.steps,
                        hidden_channels=args.hidden, num_blocks=num_blocks, seed=args.seed)


def make_step(flow, lr, jit_compile=True):
    opt = keras.optimizers.Adam(lr)
    variables = flow.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def step(x_int):
        x = images.dequantize(x_int, LEVELS)
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(x))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def steps_per_second(step, data, batch, n_steps):
    rng = np.random.default_rng(0)
    batches = [data[rng.choice(len(data), batch, replace=False)] for _ in range(16)]
    for b in batches[:3]:  # compile and warm up
        step(b).numpy()
    start = time.perf_counter()
    for i in range(n_steps):
        loss = step(batches[i % 16])
    loss.numpy()
    return n_steps / (time.perf_counter() - start)


def fit_steps_per_second(flow, data, args):
    model = tfp_nvp.FlowModel(flow, levels=LEVELS)
    model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=not args.no_xla)
    return _timed_fit(model, data, args)


def _timed_fit(model, data, args):
    """Steps/s of `model.fit` on 16 batches an epoch, after a first epoch that traces (and compiles)."""
    x = data[np.random.default_rng(0).choice(len(data), args.batch * 16)]
    model.fit(x, batch_size=args.batch, epochs=1, verbose=0)  # compile
    epochs = max(1, args.speed_steps // 16)
    start = time.perf_counter()
    model.fit(x, batch_size=args.batch, epochs=epochs, verbose=0)
    return epochs * 16 / (time.perf_counter() - start)


def train_for(flow, data, args, minutes):
    """Adam with fresh dequantization noise per batch; keeps the best validation weights (early stopping)."""
    step = make_step(flow, args.lr)

    @tf.function(jit_compile=True)
    def nll(x):
        return -tf.reduce_mean(flow.log_prob(x))

    x_val = images.dequantize(data["validation"], LEVELS, seed=(args.seed, 1))
    x_test = images.dequantize(data["test"], LEVELS, seed=(args.seed, 2))
    best, best_weights, stale = np.inf, None, 0
    rng, train, start = np.random.default_rng(args.seed), data["train"], time.perf_counter()
    while time.perf_counter() - start < 60 * minutes and stale < 20:
        perm = rng.permutation(len(train))
        for i in range(0, len(train) - args.batch + 1, args.batch):
            step(train[perm[i:i + args.batch]])
        val = float(nll(x_val))
        if val < best:
            best, best_weights, stale = val, [v.numpy() for v in flow.trainable_variables], 0
        else:
            stale += 1
    for v, w in zip(flow.trainable_variables, best_weights):
        v.assign(w)
    return float(images.bits_per_dim(float(nll(x_test)), DIMS, LEVELS)), time.perf_counter() - start


def worker(args):
    """One timing of the default GLOW in this process (imports whatever `tfp_nvp` PYTHONPATH gives)."""
    data = images.load_digits_splits(num_validation=200, seed=args.seed)
    flow = ours(args, 1)
    tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
    start = time.process_time()
    if args.compare_path == "fit":
        model = tfp_nvp.FlowModel(flow, levels=LEVELS)
        model.compile(jit_compile=not args.no_xla)  # the version's default optimizer
        rate = _timed_fit(model, data["train"], args)
    else:
        rate = steps_per_second(make_step(flow, args.lr, not args.no_xla), data["train"], args.batch,
                                args.speed_steps)
    print(json.dumps({"source": os.path.dirname(os.path.dirname(os.path.abspath(tfp_nvp.__file__))),
                      "steps_per_s": rate, "load": os.getloadavg()[0],
                      "cpu_s_incl_compile": time.process_time() - start}))


# Profiler events that wrap kernels (eager dispatch, function and executor frames, thread-pool shards): left
# out so that each kernel's time counts once.
_WRAPPERS = {"step", "EagerExecute", "TFE_Py_ExecuteCancelable", "EagerKernelExecute", "Run", "Process",
             "FunctionRun", "ExecutorDoneCallback", "ParallelFor", "ExecuteAsyncOnStream", "BlockUntilReady",
             "Execute", "EagerCopyToDevice", "tf.constant", "_EagerConst", "EagerLocalExecute"}


def profile(args):
    """Kernel time of the default GLOW step by op type, from TensorFlow's profiler."""
    import collections
    import glob
    import re
    import tempfile

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    data = images.load_digits_splits(num_validation=200, seed=args.seed)
    flow = ours(args, 1)
    tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
    step = make_step(flow, args.lr, not args.no_xla)
    rate = steps_per_second(step, data["train"], args.batch, args.speed_steps)  # also compiles and warms up
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        steps_per_second(step, data["train"], args.batch, args.profile_steps)
        wall = (time.perf_counter() - start) / args.profile_steps
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    per_type = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "").split(":")[-1].strip()
                if not name or name in _WRAPPERS or name.startswith("__inference"):
                    continue
                # HLO instructions are numbered (convolution.42): one row per kind.
                per_type[re.sub(r"\.\d+$", "", name)] += event.duration_ps / 1e9 / args.profile_steps
    total = sum(per_type.values())
    print(f"\nDefault GLOW step on digits ({args.levels} levels x {args.steps} steps, {args.hidden} hidden, "
          f"num_blocks=1), batch {args.batch}, {_mode(args)} Adam step, {os.cpu_count()} cores: "
          f"{rate:.1f} steps/s ({1e3 / rate:.1f} ms a step) before profiling, {1e3 * wall:.1f} ms a step while "
          f"profiled; kernel time summed over threads {total:.1f} ms a step\n")
    print("| op type | ms a step (all threads) | share of kernel time |")
    print("|---|---:|---:|")
    top = per_type.most_common(args.profile_rows)
    for name, ms in top:
        print(f"| {name} | {ms:.2f} | {100 * ms / total:.1f} % |")
    rest = total - sum(ms for _, ms in top)
    print(f"| {len(per_type) - len(top)} other op types | {rest:.2f} | {100 * rest / total:.1f} % |")
    conv = sum(ms for name, ms in per_type.items() if "conv" in name.lower())
    print(f"\nconvolutions (forward and both gradients): {conv:.1f} ms a step, {100 * conv / total:.0f} % of "
          "the kernel time")
    _write_json(args, dict(mode="profile", xla=not args.no_xla, steps_per_s=rate, profiled_ms_per_step=1e3 * wall,
                           kernel_ms_per_step=total, convolution_share=conv / total,
                           op_types=[dict(op=name, ms_per_step=ms) for name, ms in per_type.most_common()]))


def _mode(args) -> str:
    return "no-XLA" if args.no_xla else "XLA"


def _path(args) -> str:
    return ("FlowModel.fit with compile()'s default optimizer" if args.compare_path == "fit"
            else "hand-written Adam step")


def compare(args):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = os.path.abspath(args.compare_with)
    if not os.path.isdir(os.path.join(before, "tfp_nvp")):
        raise SystemExit(f"--compare-with must be a copy of the repository (a directory holding tfp_nvp/); "
                         f"got {before!r}.")
    passthrough = [f"--levels={args.levels}", f"--steps={args.steps}", f"--hidden={args.hidden}",
                   f"--batch={args.batch}", f"--lr={args.lr}", f"--speed-steps={args.speed_steps}",
                   f"--seed={args.seed}", f"--compare-path={args.compare_path}"] + (["--no-xla"] if args.no_xla else [])
    rows = []
    for r in range(args.compare_rounds):
        rates = {}
        for label, root in (("before", before), ("after", here)):
            env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *passthrough],
                                 env=env, cwd=root, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            if os.path.realpath(result["source"]) != os.path.realpath(root):
                raise SystemExit(f"the {label} worker imported tfp_nvp from {result['source']}, not {root}.")
            rates[label] = result
            print(f"round {r}: {label} {result['steps_per_s']:.2f} steps/s (load {result['load']:.1f})", flush=True)
        rows.append(rates)
    print(f"\nDefault GLOW on digits ({args.levels} levels x {args.steps} steps, {args.hidden} hidden, num_blocks=1), "
          f"batch {args.batch}, {_mode(args)}, {_path(args)}, {os.cpu_count()} cores; before = {before}\n")
    print("| round | before steps/s | after steps/s | speed-up | load (1 min) |")
    print("|---|---:|---:|---:|---:|")
    for r, rates in enumerate(rows):
        b, a = rates["before"]["steps_per_s"], rates["after"]["steps_per_s"]
        loads = f"{rates['before']['load']:.1f} / {rates['after']['load']:.1f}"
        print(f"| {r} | {b:.2f} | {a:.2f} | {a / b:.2f}x | {loads} |")
    b = float(np.median([x["before"]["steps_per_s"] for x in rows]))
    a = float(np.median([x["after"]["steps_per_s"] for x in rows]))
    speedups = [x["after"]["steps_per_s"] / x["before"]["steps_per_s"] for x in rows]
    print(f"| median | {b:.2f} | {a:.2f} | {a / b:.2f}x | |")
    _write_json(args, dict(mode="compare", xla=not args.no_xla, path=args.compare_path, before=before, rounds=rows,
                           median_before_steps_per_s=b, median_after_steps_per_s=a, speedup_of_medians=a / b,
                           median_round_speedup=float(np.median(speedups))))


def _write_json(args, result: dict):
    if not args.json:
        return
    result = dict(benchmark="glow_digits", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), cpus=os.cpu_count(),
                  load_average_end=list(os.getloadavg()),
                  settings={k: v for k, v in vars(args).items() if k not in ("worker", "json")}, **result)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.json}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--speed-steps", type=int, default=300)
    p.add_argument("--quality-minutes", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-with", default=None, metavar="DIR",
                   help="another copy of the repository: time the default GLOW with its tfp_nvp and with this one")
    p.add_argument("--compare-rounds", type=int, default=2)
    p.add_argument("--compare-path", choices=["step", "fit"], default="step",
                   help="what --compare-with times: the hand-written Adam step, or FlowModel.fit with the defaults")
    p.add_argument("--no-xla", action="store_true",
                   help="time tf.function steps without XLA (TensorFlow's oneDNN convolutions on x86 CPUs)")
    p.add_argument("--profile", action="store_true", help="profile the default GLOW step by op type")
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument("--json", default=None, help="also write the tables' numbers to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.compare_with:
        return compare(args)
    if args.profile:
        return profile(args)
    data = images.load_digits_splits(num_validation=200, seed=args.seed)

    rows = []
    for label, build in [
        ("tfb.Glow (GlowDefaultNetwork)", lambda: tfp_glow(args)),
        ("tfp_nvp.glow, num_blocks=0", lambda: ours(args, 0)),
        ("tfp_nvp.glow, num_blocks=1 (default)", lambda: ours(args, 1)),
    ]:
        flow = build()
        if isinstance(flow.bijector, tfb.Bijector) and label.startswith("tfp_nvp"):
            tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
        n_params = sum(int(np.prod(v.shape)) for v in flow.trainable_variables)
        rate = steps_per_second(make_step(flow, args.lr, not args.no_xla), data["train"], args.batch,
                                args.speed_steps)
        rows.append([label, n_params, rate])
    reference = rows[0][2]
    flow = ours(args, 1)
    tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
    fit_rate = fit_steps_per_second(flow, data["train"], args)
    rows.append(["tfp_nvp.glow default via FlowModel.fit", rows[-1][1], fit_rate])

    print(f"\nGLOW on digits, {args.levels} levels x {args.steps} steps, {args.hidden} hidden channels, "
          f"batch {args.batch}, {_mode(args)}, {os.cpu_count()} cores\n")
    print("| model | parameters | steps/s | vs tfb.Glow |")
    print("|---|---:|---:|---:|")
    for label, n, rate in rows:
        print(f"| {label} | {n:,} | {rate:.1f} | {rate / reference:.2f}x |")

    quality = []
    if args.quality_minutes > 0:
        print(f"\nTest bits/dim after {args.quality_minutes:g} min of training each (early stopping on "
              "200 validation images)\n")
        print("| model | test bits/dim | seconds |")
        print("|---|---:|---:|")
        for label, build in [("tfb.Glow (GlowDefaultNetwork)", lambda: tfp_glow(args)),
                             ("tfp_nvp.glow (defaults)", lambda: ours(args, 1))]:
            flow = build()
            if label.startswith("tfp_nvp"):
                tfp_nvp.initialize(flow, images.dequantize(data["train"][:512], LEVELS, seed=(args.seed, 0)))
            bpd, seconds = train_for(flow, data, args, args.quality_minutes)
            quality.append(dict(model=label, test_bits_per_dim=bpd, seconds=seconds))
            print(f"| {label} | {bpd:.3f} | {seconds:.0f} |")
        gauss = images.gaussian_bits_per_dim(data["train"], data["test"], LEVELS)
        print(f"| full-covariance Gaussian | {gauss:.3f} | |")
        print(f"| uniform | {images.uniform_bits_per_dim(LEVELS):.3f} | |")
    _write_json(args, dict(mode="speed", xla=not args.no_xla,
                           speed=[dict(model=label, parameters=n, steps_per_s=rate, vs_tfb_glow=rate / reference)
                                  for label, n, rate in rows],
                           quality=quality))


if __name__ == "__main__":
    main()
