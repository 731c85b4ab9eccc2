"""glow(): the whole multi-scale flow as one distribution, and conditional routing through nested chains.

The bijectors inside a GLOW are tested one by one elsewhere (test_actnorm, test_conv1x1, test_coupling,
test_squeeze_factor_out); this module checks what only the assembled flow can get wrong: the order of the
pieces, the logit preprocessing on the data side, naming and caching across levels, both parameter doors,
saving, XLA, and `conditional_kwargs` on nested structures.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import ActNorm, AffineCoupling, FactorOut, Invertible1x1Conv
from tfp_nvp.bijectors._base import KerasParameterizedBijector
from tfp_nvp.flows import glow
from tfp_nvp import initialize

tfb, tfd = tfp.bijectors, tfp.distributions

SHAPE = (8, 8, 1)  # D = 64: two levels of squeezing, small enough for a float64 autodiff Jacobian
SMALL = (4, 4, 2)  # for tests that do not need the Jacobian
ALPHA = 0.05


def _tiny(image_shape=SHAPE, dtype="float64", seed=0, **kwargs):
    kwargs = {"num_levels": 2, "num_steps_per_level": 1, "hidden_channels": 8, **kwargs}
    return glow(image_shape, dtype=dtype, seed=seed, **kwargs)


def _images(n, shape=SHAPE, seed=0, dtype=np.float64):
    """Data in the open unit cube, where the logit preprocessing is defined."""
    return np.random.default_rng(seed).uniform(0.02, 0.98, size=(n, *shape)).astype(dtype)


def _fresh(t):
    """A new tensor with the same values, so TFP's bijector cache cannot answer from an earlier call."""
    return tf.constant(np.asarray(t))


def _ready(flow, randomize, seed, scale=0.5):
    """Initialises every ActNorm from data, then randomises every trainable variable (a non-identity map)."""
    assert initialize(flow, _images(64, flow.event_shape.as_list(), seed=seed)) == 2
    randomize(flow, seed=seed, scale=scale)
    return flow


@pytest.fixture(scope="module")
def exact_flows(randomize):
    """float64 GLOWs with and without the logit step whose inner flows hold identical random weights.

    Both are built with the same seed and randomised with the same generator seed, and the logit chain has no
    variables, so the variable lists pair up one to one and the only difference is the data-side logit.
    """
    flows = {alpha: _ready(_tiny(logit_alpha=alpha), randomize, seed=1) for alpha in (ALPHA, None)}
    pairs = zip(flows[ALPHA].trainable_variables, flows[None].trainable_variables)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in pairs)
    return flows


