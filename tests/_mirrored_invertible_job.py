"""GLOW with invertible backprop trained by `fit` on one device and under MirroredStrategy (two logical CPUs).

Run as a script by tests/test_invertible_backprop.py: an aborted collective would poison the process that ran
it, so this training runs in a process of its own. Prints one JSON object: the largest weight difference
between the two runs, their final losses, and whether the replicas' copies agree.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import tfp_nvp  # noqa: E402

GLOBAL_BATCH = 16


def train(strategy, x, invertible):
    with strategy.scope():
        flow = tfp_nvp.glow([4, 4, 2], num_levels=2, num_steps_per_level=2, hidden_channels=8, lu_decomposed=True,
                            logit_alpha=None, seed=3, invertible_backprop=invertible)
        model = tfp_nvp.FlowModel(flow)
        model.compile(optimizer=keras.optimizers.SGD(1e-2))
        history = model.fit(x, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0)
    return model, history.history["loss"]


def main(rounds):
    x = np.random.default_rng(0).uniform(-1.0, 1.0, size=(48, 4, 4, 2)).astype("float32")
    single, single_loss = train(tf.distribute.get_strategy(), x, invertible=False)
    cpus = tf.config.list_logical_devices("CPU")
    results = []
    for _ in range(rounds):
        mirrored = tf.distribute.MirroredStrategy([cpus[0].name, cpus[1].name])
        model, loss = train(mirrored, x, invertible=True)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(single.weights, model.weights))
        copies_agree = all(
            all(np.array_equal(np.asarray(c), np.asarray(mirrored.experimental_local_results(w.value)[0]))
                for c in mirrored.experimental_local_results(w.value))
            for w in model.weights
        )
        results.append(dict(max_weight_diff=diff, loss=loss, single_loss=single_loss, copies_agree=copies_agree))
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
