"""glow(..., conditional_shape=[m]): conditional couplings, conditional split priors and a conditional top prior.

The flow is one `tfd.TransformedDistribution`; the context reaches every conditional piece through
`tfp_nvp.conditional_kwargs` or `FlowModel`'s dict inputs. Small images (4x4x1: one split, a [1, 1, 8] top
level) keep the float64 autodiff Jacobian cheap.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp
from tfp_nvp import ActNorm, AffineCoupling, ConditionalAffine, FactorOut
from tfp_nvp.flows import glow
from tfp_nvp import initialize

SHAPE = (4, 4, 1)
M = 3  # context size


def _conditional(dtype="float64", seed=0, **kwargs):
    kwargs = {"num_levels": 2, "num_steps_per_level": 1, "hidden_channels": 8, **kwargs}
    return glow(SHAPE, conditional_shape=[M], dtype=dtype, seed=seed, **kwargs)


def _images(n, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).uniform(0.02, 0.98, size=(n, *SHAPE)).astype(dtype)


def _context(n, seed=0, dtype=np.float64):
    return np.random.default_rng(seed + 100).normal(size=(n, M)).astype(dtype)


def _fresh(t):
    """A new tensor with the same values, so TFP's bijector cache cannot answer from an earlier call."""
    return tf.constant(np.asarray(t))


def _kwargs(flow, c):
    return tfp_nvp.conditional_kwargs(flow, _fresh(c))


def _swap(kwargs, target, c):
    """`kwargs` with the condition of the bijector named `target` alone replaced by `c`."""
    return {k: ({"conditional_input": _fresh(c)} if k == target else _swap(v, target, c))
            if isinstance(v, dict) else v for k, v in kwargs.items()}


def _conditional_bijectors(flow):
    return [b for b in tfp_nvp.flow_bijectors(flow) if getattr(b, "_conditional_shape", None) is not None]


@pytest.fixture(scope="module")
def flow(randomize):
    """A float64 conditional GLOW with initialised ActNorms and random (non-identity) weights everywhere."""
    flow = _conditional()
    assert initialize(flow, _images(64, seed=1), conditional_input=_fresh(_context(64, seed=1))) == 2
    randomize(flow, seed=2, scale=0.5)
    return flow


# ---------------------------------------------------------------------------------------------- structure
def test_every_conditional_piece_is_routed(flow):
    pieces = _conditional_bijectors(flow)
    kinds = sorted(type(b).__name__ for b in pieces)
    assert kinds == ["AffineCoupling", "AffineCoupling", "ConditionalAffine", "FactorOut"]
    assert {b.name for b in pieces} == {"glow_l0_s0_coupling", "glow_l1_s0_coupling", "glow_l0_split",
                                         "glow_top_prior"}

    def leaves(d):
        for k, v in d.items():
            if k == "conditional_input":
                yield v
            else:
                yield from leaves(v)

    c = _fresh(_context(2))
    assert sum(1 for leaf in leaves(tfp_nvp.conditional_kwargs(flow, c)) if leaf is c) == 4
    top = next(b for b in pieces if isinstance(b, ConditionalAffine))
    assert top.event_shape == (1, 1, 8)  # the top level's squeezed latent


def test_unconditional_glow_is_unchanged():
    plain = glow(SHAPE, num_levels=2, num_steps_per_level=1, hidden_channels=8, seed=0)
    assert "conditional_shape" not in plain._tfp_nvp_spec["config"]
    assert not _conditional_bijectors(plain)
    assert not any(isinstance(b, ConditionalAffine) for b in tfp_nvp.flow_bijectors(plain))
    with pytest.raises(ValueError, match="has no conditional bijectors"):
        tfp_nvp.conditional_kwargs(plain, tf.zeros([1, M]))


# ---------------------------------------------------------------------------------------------- exactness
def test_round_trips_with_a_context(flow):
    bij = flow.bijector
    x, c = _images(4, seed=3), _context(4, seed=3)
    z = bij.inverse(_fresh(x), **_kwargs(flow, c)).numpy()
    assert np.abs(z - x).max() > 0.5  # a genuinely non-identity map
    np.testing.assert_allclose(bij.forward(_fresh(z), **_kwargs(flow, c)).numpy(), x, rtol=1e-9, atol=1e-9)
    z0 = flow.distribution.sample(4, seed=4).numpy()
    x0 = bij.forward(_fresh(z0), **_kwargs(flow, c)).numpy()
    np.testing.assert_allclose(bij.inverse(_fresh(x0), **_kwargs(flow, c)).numpy(), z0, rtol=1e-7, atol=1e-7)


