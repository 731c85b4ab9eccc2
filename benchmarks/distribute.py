"""One device vs MirroredStrategy (two logical CPUs) vs MultiWorkerMirroredStrategy (two processes).

All three train the same small flow of `tests/multi_worker_job.py` (a data-side ActNorm and a 2-coupling RealNVP
on 4-D data, weight penalties on) from the same initial weights on the same global batches in the same order,
for `--steps` steps of one epoch, and the table gives the largest absolute difference of any weight from the
single-device run, the epoch's mean loss and the steps/s (first step, which traces, left out). A correct
distributed run differs from one device only by float32 summation order. The two workers talk over localhost
ports; on one 2-core machine neither strategy can be faster than one device (the replicas share the cores and
add synchronisation), so the steps/s column measures overhead, not scaling.

SGD is the default: with Adam the first steps move each weight by about `learning_rate * sign(gradient)`, and
the ActNorm's gradient right after its data-dependent initialisation is zero up to rounding, so Adam turns
summation-order noise into differences of order the learning rate (try `--optimizer adam`).

    python benchmarks/distribute.py                 # 1-2 minutes on 2 cores
    python benchmarks/distribute.py --steps 200 --global-batch 512
    python benchmarks/distribute.py --quick         # smoke run (10 steps)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multi_worker_job.py"
sys.path.insert(0, str(WORKER.parent))

import multi_worker_job as job  # noqa: E402


def two_workers(args, workdir: Path):
    """Runs the two-process job; returns each worker's (weights, loss, steps/s)."""
    ports = job.free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = []
    try:
        for index in range(2):
            task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), "--out", str(workdir / f"w{index}.npz"), "--steps", str(args.steps),
                 "--global-batch", str(args.global_batch), "--optimizer", args.optimizer,
                 "--learning-rate", str(args.learning_rate)],
                env={**env, "TF_CONFIG": json.dumps(task)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            ))
        outputs = [proc.communicate(timeout=args.timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    results = []
    for index, (proc, out) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise RuntimeError(f"worker {index} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
        r = np.load(workdir / f"w{index}.npz")
        weights = [r[f"arr_{i}"] for i in range(sum(k.startswith("arr_") for k in r.files))]
        results.append((weights, float(r["loss"]), float(r["steps_per_second"])))
    return results


def max_difference(weights, reference):
    assert len(weights) == len(reference)
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(weights, reference))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--optimizer", choices=job.OPTIMIZERS, default="sgd")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the two workers")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps")
    parser.add_argument("--json", default=None, help="also write the table's numbers to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.steps = 10

    # Must precede any TF op: the device list is fixed on first use.
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    run = dict(steps=args.steps, global_batch=args.global_batch, optimizer=args.optimizer,
               learning_rate=args.learning_rate)

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    single, single_loss, single_rate = job.train(tf.distribute.get_strategy(), **run)
    single = [np.asarray(w) for w in single.weights]
    mirrored, mirrored_loss, mirrored_rate = job.train(tf.distribute.MirroredStrategy(cpus[:2]), **run)
    mirrored = [np.asarray(w) for w in mirrored.weights]
    with tempfile.TemporaryDirectory() as tmp:
        workers = two_workers(args, Path(tmp))
    elapsed = time.perf_counter() - start

    print(f"{args.steps} steps of global batch {args.global_batch}, {args.optimizer} lr {args.learning_rate}; "
          f"TF {tf.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"1-min load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f}; {elapsed:.0f} s in all\n")
    print("| run | replicas | processes | steps/s | epoch loss | max abs weight diff vs single |")
    print("|---|---|---|---|---|---|")
    print(f"| single device | 1 | 1 | {single_rate:.1f} | {single_loss:.6f} | 0 (reference) |")
    print(f"| MirroredStrategy, 2 logical CPUs | 2 | 1 | {mirrored_rate:.1f} | {mirrored_loss:.6f} "
          f"| {max_difference(mirrored, single):.2e} |")
    for index, (weights, loss, rate) in enumerate(workers):
        print(f"| MultiWorkerMirroredStrategy, worker {index} | 2 | 2 | {rate:.1f} | {loss:.6f} "
              f"| {max_difference(weights, single):.2e} |")
    between = max_difference(workers[0][0], workers[1][0])
    print(f"\nworker 0 vs worker 1: max abs weight diff {between:.2e}")
    if args.json:
        rows = [dict(run="single device", replicas=1, processes=1, steps_per_second=single_rate,
                     epoch_loss=single_loss, max_abs_weight_diff=0.0),
                dict(run="MirroredStrategy, 2 logical CPUs", replicas=2, processes=1,
                     steps_per_second=mirrored_rate, epoch_loss=mirrored_loss,
                     max_abs_weight_diff=max_difference(mirrored, single))]
        rows += [dict(run=f"MultiWorkerMirroredStrategy, worker {index}", replicas=2, processes=2,
                      steps_per_second=rate, epoch_loss=loss, max_abs_weight_diff=max_difference(weights, single))
                 for index, (weights, loss, rate) in enumerate(workers)]
        config = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump(dict(benchmark="distribute", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), config=config,
                           tensorflow=tf.__version__, cpus=os.cpu_count(),
                           load_average_before_after=[load_before, os.getloadavg()[0]], seconds=elapsed,
                           rows=rows, workers_max_abs_weight_diff=between), f, indent=1, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
