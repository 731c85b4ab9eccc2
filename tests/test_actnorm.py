"""ActNorm: exact log-dets, data-dependent initialisation (eager, tf.function, XLA) and its survival on reload."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp.bijectors.actnorm import ActNorm
from tfp_nvp import initialize

tfb, tfd = tfp.bijectors, tfp.distributions


def _data(shape, seed=0, dtype=np.float64):
    """Data whose channels have clearly different means and spreads."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return (rng.normal(size=shape) * np.linspace(0.5, 3.0, c) + np.linspace(-2.0, 4.0, c)).astype(dtype)


def _mark_initialized(act):
    act.keras_layers[0].initialized.assign(1)


@pytest.mark.parametrize("event_shape", [(3, 2, 2), (3,)])
def test_round_trip_and_log_det_match_autodiff(event_shape, randomize, autodiff_log_det):
    act = ActNorm(event_shape, dtype=tf.float64)
    _mark_initialized(act)  # keep the random parameters: no data-dependent overwrite
    randomize(act, seed=1)
    assert np.all(np.abs(act.log_scale.numpy()) > 0)
    x = tf.constant(_data((4, *event_shape), seed=2))
    rank = len(event_shape)
    y = act.forward(x)
    x_back = act.inverse(tf.constant(y.numpy()))  # a fresh tensor: no TFP cache hit
    np.testing.assert_allclose(x_back.numpy(), x.numpy(), rtol=1e-12, atol=1e-12)
    fldj = act.forward_log_det_jacobian(x, event_ndims=rank).numpy()
    ildj = act.inverse_log_det_jacobian(tf.constant(y.numpy()), event_ndims=rank).numpy()
    assert fldj.shape == (4,)
    np.testing.assert_allclose(fldj, autodiff_log_det(act.forward, x, rank), rtol=1e-10)
    np.testing.assert_allclose(ildj, autodiff_log_det(act.inverse, tf.constant(y.numpy()), rank), rtol=1e-10)
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-12)
    # H * W * sum(log_scale) for images.
    np.testing.assert_allclose(fldj[0], np.prod(event_shape[:-1]) * act.log_scale.numpy().sum(), rtol=1e-12)


@pytest.mark.parametrize("event_shape", [(5, 4, 3), (4,)])
def test_first_inverse_normalises_each_channel(event_shape):
    act = ActNorm(event_shape, dtype=tf.float64)
    assert not bool(act.initialized)
    y = _data((64, *event_shape), seed=3)
    z = act.inverse(tf.constant(y)).numpy()
    axes = tuple(range(z.ndim - 1))
    np.testing.assert_allclose(z.mean(axis=axes), 0.0, atol=1e-10)
    np.testing.assert_allclose(z.std(axis=axes), 1.0, atol=1e-5)
    assert bool(act.initialized)
    # Later batches use the stored parameters: a shifted batch is no longer centred.
    z2 = act.inverse(tf.constant(y + 1.0)).numpy()
    np.testing.assert_allclose(z2, z + 1.0 / np.sqrt(y.var(axis=axes) + act.epsilon), rtol=1e-9, atol=1e-9)


def test_log_det_first_initialises_and_inverse_agrees():
    event_shape = (3, 3, 2)
    y = _data((32, *event_shape), seed=4)
    act = ActNorm(event_shape, dtype=tf.float64)
    ildj = act.inverse_log_det_jacobian(tf.constant(y), event_ndims=3).numpy()
    var = y.reshape(-1, 2).var(axis=0)
    expected = -9 * 0.5 * np.log(var + act.epsilon).sum()
    np.testing.assert_allclose(ildj, expected, rtol=1e-10)
    z = act.inverse(tf.constant(y)).numpy()
    np.testing.assert_allclose(z.reshape(-1, 2).mean(axis=0), 0.0, atol=1e-10)


