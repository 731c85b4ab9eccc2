"""MADE (Germain et al., 2015): a masked MLP whose outputs for dimension `d` depend only on earlier inputs.

Exposed as `tfp_nvp.networks.MADE` and `tfp_nvp.networks.MaskedDense`; `tfp_nvp.MaskedAutoregressive` uses it
as its conditioner.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

__all__ = ["MADE", "MaskedDense", "INPUT_ORDERS"]

INPUT_ORDERS = ("left-to-right", "right-to-left", "random")


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def l2_penalty(value, name: str = "l2") -> float:
    """A weight-penalty factor: a finite number >= 0."""
    try:
        ok = not isinstance(value, bool) and np.isfinite(float(value)) and float(value) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be a finite number >= 0 (0 for no penalty); got {value!r}.")
    return float(value)


def _initializer(name: str, seed, offset: int):
    init = keras.initializers.get(name)
    if seed is None:
        return init
    return init.__class__.from_config({**init.get_config(), "seed": int(seed) + offset})


@keras.saving.register_keras_serializable(package="tfp_nvp")
class MaskedDense(keras.layers.Layer):
    """A dense layer whose kernel is multiplied by a fixed 0/1 `mask` of shape `[input_dim, units]`.

    Entries where the mask is 0 never influence the output (their gradients are zero too), which is how MADE
    cuts the connections that would break the autoregressive property.

    Example:
      >>> layer = MaskedDense(2, mask=[[1, 0], [1, 1]])
      >>> layer(keras.ops.ones((3, 2))).shape
      (3, 2)
    """

    def __init__(self, units: int, mask, activation=None, use_bias: bool = True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.units = _count(units, "units")
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.shape[1] != self.units or not np.all((mask == 0) | (mask == 1)):
            raise ValueError(
                f"`mask` must be a 0/1 array of shape [input_dim, {self.units}]; got shape {mask.shape}."
            )
        self.mask = mask.astype(np.int8)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape):
        if input_shape[-1] != self.mask.shape[0]:
            raise ValueError(
                f"{self.name}: input has {input_shape[-1]} features but `mask` has {self.mask.shape[0]} rows."
            )
        self.kernel = self.add_weight(name="kernel", shape=self.mask.shape, initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer)
        self.bias = (self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer)
                     if self.use_bias else None)

    def call(self, inputs):
        kernel = self.kernel * ops.cast(self.mask, self.kernel.dtype)
        out = ops.matmul(inputs, kernel)
        if self.bias is not None:
            out = out + self.bias
        return self.activation(out)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "mask": self.mask.tolist(),
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
        }


def resolve_order(input_order, event_size: int, seed=None) -> list[int]:
    """The generation order as a list of indices: `order[k]` is the `k`-th dimension to be generated."""
    if isinstance(input_order, str):
        if input_order not in INPUT_ORDERS:
            raise ValueError(
                f"`input_order` must be one of {INPUT_ORDERS} or a permutation of range(event_size); "
                f"got {input_order!r}."
            )
        if input_order == "left-to-right":
            return list(range(event_size))
        if input_order == "right-to-left":
            return list(range(event_size))[::-1]
        return [int(i) for i in np.random.default_rng(seed).permutation(event_size)]
    order = np.asarray(input_order)
    if order.ndim != 1 or order.shape[0] != event_size or sorted(order.tolist()) != list(range(event_size)):
        raise ValueError(
            f"`input_order` must be a permutation of range({event_size}) (the order in which dimensions are "
            f"generated); got {input_order!r}."
        )
    return [int(i) for i in order]


@keras.saving.register_keras_serializable(package="tfp_nvp")
class MADE(keras.layers.Layer):
    r"""Masked autoencoder for distribution estimation: `x [N, D] -> (shift, log_scale)`, each `[N, D]`.

    Every input gets a degree: its 1-based position in the generation order. Hidden units get degrees cycling
    through `1 .. D - 1`; a hidden unit sees the units of the previous layer whose degree is at most its own,
    and output `d` sees the last hidden units whose degree is strictly below the degree of input `d`. Hence
    `shift[d]` and `log_scale[d]` depend only on the inputs generated before `d`: the Jacobian of the output
    with respect to the input is strictly lower-triangular once both are put in generation order. The first
    dimension's outputs are constants (learned biases). Hidden layers narrower than `D - 1` lose connections.

    The output layer starts at zero, so an affine autoregressive bijector around a fresh MADE is the identity.

    Args:
      hidden_units: widths of the masked hidden layers.
      event_size: `D`; `None` takes it from the first input.
      input_order: `"left-to-right"`, `"right-to-left"`, `"random"` (drawn with `seed`) or a permutation of
        `range(D)` listing the dimensions in the order they are generated. A random order is fixed when `D` is
        known and saved with the layer.
      conditional_size: size of a vector `conditional_input`; it feeds every hidden unit of every hidden layer
        and every output through unmasked weights (the condition may influence every output, the first
        generated dimension's too; its output weights start at zero like the head's).
      activation: hidden activation.
      l2: L2 weight penalty on every kernel (reaches `FlowModel`'s loss through `model.losses`).
      seed: seed for the kernel initialisers and a random order.

    Example:
      >>> made = MADE(hidden_units=(32, 32), input_order="right-to-left")
      >>> shift, log_scale = made(keras.ops.zeros((5, 3)))
    """

    def __init__(
        self,
        hidden_units: Sequence[int] = (64, 64),
        event_size: int | None = None,
        input_order: str | Sequence[int] = "left-to-right",
        conditional_size: int | None = None,
        activation: str = "relu",
        l2: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        hidden_units = (hidden_units,) if isinstance(hidden_units, (int, np.integer)) else tuple(hidden_units)
        if not hidden_units:
            raise ValueError("`hidden_units` must name at least one hidden layer, e.g. (64, 64).")
        self.hidden_units = tuple(_count(h, "hidden_units") for h in hidden_units)
        self.event_size = None if event_size is None else _count(event_size, "event_size")
        self.conditional_size = None if conditional_size is None else _count(conditional_size, "conditional_size")
        self.l2 = l2_penalty(l2)
        self.activation = activation
        keras.activations.get(activation)  # an unknown name fails here, not at the first call
        self.seed = seed
        if isinstance(input_order, str):
            resolve_order(input_order, 1)  # validates the name
        self._requested_order = input_order if isinstance(input_order, str) else [int(i) for i in input_order]
        self.input_order = None
        if self.event_size is not None:
            self.input_order = resolve_order(input_order, self.event_size, seed)

    # ------------------------------------------------------------------------------------------- degrees
    @property
    def input_degrees(self) -> np.ndarray:
        """Degree of every input dimension (1 = generated first); available once `D` is known."""
        if self.input_order is None:
            raise ValueError("MADE does not know its event size yet: pass `event_size` or call it once.")
        degrees = np.empty(len(self.input_order), dtype=np.int64)
        degrees[self.input_order] = np.arange(1, len(self.input_order) + 1)
        return degrees

    def _hidden_degrees(self, units: int, d: int) -> np.ndarray:
        if d == 1:  # nothing may be seen: degree-0 units have no inputs and only carry their bias
            return np.zeros(units, dtype=np.int64)
        return np.arange(units) % (d - 1) + 1

    def masks(self) -> list[np.ndarray]:
        """The 0/1 masks of the hidden layers and of the output layer (shift and log-scale columns)."""
        d = len(self.input_order)
        previous = self.input_degrees
        masks = []
        for units in self.hidden_units:
            degrees = self._hidden_degrees(units, d)
            masks.append((degrees[None, :] >= previous[:, None]).astype(np.int8))
            previous = degrees
        out = (self.input_degrees[None, :] > previous[:, None]).astype(np.int8)
        masks.append(np.concatenate([out, out], axis=1))
        return masks

    # ------------------------------------------------------------------------------------------- layers
    def build(self, input_shape):
        d = input_shape[-1]
        if d is None:
            raise ValueError("MADE needs a known last input dimension (the event size).")
        if self.event_size is None:
            self.event_size = int(d)
            self.input_order = resolve_order(self._requested_order, self.event_size, self.seed)
        elif d != self.event_size:
            raise ValueError(f"MADE was built for event_size={self.event_size}; got inputs of shape {input_shape}.")
        regularizer = keras.regularizers.L2(self.l2) if self.l2 > 0 else None
        masks = self.masks()
        self._hidden = [
            MaskedDense(units, mask, kernel_initializer=_initializer("glorot_uniform", self.seed, i),
                        kernel_regularizer=regularizer, dtype=self.dtype_policy, name=f"masked_{i}")
            for i, (units, mask) in enumerate(zip(self.hidden_units, masks[:-1]))
        ]
        # Zero head: shift = 0 and log_scale = 0 at initialisation (identity bijector).
        self._head = MaskedDense(2 * d, masks[-1], kernel_initializer="zeros", kernel_regularizer=regularizer,
                                 dtype=self.dtype_policy, name="masked_head")
        self._context = []
        if self.conditional_size is not None:
            self._context = [
                keras.layers.Dense(units, use_bias=False, kernel_initializer=_initializer("glorot_uniform",
                                                                                          self.seed, 100 + i),
                                   kernel_regularizer=regularizer, dtype=self.dtype_policy, name=f"context_{i}")
                for i, units in enumerate(self.hidden_units)
            ]
            # Zero-initialised like the head. Without it the first generated dimension, whose outputs see no
            # hidden unit, could never depend on the condition.
            self._context.append(keras.layers.Dense(2 * d, use_bias=False, kernel_initializer="zeros",
                                                    kernel_regularizer=regularizer, dtype=self.dtype_policy,
                                                    name="context_head"))
        width = d
        for layer in self._hidden:
            layer.build((None, width))
            width = layer.units
        self._head.build((None, width))
        for layer in self._context:
            layer.build((None, self.conditional_size))
        self.built = True

    def call(self, inputs, conditional_input=None):
        if (conditional_input is None) != (self.conditional_size is None):
            if conditional_input is None:
                raise ValueError(f"MADE was built with conditional_size={self.conditional_size}: pass "
                                 "`conditional_input`.")
            raise ValueError("MADE was built without `conditional_size`: it takes no `conditional_input`.")
        act = keras.activations.get(self.activation)
        c = None if conditional_input is None else ops.cast(conditional_input, self.compute_dtype)
        h = inputs
        for i, layer in enumerate(self._hidden):
            a = layer(h)
            if c is not None:
                a = a + self._context[i](c)
            h = act(a)
        out = self._head(h)
        if c is not None:
            out = out + self._context[-1](c)
        d = self.event_size
        return out[..., :d], out[..., d:]

    def compute_output_shape(self, inputs_shape, conditional_input_shape=None):
        return tuple(inputs_shape), tuple(inputs_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_units": list(self.hidden_units),
            "event_size": self.event_size,
            "input_order": self.input_order if self.input_order is not None else self._requested_order,
            "conditional_size": self.conditional_size,
            "activation": self.activation,
            "l2": self.l2,
            "seed": self.seed,
        }
