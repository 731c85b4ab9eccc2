"""SplineCoupling and spline_flow: exact log-dets, identity start, linear tails, both doors, training, reload.

The spline's own float32 exactness is tested in tests/test_spline_exact.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import AffineCoupling, FlowModel, SplineCoupling
from tfp_nvp.bijectors.coupling import Coupling
from tfp_nvp.data import two_moons
from tfp_nvp.networks import ConvResNet, DenseNetwork

tfb, tfd = tfp.bijectors, tfp.distributions

BOUND = 2.0


def make_spline(event_shape, mask="half", flip=False, dtype=tf.float64, num_bins=5, **kwargs):
    name = tf.as_dtype(dtype).name
    if len(event_shape) == 1:
        net = DenseNetwork((8,), activation="tanh", dtype=name)
    else:
        net = ConvResNet(hidden_channels=4, num_blocks=1, dtype=name)
    return SplineCoupling(event_shape, network=net, mask=mask, flip=flip, num_bins=num_bins, bound=BOUND,
                          dtype=dtype, **kwargs)


def randomize_head(bij, seed, scale=1.0):
    """Random values for the network's last layer (the zero-initialised one): bins, heights and slopes vary."""
    rng = np.random.default_rng(seed)
    head = bij.network.trainable_weights[-2:]  # kernel and bias of the head
    for w in head:
        w.assign(rng.normal(0.0, scale, size=tuple(w.shape)).astype(w.dtype))




def spread(shape, seed):
    """Points inside and outside [-BOUND, BOUND], so both the splines and their linear tails are exercised."""
    return tf.random.stateless_normal(shape, seed=[seed, 7], stddev=1.6, dtype=tf.float64)


def check_bijector(bij, x, rank, autodiff_log_det, **kwargs):
    y = bij.forward(x, **kwargs)
    np.testing.assert_allclose(bij.inverse(y, **kwargs), x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bij.forward(bij.inverse(x, **kwargs), **kwargs), x, rtol=1e-9, atol=1e-9)
    fldj = bij.forward_log_det_jacobian(x, event_ndims=rank, **kwargs)
    ildj_y = bij.inverse_log_det_jacobian(y, event_ndims=rank, **kwargs)
    ildj_x = bij.inverse_log_det_jacobian(x, event_ndims=rank, **kwargs)
    np.testing.assert_allclose(fldj, -ildj_y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fldj, autodiff_log_det(lambda t: bij.forward(t, **kwargs), x, rank),
                               rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ildj_x, autodiff_log_det(lambda t: bij.inverse(t, **kwargs), x, rank),
                               rtol=1e-8, atol=1e-8)
    return y, fldj


# --------------------------------------------------------------------------------------------- log-det math
@pytest.mark.parametrize("d,mask,flip", [(2, "half", False), (5, "half", True), (3, "alternate", False),
                                         (4, "alternate", True)])
def test_vector_log_dets_match_autodiff(d, mask, flip, autodiff_log_det, conditioning_mask):
    bij = make_spline([d], mask, flip)
    randomize_head(bij, seed=d)
    x = spread([8, d], seed=d)
    y, fldj = check_bijector(bij, x, 1, autodiff_log_det)
    keep = conditioning_mask((d,), mask, flip)
    np.testing.assert_array_equal(y.numpy()[:, keep], x.numpy()[:, keep])
    assert np.abs(y.numpy()[:, ~keep] - x.numpy()[:, ~keep]).max() > 0.05
    assert np.abs(fldj.numpy()).max() > 0.05


# Small images keep the autodiff Jacobian cheap (at most 16 entries: no pfor tracing through the spline).
@pytest.mark.parametrize("shape,mask,flip", [((2, 3, 2), "checkerboard", False), ((2, 2, 3), "channel", True)])
def test_image_log_dets_match_autodiff(shape, mask, flip, autodiff_log_det, conditioning_mask):
    bij = make_spline(list(shape), mask, flip, num_bins=4)
    randomize_head(bij, seed=3, scale=0.3)
    x = spread([3, *shape], seed=5)
    y, fldj = check_bijector(bij, x, 3, autodiff_log_det)
    keep = conditioning_mask(shape, mask, flip)
    np.testing.assert_array_equal(y.numpy()[:, keep], x.numpy()[:, keep])
    assert np.abs(y.numpy()[:, ~keep] - x.numpy()[:, ~keep]).max() > 0.05
    assert np.abs(fldj.numpy()).max() > 0.05


