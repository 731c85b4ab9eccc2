"""GLOW's multi-scale architecture: the learned split prior (`FactorOut`) and `OnChannels`.

Together they let a whole multi-scale GLOW be one `tfd.TransformedDistribution` with a standard normal base
whose event shape is the image shape. Reading a `tfb.Chain` list left to right follows the inverse (data ->
latent) direction. For data `[8, 8, 1]` and two levels:

    level_2 = tfb.Chain([tfb.Invert(Squeeze([4, 4, 2])),        # [4, 4, 2] -> [2, 2, 8]
                         *steps([2, 2, 8]),
                         Squeeze([4, 4, 2])])                    # [2, 2, 8] -> [4, 4, 2]
    glow = tfb.Chain([tfb.Invert(Squeeze([8, 8, 1])),           # [8, 8, 1] -> [4, 4, 4]
                      *steps([4, 4, 4]),
                      FactorOut([4, 4, 4], num_exit_channels=2),  # channels 2:4 leave: z = (x - mu) / sigma
                      OnChannels(level_2, 2, [4, 4, 4]),          # channels 0:2 go on to the next level
                      Squeeze([8, 8, 1])])                        # [4, 4, 4] -> [8, 8, 1]
    flow = tfd.TransformedDistribution(standard_normal([8, 8, 1]), glow)

Every level maps its input shape to itself (it ends by undoing its own squeeze), which is what lets
`OnChannels` put its output back next to the channels that left. The exited channels keep their place in the
latent tensor, so the base `N(0, I)` over the whole `[8, 8, 1]` latent is exactly GLOW's product of
per-level priors: the factored-out part is `N(mu(x_keep), sigma(x_keep)^2)` in data coordinates.
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf
from tensorflow_probability import bijectors as tfb

from tfp_nvp.bijectors._base import (
    KerasParameterizedBijector,
    NetworkContract,
    as_float_dtype,
    as_shape,
    check_event,
)
from tfp_nvp.bijectors._conditioning import broadcast_condition, missing_condition, unexpected_condition
from tfp_nvp.bijectors._reuse import recall, remember
from tfp_nvp.nn.precision import network_dtype

__all__ = ["FactorOut", "OnChannels", "ContextConv"]


@keras.saving.register_keras_serializable(package="tfp_nvp")
class ContextConv(keras.layers.Layer):
    """A zero-initialised convolution over the input with a context vector appended to every position.

    The default network of a conditional `FactorOut`: `[N, H, W, k]` and a context `[N, m]` give
    `[N, H, W, units]` from a `kernel_size` x `kernel_size` convolution of the input concatenated with the
    context broadcast over H and W (for vector events `[N, k]`, a dense layer on `[input, context]`). Like
    the unconditional split prior it starts at zero, so a fresh split is `N(0, 1)` whatever the context.

    Example:
      >>> net = ContextConv(4)
      >>> net(keras.ops.zeros((2, 4, 4, 2)), conditional_input=keras.ops.ones((2, 10))).shape
      TensorShape([2, 4, 4, 4])
    """

    def __init__(self, units: int, kernel_size: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.kernel_size = int(kernel_size)

    def build(self, input_shape):
        if len(input_shape) == 4:
            self._layer = keras.layers.Conv2D(self.units, self.kernel_size, padding="same",
                                              kernel_initializer="zeros", dtype=self.dtype_policy, name="conv")
        else:
            self._layer = keras.layers.Dense(self.units, kernel_initializer="zeros", dtype=self.dtype_policy,
                                             name="dense")
        self.built = True

    def call(self, inputs, conditional_input=None):
        h = inputs
        if conditional_input is not None:
            c = keras.ops.cast(conditional_input, inputs.dtype)
            if len(inputs.shape) == 4:
                m = conditional_input.shape[-1]
                c = keras.ops.broadcast_to(keras.ops.reshape(c, (-1, 1, 1, m)), (*keras.ops.shape(inputs)[:3], m))
            h = keras.ops.concatenate([inputs, c], axis=-1)
        return self._layer(h)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "kernel_size": self.kernel_size}


def _num_exit(channels: int, num_exit_channels, exit_fraction) -> int:
    if num_exit_channels is not None and exit_fraction is not None:
        raise ValueError("Give either `num_exit_channels` or `exit_fraction`, not both.")
    if num_exit_channels is None:
        fraction = 0.5 if exit_fraction is None else exit_fraction
        if isinstance(fraction, bool) or not 0 < fraction < 1:
            raise ValueError(f"`exit_fraction` must be in (0, 1); got {fraction!r}.")
        exact = fraction * channels
        if abs(exact - round(exact)) > 1e-9 or round(exact) < 1:
            raise ValueError(
                f"`exit_fraction`={fraction} of {channels} channels is {exact:g}: it must give a whole number "
                f"of channels between 1 and {channels - 1}; use `num_exit_channels` instead."
            )
        return int(round(exact))
    if isinstance(num_exit_channels, bool) or int(num_exit_channels) != num_exit_channels \
            or not 1 <= num_exit_channels <= channels - 1:
        raise ValueError(
            f"`num_exit_channels` must be an integer between 1 and {channels - 1} for {channels} channels "
            f"(at least one channel must stay and one leave); got {num_exit_channels!r}."
        )
    return int(num_exit_channels)


class FactorOut(KerasParameterizedBijector):
    r"""GLOW's split prior: the last channels leave the flow, modelled as a Gaussian given the channels that stay.

    The event (`[H, W, C]`, or `[D]` with features as channels) is split on its last axis into the `k` kept
    channels `x_keep = x[..., :k]` and the `e = C - k` exiting channels `x_exit = x[..., k:]`. A network maps
    `x_keep` to a mean `mu` and log standard deviation `log_sigma`, each shaped like `x_exit`:

        inverse (data -> latent):  z_exit = (x_exit - mu(x_keep)) * exp(-log_sigma(x_keep)),  z_keep = x_keep
        forward (latent -> data):  x_exit = z_exit * exp(log_sigma(z_keep)) + mu(z_keep),     x_keep = z_keep
        log|det dx/dz| = sum(log_sigma)  over the event,    log|det dz/dx| = -sum(log_sigma).

    With a standard normal on `z_exit` this is exactly `x_exit ~ N(mu(x_keep), sigma(x_keep)^2)`: the learned
    conditional prior of GLOW's multi-scale split, expressed as a bijector so the whole model stays one
    `tfd.TransformedDistribution`. Later flow steps should act on `x_keep` only: wrap them in `OnChannels`
    (see the module docstring for a full multi-scale chain). The shape is unchanged: `[H, W, C] -> [H, W, C]`.

    Args:
      event_shape: `[H, W, C]` (or `[D]`).
      num_exit_channels: `e`, between 1 and `C - 1`; or
      exit_fraction: `e / C`, which must give a whole number of channels (default 0.5 when neither is given).
      network: maps `[N, H, W, k]` to `(mu, log_sigma)` each `[N, H, W, e]`, or to one tensor of `2e`
        channels (mu first). Default: a single zero-initialised 3x3 `keras.layers.Conv2D` (GLOW's split
        prior; a `Dense` layer for vectors), so a fresh layer is `N(0, 1)`. A `tfp_nvp.networks.ConvResNet`
        / `DenseNetwork` with `output_channels` / `output_units` left `None` is sized here. The prior's
        layer is a network like a coupling's (it predicts parameters; the Gaussian density is the math): the
        default one takes the policy `tfp_nvp.nn.network_dtype(dtype)`, so it computes in bfloat16 under a
        mixed global policy, and its `(mu, log_sigma)` are cast to `dtype` before the density is formed.
      conditional_shape: `[m]` makes the prior conditional on a context vector `c`, `x_exit ~ N(mu(x_keep, c),
        sigma(x_keep, c)^2)`: the network is called as `network(x_keep, conditional_input=c)` (default: a
        `ContextConv`, the same zero-initialised convolution over `x_keep` with `c` appended at every
        position) and `c` reaches the bijector through `bijector_kwargs={name: {"conditional_input": c}}`
        (see `tfp_nvp.conditional_kwargs`). Its batch shape must broadcast with the data's.

    Example:
      >>> split = FactorOut([4, 4, 4], exit_fraction=0.5)
      >>> split.inverse(tf.random.normal([2, 4, 4, 4])).shape
      TensorShape([2, 4, 4, 4])
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        num_exit_channels: int | None = None,
        exit_fraction: float | None = None,
        network: keras.layers.Layer | Callable | None = None,
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "factor_out",
        conditional_shape: Sequence[int] | None = None,
    ):
        parameters = dict(locals())
        event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
        dtype = as_float_dtype(dtype)
        channels = event_shape[-1]
        if channels < 2:
            raise ValueError(
                f"`event_shape` {list(event_shape)} has {channels} channel: factoring out needs at least 2 "
                "(squeeze first)."
            )
        exit_channels = _num_exit(channels, num_exit_channels, exit_fraction)
        self._event_shape_ = event_shape
        self._num_keep = channels - exit_channels
        self._num_exit = exit_channels
        self._keep_shape = tuple(event_shape[:-1]) + (self._num_keep,)
        self._exit_shape = tuple(event_shape[:-1]) + (exit_channels,)
        self._conditional_shape = (
            None if conditional_shape is None else as_shape(conditional_shape, "conditional_shape", rank=1)
        )
        with tf.name_scope(name) as name:
            self._contract = NetworkContract(self._keep_shape, self._exit_shape, ("mu", "log_sigma"),
                                             self._conditional_shape)
            network = self._setup_network(network, dtype, name.rstrip("/"))
            self._network = network
            self._contract.check(self._call_network, dtype)
            # The network is unique per instance, so equal-config splits never share TFP's cache.
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

    def _setup_network(self, network, dtype, name):
        e = self._num_exit
        if network is None and self._conditional_shape is not None:
            network = ContextConv(2 * e, dtype=network_dtype(dtype), name=f"{name}_prior")
        elif network is None:
            if len(self._event_shape_) == 3:
                network = keras.layers.Conv2D(2 * e, 3, padding="same", kernel_initializer="zeros",
                                              dtype=network_dtype(dtype), name=f"{name}_prior")
            else:
                network = keras.layers.Dense(2 * e, kernel_initializer="zeros", dtype=network_dtype(dtype),
                                             name=f"{name}_prior")
        return self._contract.size(network)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def num_keep_channels(self) -> int:
        """`k`: the leading channels that stay in the flow."""
        return self._num_keep

    @property
    def num_exit_channels(self) -> int:
        """`e = C - k`: the trailing channels modelled by the conditional prior."""
        return self._num_exit

    @property
    def network(self):
        return self._network

    @property
    def conditional_shape(self) -> tuple[int, ...] | None:
        """`[m]` for a prior conditional on a context vector, else `None`."""
        return self._conditional_shape

    # ----------------------------------------------------------------------------------------- math
    def _call_network(self, x_keep, conditional_input):
        if conditional_input is None:
            return self._network(x_keep)
        return self._network(x_keep, conditional_input=conditional_input)

    def _prior(self, x_keep, conditional_input=None):
        """(mu, log_sigma) for every batch member, whatever the batch rank.

        With a condition the batch is that of `x_keep` broadcast with the condition's, so the outputs may
        have more batch dimensions than `x_keep`; `tf.concat` with the kept channels then needs `_lift`.
        """
        rank = len(self._event_shape_)
        c = None
        if self._conditional_shape is None:
            if conditional_input is not None:
                raise unexpected_condition(self.name)
        elif conditional_input is None:
            raise missing_condition(self.name, self._conditional_shape)
        else:
            x_keep, c, _ = broadcast_condition(self, x_keep, conditional_input, rank)
            c = tf.reshape(c, (-1,) + self._conditional_shape)
        batch_shape = tf.shape(x_keep)[: tf.rank(x_keep) - rank]
        flat = tf.reshape(x_keep, (-1,) + self._keep_shape)
        mean, log_sigma = self._contract.split(self._call_network(flat, c))
        shape = tf.concat([batch_shape, self._exit_shape], 0)
        return tf.reshape(tf.cast(mean, x_keep.dtype), shape), tf.reshape(tf.cast(log_sigma, x_keep.dtype), shape)

    def _lift(self, t, like):
        """`t` broadcast to the batch shape of `like` (a condition with more batch dimensions than the data)."""
        if self._conditional_shape is None:
            return t
        rank = len(self._event_shape_)
        batch = tf.shape(like)[: tf.rank(like) - rank]
        return tf.broadcast_to(t, tf.concat([batch, tf.shape(t)[tf.rank(t) - rank:]], 0))

    def _reduce_event(self, t):
        return tf.reduce_sum(t, axis=list(range(-len(self._event_shape_), 0)))

    # TFP's log_prob runs `_inverse(y)` and then a log-det at its input or its output (sampling with
    # log-densities does the mirror image); each would run the prior network again on the same kept channels,
    # and XLA merges the repeated forward passes but not their gradients. The log-scale a call computed is
    # therefore remembered (see `_reuse`) with the latent-side and data-side tensors of that call and reused
    # by a log-det at either.
    def _remember(self, latent, data, conditional_input, log_sigma):
        remember(self, latent, log_sigma, key=("latent", conditional_input))
        remember(self, data, log_sigma, key=("data", conditional_input))

    def _log_sigma_at(self, t, arg, conditional_input, latent_side):
        checked = self._check_event(t, arg)
        log_sigma = recall(self, t, key=("latent" if latent_side else "data", conditional_input))
        if log_sigma is None:
            log_sigma = self._prior(checked[..., : self._num_keep], conditional_input)[1]
        return self._reduce_event(log_sigma)

    # The memo is keyed on the tensors TFP passes in and out; the arithmetic uses the checked input, which is
    # the same tensor unless `validate_args` gates it on its finiteness check.
    def _forward(self, x, conditional_input=None):
        checked = self._check_event(x, "x")
        keep, z_exit = checked[..., : self._num_keep], checked[..., self._num_keep:]
        mean, log_sigma = self._prior(keep, conditional_input)
        exit_ = z_exit * tf.exp(log_sigma) + mean
        y = tf.concat([self._lift(keep, exit_), exit_], axis=-1)
        self._remember(x, y, conditional_input, log_sigma)
        return y

    def _inverse(self, y, conditional_input=None):
        checked = self._check_event(y, "y")
        keep, x_exit = checked[..., : self._num_keep], checked[..., self._num_keep:]
        mean, log_sigma = self._prior(keep, conditional_input)
        exit_ = (x_exit - mean) * tf.exp(-log_sigma)
        x = tf.concat([self._lift(keep, exit_), exit_], axis=-1)
        self._remember(x, y, conditional_input, log_sigma)
        return x

    def _forward_log_det_jacobian(self, x, conditional_input=None):
        return self._log_sigma_at(x, "x", conditional_input, latent_side=True)

    def _inverse_log_det_jacobian(self, y, conditional_input=None):
        return -self._log_sigma_at(y, "y", conditional_input, latent_side=False)


