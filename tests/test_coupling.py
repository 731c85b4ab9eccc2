"""AffineCoupling: bijectivity, exact log-dets (checked against autodiff), masks, batch ranks, networks."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import AffineCoupling
from tfp_nvp.networks import ConvResNet, DenseNetwork

tfb, tfd = tfp.bijectors, tfp.distributions

BOUNDS = ("tanh", "sigmoid", "none")
VECTOR_CASES = [(d, m, f) for d, m, f in itertools.product((2, 5), ("half", "alternate"), (False, True))]
# Image Jacobians are the slow part of the suite: each image case runs under one bound, the bounds taking turns,
# so every (shape, mask, flip) and every bound is covered without the full product.
IMAGE_CASES = [(s, m, f, BOUNDS[i % 3]) for i, (s, m, f) in enumerate(
    itertools.product(((4, 4, 2), (4, 4, 3)), ("checkerboard", "channel"), (False, True)))]


def make_coupling(event_shape, mask, flip, bound="tanh", dtype=tf.float64, **kwargs):
    """A small coupling: dense (8, 8) for vectors, a one-block 8-channel ResNet for images."""
    if len(event_shape) == 1:
        net = DenseNetwork((8, 8), activation="tanh", dtype=tf.as_dtype(dtype).name)
    else:
        net = ConvResNet(hidden_channels=8, num_blocks=1, dtype=tf.as_dtype(dtype).name)
    return AffineCoupling(event_shape, network=net, mask=mask, flip=flip, log_scale_bound=bound, dtype=dtype,
                          **kwargs)




def check_bijector(bij, x, event_rank, autodiff_log_det, rtol=1e-9):
    """Round trips both ways, finite log-dets, fldj == -ildj(forward), and both log-dets against autodiff."""
    y = bij.forward(x)
    np.testing.assert_allclose(bij.inverse(y), x, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(bij.forward(bij.inverse(x)), x, rtol=rtol, atol=rtol)
    fldj_x = bij.forward_log_det_jacobian(x, event_ndims=event_rank)
    ildj_x = bij.inverse_log_det_jacobian(x, event_ndims=event_rank)
    fldj_y = bij.forward_log_det_jacobian(y, event_ndims=event_rank)
    ildj_y = bij.inverse_log_det_jacobian(y, event_ndims=event_rank)
    for t in (fldj_x, ildj_x, fldj_y, ildj_y):
        assert np.all(np.isfinite(t.numpy()))
    np.testing.assert_allclose(fldj_x, -ildj_y, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(fldj_x, autodiff_log_det(bij.forward, x, event_rank), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ildj_x, autodiff_log_det(bij.inverse, x, event_rank), rtol=1e-8, atol=1e-8)
    return y, fldj_x


# --------------------------------------------------------------------------------------------- log-det math
@pytest.mark.parametrize("bound", BOUNDS)
@pytest.mark.parametrize("d,mask,flip", VECTOR_CASES)
def test_vector_coupling_log_det_matches_autodiff(d, mask, flip, bound, randomize, autodiff_log_det,
                                                   conditioning_mask):
    bij = make_coupling([d], mask, flip, bound)
    randomize(bij, seed=d + 10 * flip)
    x = tf.random.stateless_normal([6, d], seed=[d, 1], dtype=tf.float64)
    y, fldj = check_bijector(bij, x, 1, autodiff_log_det)
    keep = conditioning_mask((d,), mask, flip)
    # The conditioning entries pass through untouched; the others really move (the map is not the identity).
    np.testing.assert_array_equal(y.numpy()[:, keep], x.numpy()[:, keep])
    assert np.abs(y.numpy()[:, ~keep] - x.numpy()[:, ~keep]).max() > 0.05
    assert np.abs(fldj.numpy()).max() > 0.01


@pytest.mark.parametrize("shape,mask,flip,bound", IMAGE_CASES)
def test_image_coupling_log_det_matches_autodiff(shape, mask, flip, bound, randomize, autodiff_log_det,
                                                  conditioning_mask):
    bij = make_coupling(list(shape), mask, flip, bound)
    randomize(bij, seed=shape[-1] + 10 * flip)
    x = tf.random.stateless_normal([2, *shape], seed=[shape[-1], 2], dtype=tf.float64)
    y, fldj = check_bijector(bij, x, 3, autodiff_log_det)
    keep = conditioning_mask(shape, mask, flip)
    np.testing.assert_array_equal(y.numpy()[:, keep], x.numpy()[:, keep])
    assert np.abs(y.numpy()[:, ~keep] - x.numpy()[:, ~keep]).max() > 0.05
    assert np.abs(fldj.numpy()).max() > 0.01


@pytest.mark.parametrize("mask", [np.array([1, 0, 0, 1, 0]), np.array([0, 1, 1, 1, 0], dtype=np.float32)])
def test_explicit_vector_mask(mask, randomize, autodiff_log_det):
    bij = make_coupling([5], mask, False)
    randomize(bij, seed=3)
    assert bij.network_input_shape == (int(mask.sum()),)
    assert bij.param_shape == (5 - int(mask.sum()),)
    x = tf.random.stateless_normal([4, 5], seed=[5, 5], dtype=tf.float64)
    y, _ = check_bijector(bij, x, 1, autodiff_log_det)
    keep = mask.astype(bool)
    np.testing.assert_array_equal(y.numpy()[:, keep], x.numpy()[:, keep])
    assert np.abs(y.numpy()[:, ~keep] - x.numpy()[:, ~keep]).max() > 0.05


@pytest.mark.parametrize("mask_shape", ["full", "channels"])
def test_explicit_image_mask(mask_shape, randomize, autodiff_log_det):
    rng = np.random.default_rng(0)
    if mask_shape == "full":
        mask = (rng.uniform(size=(4, 4, 2)) < 0.5).astype(np.int64)
        keep = mask.astype(bool)
    else:
        mask = np.array([0, 1, 0])
        keep = np.broadcast_to(mask.astype(bool), (4, 4, 3))
    shape = keep.shape
    bij = make_coupling(list(shape), mask, False)
    randomize(bij, seed=4)
    x = tf.random.stateless_normal([2, *shape], seed=[6, 6], dtype=tf.float64)
    y, _ = check_bijector(bij, x, 3, autodiff_log_det)
    np.testing.assert_array_equal(y.numpy()[:, keep], x.numpy()[:, keep])
    assert np.abs(y.numpy()[:, ~keep] - x.numpy()[:, ~keep]).max() > 0.05


@pytest.mark.parametrize("dtype,tol", [(tf.float32, 1e-5), (tf.float64, 1e-12)])
@pytest.mark.parametrize("bound", BOUNDS)
def test_round_trip_and_dtype(dtype, tol, bound, randomize):
    bij = make_coupling([5], "alternate", True, bound, dtype=dtype)
    randomize(bij, seed=7)
    x = tf.random.stateless_normal([16, 5], seed=[7, 7], dtype=dtype)
    y = bij.forward(x)
    assert y.dtype == dtype
    fldj = bij.forward_log_det_jacobian(x, event_ndims=1)
    ildj = bij.inverse_log_det_jacobian(y, event_ndims=1)
    assert fldj.dtype == dtype and ildj.dtype == dtype
    np.testing.assert_allclose(bij.inverse(y), x, rtol=tol, atol=tol)
    np.testing.assert_allclose(bij.forward(bij.inverse(x)), x, rtol=tol, atol=tol)
    np.testing.assert_allclose(fldj, -ildj, rtol=tol, atol=tol)
    assert np.abs(fldj.numpy()).max() > 0.01


@pytest.mark.parametrize("event_shape,mask", [((2,), "half"), ((5,), "alternate"), ((4, 4, 2), "checkerboard"),
                                              ((4, 4, 3), "channel")])
@pytest.mark.parametrize("bound", BOUNDS)
def test_identity_at_initialisation(event_shape, mask, bound):
    bij = make_coupling(list(event_shape), mask, False, bound, dtype=tf.float32)
    x = tf.random.stateless_normal([3, *event_shape], seed=[1, 1])
    rank = len(event_shape)
    np.testing.assert_allclose(bij.forward(x), x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bij.inverse(x), x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bij.forward_log_det_jacobian(x, event_ndims=rank), np.zeros(3), atol=1e-5)
    np.testing.assert_allclose(bij.inverse_log_det_jacobian(x, event_ndims=rank), np.zeros(3), atol=1e-5)


@pytest.mark.parametrize("event_shape,mask", [((5,), "half"), ((4, 4, 2), "checkerboard")])
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)])
def test_batch_ranks(event_shape, mask, batch_shape, randomize):
    """Any batch rank gives the per-example results of a flat batch, with log-dets of shape batch_shape."""
    bij = make_coupling(list(event_shape), mask, False)
    randomize(bij, seed=11)
    n = int(np.prod(batch_shape))
    flat = tf.random.stateless_normal([n, *event_shape], seed=[2, 3], dtype=tf.float64)
    x = tf.reshape(flat, [*batch_shape, *event_shape])
    rank = len(event_shape)
    y = bij.forward(x)
    assert y.shape == x.shape
    fldj = bij.forward_log_det_jacobian(x, event_ndims=rank)
    ildj = bij.inverse_log_det_jacobian(y, event_ndims=rank)
    assert fldj.shape == batch_shape and ildj.shape == batch_shape
    np.testing.assert_allclose(tf.reshape(y, flat.shape), bij.forward(flat), rtol=1e-12)
    np.testing.assert_allclose(tf.reshape(fldj, [n]), bij.forward_log_det_jacobian(flat, event_ndims=rank),
                               rtol=1e-12)
    np.testing.assert_allclose(bij.inverse(y), x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("event_shape,mask", [((5,), "half"), ((4, 4, 2), "checkerboard")])
def test_log_det_over_extra_event_axes_sums_the_layer_log_dets(event_shape, mask, randomize):
    """Asked for more event axes than its own, a coupling sums its log-dets over them; asked for its own, the
    reduction TFP applies (over no axes) leaves no Sum in the graph: the coupling's own sum is the only one."""
    bij = make_coupling(list(event_shape), mask, False)
    randomize(bij, seed=12)
    x = tf.random.stateless_normal([2, 3, *event_shape], seed=[4, 5], dtype=tf.float64)
    rank = len(event_shape)
    per_event = bij.forward_log_det_jacobian(x, event_ndims=rank)
    assert np.abs(per_event.numpy()).max() > 1e-3
    np.testing.assert_allclose(bij.forward_log_det_jacobian(x, event_ndims=rank + 1),
                               tf.reduce_sum(per_event, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(bij.inverse_log_det_jacobian(x, event_ndims=rank + 1),
                               tf.reduce_sum(bij.inverse_log_det_jacobian(x, event_ndims=rank), axis=-1),
                               rtol=1e-12)
    graph = tf.function(lambda t: bij.inverse_log_det_jacobian(t, event_ndims=rank)).get_concrete_function(
        tf.TensorSpec([None, *event_shape], tf.float64)).graph
    assert [op.type for op in graph.get_operations()].count("Sum") == 1


# --------------------------------------------------------------------------------------------- networks
def test_plain_callable_network(autodiff_log_det):
    """A plain function of x_a returning one tensor (shift then log_scale on the last axis) is a network."""
    rng = np.random.default_rng(1)
    w1 = tf.constant(rng.normal(size=(2, 8)), tf.float64)
    w2 = tf.constant(rng.normal(size=(8, 6)) / 3, tf.float64)

    def network(x_a):
        return tf.tanh(x_a @ w1) @ w2

    bij = AffineCoupling([5], network=network, mask="half", log_scale_bound="none", dtype=tf.float64)
    assert bij.trainable_variables == ()
    x = tf.random.stateless_normal([5, 5], seed=[3, 3], dtype=tf.float64)
    y, fldj = check_bijector(bij, x, 1, autodiff_log_det)
    # With the "none" bound, the log-det is exactly the sum of the network's log-scale output.
    expected = tf.reduce_sum(network(x[:, :2])[:, 3:], -1)
    np.testing.assert_allclose(fldj, expected, rtol=1e-12)
    np.testing.assert_allclose(y[:, 2:], x[:, 2:] * tf.exp(network(x[:, :2])[:, 3:]) + network(x[:, :2])[:, :3],
                               rtol=1e-12)


def test_keras_functional_model_network(randomize, autodiff_log_det, same_variable_set):
    inp = keras.Input((2,), dtype="float64")
    h = keras.layers.Dense(8, activation="tanh", dtype="float64")(inp)
    shift = keras.layers.Dense(3, dtype="float64")(h)
    log_scale = keras.layers.Dense(3, dtype="float64")(h)
    net = keras.Model(inp, [shift, log_scale])
    bij = AffineCoupling([5], network=net, mask="half", dtype=tf.float64)
    assert same_variable_set(bij.trainable_variables, [w.value for w in net.trainable_weights] + [bij.scale.value])
    randomize(bij, seed=21)
    x = tf.random.stateless_normal([4, 5], seed=[4, 4], dtype=tf.float64)
    check_bijector(bij, x, 1, autodiff_log_det)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(tfd.TransformedDistribution(tfp_nvp.standard_normal([5], tf.float64), bij).log_prob(x))
    grads = tape.gradient(loss, bij.trainable_variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


def test_tf_keras_network_through_tfp_door(same_variable_set):
    """A Keras 2 (tf_keras) network is a tf.Module: the TFP door lists its variables and trains them."""
    import tf_keras

    net = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="tanh"), tf_keras.layers.Dense(4)])
    bij = AffineCoupling([4], network=net, mask="alternate")
    assert len(net.trainable_variables) == 4
    assert same_variable_set(bij.trainable_variables, list(net.trainable_variables) + [bij.scale.value])
    flow = tfd.TransformedDistribution(tfp_nvp.standard_normal([4]), tfb.Chain([bij]))
    assert same_variable_set(flow.trainable_variables, bij.trainable_variables)
    x = tf.random.stateless_normal([32, 4], seed=[5, 5]) * 2.0
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x))
    grads = tape.gradient(loss, flow.trainable_variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


def test_distinct_instances_do_not_share_cache(randomize):
    """Two couplings of equal configuration must not return each other's cached results for the same tensor."""
    a = AffineCoupling([2], network=DenseNetwork((8,), seed=0), mask="half", name="twin")
    b = AffineCoupling([2], network=DenseNetwork((8,), seed=0), mask="half", name="twin")
    randomize(a, seed=1)
    randomize(b, seed=2)
    x = tf.random.stateless_normal([5, 2], seed=[9, 9])
    ya, yb = a.forward(x), b.forward(x)
    assert np.abs(ya.numpy() - yb.numpy()).max() > 1e-3
    # Each result is what the instance computes on a fresh copy of the input (no cache crosstalk).
    np.testing.assert_allclose(ya, a.forward(tf.identity(x)), rtol=1e-6)
    np.testing.assert_allclose(yb, b.forward(tf.identity(x)), rtol=1e-6)
    la = a.inverse_log_det_jacobian(x, event_ndims=1)
    lb = b.inverse_log_det_jacobian(x, event_ndims=1)
    assert np.abs(la.numpy() - lb.numpy()).max() > 1e-3


# --------------------------------------------------------------------------------------------- bad arguments
def test_mask_not_allowed_for_rank():
    with pytest.raises(ValueError, match="`mask`.*vector"):
        AffineCoupling([4], mask="checkerboard")
    with pytest.raises(ValueError, match="`mask`.*image"):
        AffineCoupling([4, 4, 2], mask="half")


def test_explicit_mask_wrong_shape():
    with pytest.raises(ValueError, match=r"`mask`.*shape \(3,\)"):
        AffineCoupling([3], mask=np.array([1, 0]))
    with pytest.raises(ValueError, match="`mask`"):
        AffineCoupling([4, 4, 2], mask=np.ones((4, 4)))
    with pytest.raises(ValueError, match="`mask`.*0 and 1"):
        AffineCoupling([3], mask=np.array([1, 2, 0]))


@pytest.mark.parametrize("flip", [False, True])
def test_mask_leaving_one_side_empty(flip):
    with pytest.raises(ValueError, match="`mask` leaves nothing"):
        AffineCoupling([1], flip=flip)
    with pytest.raises(ValueError, match="`mask` leaves nothing"):
        AffineCoupling([3], mask=np.ones(3), flip=flip)


@pytest.mark.parametrize("event_shape", [[0], [2, 0, 1], [-2], [2, 2], [], [2, 2, 2, 2]])
def test_bad_event_shape(event_shape):
    with pytest.raises(ValueError, match="`event_shape`"):
        AffineCoupling(event_shape)


def test_network_returning_wrong_shapes():
    with pytest.raises(ValueError, match="`network`.*shift"):
        AffineCoupling([4], network=lambda x_a: (x_a[..., :1], x_a[..., :1]))
    with pytest.raises(ValueError, match="`network`.*log_scale"):
        AffineCoupling([4], network=lambda x_a: (x_a, tf.concat([x_a, x_a], -1)))
    with pytest.raises(ValueError, match="`network`.*last axis"):
        AffineCoupling([4], network=lambda x_a: tf.concat([x_a, x_a, x_a], -1))
    with pytest.raises(ValueError, match="`network` failed"):
        AffineCoupling([4], network=lambda x_a: tf.matmul(x_a, tf.zeros([3, 3])))
    with pytest.raises(ValueError, match="`network`"):
        AffineCoupling([4], network="not a network")


def test_bad_log_scale_bound_and_hidden_units():
    with pytest.raises(ValueError, match="`log_scale_bound`"):
        AffineCoupling([2], log_scale_bound="exp")
    with pytest.raises(ValueError, match="`hidden_units`"):
        AffineCoupling([2], hidden_units=(8, 0))
    with pytest.raises(ValueError, match="`hidden_units`"):
        AffineCoupling([2], hidden_units=(-4,))


def test_wrong_event_shape_at_call_time():
    bij = AffineCoupling([2], hidden_units=(4,))
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 2\]"):
        bij.forward(tf.zeros([3, 3]))
    with pytest.raises(ValueError, match=r"`y` must have shape \[\.\.\., 2\]"):
        bij.inverse(tf.zeros([3, 3]))
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 2\]"):
        bij.forward_log_det_jacobian(tf.zeros([3, 1]), event_ndims=1)
    with pytest.raises(ValueError, match=r"`y` must have shape \[\.\.\., 2\]"):
        bij.inverse_log_det_jacobian(tf.zeros([3, 1]), event_ndims=1)


