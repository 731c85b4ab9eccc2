"""RealNVP: affine couplings whose mask flips from layer to layer."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import as_shape
from tfp_nvp.bijectors.conv1x1 import Invertible1x1Conv
from tfp_nvp.bijectors.coupling import AffineCoupling
from tfp_nvp.bijectors.leaky_relu import LeakyReLU
from tfp_nvp.flows._base import _chain_type, _check_base, _flag, _Flow, _remember
from tfp_nvp.nn import ConvResNet, DenseNetwork

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
    if isinstance(num_coupling_layers, bool) or int(num_coupling_layers) != num_coupling_layers \
            or num_coupling_layers <= 0:
        raise ValueError(f"`num_coupling_layers` must be a positive integer; got {num_coupling_layers!r}.")
    hidden = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
    config = dict(
        event_shape=list(event_shape), num_coupling_layers=int(num_coupling_layers), hidden_units=list(hidden),
        mask=mask, log_scale_bound=log_scale_bound, separate_towers=separate_towers, activation=activation,
        l2=l2, num_blocks=num_blocks, mixing=mixing,
        conditional_shape=None if conditional_shape is None else list(conditional_shape),
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
        invertible_backprop=_flag(invertible_backprop, "invertible_backprop"),
    )
    if mixing not in (None, "conv1x1"):
        raise ValueError(f"`mixing` must be None or 'conv1x1'; got {mixing!r}.")
    if leaky_relu is not None:
        if isinstance(leaky_relu, str):
            if leaky_relu != "learnable":
                raise ValueError(f"`leaky_relu` must be None, a slope > 0 or 'learnable'; got {leaky_relu!r}.")
        elif isinstance(leaky_relu, bool) or not isinstance(leaky_relu, (int, float, np.integer, np.floating)) \
                or not np.isfinite(leaky_relu) or leaky_relu <= 0:
            raise ValueError(f"`leaky_relu` must be None, a slope > 0 or 'learnable'; got {leaky_relu!r}.")
        # Recorded only when used, so the configuration of a flow without it stays what it always was.
        config["leaky_relu"] = leaky_relu if isinstance(leaky_relu, str) else float(leaky_relu)
    image = len(event_shape) == 3
    mask = mask or ("checkerboard" if image else "half")
    base = _check_base(base_distribution, event_shape, dtype)
    couplings = []
    for i in range(int(num_coupling_layers)):
        layer_seed = None if seed is None else int(seed) + 1000 * i
        if image:
            net = ConvResNet(hidden_channels=max(hidden), num_blocks=num_blocks, l2=l2, seed=layer_seed,
                             dtype=dtype, name=f"{name}_net_{i}")
        else:
            net = DenseNetwork(hidden, activation=activation, separate_towers=separate_towers, l2=l2,
                               seed=layer_seed, dtype=dtype, name=f"{name}_net_{i}")
        if leaky_relu is not None and i > 0:
            learnable = leaky_relu == "learnable"
            couplings.append(LeakyReLU(1.0 if learnable else float(leaky_relu), learnable=learnable,
                                       shape=tuple(event_shape) if learnable else (), dtype=dtype,
                                       validate_args=validate_args, name=f"{name}_leaky_relu_{i}"))
        if mixing == "conv1x1" and i > 0:
            couplings.append(Invertible1x1Conv(event_shape, seed=None if seed is None else int(seed) + 1000 * i + 1,
                                               dtype=dtype, validate_args=validate_args, name=f"{name}_mixing_{i}"))
        couplings.append(
            AffineCoupling(event_shape, network=net, mask=mask, flip=i % 2 == 1, log_scale_bound=log_scale_bound,
                           conditional_shape=conditional_shape, dtype=dtype, validate_args=validate_args,
                           name=f"{name}_coupling_{i}")
        )
    # tfb.Chain's forward applies its list right to left, so sampling runs coupling_0 first and the density
    # (inverse) pass runs it last.
    chain_type = _chain_type(invertible_backprop)
    chain = chain_type(list(reversed(couplings)), validate_args=validate_args, name=name)
    dist = _Flow(base, chain, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return _remember(dist, "real_nvp", config)