class OnChannels(tfb.Bijector):
    r"""Applies `bijector` to the first `num_channels` channels of the event and the identity to the rest.

    For an event `[..., C]` (image `[H, W, C]` or vector `[D]`) and `k = num_channels`:

        forward:  y = concat(bijector.forward(x[..., :k]), x[..., k:])
        inverse:  x = concat(bijector.inverse(y[..., :k]), y[..., k:])
        log|det dy/dx| = bijector.forward_log_det_jacobian(x[..., :k], event_ndims=len(event_shape)),

    since the Jacobian is block diagonal with an identity block. This is how GLOW's later levels act only on the
    channels a `FactorOut` kept. `bijector` must map `event_shape[:-1] + [k]` to itself; it may change the
    shape on the way (a level squeezes, runs its steps and unsqueezes back: see the module docstring).
    Keyword arguments (e.g. `tfb.Chain`'s name-routed `bijector_kwargs`) are passed on to `bijector`.

    Example:
      >>> inner = tfb.Chain([tfb.Invert(Squeeze([4, 4, 2])), ActNorm([2, 2, 8]), Squeeze([4, 4, 2])])
      >>> OnChannels(inner, 2, [4, 4, 4]).forward(tf.zeros([5, 4, 4, 4])).shape
      TensorShape([5, 4, 4, 4])
    """

    def __init__(self, bijector: tfb.Bijector, num_channels: int, event_shape: Sequence[int],
                 validate_args: bool = False, name: str = "on_channels"):
        parameters = dict(locals())
        event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
        if not isinstance(bijector, tfb.Bijector):
            raise ValueError(f"`bijector` must be a tfb.Bijector; got {type(bijector).__name__}.")
        channels = event_shape[-1]
        if isinstance(num_channels, bool) or int(num_channels) != num_channels or not 1 <= num_channels <= channels:
            raise ValueError(
                f"`num_channels` must be an integer between 1 and {channels} for event_shape {list(event_shape)}; "
                f"got {num_channels!r}."
            )
        k = int(num_channels)
        inner_shape = tuple(event_shape[:-1]) + (k,)
        rank = len(event_shape)
        min_ndims = bijector.forward_min_event_ndims
        if tf.nest.is_nested(min_ndims) or min_ndims is None or int(min_ndims) > rank:
            raise ValueError(
                f"`bijector` must act on events of rank <= {rank}; its forward_min_event_ndims is "
                f"{bijector.forward_min_event_ndims}."
            )
        try:
            out_shape = bijector.forward_event_shape(inner_shape)
        except (ValueError, TypeError) as e:
            raise ValueError(f"`bijector` cannot take the kept channels' shape {list(inner_shape)}: {e}") from e
        if tuple(out_shape.as_list()) != inner_shape:
            raise ValueError(
                f"`bijector` must map the kept channels' shape {list(inner_shape)} to itself; it maps it to "
                f"{out_shape.as_list()}. A level that squeezes must end by unsqueezing (Squeeze of the same shape)."
            )
        self._bijector = bijector
        self._num_channels = k
        self._event_shape_ = event_shape
        with tf.name_scope(name) as name:
            super().__init__(
                forward_min_event_ndims=rank,
                is_constant_jacobian=bijector.is_constant_jacobian,
                validate_args=validate_args,
                parameters=parameters,
                dtype=bijector.dtype,
                name=name,
            )

    @property
    def bijector(self) -> tfb.Bijector:
        return self._bijector

    @property
    def num_channels(self) -> int:
        return self._num_channels

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self._event_shape_

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict()

    # TFP's log_prob calls `_inverse(y)` and then a log-det at its output `x` (or at `y`). Slicing that tensor
    # anew would hand the inner bijector a tensor it has never seen, missing its cache: the whole inner level
    # (every coupling network) would run again for the log-det, and its gradient too. The parts of the tensors
    # a call took and returned are therefore remembered (see `_reuse`), so a later split of either gives the
    # very tensors the inner bijector saw or returned.
    def _remember(self, *pairs):
        for whole, parts in pairs:
            remember(self, whole, parts)

    def _split(self, x):
        parts = recall(self, x)
        if parts is not None:
            return parts
        return x[..., : self._num_channels], x[..., self._num_channels:]

    @staticmethod
    def _join(inner, rest, kwargs):
        if kwargs and not (inner.shape.rank is not None and inner.shape[:-1].is_fully_defined()
                           and inner.shape[:-1] == rest.shape[:-1]):
            # A condition with more batch dimensions than the data broadcasts the inner bijector's output.
            rest = tf.broadcast_to(rest, tf.concat([tf.shape(inner)[:-1], tf.shape(rest)[-1:]], 0))
        return tf.concat([inner, rest], axis=-1), rest

    # The memo is keyed on the tensors TFP passes in and out; the arithmetic uses the checked input, which is
    # the same tensor unless `validate_args` gates it on its finiteness check.
    def _forward(self, x, **kwargs):
        inner, rest = self._split(check_event(self, x, "x", self._event_shape_))
        inner_out = self._bijector.forward(inner, **kwargs)
        y, rest_out = self._join(inner_out, rest, kwargs)
        self._remember((x, (inner, rest)), (y, (inner_out, rest_out)))
        return y

    def _inverse(self, y, **kwargs):
        inner, rest = self._split(check_event(self, y, "y", self._event_shape_))
        inner_out = self._bijector.inverse(inner, **kwargs)
        x, rest_out = self._join(inner_out, rest, kwargs)
        self._remember((y, (inner, rest)), (x, (inner_out, rest_out)))
        return x

    def _forward_log_det_jacobian(self, x, **kwargs):
        checked = check_event(self, x, "x", self._event_shape_)
        inner = self._split(x)[0] if checked is x else self._split(checked)[0]
        return self._bijector.forward_log_det_jacobian(inner, event_ndims=len(self._event_shape_), **kwargs)

    def _inverse_log_det_jacobian(self, y, **kwargs):
        checked = check_event(self, y, "y", self._event_shape_)
        inner = self._split(y)[0] if checked is y else self._split(checked)[0]
        return self._bijector.inverse_log_det_jacobian(inner, event_ndims=len(self._event_shape_), **kwargs)