def test_log_det_matches_autodiff_jacobian(flow, autodiff_log_det):
    bij = flow.bijector
    x, c = _images(3, seed=5), _context(3, seed=5)
    ildj = bij.inverse_log_det_jacobian(_fresh(x), event_ndims=3, **_kwargs(flow, c)).numpy()
    assert np.all(np.abs(ildj) > 1.0)
    expected = autodiff_log_det(lambda t: bij.inverse(t, **_kwargs(flow, c)), _fresh(x), 3)
    np.testing.assert_allclose(ildj, expected, rtol=1e-8, atol=1e-8)
    z = bij.inverse(_fresh(x), **_kwargs(flow, c)).numpy()
    fldj = bij.forward_log_det_jacobian(_fresh(z), event_ndims=3, **_kwargs(flow, c)).numpy()
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-9, atol=1e-9)
    # log_prob is the change of variables with that log-det.
    log_prob = flow.log_prob(_fresh(x), bijector_kwargs=_kwargs(flow, c)).numpy()
    np.testing.assert_allclose(log_prob, flow.distribution.log_prob(z).numpy() + ildj, rtol=1e-10)


def test_a_single_context_broadcasts_over_the_batch(flow):
    x = _images(5, seed=6)
    # Contexts [K, 1, m] against images [N]: every image under every context (a generative classifier's
    # scores), each row what one context of shape [m], broadcast over the images, gives.
    contexts = _context(4, seed=7)
    grid = flow.log_prob(_fresh(x), bijector_kwargs=_kwargs(flow, contexts[:, None, :])).numpy()
    assert grid.shape == (4, 5) and np.ptp(grid, axis=0).min() > 1e-3
    np.testing.assert_allclose(grid[2], flow.log_prob(_fresh(x), bijector_kwargs=_kwargs(flow, contexts[2])),
                               rtol=1e-12)
    # The sampling direction broadcasts too: one latent pushed forward under several contexts.
    z = flow.distribution.sample(seed=8)
    images = flow.bijector.forward(z, **_kwargs(flow, contexts)).numpy()
    assert images.shape == (4, *SHAPE)
    np.testing.assert_allclose(images[2], flow.bijector.forward(_fresh(z), **_kwargs(flow, contexts[2])).numpy(),
                               rtol=1e-12)


# ---------------------------------------------------------------------------------------------- the context
def test_log_prob_depends_on_the_context_through_every_piece(flow):
    x, c, other = _images(6, seed=8), _context(6, seed=8), _context(6, seed=9)
    kwargs = _kwargs(flow, c)
    base = flow.log_prob(_fresh(x), bijector_kwargs=kwargs).numpy()
    changed = flow.log_prob(_fresh(x), bijector_kwargs=_kwargs(flow, other)).numpy()
    assert np.abs(base - changed).min() > 1e-4
    # Changing the condition of one piece alone changes the latent: each piece really uses it (every one of
    # them changes the exiting or the top-level part of z, which the base density sees).
    z = flow.bijector.inverse(_fresh(x), **kwargs).numpy()
    for bij in _conditional_bijectors(flow):
        swapped = flow.bijector.inverse(_fresh(x), **_swap(kwargs, bij.name, other)).numpy()
        assert np.abs(z - swapped).max() > 1e-3, bij.name


def test_split_prior_is_a_conditional_gaussian(randomize):
    """x_exit ~ N(mu(x_keep, c), sigma(x_keep, c)^2): the density of the exiting channels changes with c."""
    split = FactorOut((2, 2, 4), num_exit_channels=2, conditional_shape=[M], dtype=tf.float64, name="split")
    randomize(split, seed=10)
    rng = np.random.default_rng(11)
    y, c = rng.normal(size=(3, 2, 2, 4)), _context(3, seed=11)
    out = split.network(tf.constant(y[..., :2]), conditional_input=tf.constant(c)).numpy()
    mean, log_sigma = out[..., :2], out[..., 2:]  # one tensor, mean first
    z = split.inverse(_fresh(y), conditional_input=_fresh(c)).numpy()
    np.testing.assert_allclose(z[..., :2], y[..., :2])
    np.testing.assert_allclose(z[..., 2:], (y[..., 2:] - mean) * np.exp(-log_sigma), rtol=1e-12)
    other = split.inverse(_fresh(y), conditional_input=_fresh(_context(3, seed=12))).numpy()
    assert np.abs(other[..., 2:] - z[..., 2:]).min() > 1e-6


