"""LeakyReLU: exact elementwise log-dets, fixed and learnable slopes, both doors, use inside a trained flow."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import AffineCoupling, FlowModel, LeakyReLU

tfb, tfd = tfp.bijectors, tfp.distributions


def points(shape, seed):
    return tf.random.stateless_normal(shape, seed=[seed, 3], dtype=tf.float64)


@pytest.mark.parametrize("alpha,learnable,shape", [(0.3, False, ()), (2.5, False, ()), (0.7, True, ()),
                                                   (0.4, True, (3,))])
def test_round_trip_and_log_dets_match_autodiff(alpha, learnable, shape, autodiff_log_det):
    bij = LeakyReLU(alpha, learnable=learnable, shape=shape, dtype=tf.float64)
    if shape:  # a different slope per entry, so a mix-up of entries would show
        bij.log_alpha.assign(np.log([0.2, 0.9, 3.0]))
    x = points([7, 3], seed=1)
    y = bij.forward(x)
    np.testing.assert_allclose(bij.inverse(y), x, rtol=1e-12)
    np.testing.assert_allclose(bij.forward(bij.inverse(x)), x, rtol=1e-12)
    slopes = np.broadcast_to(tf.exp(bij._log_alpha(tf.float64)).numpy(), (3,))
    np.testing.assert_allclose(y, np.where(x >= 0, x, slopes * x.numpy()), rtol=1e-12)
    fldj = bij.forward_log_det_jacobian(x, event_ndims=1)
    np.testing.assert_allclose(fldj, autodiff_log_det(bij.forward, x, 1), rtol=1e-10)
    np.testing.assert_allclose(bij.inverse_log_det_jacobian(x, event_ndims=1), autodiff_log_det(bij.inverse, x, 1),
                               rtol=1e-10)
    np.testing.assert_allclose(fldj, -bij.inverse_log_det_jacobian(y, event_ndims=1), rtol=1e-12)
    assert np.abs(fldj.numpy()).max() > 0.1
    # Elementwise: event_ndims=0 gives one log-det per entry, summing to the vector one.
    np.testing.assert_allclose(tf.reduce_sum(bij.forward_log_det_jacobian(x, event_ndims=0), -1), fldj,
                               rtol=1e-12)


def test_learnable_alpha_is_positive_and_on_both_doors(same_variable_set):
    bij = LeakyReLU(0.5, learnable=True)
    np.testing.assert_allclose(bij.alpha, 0.5, rtol=1e-6)
    assert same_variable_set(bij.trainable_variables, [bij.log_alpha.value])
    bij.log_alpha.assign(-3.0)  # any real log_alpha is a valid, positive slope: exp(-3) on the negative side
    np.testing.assert_allclose(bij.forward(tf.constant([[-2.0, 2.0]])), [[-2.0 * np.exp(-3.0), 2.0]], rtol=1e-6)
    np.testing.assert_allclose(bij.forward_log_det_jacobian(tf.constant([[-2.0, 2.0]]), event_ndims=1), -3.0,
                               rtol=1e-6)
    fixed = LeakyReLU(0.5)
    assert fixed.trainable_variables == () and fixed.log_alpha is None and fixed.keras_layers == []
    two = LeakyReLU(0.5, learnable=True)
    x = tf.constant([[-1.0, 2.0]])
    two.log_alpha.assign(np.log(0.25))
    # Equal arguments, different instances: TFP's cache never hands one's result to the other.
    assert float(bij.forward(x)[0, 0]) != float(two.forward(x)[0, 0])


def test_inside_a_flow_trained_by_fit(same_variable_set):
    keras.utils.set_random_seed(0)
    leaky = LeakyReLU(0.8, learnable=True, shape=(2,), name="leaky")
    chain = tfb.Chain([
        AffineCoupling([2], hidden_units=(8,), flip=True, name="c1"),
        leaky,
        AffineCoupling([2], hidden_units=(8,), name="c0"),
    ])
    flow = tfd.TransformedDistribution(tfp_nvp.standard_normal([2]), chain)
    model = FlowModel(flow)
    keras_side = [w.value for w in model.trainable_weights]
    assert same_variable_set(flow.trainable_variables, keras_side)
    assert any(v is leaky.log_alpha.value for v in keras_side)
    before = [v.numpy().copy() for v in keras_side]
    rng = np.random.default_rng(0)
    # Skewed data: a larger spread on the positive side, which a slope on the negative side helps to fit.
    data = np.abs(rng.normal(size=(512, 2))) * np.where(rng.uniform(size=(512, 2)) < 0.5, -0.4, 1.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(data.astype(np.float32), epochs=3, batch_size=128, verbose=0).history
    assert np.all(np.isfinite(history["nll"])) and history["nll"][-1] < history["nll"][0]
    assert all(np.any(b != v.numpy()) for b, v in zip(before, keras_side))
    x = tf.constant(data[:5], tf.float32)
    np.testing.assert_allclose(chain.forward(chain.inverse(x)), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=0.0), "`alpha`"), (dict(alpha=-0.2), "`alpha`"), (dict(alpha=float("nan")), "`alpha`"),
    (dict(alpha="0.2"), "`alpha`"), (dict(alpha=True), "`alpha`"), (dict(alpha=float("inf")), "`alpha`"),
    (dict(alpha=0.5, shape=(2,)), "`shape`"), (dict(alpha=0.5, learnable=True, shape=(0,)), "`shape`"),
    (dict(alpha=0.5, dtype=tf.int32), "`dtype`"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeakyReLU(**kwargs)


def test_input_that_does_not_fit_alpha_is_rejected():
    bij = LeakyReLU(0.5, learnable=True, shape=(3,))
    with pytest.raises(ValueError, match=r"`x` must have trailing shape \[\.\.\., 3\]"):
        bij.forward(tf.zeros([4, 2]))
    with pytest.raises(ValueError, match=r"`y` must have trailing shape \[\.\.\., 3\]"):
        bij.inverse(tf.zeros([4, 5]))


def test_real_nvp_puts_fixed_slopes_between_couplings(randomize, autodiff_log_det):
    flow = tfp_nvp.real_nvp([3], num_coupling_layers=3, hidden_units=(8,), leaky_relu=0.3, dtype="float64", seed=1)
    kinds = [type(b).__name__ for b in reversed(flow.bijector.bijectors)]  # sampling order
    assert kinds == ["AffineCoupling", "LeakyReLU", "AffineCoupling", "LeakyReLU", "AffineCoupling"]
    assert flow._tfp_nvp_spec["config"]["leaky_relu"] == 0.3
    randomize(flow, seed=4)
    z = points([6, 3], seed=5)
    x = flow.bijector.forward(z)
    np.testing.assert_allclose(flow.bijector.inverse(tf.identity(x)), z, atol=1e-10)
    np.testing.assert_allclose(flow.bijector.forward_log_det_jacobian(z, 1),
                               autodiff_log_det(flow.bijector.forward, z, 1), atol=1e-9)
    # The slopes are not weights: the flow's variables are the couplings' alone.
    couplings = [b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, AffineCoupling)]
    assert len(flow.trainable_variables) == sum(len(b.trainable_variables) for b in couplings)


def test_real_nvp_learnable_slopes_start_at_the_identity_train_and_reload(tmp_path, same_variable_set):
    keras.utils.set_random_seed(0)
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=3, hidden_units=(8,), leaky_relu="learnable", seed=2)
    leaky = [b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, LeakyReLU)]
    assert len(leaky) == 2 and all(b.log_alpha.shape == (2,) for b in leaky)
    x = (np.random.default_rng(3).normal(size=(256, 2)) * [1.5, 0.5]).astype(np.float32)
    np.testing.assert_array_equal(flow.bijector.forward(x), x)  # a new flow is the identity
    model = FlowModel(flow)
    assert same_variable_set([w.value for w in model.trainable_weights], flow.trainable_variables)
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, epochs=2, batch_size=64, verbose=0)
    assert all(np.any(b != w.numpy()) for b, w in zip(before, model.trainable_weights))
    assert all(np.all(b.log_alpha.numpy() != 0.0) for b in leaky)
    model.save(tmp_path / "leaky.keras")
    loaded = keras.models.load_model(tmp_path / "leaky.keras")
    assert loaded.distribution._tfp_nvp_spec["config"]["leaky_relu"] == "learnable"
    np.testing.assert_array_equal(loaded.log_prob(x[:16]), model.log_prob(x[:16]))


@pytest.mark.parametrize("value", ["relu", 0, -0.5, float("nan"), True])
def test_real_nvp_rejects_bad_leaky_relu(value):
    with pytest.raises(ValueError, match="`leaky_relu` must be None, a slope > 0 or 'learnable'"):
        tfp_nvp.real_nvp([2], leaky_relu=value)