# ---------------------------------------------------------------------------------------------- structure
def test_structure_names_and_event_shape():
    flow = _tiny(num_levels=2, num_steps_per_level=2, image_shape=(8, 8, 2), dtype="float32")
    assert flow.event_shape == SHAPE[:2] + (2,) and flow.distribution.event_shape == flow.event_shape
    bijectors = tfp_nvp.flow_bijectors(flow)  # walks nested chains, Invert and OnChannels

    def count(cls):
        return sum(isinstance(b, cls) for b in bijectors)

    assert (count(ActNorm), count(Invertible1x1Conv), count(AffineCoupling), count(FactorOut)) == (4, 4, 4, 1)
    parametric = [b for b in bijectors if isinstance(b, KerasParameterizedBijector)]
    assert len({b.name for b in parametric}) == len(parametric)
    ids = [id(v) for v in flow.trainable_variables]
    assert len(ids) == len(set(ids)) > 0


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("alpha", [ALPHA, None], ids=["logit", "no-logit"])
def test_round_trips_both_ways(exact_flows, alpha):
    flow = exact_flows[alpha]
    bij = flow.bijector
    x = _images(4, seed=2)
    z = bij.inverse(_fresh(x)).numpy()
    assert np.abs(z - x).max() > 0.5  # a genuinely non-identity map
    np.testing.assert_allclose(bij.forward(_fresh(z)).numpy(), x, rtol=1e-9, atol=1e-9)
    z0 = flow.distribution.sample(4, seed=3).numpy()
    x0 = bij.forward(_fresh(z0)).numpy()
    np.testing.assert_allclose(bij.inverse(_fresh(x0)).numpy(), z0, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("alpha", [ALPHA, None], ids=["logit", "no-logit"])
def test_log_det_matches_autodiff_jacobian(exact_flows, alpha, autodiff_log_det):
    flow = exact_flows[alpha]
    bij = flow.bijector
    x = _images(2, seed=4)
    ildj = bij.inverse_log_det_jacobian(_fresh(x), event_ndims=3).numpy()
    assert np.all(np.abs(ildj) > 1.0)
    np.testing.assert_allclose(ildj, autodiff_log_det(bij.inverse, _fresh(x), 3), rtol=1e-8, atol=1e-8)
    # The sampling direction: fldj(z) = -ildj(forward(z)) at the same point.
    z = bij.inverse(_fresh(x)).numpy()
    np.testing.assert_allclose(bij.forward_log_det_jacobian(_fresh(z), event_ndims=3).numpy(), -ildj,
                               rtol=1e-9, atol=1e-9)


def test_logit_preprocessing_is_the_realnvp_transform(exact_flows):
    """With identical inner weights, the logit flow equals the plain flow after u = logit(a + (1 - 2a) x)."""
    with_logit, plain = exact_flows[ALPHA], exact_flows[None]
    x = _images(3, seed=5)
    s = ALPHA + (1 - 2 * ALPHA) * x
    u = np.log(s) - np.log1p(-s)
    np.testing.assert_allclose(with_logit.bijector.inverse(_fresh(x)).numpy(),
                               plain.bijector.inverse(_fresh(u)).numpy(), rtol=1e-10, atol=1e-10)
    # du/dx = (1 - 2a) / (s (1 - s)) per pixel.
    logit_log_det = np.sum(np.log(1 - 2 * ALPHA) - np.log(s) - np.log1p(-s), axis=(1, 2, 3))
    np.testing.assert_allclose(
        with_logit.bijector.inverse_log_det_jacobian(_fresh(x), event_ndims=3).numpy(),
        plain.bijector.inverse_log_det_jacobian(_fresh(u), event_ndims=3).numpy() + logit_log_det, rtol=1e-10)


@pytest.mark.parametrize("alpha", [ALPHA, None], ids=["logit", "no-logit"])
def test_log_prob_is_change_of_variables(exact_flows, alpha):
    flow = exact_flows[alpha]
    x = _images(5, seed=6)
    z = flow.bijector.inverse(_fresh(x))
    expected = flow.distribution.log_prob(z) + flow.bijector.inverse_log_det_jacobian(_fresh(x), event_ndims=3)
    log_prob = flow.log_prob(_fresh(x)).numpy()
    assert log_prob.shape == (5,)
    np.testing.assert_allclose(log_prob, expected.numpy(), rtol=1e-10)


# ---------------------------------------------------------------------------------------------- sampling
def test_sample_shapes_and_range(exact_flows):
    for flow in exact_flows.values():
        assert flow.event_shape == SHAPE
        assert flow.sample(seed=7).shape == SHAPE
        assert flow.sample([2, 3], seed=7).shape == (2, 3, *SHAPE)
    # The data side ends in x = (sigmoid(u) - a) / (1 - 2a), which maps the real line onto this open interval,
    # wider than (0, 1) by a / (1 - 2a) on each side: samples are bounded, but not by the unit cube.
    lo, hi = -ALPHA / (1 - 2 * ALPHA), (1 - ALPHA) / (1 - 2 * ALPHA)
    x = exact_flows[ALPHA].sample(64, seed=8).numpy()
    assert np.all(np.isfinite(x)) and x.min() > lo and x.max() < hi
    # alpha = 0 is a bare sigmoid on the data side: every sample lies in the unit interval.
    bare = _tiny(logit_alpha=0.0, seed=2)
    x = bare.sample(64, seed=9).numpy()
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05


# ---------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("shape, levels", [((8, 8, 1), 4), ((8, 6, 1), 2), ((6, 8, 1), 2), ((4, 4, 1), 3)])
def test_image_shape_must_be_divisible_by_the_squeezes(shape, levels):
    with pytest.raises(ValueError, match=rf"`image_shape`.*divisible by 2 \*\* num_levels = {2 ** levels}"):
        glow(shape, num_levels=levels, num_steps_per_level=1, hidden_channels=4)


def test_exit_fraction_must_give_whole_channels():
    # 4 channels after the first squeeze of a 1-channel image: a third of them is not a whole number.
    with pytest.raises(ValueError, match=r"`exit_fraction` must leave a whole number of channels.*level 0 has 4 channels.*1/4, 2/4, 3/4"):
        _tiny(exit_fraction=1 / 3)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="`exit_fraction` must be in \\(0, 1\\)"):
            _tiny(exit_fraction=bad)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_levels=0), "num_levels"), (dict(num_levels=-1), "num_levels"), (dict(num_levels=1.5), "num_levels"),
    (dict(num_levels=True), "num_levels"), (dict(num_steps_per_level=0), "num_steps_per_level"),
    (dict(hidden_channels=0), "hidden_channels"), (dict(logit_alpha=0.5), "logit_alpha"),
    (dict(logit_alpha=-0.1), "logit_alpha"), (dict(logit_alpha=float("nan")), "logit_alpha"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        _tiny(**kwargs)


# ---------------------------------------------------------------------------------------------- Keras door
@pytest.fixture(scope="module")
def saved_model(randomize, tmp_path_factory):
    model = tfp_nvp.FlowModel(_tiny(SMALL, dtype="float32", seed=3))
    _ready(model.distribution, randomize, seed=10)
    path = tmp_path_factory.mktemp("glow") / "glow.keras"
    model.save(path)
    return model, keras.models.load_model(path)


def test_both_doors_list_the_same_variables(saved_model, same_variable_set):
    model, _ = saved_model
    flow_vars = model.distribution.trainable_variables
    assert len(flow_vars) > 0
    assert same_variable_set([w.value for w in model.trainable_weights], flow_vars)
    flags = [w for w in model.non_trainable_weights if w.path.endswith("initialized")]
    assert len(flags) == 2  # one ActNorm per level


def test_keras_file_reloads_exactly_without_reinitialising(saved_model):
    model, loaded = saved_model
    assert isinstance(loaded, tfp_nvp.FlowModel) and loaded is not model
    probe = _images(6, SMALL, seed=11, dtype=np.float32)
    expected = model.log_prob(probe).numpy()
    np.testing.assert_array_equal(loaded.log_prob(_fresh(probe)).numpy(), expected)
    actnorms = [b for b in tfp_nvp.flow_bijectors(loaded.distribution) if isinstance(b, ActNorm)]
    assert len(actnorms) == 2 and all(bool(a.initialized) for a in actnorms)
    # A batch with quite different statistics must not trigger a data-dependent re-initialisation.
    other = _images(32, SMALL, seed=12, dtype=np.float32) * 0.3
    assert initialize(loaded, other) == 0
    np.testing.assert_array_equal(loaded.log_prob(_fresh(probe)).numpy(), expected)


# ---------------------------------------------------------------------------------------------- instances
def test_equal_config_glows_do_not_share_results(randomize):
    a, b = _tiny(SMALL, dtype="float32", seed=4), _tiny(SMALL, dtype="float32", seed=4)
    x = tf.constant(_images(4, SMALL, seed=13, dtype=np.float32))
    data = _images(64, SMALL, seed=14)
    assert initialize(a, data) == initialize(b, data) == 2
    # Same seed, same data: the same model, so the seed really fixes the build.
    np.testing.assert_array_equal(a.log_prob(x).numpy(), b.log_prob(_fresh(x)).numpy())
    randomize(a, seed=15, scale=0.5)
    randomize(b, seed=16, scale=0.5)
    # The very same tensor `x` goes to both: a shared TFP cache would hand b the result cached for a.
    lp_a, lp_b = a.log_prob(x).numpy(), b.log_prob(x).numpy()
    assert np.abs(lp_a - lp_b).min() > 1e-3
    np.testing.assert_allclose(lp_b, b.log_prob(_fresh(x)).numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- XLA
def test_eager_equals_xla_float32(randomize):
    flow = _ready(_tiny(SMALL, dtype="float32", seed=5), randomize, seed=17)
    x = _fresh(_images(8, SMALL, seed=18, dtype=np.float32))
    eager = flow.log_prob(x).numpy()
    compiled = tf.function(flow.log_prob, jit_compile=True)(_fresh(x)).numpy()
    assert np.all(np.isfinite(eager))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- conditioning
@pytest.fixture(scope="module")
def nested_conditional(randomize):
    """Two conditional couplings, one inside a plain chain and one inside an inverted chain."""
    def coupling(name, flip):
        return AffineCoupling([2], conditional_shape=[3], hidden_units=(8,), flip=flip, dtype=tf.float64,
                              name=name)

    c0, c1 = coupling("c0", False), coupling("c1", True)
    bijector = tfb.Chain([tfb.Chain([c0], name="a"), tfb.Invert(tfb.Chain([c1], name="b"))])
    flow = tfd.TransformedDistribution(tfp_nvp.standard_normal([2], tf.float64), bijector)
    randomize(flow, seed=19)
    return flow, c0, c1


def _by_hand(flow, c0, c1, x, cond0, cond1):
    """log_prob with each coupling called directly: the density pass runs c0.inverse, then c1.forward."""
    x, cond0, cond1 = _fresh(x), _fresh(cond0), _fresh(cond1)
    h = c0.inverse(x, conditional_input=cond0)
    z = c1.forward(h, conditional_input=cond1)
    return (flow.distribution.log_prob(z) + c0.inverse_log_det_jacobian(x, event_ndims=1, conditional_input=cond0)
            + c1.forward_log_det_jacobian(h, event_ndims=1, conditional_input=cond1)).numpy()


def test_conditional_kwargs_reach_every_coupling_in_nested_chains(nested_conditional):
    flow, c0, c1 = nested_conditional
    rng = np.random.default_rng(20)
    x = rng.normal(size=(16, 2))
    cond, other = rng.normal(size=(16, 3)), rng.normal(size=(16, 3)) + 1.0
    kwargs = tfp_nvp.conditional_kwargs(flow, _fresh(cond))
    routed = flow.log_prob(_fresh(x), bijector_kwargs=kwargs).numpy()
    # The routed result is what the couplings compute when each gets the condition directly ...
    np.testing.assert_allclose(routed, _by_hand(flow, c0, c1, x, cond, cond), rtol=1e-10)
    # ... and each coupling's condition matters on its own, so neither could have been skipped or given zeros.
    assert np.abs(routed - _by_hand(flow, c0, c1, x, other, cond)).min() > 1e-4
    assert np.abs(routed - _by_hand(flow, c0, c1, x, cond, other)).min() > 1e-4
    changed = flow.log_prob(_fresh(x), bijector_kwargs=tfp_nvp.conditional_kwargs(flow, _fresh(other))).numpy()
    np.testing.assert_allclose(changed, _by_hand(flow, c0, c1, x, other, other), rtol=1e-10)
    # Sampling routes the same dict the other way.
    seed = [3, 1]
    s = flow.sample(16, seed=seed, bijector_kwargs=kwargs).numpy()
    z = flow.distribution.sample(16, seed=seed)
    expected = c0.forward(c1.inverse(z, conditional_input=_fresh(cond)), conditional_input=_fresh(cond))
    np.testing.assert_allclose(s, expected.numpy(), rtol=1e-10)


def test_missing_condition_in_nested_chains_is_a_clear_error(nested_conditional):
    flow, _, _ = nested_conditional
    with pytest.raises(ValueError, match=r"conditional_shape=\[3\].*conditional_kwargs"):
        flow.log_prob(tf.zeros([4, 2], tf.float64))
    twins = tfb.Chain([AffineCoupling([2], conditional_shape=[3], hidden_units=(4,), name="same"),
                       AffineCoupling([2], conditional_shape=[3], hidden_units=(4,), name="same")])
    with pytest.raises(ValueError, match="unique names"):
        tfp_nvp.conditional_kwargs(twins, tf.zeros([1, 3]))


def test_initialize_dequantizes_integer_images_of_a_levels_model():
    # Integer images scored as if continuous would sit outside the logit's support; a levels model must
    # initialise from the dequantized data that training feeds it.
    flow = glow([8, 8, 1], num_levels=1, num_steps_per_level=1, hidden_channels=8, seed=0)
    model = tfp_nvp.FlowModel(flow, levels=17)
    # Only the lower half of the levels, so the data's logit mean is far from 0 (what a wrong input would give).
    x = np.random.default_rng(0).integers(0, 9, size=(64, 8, 8, 1)).astype(np.int32)
    assert initialize(model, x) == 1
    actnorm = next(b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, ActNorm))
    assert np.all(np.isfinite(actnorm.log_scale.numpy())) and np.all(np.isfinite(actnorm.shift.numpy()))
    # The first ActNorm sees the logit of the dequantized data, squeezed to 4 channels of 1024 values each
    # (standard error of a channel mean ~0.05): compare with the same statistics of another dequantization.
    u = tfp_nvp.LogitTransform(0.05).inverse(tfp_nvp.images.dequantize(x, 17, seed=(1, 1)))
    assert np.allclose(actnorm.shift.numpy(), np.mean(u.numpy()), atol=0.25)
    assert abs(np.mean(u.numpy())) > 1.0
    assert np.all(np.isfinite(model.log_prob(tfp_nvp.images.dequantize(x, 17, seed=(2, 2))).numpy()))