def test_top_prior_is_a_conditional_gaussian_base(randomize):
    """On a standard normal, ConditionalAffine gives N(shift(c), exp(log_scale(c))^2) per latent entry."""
    prior = ConditionalAffine([1, 1, 2], conditional_shape=[M], hidden_units=(4,), dtype=tf.float64)
    randomize(prior, seed=13)
    dist = tfp_nvp.flows._base._Flow(tfp_nvp.standard_normal([1, 1, 2], tf.float64), prior)
    c = _context(2, seed=14)
    shift, log_scale = (t.numpy().reshape(2, 1, 1, 2) for t in prior.network(tf.constant(c)))
    y = np.random.default_rng(15).normal(size=(2, 1, 1, 2))
    z = (y - shift) / np.exp(log_scale)
    expected = np.sum(-0.5 * z**2 - 0.5 * np.log(2 * np.pi) - log_scale, axis=(1, 2, 3))
    got = dist.log_prob(_fresh(y), bijector_kwargs=tfp_nvp.conditional_kwargs(dist, _fresh(c))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.abs(shift).min() > 1e-4 and np.abs(log_scale).min() > 1e-4


# ---------------------------------------------------------------------------------------------- training
def test_gradients_reach_every_weight(flow):
    x, c = _fresh(_images(8, seed=16)), _fresh(_context(8, seed=16))
    variables = flow.trainable_variables
    names = " ".join(v.name for v in variables)
    assert "top_prior" in names and "split" in names
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c)))
    grads = tape.gradient(loss, variables)
    missing = [v.name for v, g in zip(variables, grads) if g is None or not np.any(g.numpy() != 0)]
    assert not missing


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = tfp_nvp.FlowModel(_conditional(dtype="float32", seed=3))
    x, c = _images(96, seed=17, dtype=np.float32), np.eye(M, dtype=np.float32)[np.arange(96) % M]
    assert initialize(model, x, conditional_input=c) == 2
    before = [w.numpy().copy() for w in model.trainable_weights]
    # The traced training step, as users run it (the context routed into the step through the dict input).
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit({"x": x, "conditional_input": c}, epochs=1, batch_size=32, verbose=0)
    return model, before, history, x, c


def test_fit_with_dict_inputs_moves_every_weight(trained, same_variable_set):
    model, before, history, _, _ = trained
    assert np.isfinite(history.history["loss"][0])
    assert same_variable_set([w.value for w in model.trainable_weights], model.distribution.trainable_variables)
    unmoved = [w.path for w, b in zip(model.trainable_weights, before) if np.array_equal(w.numpy(), b)]
    assert not unmoved


def test_keras_file_and_weights_reload_exactly(trained, tmp_path):
    model, _, _, x, c = trained
    expected = model.log_prob(x[:8], conditional_input=c[:8]).numpy()
    path = tmp_path / "conditional_glow.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.distribution._tfp_nvp_spec["config"]["conditional_shape"] == [M]
    np.testing.assert_array_equal(loaded.log_prob(_fresh(x[:8]), conditional_input=_fresh(c[:8])).numpy(), expected)
    np.testing.assert_array_equal(loaded({"x": _fresh(x[:8]), "conditional_input": _fresh(c[:8])}).numpy(), expected)
    actnorms = [b for b in tfp_nvp.flow_bijectors(loaded.distribution) if isinstance(b, ActNorm)]
    assert len(actnorms) == 2 and all(bool(a.initialized) for a in actnorms)
    weights = tmp_path / "conditional_glow.weights.h5"
    model.save_weights(weights)
    twin = tfp_nvp.FlowModel(_conditional(dtype="float32", seed=3))
    twin.load_weights(weights)
    np.testing.assert_array_equal(twin.log_prob(_fresh(x[:8]), conditional_input=_fresh(c[:8])).numpy(), expected)


def test_conditional_sampling(trained):
    model, _, _, _, _ = trained
    labels = np.eye(M, dtype=np.float32)
    per_class = model.sample(M, seed=1, conditional_input=labels).numpy()
    assert per_class.shape == (M, *SHAPE) and np.all(np.isfinite(per_class))
    # Same base draw, different classes: different images; one context broadcasts over all samples.
    same_draw = np.stack([model.sample(2, seed=2, conditional_input=label).numpy() for label in labels])
    assert same_draw.shape == (M, 2, *SHAPE)
    assert np.abs(same_draw[0] - same_draw[1]).max() > 1e-4
    flow = model.distribution
    cold = tfp_nvp.images.sample(flow, 4, temperature=0.5, seed=3,
                                 bijector_kwargs=tfp_nvp.conditional_kwargs(flow, labels[0])).numpy()
    assert cold.shape == (4, *SHAPE) and np.all(np.isfinite(cold))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [[2, 3], [0], "abc"])
def test_bad_conditional_shape_is_named(shape):
    with pytest.raises(ValueError, match="`conditional_shape`"):
        glow(SHAPE, num_levels=2, num_steps_per_level=1, hidden_channels=4, conditional_shape=shape)


