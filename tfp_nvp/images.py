"""Image utilities: digits data, dequantization, bits/dim, temperature sampling, interpolation, anomaly scores.

Conventions: images are `[..., H, W, C]` arrays of integers in `[0, levels)`; the flow models the dequantized
values `(x + u) / levels`, `u ~ U[0, 1)`, which live in `[0, 1)`. A density on that cube relates to the
discrete data by `log P(x) >= log p((x + u)/levels) - D log(levels)` (Theis et al., 2016), hence
`bits/dim = (NLL + D log(levels)) / (D ln 2)` with the NLL in nats.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions

__all__ = [
    "DIGITS_LEVELS",
    "load_digits_splits",
    "dequantize",
    "bits_per_dim",
    "uniform_bits_per_dim",
    "gaussian_bits_per_dim",
    "sample",
    "interpolate",
    "anomaly_score",
]

DIGITS_LEVELS = 17  # sklearn's digits are 8x8 counts in 0..16


def load_digits_splits(num_validation: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """sklearn's digits as integer images `[N, 8, 8, 1]`, split into train / validation / test.

    The test set is `train_test_split(test_size=0.2, random_state=0)` (the split the benchmarks quote);
    `num_validation` images of the remainder, drawn with `seed`, form the validation set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.int32)[..., None]
    rest, test, rest_y, test_y = train_test_split(images, digits.target, test_size=0.2, random_state=0)
    if not 0 < num_validation < len(rest):
        raise ValueError(f"`num_validation` must be in (0, {len(rest)}); got {num_validation}.")
    train, val, train_y, val_y = train_test_split(rest, rest_y, test_size=num_validation, random_state=seed)
    return {"train": train, "validation": val, "test": test,
            "train_labels": train_y, "validation_labels": val_y, "test_labels": test_y}


def dequantize(x, levels: int, seed=None, dtype=tf.float32):
    """Uniform dequantization `(x + u) / levels` of integer data in `[0, levels)`; `seed=None` draws fresh noise."""
    if int(levels) != levels or levels < 2:
        raise ValueError(f"`levels` must be an integer >= 2; got {levels!r}.")
    dtype = tf.as_dtype(dtype)
    x = tf.cast(x, dtype)
    u = tf.random.stateless_uniform(tf.shape(x), seed=seed, dtype=dtype) if seed is not None \
        else tf.random.uniform(tf.shape(x), dtype=dtype)
    y = (x + u) / tf.cast(levels, dtype)
    # (levels - 1 + u) / levels can round up to exactly 1 in float32; keep the documented half-open interval.
    return tf.minimum(y, tf.constant(np.nextafter(1.0, 0.0, dtype=dtype.as_numpy_dtype), dtype))


def bits_per_dim(nll_nats, num_dims: int, levels: int):
    """Bits per dimension of discrete data from the NLL (nats) of its dequantized, `1/levels`-scaled version."""
    if int(num_dims) != num_dims or num_dims <= 0:
        raise ValueError(f"`num_dims` must be a positive integer; got {num_dims!r}.")
    return (nll_nats + num_dims * math.log(levels)) / (num_dims * math.log(2.0))


def uniform_bits_per_dim(levels: int) -> float:
    """The uniform baseline: log2(levels) bits per dimension (4.09 for the 17-level digits)."""
    return math.log2(levels)


def gaussian_bits_per_dim(train, test, levels: int, seed: int = 0, ridge: float = 1e-6) -> float:
    """Test bits/dim of a full-covariance Gaussian fitted to the dequantized training images (a baseline)."""
    tr = dequantize(train, levels, seed=(seed, 1), dtype=tf.float64).numpy().reshape(len(train), -1)
    te = dequantize(test, levels, seed=(seed, 2), dtype=tf.float64).numpy().reshape(len(test), -1)
    cov = np.cov(tr, rowvar=False) + ridge * np.eye(tr.shape[1])
    gauss = tfd.MultivariateNormalTriL(tr.mean(0), tf.linalg.cholesky(cov))
    nll = -float(tf.reduce_mean(gauss.log_prob(te)))
    return float(bits_per_dim(nll, tr.shape[1], levels))


def _as_distribution(flow):
    # A FlowModel holds its flow in `.distribution`; a transformed distribution's own `.distribution` is its base.
    return flow if isinstance(flow, tfd.Distribution) else getattr(flow, "distribution", flow)


def _base_and_bijector(flow):
    flow = _as_distribution(flow)
    # Duck-typed: TFP builds a private twin of tfd.TransformedDistribution around non-CompositeTensor bijectors.
    if not (isinstance(flow, tfd.Distribution) and isinstance(getattr(flow, "bijector", None), tfp.bijectors.Bijector)):
        raise ValueError(f"`flow` must be a transformed distribution or FlowModel; got {type(flow).__name__}.")
    return flow.distribution, flow.bijector


def sample(flow, n: int, temperature: float = 1.0, seed=None, bijector_kwargs=None):
    """Samples with the base's spread scaled by `temperature` (GLOW §5): `x = f(mode + T (z - mode))`.

    `T = 1` is ordinary sampling, `T < 1` trades diversity for typicality and `T = 0` returns the image of the
    base's mode for every draw.
    """
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0; got {temperature}.")
    base, bijector = _base_and_bijector(flow)
    z = base.sample(n, seed=seed)
    mode = tf.cast(base.mode(), z.dtype)
    z = mode + tf.cast(temperature, z.dtype) * (z - mode)
    return bijector.forward(z, **(bijector_kwargs or {}))


def interpolate(flow, x0, x1, num: int = 8, bijector_kwargs=None):
    """`num` points on the latent segment between `inverse(x0)` and `inverse(x1)`, mapped back to data.

    Returns `[num, *event_shape]`; the first and last entries reproduce `x0` and `x1`.
    """
    if int(num) != num or num < 2:
        raise ValueError(f"`num` must be an integer >= 2; got {num!r}.")
    _, bijector = _base_and_bijector(flow)
    kwargs = bijector_kwargs or {}
    z = bijector.inverse(tf.stack([x0, x1]), **kwargs)
    t = tf.reshape(tf.linspace(tf.constant(0.0, z.dtype), 1.0, int(num)), [-1] + [1] * (z.shape.rank - 1))
    return bijector.forward(z[0] * (1.0 - t) + z[1] * t, **kwargs)


def anomaly_score(flow, x, levels: int | None = None, bijector_kwargs=None):
    """Per-example anomaly score: NLL in nats, or bits/dim when `levels` is given (higher = less likely).

    `x` is continuous data in the flow's space (dequantized images in [0, 1)), or, with `levels`, integer
    images in `[0, levels)`, scored at their bins' centres `(x + 0.5) / levels` as a served model scores them.
    """
    dist = _as_distribution(flow)
    x = tf.convert_to_tensor(x)
    if x.dtype.is_integer or x.dtype.is_bool:
        if levels is None:
            raise TypeError(f"`x` holds integers (dtype {x.dtype.name}): give `levels` to score integer images "
                            "at their bins' centres, or pass continuous (dequantized) data.")
        x = (tf.cast(x, dist.dtype) + tf.constant(0.5, dist.dtype)) / tf.constant(levels, dist.dtype)
    nll = -dist.log_prob(x, **({"bijector_kwargs": bijector_kwargs} if bijector_kwargs else {}))
    if levels is None:
        return nll
    return bits_per_dim(nll, int(np.prod(dist.event_shape.as_list())), levels)
