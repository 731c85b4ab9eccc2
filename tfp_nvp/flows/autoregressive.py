"""Builders for masked autoregressive flows (MAF) and inverse autoregressive flows (IAF)."""

from __future__ import annotations

from typing import Sequence

import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import as_shape
from tfp_nvp.bijectors.autoregressive import MaskedAutoregressive
from tfp_nvp.flows._assembly import assemble
from tfp_nvp.flows._base import _flag, _positive

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["maf", "iaf"]


def _autoregressive_flow(builder, direction, event_shape, num_layers, hidden_units, activation, log_scale_bound,
                         conditional_shape, base_distribution, dtype, seed, validate_args, name,
                         invertible_backprop):
    event_shape = as_shape(event_shape, "event_shape")
    if len(event_shape) != 1:
        raise ValueError(
            f"`event_shape` must be a vector shape [D]: {builder} supports vector events only; got "
            f"{list(event_shape)}. Flatten the data (and put tfb.Reshape on the flow's data side) first."
        )
    num_layers = _positive(num_layers, "num_layers")
    hidden = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
    config = dict(
        event_shape=list(event_shape), num_layers=num_layers, hidden_units=list(hidden), activation=activation,
        log_scale_bound=log_scale_bound,
        conditional_shape=None if conditional_shape is None else list(conditional_shape),
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
        invertible_backprop=_flag(invertible_backprop, "invertible_backprop"),
    )
    steps = []
    for i in range(num_layers):
        if i > 0:
            # Reversing between layers lets every dimension be generated early in some layer.
            steps.append(tfb.Permute(list(range(event_shape[0]))[::-1], validate_args=validate_args,
                                     name=f"{name}_permute_{i}"))
        steps.append(MaskedAutoregressive(
            event_shape, direction=direction, hidden_units=hidden, activation=activation,
            log_scale_bound=log_scale_bound, conditional_shape=conditional_shape, dtype=dtype,
            seed=None if seed is None else int(seed) + 1000 * i, validate_args=validate_args,
            name=f"{name}_{direction}_{i}",
        ))
    return assemble(builder, config, steps, event_shape, base_distribution, dtype=dtype,
                    validate_args=validate_args, name=name, invertible_backprop=invertible_backprop)


def maf(
    event_shape: Sequence[int],
    num_layers: int = 5,
    hidden_units: Sequence[int] = (64, 64),
    activation: str = "relu",
    log_scale_bound: str = "tanh",
    conditional_shape: Sequence[int] | None = None,
    base_distribution: tfd.Distribution | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    validate_args: bool = False,
    name: str = "maf",
    invertible_backprop: bool = False,
) -> tfd.TransformedDistribution:
    """Masked autoregressive flow (Papamakarios et al., 2017): `num_layers` MAF layers, reversed in between.

    Each layer is a `tfp_nvp.MaskedAutoregressive` with a MADE of `hidden_units` (`activation`), so
    `log_prob` runs every network once, while `sample` runs each layer's network `D` times in sequence: the
    flow for density estimation and `FlowModel.fit`. Layers are named `f"{name}_maf_{i}"`, with a
    `tfb.Permute` reversing the dimensions between consecutive layers. `conditional_shape=[C]` makes every
    layer conditional; pass the condition with `bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c)`.
    Vector events `[D]` only. Saved and reloaded like `real_nvp` (`FlowModel` `.keras` files and weights).
    `invertible_backprop=True` chains the layers with `tfp_nvp.InvertibleChain` (training memory flat in
    depth); rebuilding a layer's input is its sampling pass, so each layer's network then runs `D + 1` more
    times per training step.

    Mixed precision: with a mixed global Keras policy (`keras.mixed_precision.set_global_policy("mixed_bfloat16")`
    or `"mixed_float16"`) set before building, a float32 flow's networks take that policy (float32 weights,
    low-precision compute; their outputs are cast back to float32), while the bijector math, parameter layers,
    log-dets and `log_prob` stay float32; a float64 flow stays float64 (`tfp_nvp.nn.network_dtype`).

    Example:
      >>> flow = maf([2], num_layers=4, hidden_units=(32, 32))
      >>> flow.log_prob(flow.sample(3, seed=1)).shape
      TensorShape([3])
    """
    return _autoregressive_flow("maf", "maf", event_shape, num_layers, hidden_units, activation, log_scale_bound,
                                conditional_shape, base_distribution, dtype, seed, validate_args, name,
                                invertible_backprop)


def iaf(
    event_shape: Sequence[int],
    num_layers: int = 5,
    hidden_units: Sequence[int] = (64, 64),
    activation: str = "relu",
    log_scale_bound: str = "tanh",
    conditional_shape: Sequence[int] | None = None,
    base_distribution: tfd.Distribution | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    validate_args: bool = False,
    name: str = "iaf",
    invertible_backprop: bool = False,
) -> tfd.TransformedDistribution:
    """Inverse autoregressive flow (Kingma et al., 2016): the mirror image of `maf`, built the same way.

    `sample` runs every layer's network once and `log_prob` of those samples is answered from TFP's bijector
    cache without another network call, which is what a variational surrogate does at every step:

      >>> q = iaf([3], num_layers=3, hidden_units=(32, 32))
      >>> tfp.vi.fit_surrogate_posterior(target_log_prob_fn, q, tf.keras.optimizers.Adam(1e-2), 500)

    `log_prob` of arbitrary data runs each layer's network `D` times. Layers are named `f"{name}_iaf_{i}"`;
    `flow.bijector` is the whole transformation, for use on another base distribution. Vector events only.
    `invertible_backprop=True` chains the layers with `tfp_nvp.InvertibleChain`; it changes the gradient of
    `log_prob` only (of data: `D + 1` more network runs per layer), not that of the samples a surrogate trains on.
    """
    return _autoregressive_flow("iaf", "iaf", event_shape, num_layers, hidden_units, activation, log_scale_bound,
                                conditional_shape, base_distribution, dtype, seed, validate_args, name,
                                invertible_backprop)

