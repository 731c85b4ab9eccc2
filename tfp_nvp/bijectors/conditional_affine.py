"""An elementwise affine map whose shift and scale come from a context vector: a conditional Gaussian prior."""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfp_nvp import nn
from tfp_nvp.bijectors._base import KerasParameterizedBijector, NetworkContract, as_float_dtype, as_shape
from tfp_nvp.bijectors._conditioning import broadcast_condition, missing_condition

__all__ = ["ConditionalAffine"]


class ConditionalAffine(KerasParameterizedBijector):
    r"""`y = x * exp(log_scale(c)) + shift(c)` elementwise, with both maps a Keras network of the context `c`.

        forward (latent -> data):  y = x * exp(s(c)) + t(c)
        inverse (data -> latent):  x = (y - t(c)) * exp(-s(c))
        log|det dy/dx| = sum(s(c))  over the event,   log|det dx/dy| = -sum(s(c)).

    Put on the latent side of a flow with a standard normal base, it turns the base into the conditional
    Gaussian `N(t(c), exp(s(c))^2)` while `sample` and `log_prob` still come from the
    `tfd.TransformedDistribution`: this is how `tfp_nvp.glow(..., conditional_shape=...)` gets GLOW's
    class-conditional top-level prior. The context reaches the bijector through
    `bijector_kwargs={name: {"conditional_input": c}}` (see `tfp_nvp.conditional_kwargs`); its batch shape
    must broadcast with the data's. Every entry of the event gets its own mean and log-scale.

    Args:
      event_shape: the shape the map acts on (`[D]` or `[H, W, C]`).
      conditional_shape: `[m]`, the context vector's shape.
      network: maps `[N, m]` to `(shift, log_scale)` each `[N, prod(event_shape)]`, or to one tensor holding
        both (shift first). Default: a `tfp_nvp.nn.DenseNetwork(hidden_units)` (a zero-initialised dense
        layer when `hidden_units` is empty), whose zero-initialised head makes a fresh map the identity; its
        dtype policy is `tfp_nvp.nn.network_dtype(dtype)`, and its outputs are cast to `dtype`.
      hidden_units: hidden widths of the default network; `()` gives a linear map of the context (enough for
        one-hot labels: one mean and scale per class, GLOW's choice).

    Every weight is visible to TFP (`trainable_variables`) and Keras (`keras_layers`, tracked by
    `tfp_nvp.FlowModel`).

    Example:
      >>> prior = ConditionalAffine([2, 2, 4], conditional_shape=[10])
      >>> prior.forward(tf.zeros([3, 2, 2, 4]), conditional_input=tf.one_hot([0, 1, 2], 10)).shape
      TensorShape([3, 2, 2, 4])
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        conditional_shape: Sequence[int],
        network: keras.layers.Layer | Callable | None = None,
        hidden_units: Sequence[int] = (64,),
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "conditional_affine",
    ):
        parameters = dict(locals())
        event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
        if conditional_shape is None:
            raise ValueError("`conditional_shape` must be given ([m] for a context vector of m entries); got None.")
        conditional_shape = as_shape(conditional_shape, "conditional_shape", rank=1)
        dtype = as_float_dtype(dtype)
        self._event_shape_ = event_shape
        self._conditional_shape = conditional_shape
        size = int(np.prod(event_shape))
        with tf.name_scope(name) as name:
            self._contract = NetworkContract(conditional_shape, (size,), ("shift", "log_scale"))
            network = self._setup_network(network, hidden_units, size, dtype, name.rstrip("/"))
            self._network = network
            self._contract.check(lambda c, _: self._network(c), dtype)
            # The network is unique per instance, so two equal-config maps never share TFP's cache.
            parameters["network"] = network
            self._track_layers([network])
            super().__init__(
                forward_min_event_ndims=len(event_shape),
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                dtype=dtype,
                name=name,
            )

    def _setup_network(self, network, hidden_units, size, dtype, name):

        if network is None:
            hidden = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units or ())
            if hidden:
                network = nn.DenseNetwork(hidden, output_units=None, dtype=nn.network_dtype(dtype), name=f"{name}_network")
            else:
                network = keras.layers.Dense(2 * size, kernel_initializer="zeros", dtype=nn.network_dtype(dtype),
                                             name=f"{name}_network")
        return self._contract.size(network)

    @property
    def network(self):
        """The network mapping the context to `(shift, log_scale)`."""
        return self._network

    @property
    def conditional_shape(self) -> tuple[int, ...]:
        return self._conditional_shape

    def _params(self, x, conditional_input):
        """`(x, shift, log_scale)`, all with the batch shape of `x` broadcast with the condition's."""
        if conditional_input is None:
            raise missing_condition(self.name, self._conditional_shape)
        rank = len(self._event_shape_)
        x, c, batch_shape = broadcast_condition(self, x, conditional_input, rank)
        shift, log_scale = self._contract.split(self._network(tf.reshape(c, (-1,) + self._conditional_shape)))
        shape = tf.concat([batch_shape, self._event_shape_], 0)
        return x, tf.reshape(tf.cast(shift, x.dtype), shape), tf.reshape(tf.cast(log_scale, x.dtype), shape)

    def _reduce_event(self, t):
        return tf.reduce_sum(t, axis=list(range(-len(self._event_shape_), 0)))

    def _forward(self, x, conditional_input=None):
        x, shift, log_scale = self._params(self._check_event(x, "x"), conditional_input)
        return x * tf.exp(log_scale) + shift

    def _inverse(self, y, conditional_input=None):
        y, shift, log_scale = self._params(self._check_event(y, "y"), conditional_input)
        return (y - shift) * tf.exp(-log_scale)

    def _forward_log_det_jacobian(self, x, conditional_input=None):
        return self._reduce_event(self._params(self._check_event(x, "x"), conditional_input)[2])

    def _inverse_log_det_jacobian(self, y, conditional_input=None):
        return -self._reduce_event(self._params(self._check_event(y, "y"), conditional_input)[2])
