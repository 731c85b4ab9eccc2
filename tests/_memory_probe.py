"""Tensor memory of one training step, for tests/test_invertible_backprop.py (run as a script).

TensorFlow keeps allocator statistics on the CPU only with its BFC allocator, chosen by an environment
variable read at start-up, hence a separate process. Prints one JSON object: peak MB per (variant, depth).
"""

import json
import os
import sys
from pathlib import Path

os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

import tfp_nvp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory import sgd_step  # noqa: E402  (the benchmark's own step: the test measures the same workload)


def step_peak_mb(kind: str, depth: int, invertible: bool) -> float:
    if kind == "real_nvp":
        x = tf.random.stateless_normal([2048, 16], seed=[0, 1])
        flow = tfp_nvp.real_nvp([16], depth, hidden_units=(256, 256), seed=0, invertible_backprop=invertible)
    else:
        x = tf.random.stateless_uniform([32, 16, 16, 3], seed=[0, 1])
        flow = tfp_nvp.glow([16, 16, 3], num_levels=2, num_steps_per_level=depth, hidden_channels=32, seed=0,
                            invertible_backprop=invertible)
        tfp_nvp.initialize(flow, x)
    step = sgd_step(flow)
    step(x)  # traces, instantiates and optimises the graph
    tf.config.experimental.reset_memory_stats("CPU:0")
    held = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step(x)
    return (tf.config.experimental.get_memory_info("CPU:0")["peak"] - held) / 2**20


if __name__ == "__main__":
    kind, depths = sys.argv[1], [int(d) for d in sys.argv[2:]]
    print(json.dumps({f"{variant}_{d}": step_peak_mb(kind, d, variant == "invertible")
                      for variant in ("standard", "invertible") for d in depths}))
