"""Elementwise transformers: the invertible maps a `Coupling` applies to each transformed entry.

A coupling splits its event into a conditioning part and a transformed part; a network reads the first and
gives, for every entry of the second, the parameters of a monotone scalar map. Everything but that scalar map
(masks, the network and its sizing, conditioning, batch handling, result reuse) is the same for every family
and lives in `tfp_nvp.bijectors.Coupling`; a `Transformer` supplies the map. A new coupling family is
therefore a `Transformer` subclass, and `Coupling(event_shape, MyTransformer())` is the bijector.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import tensorflow as tf

__all__ = ["AffineTransformer", "LOG_SCALE_BOUNDS", "SplineTransformer", "Transformer", "as_transformer"]

LOG_SCALE_BOUNDS = ("tanh", "sigmoid", "none")


class Transformer:
    r"""The contract between a `Coupling` and the elementwise map it applies.

    The coupling's network maps the conditioning part to a pair of tensors. For every transformed element
    they hold `output_widths()[0]` and `output_widths()[1]` raw values, grouped per element on the last axis:
    the pair is shaped `batch + param_shape[:-1] + (param_shape[-1] * width,)` for each width, where
    `param_shape` is the coupling's per-example shape of the transformed part. A subclass implements:

    * `labels`: names of the two network outputs, used in error messages (e.g. `("shift", "log_scale")`);
    * `output_widths()`: how many raw values of each output one element needs (`(1, 1)` for affine);
    * `add_weights(layer, param_shape)` (optional): creates the transformer's own weights on the coupling's
      `ParameterLayer` with `layer.add(name, shape, initializer)`; they are trained and saved with the network;
    * `params(first, second, layer)`: the map's parameters from the network's raw pair (and the weights on
      `layer`), in any structure `forward` and `inverse` understand;
    * `forward(x, params)`: `(y, log|dy/dx|)`, both elementwise, shaped like the transformed part (or its
      broadcast with the parameters' batch shape);
    * `inverse(y, params)`: `(x, log|dx/dy|)`, elementwise;
    * `forward_log_det(x, params)`, `inverse_log_det(y, params)` (optional): the log-dets alone, where that is
      cheaper than the map (by default the maps are computed and their output dropped).

    A raw network output of zero should give the identity: the default networks end in a zero-initialised
    layer, so a fresh coupling then starts as the identity. A transformer need not know about masks: with an
    image mask it sees the whole event, and the coupling zeroes the raw parameters of the conditioning entries
    and passes those entries through unchanged with a zero log-det, whatever the transformer computes there.
    The transformer holds no state of its own (its weights live on the coupling's layer), so one instance may
    serve many couplings.

    Example, an additive (shift-only, volume-preserving) coupling:
      >>> class Shift(Transformer):
      ...     labels = ("shift", "unused")
      ...     def output_widths(self):
      ...         return (1, 1)
      ...     def params(self, shift, unused, layer):
      ...         return shift
      ...     def forward(self, x, shift):
      ...         y = x + shift
      ...         return y, tf.zeros_like(y)
      ...     def inverse(self, y, shift):
      ...         x = y - shift
      ...         return x, tf.zeros_like(x)
      >>> nice = Coupling([4], Shift(), hidden_units=(32, 32))
    """

    labels: tuple[str, str] = ("first", "second")

    def output_widths(self) -> tuple[int, int]:
        """Raw network values per transformed element, for each of the two outputs."""
        raise NotImplementedError

    def add_weights(self, layer, param_shape: tuple[int, ...]) -> None:
        """Creates this transformer's own weights on `layer` (none by default)."""

    def params(self, first, second, layer):
        """The map's parameters from the network's raw pair and the weights on `layer`."""
        raise NotImplementedError

    def forward(self, x, params):
        """`(y, log|dy/dx|)` elementwise."""
        raise NotImplementedError

    def inverse(self, y, params):
        """`(x, log|dx/dy|)` elementwise."""
        raise NotImplementedError

    def forward_log_det(self, x, params):
        """`log|dy/dx|` elementwise at `x`."""
        return self.forward(x, params)[1]

    def inverse_log_det(self, y, params):
        """`log|dx/dy|` elementwise at `y`."""
        return self.inverse(y, params)[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ------------------------------------------------------------------------------------------------ affine
# sigmoid(h + 2) is GLOW's scale; dividing by sigmoid(2) makes h = 0 the identity, as DESIGN.md §4 asks.
_LOG_SIGMOID_2 = -math.log1p(math.exp(-2.0))


def _bounded_log_scale(h, bound: str, scale):
    """The log-scale `s` of an affine transformer from its raw network output `h`, under `bound`.

    `scale` is the learnable bound of `"tanh"` (a Keras variable; unused otherwise).
    """
    if bound == "tanh":
        return tf.cast(scale.value, h.dtype) * tf.tanh(h)
    if bound == "sigmoid":
        # GLOW bounds the scale of the data -> latent pass (TFP's inverse), so a training step cannot blow an
        # activation up through a layer: a flow that bounded the sampling direction instead diverged to an
        # infinite latent on an ordinary training image (digits, 22 epochs). tf.constant, not a cast: casting a
        # Python float goes through float32 and would round it.
        return tf.constant(_LOG_SIGMOID_2, h.dtype) - tf.math.log_sigmoid(h + 2.0)
    return h


def check_log_scale_bound(bound) -> str:
    """`bound` if it names a log-scale bound, else a ValueError listing them."""
    if bound not in LOG_SCALE_BOUNDS:
        raise ValueError(f"`log_scale_bound` must be one of {LOG_SCALE_BOUNDS}; got {bound!r}.")
    return bound


class AffineTransformer(Transformer):
    r"""`y = x * exp(s) + t`: RealNVP's affine map, with a bounded log-scale `s`.

    The network gives a shift `t` and a raw log-scale `h` per element; `s` is

        "tanh":     s = scale * tanh(h), with a learnable `scale` per transformed position on the last axis
                    (per channel for images), starting at 1 (RealNVP paper);
        "sigmoid":  s = log sigmoid(2) - log sigmoid(h + 2): GLOW's bound, under which the data -> latent map
                    (`inverse`) multiplies by `sigmoid(h + 2) / sigmoid(2)`, a factor in (0, 1.14];
        "none":     s = h.

    `log|dy/dx| = s`. A zero network output is the identity under every bound.

    Args:
      log_scale_bound: `"tanh"`, `"sigmoid"` or `"none"`.

    Example:
      >>> bij = Coupling([4], AffineTransformer("sigmoid"), hidden_units=(32, 32))
    """

    labels = ("shift", "log_scale")

    def __init__(self, log_scale_bound: str = "tanh"):
        self._log_scale_bound = check_log_scale_bound(log_scale_bound)

    @property
    def log_scale_bound(self) -> str:
        """How the log-scale is bounded: `"tanh"`, `"sigmoid"` or `"none"`."""
        return self._log_scale_bound

    def output_widths(self):
        return (1, 1)

    def add_weights(self, layer, param_shape):
        if self._log_scale_bound == "tanh":
            layer.add("scale", param_shape[-1:], "ones")

    def params(self, shift, h, layer):
        return shift, _bounded_log_scale(h, self._log_scale_bound, getattr(layer, "scale", None))

    def forward(self, x, params):
        shift, log_scale = params
        return x * tf.exp(log_scale) + shift, log_scale

    def inverse(self, y, params):
        shift, log_scale = params
        neg = -log_scale
        return (y - shift) * tf.exp(neg), neg

    def forward_log_det(self, x, params):
        return params[1]

    def inverse_log_det(self, y, params):
        return -params[1]

    def __repr__(self) -> str:
        return f"AffineTransformer(log_scale_bound={self._log_scale_bound!r})"


# ------------------------------------------------------------------------------------------------ spline
# The rational-quadratic spline of Durkan et al. (2019), "Neural Spline Flows", written here rather than taken
# from `tfb.RationalQuadraticSpline`: once bins approach the minimum width, TFP's float32 inverse returns a point
# in the wrong bin, whose image is off by up to 8, on 0.3-0.7 % of points (benchmarks/spline_inverse.py). What
# makes this one backward stable (the returned point maps back to the given one to float32 rounding):
# * the knots are a cumulative sum with the end knots set to exactly -B and +B, and the bins' widths and heights
#   are the differences of those knots, so every bin ends where the next begins;
# * the bin is found by counting the interior knots at or below the point: an index in [0, K - 1] by
#   construction, whatever rounding did to the last knot;
# * the in-bin coordinates are clamped to [0, 1], and points outside [-B, B] pass through with log-det 0;
# * the inverse solves a xi^2 + b xi + c = 0 with every quantity written as a sum of non-negative terms where the
#   textbook form subtracts (the derivation is in `_rq_inverse`), and takes each root in the form that does not
#   cancel for the sign of b at hand.
# Selection uses a one-hot mask instead of a gather: exact (one non-zero term per sum), cheap for the handful of
# bins a spline has, and its gradient is a multiplication rather than a scatter. The whole map is a few dozen
# elementwise ops, so every coupling writes it inline (no shared traced function, inside XLA or not).


def _rq_knots(widths, heights, knot_slopes, bound):
    """Knot positions `[..., K + 1]` of x and y (ends exactly -B and B) and knot derivatives `[..., K + 1]`."""
    dtype = widths.dtype
    lo = tf.fill(tf.concat([tf.shape(widths)[:-1], [1]], 0), tf.constant(-bound, dtype))

    def knots(sizes):
        inner = tf.constant(-bound, dtype) + tf.math.cumsum(sizes[..., :-1], axis=-1)
        inner = tf.clip_by_value(inner, -bound, bound)
        return tf.concat([lo, inner, -lo], axis=-1)

    ones = tf.ones_like(lo)
    return knots(widths), knots(heights), tf.concat([ones, knot_slopes, ones], axis=-1)


def _rq_bin(t, knots, bound):
    """The point clamped to [-B, B], whether it was inside, and the one-hot mask of its bin `[..., K]`."""
    inside = (t >= -bound) & (t <= bound)
    t = tf.clip_by_value(t, -bound, bound)
    index = tf.reduce_sum(tf.cast(t[..., None] >= knots[..., 1:-1], tf.int32), axis=-1)  # in [0, K - 1]
    return t, inside, tf.one_hot(index, tf.shape(knots)[-1] - 1, dtype=t.dtype)


def _rq_bin_values(mask, x_knots, y_knots, derivatives):
    """Left knot, width, left knot height, height, slope of the chord and both knot derivatives of each point's bin."""
    def pick(v):
        return tf.reduce_sum(mask * v, axis=-1)

    x0, y0 = pick(x_knots[..., :-1]), pick(y_knots[..., :-1])
    w = pick(x_knots[..., 1:]) - x0
    h = pick(y_knots[..., 1:]) - y0
    d0, d1 = pick(derivatives[..., :-1]), pick(derivatives[..., 1:])
    safe_w = tf.where(w > 0, w, tf.ones_like(w))
    return x0, safe_w, y0, h, h / safe_w, d0, d1


def _rq_log_slope(xi, s, d0, d1):
    """log g'(x) at in-bin coordinate xi: s^2 (d1 xi^2 + 2 s xi (1 - xi) + d0 (1 - xi)^2) / den^2."""
    one_minus = 1.0 - xi
    cross = xi * one_minus
    den = s * (xi * xi + one_minus * one_minus) + (d0 + d1) * cross  # = s + (d0 + d1 - 2 s) xi (1 - xi)
    num = d1 * xi * xi + 2.0 * s * cross + d0 * one_minus * one_minus
    return 2.0 * tf.math.log(s) + tf.math.log(num) - 2.0 * tf.math.log(den), den, cross


def _rq_forward(x, params, bound, with_output=True):
    """`(y, log g'(x))` of the spline with parameters `(widths, heights, knot_slopes)`; identity outside [-B, B]."""
    x_knots, y_knots, derivatives = _rq_knots(*params, bound)
    t, inside, mask = _rq_bin(x, x_knots, bound)
    x0, w, y0, h, s, d0, d1 = _rq_bin_values(mask, x_knots, y_knots, derivatives)
    xi = tf.clip_by_value((t - x0) / w, 0.0, 1.0)
    log_slope, den, cross = _rq_log_slope(xi, s, d0, d1)
    log_det = tf.where(inside, log_slope, tf.zeros_like(log_slope))
    if not with_output:
        return None, log_det
    y = tf.minimum(y0 + h * (s * xi * xi + d0 * cross) / den, y0 + h)
    return tf.where(inside, y, x), log_det


def _rq_inverse(y, params, bound, with_output=True):
    """`(x, log|dx/dy|)` of the spline's inverse; identity outside [-B, B].

    With eta = (y - y0) / h in [0, 1], the in-bin coordinate xi solves (Durkan et al., eq. 6-8, divided by h)

        a xi^2 + b xi + c = 0,  a = s - d0 + eta (d0 + d1 - 2 s),  b = d0 - eta (d0 + d1 - 2 s),  c = -s eta.

    Here a + b = s, and with e = d0 (1 - eta) - d1 eta:  b = e + 2 s eta  and
    b^2 - 4 a c = b^2 + 4 (s - b) s eta = e^2 + 4 s^2 eta (1 - eta)  >= 0, a sum of non-negative terms (the
    textbook form subtracts 4 |a| |c| from b^2 when a < 0 and loses its digits). The root in [0, 1]:
      b >= 0:  xi = 2 c / (-b - sqrt(disc)) = 2 s eta / (b + sqrt(disc))     (no cancellation: b, sqrt >= 0);
      b < 0:   xi = (-b + sqrt(disc)) / (2 a) = (sqrt(disc) - b) / (2 (s - b))  (a = s - b > s > 0).
    The first form is the same root for either sign of b (its denominator is never 0 while the knot slopes are
    positive), but for b < 0 it subtracts sqrt(disc) ~ |b| from -b; the second form is used there.
    """
    x_knots, y_knots, derivatives = _rq_knots(*params, bound)
    t, inside, mask = _rq_bin(y, y_knots, bound)
    x0, w, y0, h, s, d0, d1 = _rq_bin_values(mask, x_knots, y_knots, derivatives)
    safe_h = tf.where(h > 0, h, tf.ones_like(h))
    eta = tf.clip_by_value((t - y0) / safe_h, 0.0, 1.0)
    e = d0 * (1.0 - eta) - d1 * eta
    b = e + 2.0 * s * eta
    root = tf.sqrt(e * e + 4.0 * s * s * eta * (1.0 - eta))
    positive = b >= 0
    ones = tf.ones_like(b)
    xi = tf.where(positive,
                  tf.math.divide_no_nan(2.0 * s * eta, tf.where(positive, b + root, ones)),
                  (root - b) / tf.where(positive, ones, 2.0 * (s - b)))
    xi = tf.clip_by_value(xi, 0.0, 1.0)
    log_slope = _rq_log_slope(xi, s, d0, d1)[0]
    log_det = tf.where(inside, -log_slope, tf.zeros_like(log_slope))
    if not with_output:
        return None, log_det
    x = tf.minimum(x0 + w * xi, x0 + w)
    return tf.where(inside, x, y), log_det


def _check_real(value, name: str, low: float | None = None, high: float | None = None,
                low_open: bool = True, high_open: bool = True) -> float:
    """`value` as a float, or a ValueError naming `name` and the allowed interval."""
    interval = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
                f"{'inf' if high is None else high}{')' if high_open else ']'}")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"`{name}` must be a real number in {interval}; got {value!r}.")
    value = float(value)
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"`{name}` must be a finite number in {interval}; got {value!r}.")
    return value