def test_sampling_before_initialisation_is_identity_and_keeps_the_flag_down():
    act = ActNorm((2, 2, 3), dtype=tf.float64)
    x = tf.constant(_data((5, 2, 2, 3), seed=5))
    np.testing.assert_array_equal(act.forward(x).numpy(), x.numpy())
    np.testing.assert_array_equal(act.forward_log_det_jacobian(x, event_ndims=3).numpy(), np.zeros(5))
    assert not bool(act.initialized)
    # ... so the first data batch still initialises.
    z = act.inverse(tf.constant(_data((50, 2, 2, 3), seed=6))).numpy()
    assert bool(act.initialized)
    np.testing.assert_allclose(z.reshape(-1, 3).std(axis=0), 1.0, atol=1e-5)


def test_zero_variance_channel_stays_finite():
    act = ActNorm((2, 2, 2), dtype=tf.float32)
    y = np.random.default_rng(7).normal(size=(16, 2, 2, 2)).astype(np.float32)
    y[..., 1] = 3.0
    z = act.inverse(tf.constant(y)).numpy()
    ildj = act.inverse_log_det_jacobian(tf.constant(y), event_ndims=3).numpy()
    assert np.all(np.isfinite(z)) and np.all(np.isfinite(ildj))
    np.testing.assert_allclose(z[..., 1], 0.0, atol=1e-6)
    assert np.all(np.isfinite(act.forward(tf.constant(z)).numpy()))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_initialisation_inside_tf_function(jit_compile):
    event_shape = (3, 3, 2)
    y = tf.constant(_data((20, *event_shape), seed=8))
    graph_act, eager_act = ActNorm(event_shape, dtype=tf.float64), ActNorm(event_shape, dtype=tf.float64)

    @tf.function(jit_compile=jit_compile)
    def density_pass(batch):
        # ildj runs first on purpose: it must initialise and the inverse must then see the same values.
        return graph_act.inverse_log_det_jacobian(batch, event_ndims=3), graph_act.inverse(batch)

    ildj, z = density_pass(y)
    assert bool(graph_act.initialized)
    np.testing.assert_allclose(z.numpy().reshape(-1, 2).mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(z.numpy().reshape(-1, 2).std(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(ildj.numpy(), eager_act.inverse_log_det_jacobian(y, event_ndims=3).numpy(),
                               rtol=1e-12)
    np.testing.assert_allclose(graph_act.log_scale.numpy(), eager_act.log_scale.numpy(), rtol=1e-12)
    # A second traced call on other data does not re-initialise.
    before = graph_act.shift.numpy().copy()
    density_pass(y * 3.0 + 1.0)
    np.testing.assert_array_equal(graph_act.shift.numpy(), before)


def test_both_doors_and_distinct_instances():
    a, b = ActNorm((2, 2, 3), name="twin"), ActNorm((2, 2, 3), name="twin")
    assert [v.name.split("/")[-1] for v in a.trainable_variables] == ["log_scale:0", "shift:0"]
    layer = a.keras_layers[0]
    assert {id(w.value) for w in layer.trainable_weights} == {id(v) for v in a.trainable_variables}
    assert [w.name for w in layer.non_trainable_weights] == ["initialized"]
    b.keras_layers[0].log_scale.assign(np.full(3, 0.5, np.float32))
    x = tf.ones((2, 2, 2, 3))
    # Same config, same input tensor: TFP's cache must not hand b the result cached for a.
    ya, yb = a.forward(x), b.forward(x)
    assert not np.allclose(ya.numpy(), yb.numpy())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="event_shape"):
        ActNorm((2, 2))
    with pytest.raises(ValueError, match="epsilon"):
        ActNorm((3,), epsilon=0.0)
    with pytest.raises(ValueError, match="dtype"):
        ActNorm((3,), dtype=tf.int32)
    act = ActNorm((2, 2, 3))
    with pytest.raises(ValueError, match=r"`y` must have shape \[\.\.\., 2, 2, 3\]"):
        act.inverse(tf.zeros((4, 2, 2, 4)))


def _vector_flow(seed):
    bijectors = [
        ActNorm([3], dtype=tf.float64, name="act_0"),
        tfp_nvp.AffineCoupling([3], network=tfp_nvp.networks.DenseNetwork((8,), seed=seed, dtype="float64"),
                               mask="half", dtype=tf.float64, name="coupling_0"),
        ActNorm([3], dtype=tf.float64, name="act_1"),
    ]
    return tfd.TransformedDistribution(tfp_nvp.standard_normal([3], tf.float64), tfb.Chain(bijectors))


def test_initialize_counts_and_normalises():
    flow = _vector_flow(seed=0)
    x = _data((200, 3), seed=9)
    assert initialize(flow, x) == 2
    act_0 = flow.bijector.bijectors[0]
    z = flow.bijector.bijectors[0].inverse(tf.constant(x)).numpy()
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-5)
    assert bool(act_0.initialized)
    assert initialize(flow, x) == 0  # already initialised: nothing to do
    assert initialize(tfp_nvp.FlowModel(_vector_flow(seed=0)), x) == 2
    assert initialize(_vector_flow(seed=0).bijector, x) == 2
    with pytest.raises(ValueError, match="flow_or_model"):
        initialize("not a flow", x)
    # Integer data for a flow of continuous data is refused before any ActNorm sees it.
    fresh = _vector_flow(seed=0)
    with pytest.raises(TypeError, match=r"`x` holds integers \(dtype int32\).*dequantize"):
        initialize(fresh, np.arange(12, dtype=np.int32).reshape(4, 3))
    assert not any(bool(b.initialized) for b in tfp_nvp.flow_bijectors(fresh) if isinstance(b, ActNorm))


def test_flag_and_parameters_survive_weights_reload(tmp_path):
    x = _data((128, 3), seed=10)
    model = tfp_nvp.FlowModel(_vector_flow(seed=1))
    assert initialize(model, x) == 2
    path = str(tmp_path / "flow.weights.h5")
    model.save_weights(path)

    fresh = tfp_nvp.FlowModel(_vector_flow(seed=1))
    fresh.load_weights(path)
    acts = [b for b in tfp_nvp.flow_bijectors(fresh.distribution) if isinstance(b, ActNorm)]
    assert len(acts) == 2 and all(bool(a.initialized) for a in acts)
    probe = _data((16, 3), seed=11)
    np.testing.assert_array_equal(fresh.log_prob(probe).numpy(), model.log_prob(probe).numpy())
    before = [w.numpy().copy() for w in fresh.weights]
    fresh.distribution.bijector.inverse(tf.constant(_data((64, 3), seed=12) * 5.0 - 2.0))
    for old, new in zip(before, fresh.weights):
        np.testing.assert_array_equal(new.numpy(), old)


def test_first_log_prob_under_xla_uses_the_initialised_parameters():
    # TransformedDistribution.log_prob runs inverse(y) and then forward_log_det_jacobian(x), so the log-det
    # must read the parameters the inverse has just assigned, in the same compiled graph.
    event_shape = (3, 3, 2)
    y = tf.constant(_data((40, *event_shape), seed=13))
    base = tfp_nvp.standard_normal(event_shape, tf.float64)
    compiled = tfd.TransformedDistribution(base, ActNorm(event_shape, dtype=tf.float64))
    log_prob = tf.function(compiled.log_prob, jit_compile=True)(y).numpy()
    yy = y.numpy().reshape(-1, 2)
    z = (y.numpy() - yy.mean(axis=0)) / np.sqrt(yy.var(axis=0) + 1e-6)
    expected = base.log_prob(z).numpy() - 9 * 0.5 * np.log(yy.var(axis=0) + 1e-6).sum()
    np.testing.assert_allclose(log_prob, expected, rtol=1e-10)
