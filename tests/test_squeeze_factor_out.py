"""Squeeze, FactorOut, OnChannels, and a two-level GLOW assembled from them as one TransformedDistribution."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp.bijectors.actnorm import ActNorm
from tfp_nvp.bijectors.conv1x1 import Invertible1x1Conv
from tfp_nvp.bijectors.factor_out import FactorOut, OnChannels
from tfp_nvp.bijectors.squeeze import Squeeze
from tfp_nvp import initialize

tfb, tfd = tfp.bijectors, tfp.distributions


def _x(shape, seed, dtype=np.float64):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype(dtype))


def _fresh(t):
    """A new tensor with the same values, so TFP's cache cannot answer from an earlier call."""
    return tf.constant(t.numpy())


def _check_bijector(bij, x, rank, autodiff_log_det, tol=1e-9):
    """Round trip both ways and all log-dets against autodiff and each other."""
    y = bij.forward(x)
    y_fresh = _fresh(y)
    np.testing.assert_allclose(bij.inverse(y_fresh).numpy(), x.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(bij.forward(_fresh(bij.inverse(y_fresh))).numpy(), y.numpy(), rtol=tol, atol=tol)
    fldj = bij.forward_log_det_jacobian(x, event_ndims=rank).numpy()
    ildj = bij.inverse_log_det_jacobian(y_fresh, event_ndims=rank).numpy()
    np.testing.assert_allclose(fldj, autodiff_log_det(bij.forward, x, rank), rtol=tol, atol=tol)
    np.testing.assert_allclose(ildj, autodiff_log_det(bij.inverse, y_fresh, rank), rtol=tol, atol=tol)
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-12, atol=1e-12)
    return fldj


# ---------------------------------------------------------------------------------------------------- Squeeze
@pytest.mark.parametrize("shape, factor", [((4, 6, 2), 2), ((6, 3, 1), 3)])
def test_squeeze_is_space_to_depth_and_volume_preserving(shape, factor, autodiff_log_det):
    sq = Squeeze(shape, factor=factor)
    x = _x((3, *shape), seed=0)
    y = sq.forward(x)
    np.testing.assert_array_equal(y.numpy(), tf.nn.space_to_depth(x, factor).numpy())
    out = (shape[0] // factor, shape[1] // factor, shape[2] * factor ** 2)
    assert sq.event_shape_out == out and tuple(sq.forward_event_shape(shape).as_list()) == out
    assert tuple(sq.inverse_event_shape(out).as_list()) == tuple(shape)
    np.testing.assert_array_equal(sq.inverse(_fresh(y)).numpy(), x.numpy())
    np.testing.assert_array_equal(sq.forward_log_det_jacobian(x, event_ndims=3).numpy() * np.ones(3), 0.0)
    np.testing.assert_allclose(autodiff_log_det(sq.forward, x, 3), 0.0, atol=1e-12)
    # Invert(Squeeze) is depth-to-space, which a GLOW chain uses on the data side.
    np.testing.assert_array_equal(tfb.Invert(sq).forward(_fresh(y)).numpy(), x.numpy())


def test_squeeze_rejects_bad_shapes_and_factors():
    with pytest.raises(ValueError, match=r"divisible by `factor`=2"):
        Squeeze((5, 4, 1))
    with pytest.raises(ValueError, match=r"divisible by `factor`=3"):
        Squeeze((6, 4, 1), factor=3)
    with pytest.raises(ValueError, match="factor"):
        Squeeze((4, 4, 1), factor=1)
    with pytest.raises(ValueError, match="event_shape"):
        Squeeze((4, 4))
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 4, 4, 1\]"):
        Squeeze((4, 4, 1)).forward(tf.zeros((2, 4, 4, 2)))