def test_conditioning(autodiff_log_det):
    bij = make_spline([3], conditional_shape=[2])
    randomize_head(bij, seed=11)
    x = spread([6, 3], seed=1)
    c = tf.random.stateless_normal([6, 2], seed=[3, 3], dtype=tf.float64)
    y, _ = check_bijector(bij, x, 1, autodiff_log_det, conditional_input=c)
    assert np.abs(bij.forward(x, conditional_input=-c).numpy() - y.numpy()).max() > 1e-3
    with pytest.raises(ValueError, match="conditional_shape"):
        bij.forward(x)
    with pytest.raises(ValueError, match=r"`conditional_input` must have shape \[\.\.\., 2\]"):
        bij.forward(x, conditional_input=tf.zeros([6, 3], tf.float64))


def test_batch_ranks_and_float32():
    bij = make_spline([3], "alternate", dtype=tf.float32)
    randomize_head(bij, seed=2)
    x = tf.random.stateless_normal([2, 4, 3], seed=[1, 2], stddev=1.5)
    y = bij.forward(x)
    assert y.dtype == tf.float32 and y.shape == [2, 4, 3]
    flat = bij.forward(tf.reshape(x, [8, 3]))
    np.testing.assert_allclose(tf.reshape(y, [8, 3]), flat, rtol=1e-6, atol=1e-6)
    # Checked where it is well conditioned: a randomised head can make a bin nearly flat (slopes down to 1e-6),
    # and there float32's rounding of y moves the inverse by eps / slope; the float64 tests check x exactly.
    np.testing.assert_allclose(bij.forward(bij.inverse(y)), y, rtol=1e-5, atol=1e-5)
    assert bij.forward_log_det_jacobian(x, event_ndims=1).shape == [2, 4]
    with pytest.raises(TypeError, match="float32"):
        bij.forward(x, conditional_input=tf.zeros([2, 4, 1], tf.float64))
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 3\]"):
        bij.forward(tf.zeros([2, 4]))


# --------------------------------------------------------------------------------------------- spline specifics
@pytest.mark.parametrize("shape,mask", [((5,), "half"), ((4, 4, 2), "checkerboard"), ((4, 4, 2), "channel")])
def test_identity_at_initialisation(shape, mask):
    """Zero network output gives uniform bins and unit slopes: the spline is the identity everywhere."""
    bij = SplineCoupling(list(shape), mask=mask, hidden_units=(8,), dtype=tf.float64)
    assert bij.bound == 4.0  # the default, as in spline_flow and glow
    x = spread([4, *shape], seed=4)
    np.testing.assert_allclose(bij.forward(x), x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bij.inverse(x), x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bij.forward_log_det_jacobian(x, event_ndims=len(shape)), 0.0, atol=1e-12)
    # The slopes really are 1 (softplus alone would give log 2 ~ 0.69 at zero).
    widths, heights, slopes = bij._params_of(bij._split(x)[0], None)
    np.testing.assert_allclose(slopes, 1.0, rtol=1e-12)
    np.testing.assert_allclose(widths, 2 * bij.bound / bij.num_bins, rtol=1e-12)


def test_linear_tails_pass_points_outside_the_bound_unchanged():
    bij = make_spline([4], "half")
    randomize_head(bij, seed=9, scale=2.0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 2))
    outside = np.sign(rng.normal(size=(6, 2))) * rng.uniform(BOUND + 1e-3, BOUND + 5.0, size=(6, 2))
    x = tf.constant(np.concatenate([a, outside], axis=1))
    np.testing.assert_array_equal(bij.forward(x), x)
    np.testing.assert_array_equal(bij.inverse(x), x)
    np.testing.assert_array_equal(bij.forward_log_det_jacobian(x, event_ndims=1), np.zeros(6))
    inside = tf.constant(np.concatenate([a, rng.uniform(-0.5, 0.5, size=(6, 2))], axis=1))
    assert np.abs(bij.forward(inside).numpy() - inside.numpy()).max() > 1e-3


def test_network_contract_and_single_tensor_networks():
    """A plain callable returning one tensor (bins then slopes) works; a wrong width says what is expected."""
    k, n = 4, 2  # D = 4, half mask: 2 transformed entries
    dense = keras.layers.Dense(n * (3 * k - 1), kernel_initializer=keras.initializers.RandomNormal(seed=1),
                               dtype="float64")
    bij = SplineCoupling([4], network=dense, num_bins=k, bound=BOUND, dtype=tf.float64)
    x = spread([5, 4], seed=2)
    np.testing.assert_allclose(bij.inverse(bij.forward(x)), x, atol=1e-9)
    with pytest.raises(ValueError, match=r"8 \+ 3 \(bins then slopes\)|16 \+ 6"):
        SplineCoupling([4], network=keras.layers.Dense(7, dtype="float64"), num_bins=k, dtype=tf.float64)
    with pytest.raises(ValueError, match=r"\[batch, \*\[16\]\] and \[batch, \*\[6\]\]"):
        SplineCoupling([4], network=DenseNetwork((4,), output_units=3, dtype="float64"), num_bins=k,
                       dtype=tf.float64)


