"""The one assembly path of the coupling builders: networks, couplings, optional mixing layers, chain, flow.

A coupling flow is a stack of couplings whose mask flips from layer to layer, each with its own conditioner
network, optionally with a learned 1x1 convolution (`mixing="conv1x1"`) or an elementwise leaky ReLU between
consecutive couplings. `real_nvp` and `spline_flow` differ only in the transformer their couplings use, so each
passes a `make_coupling` function and everything else is built here.
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import numpy as np
import tensorflow_probability as tfp

from tfp_nvp.bijectors.conv1x1 import Invertible1x1Conv
from tfp_nvp.bijectors.leaky_relu import LeakyReLU
from tfp_nvp.flows._base import _chain_type, _check_base, _Flow, _remember
from tfp_nvp.nn import ConvResNet, DenseNetwork, network_dtype

tfd = tfp.distributions

MIXINGS = (None, "conv1x1")


def check_mixing(mixing) -> None:
    if mixing not in MIXINGS:
        raise ValueError(f"`mixing` must be None or 'conv1x1'; got {mixing!r}.")


def check_leaky_relu(leaky_relu):
    """`leaky_relu` as recorded in a builder's config: None, 'learnable' or a positive float slope."""
    if leaky_relu is None or leaky_relu == "learnable":
        return leaky_relu
    if isinstance(leaky_relu, bool) or not isinstance(leaky_relu, (numbers.Real, np.floating, np.integer)) \
            or not np.isfinite(leaky_relu) or leaky_relu <= 0:
        raise ValueError(f"`leaky_relu` must be None, a slope > 0 or 'learnable'; got {leaky_relu!r}.")
    return float(leaky_relu)


def conditioner(event_shape, hidden: Sequence[int], seed, name: str, *, activation="relu", separate_towers=False,
                l2=0.0, num_blocks=2, dtype="float32"):
    """An unsized conditioner: a `DenseNetwork` for vectors, a `ConvResNet` of `max(hidden)` channels for images."""
    if len(event_shape) == 3:
        return ConvResNet(hidden_channels=max(hidden), num_blocks=num_blocks, l2=l2, seed=seed, dtype=network_dtype(dtype),
                          name=name)
    return DenseNetwork(hidden, activation=activation, separate_towers=separate_towers, l2=l2, seed=seed,
                        dtype=network_dtype(dtype), name=name)


def coupling_layers(event_shape, num_layers: int, make_coupling: Callable, hidden: Sequence[int], *, mixing=None,
                    leaky_relu=None, seed=None, dtype="float32", validate_args=False, name: str,
                    **network_kwargs) -> list:
    """The flow's layers in sampling order (latent side first).

    `make_coupling(index, network, flip)` builds coupling `index` around its conditioner; `network_kwargs` go to
    `conditioner`. Layer `i` draws its network's initial weights from `seed + 1000 i` and its 1x1 convolution's
    from `seed + 1000 i + 1`, so a seeded flow is the same whatever else it contains.
    """
    layers = []
    for i in range(num_layers):
        layer_seed = None if seed is None else int(seed) + 1000 * i
        net = conditioner(event_shape, hidden, layer_seed, f"{name}_net_{i}", dtype=dtype, **network_kwargs)
        if leaky_relu is not None and i > 0:
            learnable = leaky_relu == "learnable"
            layers.append(LeakyReLU(1.0 if learnable else leaky_relu, learnable=learnable,
                                    shape=tuple(event_shape) if learnable else (), dtype=dtype,
                                    validate_args=validate_args, name=f"{name}_leaky_relu_{i}"))
        if mixing == "conv1x1" and i > 0:
            layers.append(Invertible1x1Conv(event_shape, seed=None if seed is None else layer_seed + 1, dtype=dtype,
                                            validate_args=validate_args, name=f"{name}_mixing_{i}"))
        layers.append(make_coupling(i, net, i % 2 == 1))
    return layers


def assemble(builder: str, config: dict, layers: Sequence, event_shape, base_distribution, *, dtype="float32",
             validate_args=False, name: str, invertible_backprop=False, support=None) -> tfd.Distribution:
    """The flow of `layers` (sampling order) on `base_distribution`, with its spec for `.keras` files."""
    base = _check_base(base_distribution, event_shape, dtype)
    # tfb.Chain's forward applies its list right to left, so sampling runs the first layer first and the density
    # (inverse) pass runs it last.
    chain = _chain_type(invertible_backprop)(list(reversed(layers)), validate_args=validate_args, name=name)
    dist = _Flow(base, chain, support=support, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return _remember(dist, builder, config)
