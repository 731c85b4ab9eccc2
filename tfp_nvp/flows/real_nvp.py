"""RealNVP: affine couplings whose mask flips from layer to layer."""

from __future__ import annotations

from typing import Sequence

import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import as_shape
from tfp_nvp.bijectors.coupling import AffineCoupling
from tfp_nvp.flows._assembly import assemble, check_leaky_relu, check_mixing, coupling_layers
from tfp_nvp.flows._base import _flag, _positive

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["real_nvp"]


# `real_nvp`'s network for vector events when none is given (benchmarks/defaults.py measured the choice).
REAL_NVP_VECTOR_DEFAULTS = dict(num_coupling_layers=16, hidden_units=(64, 64))


def real_nvp(
    event_shape: Sequence[int],
    num_coupling_layers: int | None = None,
    hidden_units: Sequence[int] | None = None,
    mask: str | None = None,
    log_scale_bound: str = "tanh",
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
    name: str = "real_nvp",
    invertible_backprop: bool = False,
    leaky_relu: float | str | None = None,
) -> tfd.TransformedDistribution:
    """RealNVP: a chain of affine couplings whose mask flips from layer to layer.

    Vector events `[D]` use dense networks (`hidden_units`, `activation`, `separate_towers`); image events
    `[H, W, C]` use convolutional ResNets (`hidden_units[0]` channels, `num_blocks` residual blocks).
    Defaults: 16 couplings of `(64, 64)` for vectors (on two moons, deep and narrow beat 8 couplings of
    `(128, 128)` at equal training time), 8 couplings of 128 channels for images.
    `mask` defaults to `"half"` for vectors and `"checkerboard"` for images. `mixing="conv1x1"` puts a learned
    `Invertible1x1Conv` (LU, random-rotation start) between consecutive couplings, so the split the couplings
    see is learned rather than fixed (GLOW's replacement for permutations); `None` uses only the mask flips.
    `leaky_relu` puts an elementwise `tfp_nvp.LeakyReLU` between consecutive couplings (as in flows that
    alternate couplings with a leaky-ReLU layer): a number fixes its negative-side slope (e.g. 0.5);
    `"learnable"` learns one slope per entry, starting at 1 (the identity, so the flow still starts as one).
    Couplings are named
    `f"{name}_coupling_{i}"`; with `conditional_shape` set, pass the condition with
    `bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c)`.

    Returns a `tfd.TransformedDistribution` (base `N(0, I)` unless `base_distribution` is given) whose
    `sample`, `log_prob` and `prob` come from TFP; `forward` maps base samples to data. `log_prob` rejects data
    of the wrong event shape or dtype (cast float64 data to a float32 flow yourself); `validate_args=True` makes
    it and every bijector also raise `InvalidArgumentError` for non-finite data (at some cost per call).
    `invertible_backprop=True` chains the couplings with `tfp_nvp.InvertibleChain`: training gradients are
    recomputed by inverting the flow step by step instead of from stored activations, so activation memory stays
    flat in depth (about two extra passes of compute; gradients equal up to float32 reconstruction error).

    Mixed precision: with a mixed global Keras policy (`keras.mixed_precision.set_global_policy("mixed_bfloat16")`
    or `"mixed_float16"`) set before building, a float32 flow's networks take that policy (float32 weights,
    low-precision compute; their outputs are cast back to float32), while the bijector math, parameter layers,
    log-dets and `log_prob` stay float32; a float64 flow stays float64 (`tfp_nvp.nn.network_dtype`).

    Example:
      >>> flow = real_nvp([2], num_coupling_layers=6, hidden_units=(64, 64))
      >>> flow.log_prob(flow.sample(3, seed=1)).shape
      TensorShape([3])
    """
    event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
    vector = len(event_shape) == 1
    if num_coupling_layers is None:
        num_coupling_layers = REAL_NVP_VECTOR_DEFAULTS["num_coupling_layers"] if vector else 8
    if hidden_units is None:
        hidden_units = REAL_NVP_VECTOR_DEFAULTS["hidden_units"] if vector else (128,)
    num_layers = _positive(num_coupling_layers, "num_coupling_layers")
    hidden = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
    check_mixing(mixing)
    config = dict(
        event_shape=list(event_shape), num_coupling_layers=num_layers, hidden_units=list(hidden),
        mask=mask, log_scale_bound=log_scale_bound, separate_towers=separate_towers, activation=activation,
        l2=l2, num_blocks=num_blocks, mixing=mixing,
        conditional_shape=None if conditional_shape is None else list(conditional_shape),
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
        invertible_backprop=_flag(invertible_backprop, "invertible_backprop"),
    )
    leaky_relu = check_leaky_relu(leaky_relu)
    if leaky_relu is not None:
        # Recorded only when used, so the configuration of a flow without it stays what it always was.
        config["leaky_relu"] = leaky_relu
    mask = mask or ("checkerboard" if not vector else "half")

    def make_coupling(i, network, flip):
        return AffineCoupling(event_shape, network=network, mask=mask, flip=flip, log_scale_bound=log_scale_bound,
                              conditional_shape=conditional_shape, dtype=dtype, validate_args=validate_args,
                              name=f"{name}_coupling_{i}")

    layers = coupling_layers(event_shape, num_layers, make_coupling, hidden, mixing=mixing, leaky_relu=leaky_relu,
                             seed=seed, dtype=dtype, validate_args=validate_args, name=name, activation=activation,
                             separate_towers=separate_towers, l2=l2, num_blocks=num_blocks)
    return assemble("real_nvp", config, layers, event_shape, base_distribution, dtype=dtype,
                    validate_args=validate_args, name=name, invertible_backprop=invertible_backprop)