class SplineTransformer(Transformer):
    r"""A monotone rational-quadratic spline per element (Durkan et al., 2019), exact in float32.

    Each spline maps `[-bound, bound]` onto itself through `num_bins` bins and is the identity outside it
    (linear tails of slope 1, log-det 0), with slope 1 at both ends of the interval. The network gives
    `2 * num_bins` bin parameters (widths then heights) and `num_bins - 1` interior knot slopes per element:

        widths  = min_bin_width + (2 * bound - num_bins * min_bin_width) * softmax(u_w)     (same for heights)
        slopes  = min_slope + softplus(u_s + log(expm1(1 - min_slope)))

    so a zero network output gives uniform bins and unit slopes: the identity.

    Args:
      num_bins: number of bins `K` (an integer >= 2).
      bound: half-width `B` of the interval the splines act on (positive).
      min_bin_width: smallest width and height of a bin, in `[0, 2 * bound / num_bins)`.
      min_slope: smallest knot slope, in `[0, 1)`.

    Example:
      >>> bij = Coupling([4], SplineTransformer(num_bins=8, bound=3.0), hidden_units=(32, 32))
    """

    labels = ("bins", "slopes")

    def __init__(self, num_bins: int = 8, bound: float = 4.0, min_bin_width: float = 1e-3, min_slope: float = 1e-3):
        if isinstance(num_bins, bool) or not isinstance(num_bins, (numbers.Integral, float)) \
                or int(num_bins) != num_bins or num_bins < 2:
            # One bin spanning [-bound, bound] with unit end slopes is the identity: nothing to learn.
            raise ValueError(f"`num_bins` must be an integer >= 2; got {num_bins!r}.")
        self._num_bins = int(num_bins)
        self._bound = _check_real(bound, "bound", low=0.0)
        self._min_bin_width = _check_real(min_bin_width, "min_bin_width", low=0.0,
                                          high=2.0 * self._bound / self._num_bins, low_open=False)
        self._min_slope = _check_real(min_slope, "min_slope", low=0.0, high=1.0, low_open=False)
        # softplus(c) = 1 - min_slope, so a zero network output gives slope exactly 1 (the identity).
        self._slope_offset = math.log(math.expm1(1.0 - self._min_slope))

    @property
    def num_bins(self) -> int:
        """Number of spline bins per transformed element."""
        return self._num_bins

    @property
    def bound(self) -> float:
        """Half-width of the interval `[-bound, bound]` the splines act on; the identity outside it."""
        return self._bound

    def output_widths(self):
        return (2 * self._num_bins, self._num_bins - 1)

    def params(self, bins, slopes, layer):
        """Bin widths and heights `[..., n, K]` and interior knot slopes `[..., n, K - 1]` per element."""
        k = self._num_bins
        head = tf.shape(bins)[:-1]
        bins = tf.reshape(bins, tf.concat([head, [-1, 2 * k]], 0))
        slopes = tf.reshape(slopes, tf.concat([head, [-1, k - 1]], 0))
        dtype = bins.dtype
        span = tf.constant(2.0 * self._bound - k * self._min_bin_width, dtype)
        smallest = tf.constant(self._min_bin_width, dtype)
        widths = smallest + span * tf.math.softmax(bins[..., :k], axis=-1)
        heights = smallest + span * tf.math.softmax(bins[..., k:], axis=-1)
        knot_slopes = tf.constant(self._min_slope, dtype) + tf.math.softplus(
            slopes + tf.constant(self._slope_offset, dtype))
        return widths, heights, knot_slopes

    def _call(self, t, params, inverse: bool, with_output: bool):
        """The spline (or its inverse) at `t` and its elementwise log-det in the direction of the call."""
        # A conditional input may carry more batch dimensions than `t`; the parameters have the broadcast ones.
        t = tf.broadcast_to(t, tf.shape(params[0])[:-1])
        spline = _rq_inverse if inverse else _rq_forward
        return spline(t, params, self._bound, with_output)

    def forward(self, x, params):
        return self._call(x, params, inverse=False, with_output=True)

    def inverse(self, y, params):
        return self._call(y, params, inverse=True, with_output=True)

    def forward_log_det(self, x, params):
        return self._call(x, params, inverse=False, with_output=False)[1]

    def inverse_log_det(self, y, params):
        return self._call(y, params, inverse=True, with_output=False)[1]

    def __repr__(self) -> str:
        return (f"SplineTransformer(num_bins={self._num_bins}, bound={self._bound}, "
                f"min_bin_width={self._min_bin_width}, min_slope={self._min_slope})")


_DEFAULTS = {"affine": AffineTransformer, "spline": SplineTransformer}


def as_transformer(transformer) -> Transformer:
    """`transformer` itself, or the default transformer it names (`"affine"`, `"spline"`)."""
    if isinstance(transformer, str):
        if transformer not in _DEFAULTS:
            raise ValueError(f"`transformer` must be a Transformer or one of {tuple(_DEFAULTS)}; got {transformer!r}.")
        return _DEFAULTS[transformer]()
    if not isinstance(transformer, Transformer):
        raise ValueError(
            f"`transformer` must be a tfp_nvp.bijectors.Transformer or one of {tuple(_DEFAULTS)}; got "
            f"{type(transformer).__name__}."
        )
    return transformer