# ---------------------------------------------------------------------------------------------------- FactorOut
def test_fresh_factor_out_is_the_identity():
    fo = FactorOut((2, 2, 4), dtype=tf.float64)
    assert (fo.num_keep_channels, fo.num_exit_channels) == (2, 2)
    x = _x((3, 2, 2, 4), seed=1)
    np.testing.assert_array_equal(fo.inverse(x).numpy(), x.numpy())
    np.testing.assert_array_equal(fo.inverse_log_det_jacobian(x, event_ndims=3).numpy(), np.zeros(3))


@pytest.mark.parametrize(
    "event_shape, kwargs",
    [((2, 3, 4), dict(num_exit_channels=1)), ((2, 2, 6), dict(exit_fraction=2 / 3)), ((6,), dict())],
    ids=["image-1-exits", "image-fraction", "vector"],
)
def test_factor_out_round_trip_and_log_det(event_shape, kwargs, randomize, autodiff_log_det):
    fo = FactorOut(event_shape, dtype=tf.float64, **kwargs)
    randomize(fo, seed=2, scale=0.5)
    x = _x((3, *event_shape), seed=3)
    fldj = _check_bijector(fo, x, len(event_shape), autodiff_log_det)
    assert np.all(np.abs(fldj) > 1e-6)
    y = fo.forward(x)
    k = fo.num_keep_channels
    np.testing.assert_array_equal(y.numpy()[..., :k], x.numpy()[..., :k])  # kept channels pass untouched


def test_factor_out_is_a_conditional_gaussian_prior(randomize):
    network = tfp_nvp.networks.ConvResNet(hidden_channels=4, num_blocks=1, seed=0, dtype="float64")
    fo = FactorOut((2, 2, 4), num_exit_channels=3, network=network, dtype=tf.float64)
    assert network.output_channels == 3  # sized by FactorOut
    randomize(fo, seed=4, scale=0.5)
    flow = tfd.TransformedDistribution(tfp_nvp.standard_normal((2, 2, 4), tf.float64), fo)
    x = _x((5, 2, 2, 4), seed=5)
    keep, exit_ = x[..., :1], x[..., 1:]
    mean, log_sigma = network(keep)
    expected = (tf.reduce_sum(tfd.Normal(tf.constant(0.0, tf.float64), 1.0).log_prob(keep), [1, 2, 3])
                + tf.reduce_sum(tfd.Normal(mean, tf.exp(log_sigma)).log_prob(exit_), [1, 2, 3]))
    np.testing.assert_allclose(flow.log_prob(x).numpy(), expected.numpy(), rtol=1e-10)


def test_factor_out_rejects_bad_channel_counts():
    with pytest.raises(ValueError, match="exit_fraction"):
        FactorOut((2, 2, 4), exit_fraction=1 / 3)
    with pytest.raises(ValueError, match="exit_fraction"):
        FactorOut((2, 2, 4), exit_fraction=1.0)
    with pytest.raises(ValueError, match=r"`num_exit_channels` must be an integer between 1 and 3"):
        FactorOut((2, 2, 4), num_exit_channels=4)
    with pytest.raises(ValueError, match="num_exit_channels"):
        FactorOut((2, 2, 4), num_exit_channels=0)
    with pytest.raises(ValueError, match="not both"):
        FactorOut((2, 2, 4), num_exit_channels=2, exit_fraction=0.5)
    with pytest.raises(ValueError, match="at least 2"):
        FactorOut((4, 4, 1))
    with pytest.raises(ValueError, match="network"):
        FactorOut((2, 2, 4), network=keras.layers.Conv2D(3, 1))  # 3 != 2 * exit channels


def test_equal_config_factor_outs_do_not_share_the_cache():
    a, b = FactorOut((2, 2, 2), name="twin"), FactorOut((2, 2, 2), name="twin")
    b.network.bias.assign(np.array([0.5, -0.5], np.float32))
    x = tf.ones((3, 2, 2, 2))
    assert not np.allclose(a.forward(x).numpy(), b.forward(x).numpy())


