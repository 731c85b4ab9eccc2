"""Neural spline coupling: a rational-quadratic spline transformer on the coupling machinery of RealNVP."""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfp_nvp.bijectors.coupling import Coupling
from tfp_nvp.bijectors.transformers import SplineTransformer

__all__ = ["SplineCoupling"]


class SplineCoupling(Coupling):
    r"""Neural spline coupling (Durkan et al., 2019): a monotone rational-quadratic spline per element.

    The event is split by a mask into a conditioning part `x_a` and a transformed part `x_b`, exactly as in
    `AffineCoupling` (same masks, `flip`, networks, conditioning and batch handling); each entry of `x_b` goes
    through its own monotone rational-quadratic spline (the package's own, exact in float32) whose knots come from
    the network evaluated on `x_a`:

        forward (latent -> data):  y_a = x_a,  y_b = g(x_b; theta(x_a))
        inverse (data -> latent):  x_a = y_a,  x_b = g^{-1}(y_b; theta(y_a))
        log|det dy/dx| = sum over x_b of log g'(x_b),   log|det dx/dy| = -sum over y_b of log g'(g^{-1}(y_b)).

    Each spline maps `[-bound, bound]` onto itself through `num_bins` bins and is the identity outside it
    (linear tails of slope 1, log-det 0), so the map is defined on the whole real line; the slope is 1 at both
    ends of the interval, so the derivative is continuous there. Per transformed element the network returns
    `2 * num_bins` bin parameters (widths then heights) and `num_bins - 1` interior knot slopes:

        widths  = min_bin_width + (2 * bound - num_bins * min_bin_width) * softmax(u_w)     (same for heights)
        slopes  = min_slope + softplus(u_s + log(expm1(1 - min_slope)))

    so a zero network output gives uniform bins and unit slopes: the identity. The networks of
    `tfp_nvp.networks` end in a zero-initialised layer, so a fresh coupling is exactly the identity. It is
    `Coupling(event_shape, SplineTransformer(num_bins, bound, min_bin_width, min_slope), ...)` under its own
    name and defaults.

    The network sees `x_a` with shape `[N] + network_input_shape` and returns `(bins, slopes)` with last axes
    `param_shape[-1] * 2 * num_bins` and `param_shape[-1] * (num_bins - 1)` (leading axes `param_shape[:-1]`),
    or one tensor holding both on its last axis (bins first); entries are grouped per transformed element.
    A `tfp_nvp.networks` network with `output_units` / `output_channels` left `None` is sized here. With
    `conditional_shape` set, the network is called as `network(x_a, conditional_input=c)` and `c` reaches the
    bijector through `bijector_kwargs={name: {"conditional_input": c}}` (see `tfp_nvp.conditional_kwargs`).

    Args:
      event_shape: `[D]` for vectors or `[H, W, C]` for images.
      network: the conditioner; `None` builds a `DenseNetwork(hidden_units)` (vectors) or a `ConvResNet`
        (images, `max(hidden_units)` channels).
      mask, flip: which entries condition, as in `AffineCoupling`.
      num_bins: number of spline bins `K` (an integer >= 2).
      bound: half-width `B` of the interval `[-B, B]` the spline acts on (positive; 4 by default, as in
        `spline_flow` and `glow`). Put it where the data of this layer lie: entries outside are left unchanged.
      min_bin_width: smallest width and height of a bin, in `[0, 2 * bound / num_bins)`; keeps bins from
        collapsing (a numerical guard).
      min_slope: smallest knot slope, in `[0, 1)`.
      hidden_units, conditional_shape, dtype, validate_args, name: as in `AffineCoupling`.

    Every weight is visible to both TFP (`trainable_variables`) and Keras (`keras_layers`, tracked by
    `tfp_nvp.FlowModel`).

    Example:
      >>> bij = SplineCoupling(event_shape=[2], num_bins=8, bound=3.0, hidden_units=(64, 64))
      >>> y = bij.forward(tf.random.normal([10, 2]))
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        network: keras.layers.Layer | Callable | None = None,
        mask: str | np.ndarray = "half",
        flip: bool = False,
        num_bins: int = 8,
        bound: float = 4.0,
        min_bin_width: float = 1e-3,
        min_slope: float = 1e-3,
        hidden_units: Sequence[int] = (128, 128),
        conditional_shape: Sequence[int] | None = None,
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "spline_coupling",
    ):
        parameters = dict(locals())
        transformer = SplineTransformer(num_bins=num_bins, bound=bound, min_bin_width=min_bin_width,
                                        min_slope=min_slope)
        self._setup(parameters, transformer)

    @property
    def num_bins(self) -> int:
        """Number of spline bins per transformed element."""
        return self.transformer.num_bins

    @property
    def bound(self) -> float:
        """Half-width of the interval `[-bound, bound]` the splines act on; the identity outside it."""
        return self.transformer.bound
