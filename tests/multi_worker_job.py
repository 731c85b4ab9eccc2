"""One worker of a MultiWorkerMirroredStrategy job, and the training that both sides of the comparison share.

Run as a script with `TF_CONFIG` naming every worker, it joins the cluster, trains a small flow for `--steps`
steps on fixed global batches and writes its final weights to `--out` (`.npz`). `tests/test_distribute.py` and
`benchmarks/distribute.py` start two of these and compare the weights with `train` run in a single process.
Not a test module (pytest collects only `test_*.py`).

Sharding: the input is one `tf.data` pipeline of global batches, identical on every worker, with
`AutoShardPolicy.DATA` set explicitly. Keras hands it to `strategy.experimental_distribute_dataset`, which splits
each global batch into per-replica batches and gives worker `i` of `k` the `i`-th of every `k` of them, so step
`s` of the job sees exactly global batch `s`, as the single process does. (The default `AUTO` policy would try
to shard by file first and, finding none in an in-memory dataset, fall back to DATA with a warning.)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

def free_ports(n: int) -> list[int]:
    """`n` distinct free localhost ports for the workers' TF_CONFIG (all held open together, so no repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_data(num_examples: int, seed: int = 0) -> np.ndarray:
    """Correlated, off-centre float32 vectors `[num_examples, 4]`."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(4, 4)) * 0.7 + np.eye(4)
    return (rng.normal(size=(num_examples, 4)) @ mixing + np.arange(4.0)).astype(np.float32)


def make_model(seed: int = 1, invertible_backprop: bool = False):
    """A small RealNVP (with weight penalties) behind a data-side ActNorm; its initial weights depend on `seed`.

    The ActNorm initialises from the first global batch inside the distributed step, which is the part of the
    flow that needs the replicas (and workers) to exchange statistics. With `invertible_backprop` both chains
    are `tfp_nvp.InvertibleChain`s (the gradient then rebuilds every step's input, the ActNorm's included).
    """
    import tensorflow_probability as tfp

    import tfp_nvp

    inner = tfp_nvp.real_nvp([4], num_coupling_layers=2, hidden_units=(16,), l2=1e-3, seed=seed,
                             invertible_backprop=invertible_backprop)
    # Chain([a, b]) inverts `a` first: the ActNorm sees the data.
    chain = tfp_nvp.InvertibleChain if invertible_backprop else tfp.bijectors.Chain
    bijector = chain([tfp_nvp.ActNorm([4]), inner.bijector])
    return tfp_nvp.FlowModel(tfp.distributions.TransformedDistribution(inner.distribution, bijector))


def global_batches(x: np.ndarray, global_batch: int):
    """The fixed sequence of global batches, marked for sharding by data (see the module docstring)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x).batch(global_batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


OPTIMIZERS = ("sgd", "adam")


def train(strategy, steps: int, global_batch: int, optimizer: str = "sgd", learning_rate: float = 1e-2,
          seed: int = 1, invertible_backprop: bool = False):
    """Builds and compiles under `strategy`, fits outside its scope for `steps` steps of one epoch.

    Returns (model, the epoch's mean loss, steps/s); steps/s leaves out the first step, which includes tracing.
    """
    import keras

    x = make_data(steps * global_batch)
    with strategy.scope():
        model = make_model(seed, invertible_backprop)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}; got {optimizer!r}.")
        opt = keras.optimizers.SGD(learning_rate) if optimizer == "sgd" else keras.optimizers.Adam(learning_rate)
        model.compile(optimizer=opt)
    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    history = model.fit(global_batches(x, global_batch), epochs=1, verbose=0, shuffle=False, callbacks=[Clock()])
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return model, history.history["loss"][0], rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the final weights (.npz)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--invertible-backprop", action="store_true",
                        help="train with tfp_nvp.InvertibleChain instead of tfb.Chain")
    args = parser.parse_args(argv)
    if "TF_CONFIG" not in os.environ:
        parser.error("TF_CONFIG must name the cluster and this worker's task")

    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    model, loss, rate = train(strategy, args.steps, args.global_batch, args.optimizer, args.learning_rate,
                              invertible_backprop=args.invertible_backprop)
    import tfp_nvp

    chains = sum(isinstance(b, tfp_nvp.InvertibleChain) for b in tfp_nvp.flow_bijectors(model.distribution))
    np.savez(args.out, *[np.asarray(w) for w in model.weights], loss=loss, steps_per_second=rate,
             num_replicas=strategy.num_replicas_in_sync, invertible_chains=chains)
    return 0


if __name__ == "__main__":
    sys.exit(main())