def test_batch_shape_is_scalar():
    """Network weights are not batch parameters: couplings and the flows built from them have batch shape []."""
    bij = make_coupling([5], "half", False)
    assert bij.experimental_batch_shape() == []
    flow = tfp_nvp.real_nvp([4, 4, 2], num_coupling_layers=2, hidden_units=(4,), num_blocks=0)
    assert flow.batch_shape == [] and flow.event_shape == [4, 4, 2]


@pytest.mark.parametrize("builder", [
    lambda: tfp_nvp.real_nvp([2], 3, hidden_units=(8,), seed=0),
    lambda: tfp_nvp.spline_flow([2], num_coupling_layers=2, hidden_units=(8,), num_bins=4, seed=0),
    lambda: tfp_nvp.glow([4, 4, 2], num_levels=1, num_steps_per_level=2, hidden_channels=4, seed=0),
], ids=["real_nvp", "spline_flow", "glow"])
def test_eager_results_follow_weight_updates_for_the_same_tensors(builder):
    """TFP caches results per input tensor; an eager call after a weight update must not get the old ones."""
    flow = builder()
    shape = [16, *flow.event_shape]
    y = tf.constant(np.random.default_rng(1).uniform(0.05, 0.95, size=shape), tf.float32)  # in GLOW's (0, 1)
    z = tf.constant(np.random.default_rng(2).normal(size=shape), tf.float32)
    before = flow.log_prob(y).numpy()
    x = flow.bijector.forward(z)  # held across the update, as a sample kept for a later figure would be
    for i, w in enumerate(flow.trainable_variables):
        w.assign(w + tf.random.stateless_normal(w.shape, (i, 0), stddev=0.2))
    after, after_fresh = flow.log_prob(y).numpy(), flow.log_prob(tf.identity(y)).numpy()
    assert np.abs(after - before).max() > 1e-2  # the update changed the density
    np.testing.assert_allclose(after, after_fresh, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flow.bijector.inverse(x), flow.bijector.inverse(tf.identity(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flow.bijector.inverse_log_det_jacobian(x, len(flow.event_shape)),
                               flow.bijector.inverse_log_det_jacobian(tf.identity(x), len(flow.event_shape)),
                               rtol=1e-5, atol=1e-5)


def test_traced_log_prob_runs_each_network_once_with_unchanged_values_and_gradients():
    """Inside tf.function the log-scale from `_inverse` is reused for the log-det; eager calls never reuse it."""
    calls = []
    dense = keras.layers.Dense(2, kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=3))

    def network(x_a):
        calls.append(1)
        return tf.split(dense(x_a), 2, axis=-1)

    bij = AffineCoupling([2], network=network, mask="half")
    y = tf.constant(np.random.default_rng(0).normal(size=(7, 2)), tf.float32)

    def loss():
        return tf.reduce_sum(bij.inverse(y) ** 2) + tf.reduce_sum(bij.forward_log_det_jacobian(bij.inverse(y), 1))

    calls.clear()
    with tf.GradientTape() as tape:
        eager_loss = loss()
    eager_grads = tape.gradient(eager_loss, dense.trainable_variables)
    assert len(calls) == 3  # eager: no cache, so both inverses and the log-det each evaluate the network

    @tf.function
    def traced():
        with tf.GradientTape() as tape:
            value = loss()
        return value, tape.gradient(value, dense.trainable_variables)

    calls.clear()
    graph_loss, graph_grads = traced()
    assert len(calls) == 1
    np.testing.assert_allclose(graph_loss, eager_loss, rtol=1e-6)
    for g, e in zip(graph_grads, eager_grads):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["coupling", "maf", "iaf"])
