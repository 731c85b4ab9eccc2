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
from tensorflow_probability import bijectors as tfb

from tfp_nvp._compat import in_xla_context

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
def _rq_spline_ops(flat, widths, heights, knot_slopes, bound, inverse, with_output):
    """TFP's spline (or its inverse) at `flat` and its elementwise log-det; every argument but `flat` is per element."""
    spline = tfb.RationalQuadraticSpline(widths, heights, knot_slopes, range_min=tf.constant(-bound, widths.dtype))
    if inverse:
        out = spline.inverse(flat) if with_output else None
        log_det = spline.inverse_log_det_jacobian(flat, event_ndims=0)
    else:
        out = spline.forward(flat) if with_output else None
        log_det = spline.forward_log_det_jacobian(flat, event_ndims=0)
    return out, log_det


# TFP's spline is a large graph (about 2200 ops in its gradient alone), and a flow stacks many couplings of
# identical shapes. As one traced function, the spline and its gradient are built once per shape and dtype and
# called by every coupling, instead of being rebuilt in each: the two-moons spline recipe's first epoch (its
# training and validation traces) fell from 28-31 s to 16-17 s, and later epochs got faster too (fewer graph
# nodes to schedule). XLA must not see the shared function: a digits GLOW with spline couplings under
# `jit_compile=True` took 107 s instead of 15 s for its first epoch and 150 s instead of 0.24 s for the next
# (measured). Inside a jit-compiled trace (`in_xla_context()`) the spline's ops are written inline, as XLA
# compiles the whole step anyway.
_rq_spline = tf.function(_rq_spline_ops, autograph=False, reduce_retracing=True)


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
    r"""A monotone rational-quadratic spline per element (Durkan et al., 2019), through `tfb.RationalQuadraticSpline`.

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
        """The spline (or its inverse) at `t` and its elementwise log-det in the direction of the call.

        Every element is one independent spline, so the batch and event axes are flattened into one before TFP
        sees them: its bin search gathers with `batch_dims = rank - 1`, whose gradient costs graph ops per batch
        axis (measured: fewer ops and faster tracing than with the natural shape).
        """
        # A conditional input may carry more batch dimensions than `t`; the parameters have the broadcast ones.
        t = tf.broadcast_to(t, tf.shape(params[0])[:-1])
        widths, heights, knot_slopes = (tf.reshape(p, [-1, p.shape[-1]]) for p in params)
        flat = tf.reshape(t, [-1])
        spline = _rq_spline_ops if in_xla_context() else _rq_spline
        out, log_det = spline(flat, widths, heights, knot_slopes, self._bound, inverse, with_output)
        shape = tf.shape(t)
        return (None if out is None else tf.reshape(out, shape)), tf.reshape(log_det, shape)

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