def test_bad_conditions_are_clear_errors(trained):
    model, _, _, x, c = trained
    flow = model.distribution
    xt = tf.constant(x[:4])
    with pytest.raises(ValueError, match=r"`conditional_input` must have shape \[\.\.\., 3\].*got \(4, 2\)"):
        flow.log_prob(xt, bijector_kwargs=tfp_nvp.conditional_kwargs(flow, tf.zeros([4, 2])))
    with pytest.raises(ValueError, match=r"`conditional_input` must have shape \[\.\.\., 3\]"):
        model.log_prob(xt, conditional_input=np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"`conditional_input` of shape \(3, 3\) must broadcast with the data's "
                                         r"batch shape \(4,\)"):
        flow.log_prob(xt, bijector_kwargs=tfp_nvp.conditional_kwargs(flow, tf.zeros([3, 3])))
    with pytest.raises(ValueError, match=r"built with conditional_shape=\[3\].*conditional_kwargs"):
        flow.log_prob(xt)
    with pytest.raises(ValueError, match=r"`conditional_input` is required"):
        model({"x": xt})
    with pytest.raises(TypeError, match=r"`conditional_input` has dtype float64"):
        flow.log_prob(xt, bijector_kwargs=tfp_nvp.conditional_kwargs(flow, tf.zeros([4, 3], tf.float64)))


def test_bijector_level_errors():
    with pytest.raises(ValueError, match="`conditional_shape` must be given"):
        ConditionalAffine([2], conditional_shape=None)
    prior = ConditionalAffine([2], conditional_shape=[M], name="prior")
    with pytest.raises(ValueError, match=r"prior was built with conditional_shape=\[3\]"):
        prior.forward(tf.zeros([1, 2]))
    split = FactorOut((2, 2, 4), name="plain_split")
    with pytest.raises(ValueError, match="plain_split was built without `conditional_shape`"):
        split.inverse(tf.zeros([1, 2, 2, 4]), conditional_input=tf.zeros([1, M]))
    with pytest.raises(ValueError, match=r"`network` returned one tensor of shape \[2, 3\].*2 \* 2 \(shift then"):
        ConditionalAffine([2], conditional_shape=[M], network=keras.layers.Dense(3))


# ---------------------------------------------------------------------------------------------- spline couplings
def test_spline_glow_is_exact_and_reloads_exactly(randomize, autodiff_log_det, tmp_path):
    flow = _conditional(coupling="spline", num_bins=4, bound=3.0)
    couplings = [b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, tfp_nvp.SplineCoupling)]
    assert len(couplings) == 2 and not any(isinstance(b, AffineCoupling) for b in tfp_nvp.flow_bijectors(flow))
    assert all(b.num_bins == 4 and b.bound == 3.0 for b in couplings)
    initialize(flow, _images(64, seed=20), conditional_input=_fresh(_context(64, seed=20)))
    randomize(flow, seed=21, scale=0.5)
    bij = flow.bijector
    x, c = _images(2, seed=22), _context(2, seed=22)
    ildj = bij.inverse_log_det_jacobian(_fresh(x), event_ndims=3, **_kwargs(flow, c)).numpy()
    expected = autodiff_log_det(lambda t: bij.inverse(t, **_kwargs(flow, c)), _fresh(x), 3)
    np.testing.assert_allclose(ildj, expected, rtol=1e-8, atol=1e-8)
    assert np.all(np.abs(ildj) > 1.0)
    config = tfp_nvp.FlowModel(flow).get_config()
    assert config["distribution"]["config"]["coupling"] == "spline"
    rebuilt = tfp_nvp.FlowModel.from_config(config).distribution
    assert [type(b).__name__ for b in tfp_nvp.flow_bijectors(rebuilt)] == \
        [type(b).__name__ for b in tfp_nvp.flow_bijectors(flow)]
    # The trained state comes back exactly from a `.keras` file.
    model = tfp_nvp.FlowModel(flow)
    expected = model.log_prob(x, conditional_input=c).numpy()
    model.save(tmp_path / "spline_glow.keras")
    loaded = keras.models.load_model(tmp_path / "spline_glow.keras")
    assert sum(isinstance(b, tfp_nvp.SplineCoupling) for b in tfp_nvp.flow_bijectors(loaded.distribution)) == 2
    np.testing.assert_array_equal(loaded.log_prob(_fresh(x), conditional_input=_fresh(c)).numpy(), expected)
    with pytest.raises(ValueError, match="`coupling` must be 'affine' or 'spline'"):
        _conditional(coupling="additive")
