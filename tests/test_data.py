"""Two moons: standardization, the exact density, and the entropy every model is judged against."""

from __future__ import annotations

import numpy as np
import pytest

from tfp_nvp.data import moons_entropy, moons_log_prob, moons_standardizer, two_moons

# Fewer arc positions make the density ~5x cheaper; test_arc_discretisation_converges shows the loss is negligible.
ARCS = 400


def test_two_moons_is_standardized():
    x = two_moons(100_000, seed=5)
    assert x.shape == (100_000, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), [0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(x.std(0), [1.0, 1.0], atol=0.01)


def test_two_moons_seed_raw_and_dtype():
    np.testing.assert_array_equal(two_moons(100, seed=1), two_moons(100, seed=1))
    assert np.any(two_moons(100, seed=1) != two_moons(100, seed=2))
    raw = two_moons(1000, seed=3, standardize=False, dtype="float64")
    mean, std = moons_standardizer()
    np.testing.assert_allclose(two_moons(1000, seed=3, dtype="float64"), (raw - mean) / std, rtol=1e-12)
    # sklearn's moons live in [-1, 2] x [-0.5, 1] up to the noise.
    assert raw[:, 0].min() > -1.5 and raw[:, 0].max() < 2.5 and raw[:, 1].min() > -1.0 and raw[:, 1].max() < 1.5


@pytest.mark.parametrize("n", [0, -5, 2.5])
def test_two_moons_rejects_bad_n(n):
    with pytest.raises(ValueError, match="`n`"):
        two_moons(n)


def test_arc_discretisation_converges():
    x = two_moons(2000, seed=6)
    np.testing.assert_allclose(moons_log_prob(x, arc_points=ARCS), moons_log_prob(x), rtol=2e-3, atol=2e-3)


def test_log_prob_is_a_normalised_density():
    # The noise is about 0.06 wide in standardized units: a 0.04 step integrates such bumps essentially exactly.
    step = 0.04
    xs, ys = np.arange(-3.5, 3.5, step), np.arange(-3.5, 3.5, step)
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    np.testing.assert_allclose(np.exp(moons_log_prob(grid, arc_points=ARCS)).sum() * step**2, 1.0, atol=1e-3)


def test_standardized_and_raw_densities_agree():
    raw = two_moons(500, seed=7, standardize=False, dtype="float64")
    mean, std = moons_standardizer()
    np.testing.assert_allclose(moons_log_prob((raw - mean) / std, arc_points=ARCS),
                               moons_log_prob(raw, standardized=False, arc_points=ARCS) + np.log(std).sum(),
                               rtol=1e-10)


def test_entropy_grid_converges(moons_entropy_coarse):
    fine = moons_entropy(grid_step=0.01, arc_points=ARCS)
    assert abs(fine - moons_entropy_coarse) < 1e-4
    raw = moons_entropy(grid_step=0.02, arc_points=ARCS, standardize=False)
    np.testing.assert_allclose(moons_entropy_coarse, raw - np.log(moons_standardizer()[1]).sum(), rtol=1e-12)


def test_entropy_matches_monte_carlo(moons_entropy_coarse):
    """The grid entropy equals E[-log p(x)] estimated on fresh samples, within a few standard errors."""
    neg_log_p = -moons_log_prob(two_moons(40_000, seed=11), arc_points=ARCS)
    standard_error = neg_log_p.std() / np.sqrt(neg_log_p.size)
    assert standard_error < 0.01
    assert abs(neg_log_p.mean() - moons_entropy_coarse) < 4 * standard_error
