"""real_nvp as a distribution: normalisation, change of variables, bases, images, conditioning, XLA."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import AffineCoupling

tfb, tfd = tfp.bijectors, tfp.distributions


def grid_2d(lo=-12.0, hi=12.0, step=0.04, dtype=np.float64):
    ticks = np.arange(lo, hi, step) + step / 2
    gx, gy = np.meshgrid(ticks, ticks, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], -1).astype(dtype), step**2


@pytest.fixture(scope="module")
def random_flow(randomize):
    """A float64 RealNVP on [2] with random weights: a genuinely non-Gaussian density."""
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=4, hidden_units=(16,), dtype="float64", seed=0)
    # scale 1.5: mean |log det| near 0.8 per sample, while the tails still fit inside the +-12 integration grid.
    randomize(flow, seed=123, scale=1.5)
    return flow


def test_couplings_alternate_and_have_unique_names(randomize):
    flow = tfp_nvp.real_nvp([4], num_coupling_layers=3, hidden_units=(8,))
    couplings = [b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, AffineCoupling)]
    assert len(couplings) == 3
    assert len({b.name for b in couplings}) == 3
    # Alternate flips make every entry transformed by some coupling.
    x = tf.random.stateless_normal([1, 4], seed=[0, 0])
    moved = np.zeros(4, bool)
    for b in couplings:
        randomize(b, seed=1)
        moved |= (b.forward(x).numpy() != x.numpy())[0]
    assert moved.all()


def test_log_prob_integrates_to_one(random_flow):
    pts, area = grid_2d()
    log_p = random_flow.log_prob(pts).numpy()
    base_log_p = tfp_nvp.standard_normal([2], tf.float64).log_prob(pts).numpy()
    # The random flow is far from its Gaussian base, yet still a normalised density.
    assert np.abs(log_p - base_log_p)[base_log_p > -6].max() > 0.5
    np.testing.assert_allclose(np.exp(log_p).sum() * area, 1.0, atol=1e-3)


def test_sample_matches_change_of_variables(random_flow):
    base, bij = random_flow.distribution, random_flow.bijector
    seed = [4, 2]
    z = base.sample(64, seed=seed)
    x = random_flow.sample(64, seed=seed)
    # Sampling is forward (latent -> data) applied to base samples.
    np.testing.assert_allclose(x, bij.forward(z), rtol=1e-12)
    expected = base.log_prob(z) - bij.forward_log_det_jacobian(z, event_ndims=1)
    np.testing.assert_allclose(random_flow.log_prob(x), expected, rtol=1e-9, atol=1e-9)
    assert np.abs(x.numpy() - z.numpy()).max() > 0.1


def test_prob_is_exp_log_prob(random_flow):
    x = tf.random.stateless_normal([10, 2], seed=[1, 2], dtype=tf.float64)
    np.testing.assert_allclose(random_flow.prob(x), np.exp(random_flow.log_prob(x)), rtol=1e-12)


def test_custom_base_distribution():
    base = tfd.MultivariateNormalDiag(loc=[1.0, -1.0], scale_diag=[2.0, 0.5])
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), base_distribution=base)
    assert flow.distribution is base
    x = tf.random.stateless_normal([8, 2], seed=[3, 3])
    # A fresh flow is the identity, so its density is the base's.
    np.testing.assert_allclose(flow.log_prob(x), base.log_prob(x), rtol=1e-6)
    assert flow.sample(5, seed=1).shape == (5, 2)


def test_base_distribution_with_wrong_event_shape_is_rejected():
    with pytest.raises(ValueError, match=r"`base_distribution`.*event_shape \[2\]"):
        tfp_nvp.real_nvp([2], base_distribution=tfp_nvp.standard_normal([3]))
    with pytest.raises(ValueError, match="`base_distribution`"):
        tfp_nvp.real_nvp([2], base_distribution="normal")


def test_image_real_nvp(randomize):
    flow = tfp_nvp.real_nvp([4, 4, 2], num_coupling_layers=2, hidden_units=(8,), num_blocks=1, dtype="float64")
    randomize(flow, seed=5)
    seed = [7, 7]
    x = flow.sample(3, seed=seed)
    assert x.shape == (3, 4, 4, 2)
    z = flow.distribution.sample(3, seed=seed)
    lp = flow.log_prob(x)
    assert lp.shape == (3,)
    expected = flow.distribution.log_prob(z) - flow.bijector.forward_log_det_jacobian(z, event_ndims=3)
    np.testing.assert_allclose(lp, expected, rtol=1e-9, atol=1e-9)
    assert np.abs(x.numpy() - z.numpy()).max() > 0.1


# --------------------------------------------------------------------------------------------- conditioning
@pytest.fixture(scope="module")
def conditional_flow(randomize):
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=3, hidden_units=(16,), conditional_shape=[3],
                            dtype="float64", seed=1)
    randomize(flow, seed=77)
    return flow


def test_conditional_log_prob_depends_on_condition(conditional_flow):
    x = tf.random.stateless_normal([16, 2], seed=[8, 8], dtype=tf.float64)
    c1 = tf.random.stateless_normal([16, 3], seed=[9, 9], dtype=tf.float64)
    c2 = c1 + 1.0
    lp1 = conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, c1))
    lp2 = conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, c2))
    assert lp1.shape == (16,)
    assert np.all(np.isfinite(lp1.numpy()))
    assert np.abs(lp1.numpy() - lp2.numpy()).max() > 0.1


def test_conditional_density_is_normalised_for_each_condition(conditional_flow):
    pts, area = grid_2d()
    for c in ([0.5, -1.0, 2.0], [-2.0, 0.0, 1.0]):
        kwargs = tfp_nvp.conditional_kwargs(conditional_flow, tf.constant([c], tf.float64))
        np.testing.assert_allclose(np.exp(conditional_flow.log_prob(pts, bijector_kwargs=kwargs)).sum() * area, 1.0,
                                   atol=1e-3)


def test_conditional_sample_and_change_of_variables(conditional_flow):
    c = tf.random.stateless_normal([6, 3], seed=[1, 6], dtype=tf.float64)
    kwargs = tfp_nvp.conditional_kwargs(conditional_flow, c)
    seed = [2, 6]
    x = conditional_flow.sample(6, seed=seed, bijector_kwargs=kwargs)
    assert x.shape == (6, 2)
    z = conditional_flow.distribution.sample(6, seed=seed)
    bij = conditional_flow.bijector
    np.testing.assert_allclose(x, bij.forward(z, **kwargs), rtol=1e-12)
    expected = conditional_flow.distribution.log_prob(z) - bij.forward_log_det_jacobian(z, event_ndims=1, **kwargs)
    np.testing.assert_allclose(conditional_flow.log_prob(x, bijector_kwargs=kwargs), expected, rtol=1e-9, atol=1e-9)


def test_missing_or_wrong_conditional_input(conditional_flow):
    x = tf.zeros([4, 2], tf.float64)
    with pytest.raises(ValueError, match="conditional_shape=\\[3\\].*conditional_kwargs"):
        conditional_flow.log_prob(x)
    with pytest.raises(ValueError, match=r"`conditional_input` must have shape \[\.\.\., 3\]"):
        conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, tf.zeros([4, 2],
                                                                                                        tf.float64)))
    with pytest.raises(ValueError, match="`flow` has no conditional bijectors"):
        tfp_nvp.conditional_kwargs(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,)), x)


# --------------------------------------------------------------------------------------------- XLA
def test_eager_equals_xla(random_flow, conditional_flow):
    x = tf.random.stateless_normal([32, 2], seed=[5, 1], dtype=tf.float64)
    seed = tf.constant([3, 4], tf.int32)
    xla_log_prob = tf.function(random_flow.log_prob, jit_compile=True)
    np.testing.assert_allclose(xla_log_prob(x), random_flow.log_prob(x), rtol=1e-10, atol=1e-10)
    # XLA may pick another stateless RNG algorithm than the CPU kernels, so the same seed need not give the same
    # latent: compare the compiled sample with the eager forward pass of the latent drawn in the same program.
    xla_sample = tf.function(
        lambda s: (random_flow.sample(16, seed=s), random_flow.distribution.sample(16, seed=s)), jit_compile=True)
    x_xla, z_xla = xla_sample(seed)
    np.testing.assert_allclose(x_xla, random_flow.bijector.forward(z_xla), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(tf.function(random_flow.bijector.forward, jit_compile=True)(x),
                               random_flow.bijector.forward(x), rtol=1e-10, atol=1e-10)

    c = tf.random.stateless_normal([32, 3], seed=[5, 2], dtype=tf.float64)
    xla_cond = tf.function(
        lambda x, c: conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, c)),
        jit_compile=True)
    eager_cond = conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, c))
    np.testing.assert_allclose(xla_cond(x, c), eager_cond, rtol=1e-10, atol=1e-10)


def test_eager_equals_xla_float32(randomize):
    flow = tfp_nvp.real_nvp([3], num_coupling_layers=2, hidden_units=(8,), seed=2)
    randomize(flow, seed=9)
    x = tf.random.stateless_normal([32, 3], seed=[5, 3])
    z = tf.random.stateless_normal([32, 3], seed=[5, 4])
    np.testing.assert_allclose(tf.function(flow.log_prob, jit_compile=True)(x), flow.log_prob(x), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(tf.function(flow.bijector.forward, jit_compile=True)(z), flow.bijector.forward(z),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_num_coupling_layers(n):
    with pytest.raises(ValueError, match="`num_coupling_layers`"):
        tfp_nvp.real_nvp([2], num_coupling_layers=n)


@pytest.mark.parametrize("hidden", [(0,), (16, -1), ()])
def test_bad_hidden_units(hidden):
    with pytest.raises(ValueError, match="`hidden_units`"):
        tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=hidden)


@pytest.mark.parametrize("event_shape", [[0], [3, -1, 2], [2, 2], []])
def test_bad_event_shape(event_shape):
    with pytest.raises(ValueError, match="`event_shape`"):
        tfp_nvp.real_nvp(event_shape)


def test_bad_log_scale_bound_mask_and_conditional_shape():
    with pytest.raises(ValueError, match="`log_scale_bound`"):
        tfp_nvp.real_nvp([2], num_coupling_layers=1, log_scale_bound="softplus")
    with pytest.raises(ValueError, match="`mask`"):
        tfp_nvp.real_nvp([2], num_coupling_layers=1, mask="checkerboard")
    with pytest.raises(ValueError, match="`conditional_shape`"):
        tfp_nvp.real_nvp([2], num_coupling_layers=1, conditional_shape=[0])


def test_wrong_event_shape_at_call_time():
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(4,))
    with pytest.raises(ValueError, match=r"must have shape \[\.\.\., 2\]"):
        flow.log_prob(tf.zeros([3, 3]))
    image = tfp_nvp.real_nvp([4, 4, 2], num_coupling_layers=1, hidden_units=(4,), num_blocks=0)
    with pytest.raises(ValueError, match=r"must have shape \[\.\.\., 4, 4, 2\]"):
        image.log_prob(tf.zeros([3, 4, 4, 3]))


def test_conv1x1_mixing_between_couplings(randomize, autodiff_log_det):
    """mixing="conv1x1" puts a learned invertible linear map between consecutive couplings; still exact."""
    flow = tfp_nvp.real_nvp([3], num_coupling_layers=3, hidden_units=(8,), mixing="conv1x1", dtype="float64",
                            seed=2)
    kinds = [type(b).__name__ for b in reversed(flow.bijector.bijectors)]  # sampling order
    assert kinds == ["AffineCoupling", "Invertible1x1Conv", "AffineCoupling", "Invertible1x1Conv", "AffineCoupling"]
    randomize(flow, seed=5)
    z = tf.random.stateless_normal([6, 3], seed=[1, 2], dtype=tf.float64)
    x = flow.bijector.forward(z)
    np.testing.assert_allclose(flow.bijector.inverse(tf.identity(x)), z, atol=1e-9)
    np.testing.assert_allclose(flow.bijector.forward_log_det_jacobian(z, 1),
                               autodiff_log_det(flow.bijector.forward, z, 1), atol=1e-8)
    mixing_vars = {id(v) for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, tfp_nvp.Invertible1x1Conv)
                   for v in b.trainable_variables}
    assert mixing_vars and mixing_vars <= {id(v) for v in flow.trainable_variables}
    with pytest.raises(ValueError, match="mixing"):
        tfp_nvp.real_nvp([2], mixing="permute")


def test_builders_return_the_class_tfp_returns_for_such_bijectors():
    """What README's "Type" convention says: the flow is what `tfd.TransformedDistribution(base, bijector)`
    gives for a bijector that is not a CompositeTensor, TFP's private base class, not the public subclass."""
    from tensorflow_probability.python.distributions.transformed_distribution import _TransformedDistribution

    flow = tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(4,))
    plain = tfp.distributions.TransformedDistribution(tfp_nvp.standard_normal([2]), flow.bijector)
    for dist in (flow, plain):
        assert isinstance(dist, _TransformedDistribution) and isinstance(dist, tfp.distributions.Distribution)
        assert not isinstance(dist, tfp.distributions.TransformedDistribution)
        assert dist.bijector is flow.bijector
