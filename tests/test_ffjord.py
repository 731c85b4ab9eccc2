"""FFJORD: log-density against the Jacobian of the ODE map, round trip, Hutchinson estimate, both doors,
training, exact reload, argument errors.

Every ODE solve is an adaptive loop and the first trace of a solve (and of its adjoint gradient) takes seconds,
so the tests use 2-D events, tiny networks and as few traced functions as they can.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp
from tfp_nvp import ffjord
from tfp_nvp.bijectors import FFJORDFlow
from tfp_nvp.nn import TimeDerivativeNetwork


def randomize(flow, seed, scale=0.7):
    """Random values for every weight (the zero head too): a clearly non-identity, still smooth field."""
    rng = np.random.default_rng(seed)
    for v in flow.trainable_variables:
        std = scale / np.sqrt(v.shape[0]) if len(v.shape) == 2 else scale / 2
        v.assign(rng.normal(0.0, std, size=tuple(v.shape)).astype(v.dtype.as_numpy_dtype))


def points(n, seed, dtype=tf.float64):
    return tf.random.stateless_normal([n, 2], seed=[seed, 3], dtype=dtype)


def test_log_prob_matches_jacobian_of_the_map_and_round_trip():
    flow = ffjord([2], hidden_units=(8,), dtype="float64", atol=1e-10, rtol=1e-10, seed=0)
    randomize(flow, 1)
    bij = flow.bijector
    x = points(4, 0)
    h = 1e-4
    steps = np.concatenate([np.eye(2), -np.eye(2)]) * h  # [4, 2]: +h e_j then -h e_j

    @tf.function
    def run(x):
        log_prob = flow.log_prob(x)
        z = bij.inverse(x)  # from the cache: log_prob solved for it
        # One solve for every shifted point: the Jacobian of the inverse map by central differences.
        shifted = bij.inverse(tf.reshape(x[:, None, :] + steps[None], [-1, 2]))
        back = bij.forward(tf.identity(z))
        return log_prob, z, tf.reshape(shifted, [-1, 4, 2]), back

    log_prob, z, shifted, back = (t.numpy() for t in run(x))
    # jac[n, i, j] = d z_i / d x_j
    jac = np.transpose((shifted[:, :2] - shifted[:, 2:]) / (2 * h), (0, 2, 1))
    assert np.abs(jac - np.eye(2)).max() > 0.1  # the map is far from the identity
    expected = flow.distribution.log_prob(z).numpy() + np.linalg.slogdet(jac)[1]
    np.testing.assert_allclose(log_prob, expected, atol=1e-5)
    np.testing.assert_allclose(back, x.numpy(), atol=1e-7)
    assert np.abs(z - x.numpy()).max() > 0.1


def test_log_prob_matches_autodiff_jacobian_of_the_ode_map():
    # Autodiff through the solver: eager, persistent tape, no pfor (pfor cannot vectorise the solver's loop).
    # Two points keep the d-by-d backward solves few; the tolerance is the solver's, not autodiff's.
    flow = ffjord([2], hidden_units=(8,), dtype="float64", atol=1e-8, rtol=1e-8, seed=0)
    randomize(flow, 2)
    x = points(2, 5)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        z = flow.bijector.inverse(x)
    jac = tape.batch_jacobian(z, x, experimental_use_pfor=False).numpy()
    assert np.abs(jac - np.eye(2)).max() > 0.1
    expected = flow.distribution.log_prob(z).numpy() + np.linalg.slogdet(jac)[1]
    np.testing.assert_allclose(flow.log_prob(x).numpy(), expected, atol=1e-6)


def test_hutchinson_estimate_is_unbiased():
    exact = ffjord([2], hidden_units=(8,), dtype="float64", atol=1e-7, rtol=1e-7)
    noisy = ffjord([2], hidden_units=(8,), dtype="float64", atol=1e-7, rtol=1e-7, trace="hutchinson", seed=3)
    randomize(exact, 2, scale=1.0)
    for a, b in zip(exact.trainable_variables, noisy.trainable_variables):
        b.assign(a)
    x = points(3, 1)
    repeats = 400
    tiled = tf.tile(x, [repeats, 1])  # every row gets its own noise

    @tf.function
    def run():
        return exact.log_prob(x), noisy.log_prob(tiled)

    want, draws = run()
    draws = draws.numpy().reshape(repeats, 3)
    spread = draws.std(axis=0)
    assert spread.min() > 1e-3  # a real estimate, not the exact trace in disguise
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - want.numpy()), 4 * spread / np.sqrt(repeats) + 1e-4)


def test_both_doors_and_distinct_instances():
    first = ffjord([2], hidden_units=(4, 5), seed=0)
    second = ffjord([2], hidden_units=(4, 5), seed=0)
    tfp_side = first.trainable_variables
    assert len(tfp_side) == 6  # 3 kernels, 3 biases
    model = tfp_nvp.FlowModel(first)
    assert {id(v) for v in tfp_side} == {id(w.value) for w in model.trainable_weights}
    assert first.bijector != second.bijector
    randomize(first, 4)
    z = tf.constant([[0.3, -0.2]])
    # Equal configurations, different weights: TFP's cache must not hand one the other's result.
    assert np.abs(first.bijector.forward(z).numpy() - second.bijector.forward(z).numpy()).max() > 1e-3


@pytest.fixture(scope="module")
def trained():
    flow = ffjord([2], hidden_units=(4,), atol=1e-4, rtol=1e-4, seed=0)
    before = [v.numpy().copy() for v in flow.trainable_variables]
    model = tfp_nvp.FlowModel(flow)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(tfp_nvp.data.two_moons(64, seed=0), epochs=1, batch_size=32, verbose=0, shuffle_seed=0)
    return model, before, history


def test_fit_moves_every_weight_and_samples(trained):
    model, before, history = trained
    assert np.isfinite(history.history["loss"]).all()
    for v, old in zip(model.distribution.trainable_variables, before):
        assert np.abs(v.numpy() - old).max() > 0, v.name
    sample = model.sample(5, seed=1).numpy()
    assert sample.shape == (5, 2) and np.isfinite(sample).all()


def test_gradient_tape_reaches_every_weight():
    flow = ffjord([2], hidden_units=(4,), atol=1e-4, rtol=1e-4, seed=0)
    randomize(flow, 5)
    x = tf.constant(tfp_nvp.data.two_moons(8, seed=1))
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x))
    grads = tape.gradient(loss, flow.trainable_variables)
    assert all(g is not None and np.abs(g.numpy()).max() > 0 for g in grads)


def test_trains_as_a_tfp_vi_surrogate():
    import tensorflow_probability as tfp

    q = ffjord([2], hidden_units=(8,), atol=1e-4, rtol=1e-4, seed=0)
    target = tfp.distributions.MultivariateNormalTriL([1.0, -1.0], [[1.0, 0.0], [0.8, 0.6]])
    before = [v.numpy().copy() for v in q.trainable_variables]
    losses = tfp.vi.fit_surrogate_posterior(target.log_prob, q, keras.optimizers.Adam(1e-2), num_steps=3,
                                            sample_size=16, seed=(1, 2))
    assert np.isfinite(losses.numpy()).all()
    for v, b in zip(q.trainable_variables, before):
        assert not np.array_equal(v.numpy(), b), v.name


def test_exact_reload(trained, tmp_path):
    model = trained[0]
    x = tfp_nvp.data.two_moons(4, seed=2)
    want = model.log_prob(x).numpy()
    path = str(tmp_path / "ffjord.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.log_prob(x).numpy(), want)
    weights = str(tmp_path / "ffjord.weights.h5")
    model.save_weights(weights)
    fresh = tfp_nvp.FlowModel(ffjord([2], hidden_units=(4,), atol=1e-4, rtol=1e-4, seed=5))
    fresh.load_weights(weights)
    np.testing.assert_array_equal(fresh.log_prob(x).numpy(), want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trace="stochastic"), "`trace` must be one of"),
        (dict(atol=-1e-5), "`atol` must be a positive"),
        (dict(rtol=0.0), "`rtol` must be a positive"),
        (dict(hidden_units=(8, 0)), "`hidden_units` must be a non-empty sequence of positive integers"),
        (dict(hidden_units=()), "`hidden_units` must be a non-empty"),
        (dict(hidden_units="64"), "`hidden_units` must be"),
        (dict(solver="euler"), "`solver` must be one of"),
        (dict(hutchinson_samples=0, trace="hutchinson"), "`hutchinson_samples` must be a positive integer"),
        (dict(activation="no_such_activation"), "`activation` must be a Keras activation"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ffjord([2], **kwargs)


def test_bad_event_and_network():
    with pytest.raises(ValueError, match="`event_shape` must have rank 1"):
        ffjord([2, 2])
    with pytest.raises(ValueError, match=r"`network` failed on a state of shape \[2, 2\]"):
        FFJORDFlow([2], TimeDerivativeNetwork(3, hidden_units=(4,)))
    flow = ffjord([2], hidden_units=(4,))
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 2\]"):
        flow.log_prob(tf.zeros([3, 5]))