def test_shares_the_coupling_machinery_and_instances_stay_distinct():
    assert issubclass(SplineCoupling, Coupling) and issubclass(AffineCoupling, Coupling)
    one, two = make_spline([2]), make_spline([2])
    randomize_head(one, seed=1)
    randomize_head(two, seed=2)
    x = spread([3, 2], seed=3)
    assert np.abs(one.forward(x).numpy() - two.forward(x).numpy()).max() > 1e-3
    # Equal configurations with the default network (equal `parameters` but for the network TFP keys its
    # cache on): the untouched one stays the identity after the other's weights change.
    first, second = (SplineCoupling([2], hidden_units=(8,), num_bins=4, dtype=tf.float64) for _ in range(2))
    randomize_head(second, seed=4)
    np.testing.assert_allclose(first.forward(x), x, rtol=0, atol=1e-12)
    assert np.abs(second.forward(x).numpy() - x.numpy()).max() > 1e-3
    np.testing.assert_allclose(first.forward(x), x, rtol=0, atol=1e-12)


def test_traced_log_prob_runs_the_network_once_with_eager_values():
    calls = []
    dense = keras.layers.Dense(3 * 4 - 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=3))

    def network(x_a):
        calls.append(1)
        return dense(x_a)

    bij = SplineCoupling([2], network=network, num_bins=4, bound=BOUND)
    flow = tfd.TransformedDistribution(tfp_nvp.standard_normal([2]), bij)
    y = tf.constant(np.random.default_rng(0).normal(size=(7, 2)), tf.float32)
    calls.clear()
    eager = flow.log_prob(y)
    assert len(calls) == 2
    calls.clear()
    traced = tf.function(flow.log_prob)(y)
    assert len(calls) == 1
    np.testing.assert_allclose(traced, eager, rtol=1e-5, atol=1e-5)


def test_spline_is_a_small_inline_graph_and_xla_gives_the_same_numbers():
    """The package's spline is a few dozen elementwise ops, written inline in every coupling (TFP's, about 2200
    ops in its gradient alone, needed one shared traced function per shape outside XLA; this one does not)."""
    flow = tfp_nvp.spline_flow([2], num_coupling_layers=2, hidden_units=(8,), num_bins=4, bound=BOUND, seed=0)
    y = tf.constant(np.random.default_rng(1).normal(size=(16, 2)), tf.float32)
    flow.log_prob(y)  # builds the networks
    for i, w in enumerate(flow.trainable_variables):
        w.assign(tf.random.stateless_normal(w.shape, (i, 0), stddev=0.3))

    def step(y):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(flow.log_prob(y))
        return loss, tape.gradient(loss, flow.trainable_variables)

    def calls(graph):
        return [op.get_attr("f").name for op in graph.get_operations()
                if op.type in ("PartitionedCall", "StatefulPartitionedCall")]

    plain = tf.function(step).get_concrete_function(y)
    assert calls(plain.graph) == []
    assert len(plain.graph.get_operations()) < 1500, len(plain.graph.get_operations())
    xla = tf.function(step, jit_compile=True).get_concrete_function(y)
    assert calls(xla.graph) == []

    (loss, grads), (loss_x, grads_x) = plain(y), xla(y)
    eager_loss, eager_grads = step(y)
    np.testing.assert_allclose(loss, eager_loss, rtol=1e-6)
    np.testing.assert_allclose(loss_x, eager_loss, rtol=1e-5)
    for g, gx, ge in zip(grads, grads_x, eager_grads):
        np.testing.assert_allclose(g, ge, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gx, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_bins=0), "`num_bins`"), (dict(num_bins=1), "`num_bins`"), (dict(num_bins="8"), "`num_bins`"),
    (dict(num_bins=2.5), "`num_bins`"), (dict(num_bins=True), "`num_bins`"),
    (dict(bound=0.0), "`bound`"), (dict(bound=-1.0), "`bound`"), (dict(bound="3"), "`bound`"),
    (dict(bound=float("nan")), "`bound`"), (dict(bound=float("inf")), "`bound`"),
    (dict(min_bin_width=-0.1), "`min_bin_width`"), (dict(min_bin_width=0.75), "`min_bin_width`"),
    (dict(min_slope=1.0), "`min_slope`"), (dict(min_slope=-1e-3), "`min_slope`"),
    (dict(mask="checkerboard"), "`mask`"), (dict(event_shape=[2, 2]), "`event_shape`"),
])
def test_bad_arguments(kwargs, match):
    args = dict(event_shape=[2], num_bins=8, bound=3.0, hidden_units=(4,))  # min_bin_width must be < 0.75
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SplineCoupling(**args)


