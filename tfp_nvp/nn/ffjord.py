"""FFJORD's dynamics network: a time-conditioned Keras 3 MLP `f(h, t)`."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import layers, ops

__all__ = ["TimeDerivativeNetwork", "hidden_units_of"]


def hidden_units_of(value) -> tuple[int, ...]:
    units = (value,) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        units = tuple(units)
    except TypeError:
        units = None
    if not units or any(isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u <= 0 for u in units):
        raise ValueError(
            f"`hidden_units` must be a non-empty sequence of positive integers such as (64, 64); got {value!r}."
        )
    return tuple(int(u) for u in units)

def _seeded(initializer: str, seed, offset: int):
    init = keras.initializers.get(initializer)
    if seed is not None:
        init = init.__class__.from_config({**init.get_config(), "seed": int(seed) + offset})
    return init

@keras.saving.register_keras_serializable(package="tfp_nvp")
class TimeDerivativeNetwork(keras.layers.Layer):
    """The FFJORD dynamics `f(h, t)`: an MLP from a state `h` of shape `[N, D]` and a time `t` to `dh/dt`.

    The time enters every layer (it is concatenated to each layer's input), so the field can change along the
    trajectory. Use smooth activations (`tanh`, `softplus`, `swish`, ...): the ODE solver and the trace of the
    Jacobian need a smooth field; a ReLU field makes adaptive solvers take many tiny steps. The last layer is
    zero-initialised, so a fresh flow is the identity map.

    Args:
      state_dim: `D`, the size of the state (the event size of the flow).
      hidden_units: widths of the hidden layers.
      activation: hidden activation (any Keras activation name).
      seed: seed for the kernel initialisers.

    Example:
      >>> net = TimeDerivativeNetwork(2, hidden_units=(32, 32))
      >>> net(tf.zeros([5, 2]), tf.constant(0.5)).shape
      TensorShape([5, 2])
    """

    def __init__(self, state_dim: int, hidden_units: Sequence[int] = (64, 64), activation: str = "tanh",
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(state_dim, bool) or not isinstance(state_dim, (int, np.integer)) or state_dim <= 0:
            raise ValueError(f"`state_dim` must be a positive integer; got {state_dim!r}.")
        self.state_dim = int(state_dim)
        self.hidden_units = hidden_units_of(hidden_units)
        try:
            keras.activations.get(activation)
        except (ValueError, TypeError) as e:
            raise ValueError(f"`activation` must be a Keras activation such as 'tanh' or 'softplus'; got "
                             f"{activation!r}.") from e
        self.activation = activation
        self.seed = seed
        self._dense = []
        width = self.state_dim
        for i, units in enumerate(self.hidden_units):
            dense = layers.Dense(units, activation=activation, kernel_initializer=_seeded("glorot_uniform", seed, i),
                                 dtype=self.dtype_policy, name=f"hidden_{i}")
            dense.build((None, width + 1))
            self._dense.append(dense)
            width = units
        head = layers.Dense(self.state_dim, kernel_initializer="zeros", dtype=self.dtype_policy, name="head")
        head.build((None, width + 1))
        self._dense.append(head)
        # Every size is known here, so the weights exist from construction: the bijector lists them for TFP at once.
        self.built = True

    def call(self, state, time):
        state = ops.convert_to_tensor(state, dtype=self.compute_dtype)
        # One column holding t for every row: concatenated to each layer's input.
        t = ops.ones_like(state[..., :1]) * ops.cast(time, self.compute_dtype)
        h = state
        for dense in self._dense:
            h = dense(ops.concatenate([h, t], axis=-1))
        return h

    def compute_output_spec(self, state, time):
        return keras.KerasTensor(state.shape, dtype=self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "state_dim": self.state_dim, "hidden_units": list(self.hidden_units),
                "activation": self.activation, "seed": self.seed}
