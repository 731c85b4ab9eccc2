"""Image utilities: digits splits, dequantization, bits/dim and its baselines, temperature, interpolation, scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from scipy import stats
from sklearn.datasets import load_digits

import tfp_nvp
from tfp_nvp import images
from tfp_nvp.flows import glow

tfb, tfd = tfp.bijectors, tfp.distributions

LEVELS = images.DIGITS_LEVELS
D = 64  # 8 x 8 x 1


def _rows(a):
    return np.asarray(a).reshape(len(a), -1)


@pytest.fixture(scope="module")
def digits():
    return images.load_digits_splits(num_validation=150, seed=0)


@pytest.fixture(scope="module")
def flow(digits, randomize):
    """A float64 one-level GLOW on digits, ActNorms initialised and every weight random: a non-trivial map."""
    flow = glow([8, 8, 1], num_levels=1, num_steps_per_level=1, hidden_channels=8, dtype="float64", seed=0)
    tfp_nvp.initialize(flow, images.dequantize(digits["train"][:256], LEVELS, seed=(0, 0), dtype=tf.float64))
    randomize(flow, seed=1, scale=0.5)
    return flow


# ---------------------------------------------------------------------------------------------- digits splits
def test_digits_splits_shapes_values_and_sizes(digits):
    n = len(load_digits().images)
    assert len(digits["test"]) == math.ceil(0.2 * n) == 360
    assert len(digits["validation"]) == 150
    assert len(digits["train"]) == n - 360 - 150
    for part in ("train", "validation", "test"):
        x, y = digits[part], digits[f"{part}_labels"]
        assert x.shape[1:] == (8, 8, 1) and len(y) == len(x)
        assert np.issubdtype(x.dtype, np.integer) and x.min() == 0 and x.max() == LEVELS - 1


def test_digits_splits_partition_the_dataset(digits):
    """Every image lands in exactly one split, with its own label (the 1797 digit images are all distinct)."""
    raw = load_digits()
    everything = _rows(raw.images.astype(np.int64))
    assert len(np.unique(everything, axis=0)) == len(everything)  # rows identify images
    label_of = {row.tobytes(): label for row, label in zip(everything, raw.target)}
    parts = [_rows(digits[p]).astype(np.int64) for p in ("train", "validation", "test")]
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert not ({r.tobytes() for r in a} & {r.tobytes() for r in b})
    together = np.concatenate(parts)
    np.testing.assert_array_equal(np.unique(together, axis=0), np.unique(everything, axis=0))
    assert len(together) == len(everything)
    labels = np.concatenate([digits[f"{p}_labels"] for p in ("train", "validation", "test")])
    assert all(label_of[row.tobytes()] == label for row, label in zip(together, labels))


def test_digits_splits_are_deterministic_per_seed(digits):
    again = images.load_digits_splits(num_validation=150, seed=0)
    for key in digits:
        np.testing.assert_array_equal(again[key], digits[key])
    other = images.load_digits_splits(num_validation=150, seed=1)
    np.testing.assert_array_equal(other["test"], digits["test"])  # the quoted test split never moves
    assert not np.array_equal(other["validation"], digits["validation"])


@pytest.mark.parametrize("bad", [0, -5, 1437, 5000])
def test_digits_splits_reject_bad_num_validation(bad):
    with pytest.raises(ValueError, match=r"`num_validation` must be in \(0, 1437\)"):
        images.load_digits_splits(num_validation=bad)


# ---------------------------------------------------------------------------------------------- dequantize
def test_dequantize_is_uniform_within_each_bin(digits):
    x = digits["train"]
    u = images.dequantize(x, LEVELS, seed=(3, 4), dtype=tf.float64).numpy()
    assert u.shape == x.shape and u.dtype == np.float64
    assert u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(np.floor(u * LEVELS), x)
    offsets = u * LEVELS - x  # U[0, 1) if the noise is right: mean 1/2, variance 1/12 (n ~ 80 000)
    assert abs(offsets.mean() - 0.5) < 0.01 and abs(offsets.var() - 1 / 12) < 0.005
    default = images.dequantize(x, LEVELS, seed=(3, 4)).numpy()
    assert default.dtype == np.float32 and default.min() >= 0.0 and default.max() <= 1.0


def test_dequantize_seeding(digits):
    x = digits["test"]
    a = images.dequantize(x, LEVELS, seed=(1, 2)).numpy()
    np.testing.assert_array_equal(images.dequantize(x, LEVELS, seed=(1, 2)).numpy(), a)
    assert not np.array_equal(images.dequantize(x, LEVELS, seed=(1, 3)).numpy(), a)
    fresh_1, fresh_2 = images.dequantize(x, LEVELS).numpy(), images.dequantize(x, LEVELS).numpy()
    assert not np.array_equal(fresh_1, fresh_2)
    np.testing.assert_array_equal(np.floor(fresh_1.astype(np.float64) * LEVELS), x)


@pytest.mark.parametrize("levels", [1, 0, -3, 2.5])
def test_dequantize_rejects_bad_levels(levels):
    with pytest.raises(ValueError, match="`levels` must be an integer >= 2"):
        images.dequantize(np.zeros((2, 8, 8, 1)), levels)


# ---------------------------------------------------------------------------------------------- bits per dim
def test_bits_per_dim_formula():
    expected = (100.0 + 64 * math.log(17)) / (64 * math.log(2))
    assert images.bits_per_dim(100.0, 64, 17) == pytest.approx(expected, rel=1e-12)
    nll = np.array([0.0, 50.0, -20.0])
    np.testing.assert_allclose(images.bits_per_dim(tf.constant(nll), 64, 17).numpy(),
                               [(n / 64 + math.log(17)) / math.log(2) for n in nll], rtol=1e-12)
    with pytest.raises(ValueError, match="`num_dims` must be a positive integer"):
        images.bits_per_dim(1.0, 0, 17)


def test_uniform_density_on_the_cube_scores_log2_levels(digits):
    """A density of 1 on [0, 1)^D spreads each discrete value over a 1/levels bin: log2(levels) bits/dim."""
    uniform = tfd.Independent(tfd.Uniform(tf.zeros([8, 8, 1], tf.float64), tf.ones([8, 8, 1], tf.float64)), 3)
    x = images.dequantize(digits["test"], LEVELS, seed=(0, 5), dtype=tf.float64)
    bpd = images.anomaly_score(uniform, x, levels=LEVELS).numpy()
    np.testing.assert_allclose(bpd, math.log2(LEVELS), rtol=1e-12)
    assert images.uniform_bits_per_dim(LEVELS) == pytest.approx(math.log2(LEVELS), rel=1e-15)
    assert images.uniform_bits_per_dim(2) == pytest.approx(1.0, rel=1e-15)


def test_gaussian_baseline_is_scale_invariant_and_in_its_band(digits):
    """bits/dim must not depend on the scale of the continuous embedding (Theis et al., 2016).

    The same Gaussian fitted to the raw dequantized counts x + u (no 1/levels scaling, so no log(levels) term)
    must give the same bits/dim as the library's fit on (x + u) / levels; the ridge is scaled to match.
    """
    train, test = digits["train"], digits["test"]
    bpd = images.gaussian_bits_per_dim(train, test, LEVELS, seed=0)
    tr = _rows(images.dequantize(train, LEVELS, seed=(0, 1), dtype=tf.float64).numpy()) * LEVELS
    te = _rows(images.dequantize(test, LEVELS, seed=(0, 2), dtype=tf.float64).numpy()) * LEVELS
    cov = np.cov(tr, rowvar=False) + 1e-6 * LEVELS**2 * np.eye(D)
    nll_raw = -stats.multivariate_normal(tr.mean(0), cov).logpdf(te).mean()
    assert bpd == pytest.approx(nll_raw / (D * math.log(2)), rel=1e-9)
    # Sanity band. Above the floor: a Gaussian is a weak image model, far from a perfect one, and 2 bits/dim
    # is well below what it can reach (a missing D log(levels) term would land below it). Below the uniform
    # baseline: neighbouring pixels of a digit are strongly correlated and the border is almost always blank,
    # which a full covariance captures and the uniform density ignores.
    assert 2.0 < bpd < images.uniform_bits_per_dim(LEVELS)


# ---------------------------------------------------------------------------------------------- temperature
def test_zero_temperature_gives_the_image_of_the_mode(flow):
    x = images.sample(flow, 5, temperature=0.0, seed=(1, 1)).numpy()
    assert x.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(x, np.broadcast_to(x[:1], x.shape))
    mode = flow.bijector.forward(flow.distribution.mode()[None]).numpy()
    np.testing.assert_allclose(x, np.broadcast_to(mode, x.shape), rtol=1e-12, atol=1e-12)


def test_unit_temperature_is_ordinary_sampling(flow):
    seed = (2, 3)
    np.testing.assert_allclose(images.sample(flow, 6, temperature=1.0, seed=seed).numpy(),
                               flow.sample(6, seed=seed).numpy(), rtol=1e-12, atol=1e-12)


def test_temperature_scales_the_latent_and_the_spread(flow):
    seed = (4, 5)
    z = flow.distribution.sample(48, seed=seed).numpy()
    draws = {t: images.sample(flow, 48, temperature=t, seed=seed) for t in (0.3, 0.6, 1.0)}
    # In latent space a temperature is exactly a scaling about the mode (0 for N(0, I)).
    np.testing.assert_allclose(flow.bijector.inverse(tf.constant(draws[0.6].numpy())).numpy(), 0.6 * z,
                               rtol=1e-7, atol=1e-7)
    spread = [draws[t].numpy().std(axis=0).mean() for t in (0.3, 0.6, 1.0)]
    assert spread[0] < spread[1] < spread[2]


def test_sample_accepts_a_flow_model_and_rejects_negative_temperature(flow):
    model = tfp_nvp.FlowModel(flow)
    np.testing.assert_array_equal(images.sample(model, 2, temperature=0.0).numpy(),
                                  images.sample(flow, 2, temperature=0.0).numpy())
    with pytest.raises(ValueError, match="`temperature` must be >= 0"):
        images.sample(flow, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="`flow` must be a transformed distribution or FlowModel"):
        images.sample(tfp_nvp.standard_normal([8, 8, 1]), 2)


# ---------------------------------------------------------------------------------------------- interpolation
def test_interpolation_runs_along_the_latent_segment(flow, digits):
    x = images.dequantize(digits["test"][:2], LEVELS, seed=(6, 7), dtype=tf.float64)
    path = images.interpolate(flow, x[0], x[1], num=5)
    assert path.shape == (5, 8, 8, 1)
    np.testing.assert_allclose(path[0].numpy(), x[0].numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(path[-1].numpy(), x[1].numpy(), rtol=1e-9, atol=1e-9)
    z = flow.bijector.inverse(tf.constant(x.numpy())).numpy()
    t = np.linspace(0.0, 1.0, 5)[:, None, None, None]
    np.testing.assert_allclose(flow.bijector.inverse(tf.constant(path.numpy())).numpy(),
                               (1 - t) * z[0] + t * z[1], rtol=1e-7, atol=1e-7)
    # The data-space path is not the straight pixel blend: the flow is non-linear.
    assert np.abs(path[2].numpy() - 0.5 * (x[0] + x[1]).numpy()).max() > 1e-3


@pytest.mark.parametrize("num", [1, 0, 2.5])
def test_interpolation_rejects_bad_num(flow, num):
    x = tf.zeros([8, 8, 1], tf.float64)
    with pytest.raises(ValueError, match="`num` must be an integer >= 2"):
        images.interpolate(flow, x, x, num=num)


# ---------------------------------------------------------------------------------------------- anomaly score
def test_anomaly_score_is_nll_or_bits_for_flows_and_models(flow, digits):
    x = images.dequantize(digits["test"][:8], LEVELS, seed=(8, 9), dtype=tf.float64)
    nll = -flow.log_prob(tf.constant(x.numpy())).numpy()
    score = images.anomaly_score(flow, x).numpy()
    np.testing.assert_allclose(score, nll, rtol=1e-12)
    bits = images.anomaly_score(flow, x, levels=LEVELS).numpy()
    np.testing.assert_allclose(bits, images.bits_per_dim(nll, D, LEVELS), rtol=1e-12)
    # A FlowModel holds the flow in `.distribution`, which on a transformed distribution would be its base:
    # the same numbers prove the model was unwrapped once and the flow was not.
    model = tfp_nvp.FlowModel(flow)
    np.testing.assert_allclose(images.anomaly_score(model, x).numpy(), score, rtol=1e-12)
    np.testing.assert_allclose(images.anomaly_score(model, x, levels=LEVELS).numpy(), bits, rtol=1e-12)
    base_nll = -flow.distribution.log_prob(tf.constant(x.numpy())).numpy()
    assert np.abs(base_nll - nll).min() > 1e-3
    # Integer images are scored at their bins' centres, as a served model scores them.
    ints = digits["test"][:8]
    centres = (ints.astype(np.float64) + 0.5) / LEVELS
    np.testing.assert_allclose(images.anomaly_score(flow, ints, levels=LEVELS).numpy(),
                               images.bits_per_dim(-flow.log_prob(centres).numpy(), D, LEVELS), rtol=1e-12)
    assert np.isfinite(images.anomaly_score(model, ints, levels=LEVELS).numpy()).all()
    with pytest.raises(TypeError, match=r"`x` holds integers .*give `levels`"):
        images.anomaly_score(flow, ints)


def test_blank_image_is_an_anomaly_under_a_fitted_density(digits):
    """A full-covariance Gaussian fitted to digits (a flow made of one Reshape) rates a blank image as atypical.

    Blank pixels are common in digits, but never all at once: the centre is where every digit has ink, so the
    blank image sits farther from the mean, in the Mahalanobis sense, than a typical test digit does.
    """
    tr = _rows(images.dequantize(digits["train"], LEVELS, seed=(0, 1), dtype=tf.float64).numpy())
    cov = np.cov(tr, rowvar=False) + 1e-6 * np.eye(D)
    gaussian = tfd.MultivariateNormalTriL(tr.mean(0), np.linalg.cholesky(cov))
    density = tfd.TransformedDistribution(gaussian, tfb.Reshape([8, 8, 1], [D]))
    test = images.dequantize(digits["test"], LEVELS, seed=(0, 2), dtype=tf.float64)
    blank = images.dequantize(np.zeros((1, 8, 8, 1), np.int64), LEVELS, seed=(0, 3), dtype=tf.float64)
    typical = images.anomaly_score(density, test, levels=LEVELS).numpy()
    blank_score = images.anomaly_score(density, blank, levels=LEVELS).numpy()
    assert blank_score.shape == (1,) and typical.shape == (len(test),)
    assert blank_score[0] > np.median(typical) + 0.1
    np.testing.assert_allclose(images.anomaly_score(tfp_nvp.FlowModel(density), blank, levels=LEVELS).numpy(),
                               blank_score, rtol=1e-12)
