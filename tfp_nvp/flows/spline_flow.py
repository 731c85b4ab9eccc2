"""Neural spline flow: rational-quadratic spline couplings whose mask flips from layer to layer."""

from __future__ import annotations

from typing import Sequence

import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import as_shape
from tfp_nvp.bijectors.spline import SplineCoupling
from tfp_nvp.flows._assembly import assemble, check_mixing, coupling_layers
from tfp_nvp.flows._base import _flag, _positive

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["spline_flow"]


def spline_flow(
    event_shape: Sequence[int],
    num_coupling_layers: int = 4,
    hidden_units: Sequence[int] = (128, 128),
    num_bins: int = 8,
    bound: float = 4.0,
    mask: str | None = None,
    min_bin_width: float = 1e-3,
    min_slope: float = 1e-3,
    separate_towers: bool = False,
    activation: str = "relu",
    l2: float = 0.0,
    num_blocks: int = 2,
    mixing: str | None = None,
    conditional_shape: Sequence[int] | None = None,
    base_distribution: tfd.Distribution | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    validate_args: bool = False,
    name: str = "spline_flow",
    invertible_backprop: bool = False,
) -> tfd.TransformedDistribution:
    """Neural spline flow: a chain of rational-quadratic spline couplings whose mask flips from layer to layer.

    The same layout and arguments as `real_nvp`, with `tfp_nvp.SplineCoupling` in place of the affine
    coupling: each transformed entry goes through a monotone spline of `num_bins` bins on `[-bound, bound]`
    (the identity outside, so put `bound` where standardised data and the base's mass lie; 4 covers all but
    6e-5 of a standard normal), with `min_bin_width` and `min_slope` as numerical guards. Splines bend where
    an affine map only scales, so a few spline couplings often match many affine ones. Couplings are named
    `f"{name}_coupling_{i}"`; with `conditional_shape` set, pass the condition with
    `bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c)`. Saved and reloaded like `real_nvp` (`FlowModel`
    `.keras` files and weights). `invertible_backprop=True` chains the couplings with
    `tfp_nvp.InvertibleChain`, as in `real_nvp`: training memory flat in depth for about two extra passes.

    Mixed precision: with a mixed global Keras policy (`keras.mixed_precision.set_global_policy("mixed_bfloat16")`
    or `"mixed_float16"`) set before building, a float32 flow's networks take that policy (float32 weights,
    low-precision compute; their outputs are cast back to float32), while the bijector math, parameter layers,
    log-dets and `log_prob` stay float32; a float64 flow stays float64 (`tfp_nvp.nn.network_dtype`).

    Example:
      >>> flow = spline_flow([2], num_coupling_layers=4, hidden_units=(64, 64), num_bins=8)
      >>> flow.log_prob(flow.sample(3, seed=1)).shape
      TensorShape([3])
    """
    event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
    num_layers = _positive(num_coupling_layers, "num_coupling_layers")
    hidden = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
    check_mixing(mixing)
    config = dict(
        event_shape=list(event_shape), num_coupling_layers=num_layers, hidden_units=list(hidden),
        num_bins=num_bins, bound=bound, mask=mask, min_bin_width=min_bin_width, min_slope=min_slope,
        separate_towers=separate_towers, activation=activation, l2=l2, num_blocks=num_blocks, mixing=mixing,
        conditional_shape=None if conditional_shape is None else list(conditional_shape),
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
        invertible_backprop=_flag(invertible_backprop, "invertible_backprop"),
    )
    mask = mask or ("checkerboard" if len(event_shape) == 3 else "half")

    def make_coupling(i, network, flip):
        return SplineCoupling(event_shape, network=network, mask=mask, flip=flip, num_bins=num_bins, bound=bound,
                              min_bin_width=min_bin_width, min_slope=min_slope, conditional_shape=conditional_shape,
                              dtype=dtype, validate_args=validate_args, name=f"{name}_coupling_{i}")

    layers = coupling_layers(event_shape, num_layers, make_coupling, hidden, mixing=mixing, seed=seed, dtype=dtype,
                             validate_args=validate_args, name=name, activation=activation,
                             separate_towers=separate_towers, l2=l2, num_blocks=num_blocks)
    return assemble("spline_flow", config, layers, event_shape, base_distribution, dtype=dtype,
                    validate_args=validate_args, name=name, invertible_backprop=invertible_backprop)