# ---------------------------------------------------------------------------------------------------- OnChannels
def _level(shape, dtype, tag, seed=0, hidden=4):
    """A GLOW level mapping `shape` to itself: squeeze, one flow step, unsqueeze (reads data -> latent)."""
    h, w, c = shape
    inner = (h // 2, w // 2, 4 * c)
    return [
        tfb.Invert(Squeeze(shape, name=f"squeeze_{tag}")),
        ActNorm(inner, dtype=dtype, name=f"act_norm_{tag}"),
        Invertible1x1Conv(inner, seed=seed, dtype=dtype, name=f"conv1x1_{tag}"),
        tfp_nvp.AffineCoupling(
            inner, network=tfp_nvp.networks.ConvResNet(hidden, num_blocks=1, seed=seed, dtype=tf.as_dtype(dtype).name),
            mask="channel", dtype=dtype, name=f"coupling_{tag}"),
    ]


def _initialized(bijectors):
    for b in tfp_nvp.flow_bijectors(tfb.Chain(bijectors)):
        if isinstance(b, ActNorm):
            b.keras_layers[0].initialized.assign(1)


def test_on_channels_round_trip_and_log_det(randomize, autodiff_log_det):
    level = _level((2, 2, 2), tf.float64, "inner")
    inner = tfb.Chain([*level, Squeeze((2, 2, 2))])
    oc = OnChannels(inner, 2, (2, 2, 3))
    _initialized(level)
    randomize(oc, seed=6, scale=0.5)
    x = _x((3, 2, 2, 3), seed=7)
    fldj = _check_bijector(oc, x, 3, autodiff_log_det)
    np.testing.assert_allclose(fldj, inner.forward_log_det_jacobian(x[..., :2], event_ndims=3).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(oc.forward(x).numpy()[..., 2:], x.numpy()[..., 2:])
    assert {id(v) for v in oc.trainable_variables} == {id(v) for v in inner.trainable_variables}


def test_on_channels_rejects_shape_changes_and_bad_counts():
    with pytest.raises(ValueError, match=r"must map the kept channels' shape \[4, 4, 2\] to itself"):
        OnChannels(Squeeze((4, 4, 2)), 2, (4, 4, 4))
    with pytest.raises(ValueError, match="cannot take the kept channels' shape"):
        OnChannels(Squeeze((8, 8, 2)), 2, (4, 4, 4))
    with pytest.raises(ValueError, match=r"`num_channels` must be an integer between 1 and 4"):
        OnChannels(tfb.Identity(), 5, (4, 4, 4))
    with pytest.raises(ValueError, match="bijector"):
        OnChannels(lambda t: t, 2, (4, 4, 4))


# ---------------------------------------------------------------------------------------------------- 2-level GLOW
def tiny_glow(dtype=tf.float64, seed=0, image_shape=(4, 4, 2)):
    """Two-level GLOW on `image_shape` with one step per level, written as one tfb.Chain (data -> latent)."""
    h, w, c = image_shape
    top = (h // 2, w // 2, 4 * c)
    kept = (h // 2, w // 2, 2 * c)
    level_2 = tfb.Chain([*_level(kept, dtype, "2", seed=seed + 1), Squeeze(kept, name="unsqueeze_2")])
    chain = tfb.Chain([
        *_level(image_shape, dtype, "1", seed=seed),
        FactorOut(top, exit_fraction=0.5, dtype=dtype, name="factor_out_1"),
        OnChannels(level_2, 2 * c, top, name="on_channels_1"),
        Squeeze(image_shape, name="unsqueeze_1"),
    ])
    return tfd.TransformedDistribution(tfp_nvp.standard_normal(image_shape, dtype), chain)


def test_two_level_glow_is_exact(randomize, autodiff_log_det):
    flow = tiny_glow()
    assert initialize(flow, _x((32, 4, 4, 2), seed=8)) == 2
    randomize(flow.bijector, seed=9, scale=0.5)
    x = _x((3, 4, 4, 2), seed=10)
    fldj = _check_bijector(flow.bijector, x, 3, autodiff_log_det, tol=1e-8)
    assert np.all(np.abs(fldj) > 1e-3)
    z = flow.bijector.inverse(x)
    expected = flow.distribution.log_prob(z) + flow.bijector.inverse_log_det_jacobian(x, event_ndims=3)
    np.testing.assert_allclose(flow.log_prob(x).numpy(), expected.numpy(), rtol=1e-12)
    assert flow.sample(2, seed=1).shape == (2, 4, 4, 2)


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = tfp_nvp.FlowModel(tiny_glow(tf.float32, seed=0))
    data = np.random.default_rng(11).uniform(size=(64, 4, 4, 2)).astype(np.float32)
    initialized = initialize(model, data)
    start = {id(w): w.numpy().copy() for w in model.trainable_weights}
    # XLA is left off only to keep the suite fast (it triples compile time); test_actnorm covers ActNorm's
    # initialisation under jit_compile=True, the one part of the flow that is stateful.
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    model.fit(data, batch_size=16, epochs=3, verbose=0)
    return model, start, initialized


def test_glow_both_doors_and_fit_moves_every_weight(trained, same_variable_set):
    model, start, initialized = trained
    assert initialized == 2
    dist_vars = model.distribution.trainable_variables
    assert same_variable_set([w.value for w in model.trainable_weights], dist_vars)
    names = {v.name.split("/")[-1].split(":")[0] for v in dist_vars}
    assert {"log_scale", "shift", "lower", "upper", "log_s", "scale", "kernel", "bias"} <= names
    frozen = [w.path for w in model.trainable_weights if np.array_equal(w.numpy(), start[id(w)])]
    assert not frozen, f"fit left these weights unchanged: {frozen}"


def test_glow_weights_reload_exactly_without_reinitialising(trained, tmp_path):
    model, _, _ = trained
    path = str(tmp_path / "glow.weights.h5")
    model.save_weights(path)
    fresh = tfp_nvp.FlowModel(tiny_glow(tf.float32, seed=0))
    fresh.load_weights(path)
    probe = np.random.default_rng(12).uniform(size=(8, 4, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(fresh.log_prob(probe).numpy(), model.log_prob(probe).numpy())
    # Non-trainable state (ActNorm flags, LU permutation and signs) came back too.
    for new, old in zip(fresh.non_trainable_weights, model.non_trainable_weights):
        np.testing.assert_array_equal(new.numpy(), old.numpy())
    before = [w.numpy().copy() for w in fresh.weights]
    assert initialize(fresh, probe * 7.0 - 3.0) == 0
    for old, new in zip(before, fresh.weights):
        np.testing.assert_array_equal(new.numpy(), old)


def test_traced_log_prob_runs_every_network_once_with_the_eager_gradient(monkeypatch):
    # The log-det after the density pass must reuse the inner level's and the split prior's work: each
    # coupling network and the prior run once per traced log_prob, and the traced gradient is the eager one
    # (eager calls never reuse anything).
    flow = tfp_nvp.glow([4, 4, 1], num_levels=2, num_steps_per_level=1, hidden_channels=4, logit_alpha=None,
                        dtype="float64", seed=3)
    x = _x((3, 4, 4, 1), 21)
    initialize(flow, x)
    calls = {}
    original = keras.layers.Conv2D.call

    def counted(self, *args, **kwargs):
        calls[self.name] = calls.get(self.name, 0) + 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Conv2D, "call", counted)
    variables = flow.trainable_variables

    def value_and_grad(t):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_sum(flow.log_prob(t))
        return loss, tape.gradient(loss, variables)

    traced = tf.function(value_and_grad).get_concrete_function(tf.TensorSpec(x.shape, x.dtype))
    assert calls and set(calls.values()) == {1}, calls
    loss, grads = traced(x)
    eager_loss, eager_grads = value_and_grad(_fresh(x))
    np.testing.assert_allclose(loss.numpy(), eager_loss.numpy(), rtol=1e-12)
    for g, e in zip(grads, eager_grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-9, atol=1e-12)