def test_sigmoid_bound_scales_the_data_to_latent_pass_as_glow_does(kind):
    """GLOW's bound: `inverse` (data -> latent) multiplies the transformed entries by sigmoid(h + 2) / sigmoid(2),
    at most 1/sigmoid(2) = 1.1353, and `forward` (sampling) divides by it."""
    bound = 1.0 / (1.0 / (1.0 + np.exp(-2.0)))  # 1 / sigmoid(2)
    for h, inverse_factor in ((20.0, bound * (1.0 / (1.0 + np.exp(-22.0)))), (-20.0, bound / (1.0 + np.exp(18.0)))):
        def network(u, h=h):
            # shift 0, h constant: one [N, 2D] tensor, shift first
            return tf.concat([tf.zeros_like(u), tf.fill(tf.shape(u), tf.constant(h, u.dtype))], -1)

        if kind == "coupling":
            bij = AffineCoupling([2], network=network, log_scale_bound="sigmoid", dtype=tf.float64)
        else:
            bij = tfp_nvp.MaskedAutoregressive([2], direction=kind, network=network, log_scale_bound="sigmoid",
                                               dtype=tf.float64)
        x = tf.constant([[1.0, 1.0]], tf.float64)
        transformed = 1 if kind == "coupling" else slice(None)  # the coupling's "half" mask keeps entry 0
        np.testing.assert_allclose(bij.inverse(x).numpy()[0, transformed], inverse_factor, rtol=1e-9)
        np.testing.assert_allclose(bij.forward(x).numpy()[0, transformed], 1.0 / inverse_factor, rtol=1e-9)