# --------------------------------------------------------------------------------------------- spline_flow
def test_spline_flow_layout_and_both_doors(same_variable_set):
    flow = tfp_nvp.spline_flow([3], num_coupling_layers=3, hidden_units=(8,), num_bins=4, mixing="conv1x1", seed=0)
    couplings = [b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, SplineCoupling)]
    assert sorted(c.name for c in couplings) == [f"spline_flow_coupling_{i}" for i in range(3)]
    assert sorted(c._flip for c in couplings) == [False, False, True]
    model = FlowModel(flow)
    keras_side = [w.value for w in model.trainable_weights]
    assert same_variable_set(flow.trainable_variables, keras_side)
    net_vars = [w.value for c in couplings for w in c.network.trainable_weights]
    assert len(net_vars) == 3 * 4 and {id(v) for v in net_vars} <= {id(v) for v in keras_side}
    x = tf.random.stateless_normal([4, 3], seed=[1, 1])
    np.testing.assert_allclose(flow.bijector.inverse(flow.bijector.forward(x)), x, atol=1e-5)


def test_tfp_vi_trains_every_variable():
    flow = tfp_nvp.spline_flow([2], num_coupling_layers=1, hidden_units=(4,), num_bins=3, seed=0)
    variables = flow.trainable_variables
    before = [v.numpy().copy() for v in variables]
    target = tfd.MultivariateNormalDiag(loc=[1.0, -1.0], scale_diag=[0.5, 1.5])
    # The zero-initialised heads block the hidden layers' gradients at the first step: two steps are needed.
    losses = tfp.vi.fit_surrogate_posterior(target.log_prob, surrogate_posterior=flow,
                                            optimizer=tf.optimizers.Adam(1e-2), num_steps=2, sample_size=16,
                                            seed=(1, 2))
    assert np.all(np.isfinite(losses.numpy()))
    assert len(variables) == 4
    assert all(np.any(b != v.numpy()) for b, v in zip(before, variables))


def test_conditional_spline_flow_and_image_flow():
    flow = tfp_nvp.spline_flow([2], num_coupling_layers=2, hidden_units=(8,), conditional_shape=[3], seed=1)
    x = tf.random.stateless_normal([5, 2], seed=[1, 1])
    c = tf.random.stateless_normal([5, 3], seed=[2, 2])
    lp = flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c))
    assert lp.shape == [5] and np.all(np.isfinite(lp.numpy()))
    image = tfp_nvp.spline_flow([4, 4, 1], num_coupling_layers=2, hidden_units=(4,), num_blocks=0, seed=2)
    assert image.sample(2, seed=(1, 1)).shape == [2, 4, 4, 1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_coupling_layers=0), "`num_coupling_layers`"), (dict(num_bins=0), "`num_bins`"),
    (dict(bound=-2.0), "`bound`"), (dict(mixing="shuffle"), "`mixing`"), (dict(event_shape=[0]), "`event_shape`"),
])
def test_spline_flow_bad_arguments(kwargs, match):
    args = dict(event_shape=[2], hidden_units=(4,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        tfp_nvp.spline_flow(**args)


MOONS = dict(event_shape=[2], num_coupling_layers=1, hidden_units=(16,), num_bins=6, bound=3.0)


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = FlowModel(tfp_nvp.spline_flow(**MOONS, seed=0))
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(two_moons(1000, seed=0), epochs=3, batch_size=200, verbose=0)
    return dict(model=model, before=before, history=history.history)


def test_fit_moves_every_weight_and_lowers_the_loss(trained):
    after = [w.numpy() for w in trained["model"].trainable_weights]
    assert len(after) == len(trained["before"]) == 4
    assert all(np.any(b != a) for b, a in zip(trained["before"], after))
    nll = trained["history"]["nll"]
    assert np.all(np.isfinite(nll)) and nll[-1] < nll[0]


def test_exact_reload_from_keras_file_and_weights(trained, tmp_path):
    model = trained["model"]
    x = two_moons(300, seed=3)
    path = tmp_path / "spline.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FlowModel)
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))
    np.testing.assert_array_equal(loaded.sample(5, seed=(4, 4)), model.sample(5, seed=(4, 4)))
    weights = tmp_path / "spline.weights.h5"
    model.save_weights(weights)
    fresh = FlowModel(tfp_nvp.spline_flow(**MOONS, seed=99))
    assert np.any(fresh.log_prob(x).numpy() != model.log_prob(x).numpy())
    fresh.load_weights(weights)
    np.testing.assert_array_equal(fresh.log_prob(x), model.log_prob(x))
