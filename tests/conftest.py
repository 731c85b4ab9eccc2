"""Shared helpers for the tfp_nvp test suite.

A freshly built coupling is the identity (its last layer is zero-initialised), and the identity passes every
log-det test whatever the code computes. The `randomize` fixture therefore overwrites every trainable variable
with random values so the tests exercise genuinely non-linear, non-identity maps.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs for the whole session, so tests/test_distribute.py can run MirroredStrategy over two devices
# in-process. TF fixes its device list on first use, and conftest is imported before any test module, so this
# is the one place it reliably works. Code without a strategy still places every op on CPU:0, so the other
# tests run exactly as on one device.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


def randomize_variables(module, seed: int, scale: float = 1.0) -> None:
    """Assigns random normal values to every trainable variable reachable through `module` (TFP door).

    Kernels are scaled by 1/sqrt(fan_in) so hidden activations stay O(scale) whatever the width; vectors
    (biases, the tanh `scale`) get standard deviation `scale / 2`. The result is a clearly non-identity map whose
    log-scales stay moderate, so float64 comparisons against autodiff remain well conditioned.
    """
    rng = np.random.default_rng(seed)
    variables = module.trainable_variables
    assert variables, f"{module!r} has no trainable variables to randomize"
    for v in variables:
        shape = tuple(v.shape)
        if len(shape) >= 2:
            std = scale / np.sqrt(np.prod(shape[:-1]))
        else:
            std = scale / 2
        v.assign(rng.normal(0.0, std, size=shape).astype(v.dtype.as_numpy_dtype))


@pytest.fixture(scope="session")
def randomize():
    """The `randomize_variables` helper, as a fixture so test modules need not import conftest."""
    return randomize_variables


def flat_log_det(fn, x, event_rank: int):
    """log|det J| of `fn` at every batch member of `x` ([N, *event]) by autodiff of the flattened map."""
    x = tf.convert_to_tensor(x)
    n = x.shape[0]
    event_shape = x.shape[1:]
    assert len(event_shape) == event_rank
    flat = tf.reshape(x, [n, -1])
    # pfor traces a graph on every eager call (~1 s); a plain loop of backward passes is cheaper for small D.
    use_pfor = flat.shape[1] > 16
    with tf.GradientTape(persistent=not use_pfor) as tape:
        tape.watch(flat)
        out = tf.reshape(fn(tf.reshape(flat, [n, *event_shape])), [n, -1])
    jac = tape.batch_jacobian(out, flat, experimental_use_pfor=use_pfor)
    sign, log_abs_det = tf.linalg.slogdet(jac)
    assert np.all(sign.numpy() != 0), "Jacobian is singular"
    return log_abs_det.numpy()


@pytest.fixture(scope="session")
def autodiff_log_det():
    """The `flat_log_det` helper, as a fixture."""
    return flat_log_det


def same_variables(a, b) -> bool:
    """True when two collections hold exactly the same tf.Variable objects (by identity)."""
    ids_a, ids_b = [id(v) for v in a], [id(v) for v in b]
    return len(ids_a) == len(set(ids_a)) and len(ids_b) == len(set(ids_b)) and set(ids_a) == set(ids_b)


@pytest.fixture(scope="session")
def same_variable_set():
    """The `same_variables` helper, as a fixture."""
    return same_variables


@pytest.fixture(scope="session")
def moons_entropy_coarse():
    """Exact two-moons entropy on a 0.02 grid with 400 positions per arc (5x cheaper than the defaults).

    test_data.py shows this agrees with a 0.01 grid, that 400 arc positions reproduce the default density, and
    that a Monte Carlo estimate agrees.
    """
    from tfp_nvp.data import moons_entropy

    return moons_entropy(grid_step=0.02, arc_points=400)
