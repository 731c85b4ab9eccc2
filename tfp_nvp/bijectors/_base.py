"""Shared plumbing for bijectors whose parameters live in Keras 3 layers."""

from __future__ import annotations

from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow_probability import bijectors as tfb

from tfp_nvp import nn
from tfp_nvp.bijectors._reuse import TracedOnlyCache

__all__ = ["KerasParameterizedBijector", "NetworkContract", "ParameterLayer", "as_float_dtype", "as_shape",
           "assert_finite", "check_dtype", "check_event"]


def as_shape(value, name: str, rank: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """Normalises a user-given event shape and rejects bad ones with a message naming `name`."""
    try:
        shape = tuple(int(d) for d in tf.TensorShape(value).as_list())
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`{name}` must be a fully defined shape of positive sizes such as (2,) or (8, 8, 1); got {value!r}."
        ) from e
    if any(d <= 0 for d in shape):
        raise ValueError(f"`{name}` must have positive sizes; got {shape}.")
    if rank is not None:
        ranks = (rank,) if isinstance(rank, int) else tuple(rank)
        if len(shape) not in ranks:
            raise ValueError(
                f"`{name}` must have rank {' or '.join(map(str, ranks))} "
                f"([D] for vectors, [H, W, C] for images); got {shape}."
            )
    return shape


def as_float_dtype(dtype) -> tf.DType:
    """The `tf.DType` for `dtype`, which must be floating: network weights and log-dets need it."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ValueError(f"`dtype` must be a floating dtype such as tf.float32; got {dtype.name}.")
    return dtype


def check_event(bijector, x, arg: str, event_shape):
    """Rejects an `x` whose static trailing shape is not `event_shape`, naming the argument and the bijector.

    `bijector` is anything with a `name` (a distribution too); when its `validate_args` is set, `x` must also be
    finite, and the returned `x` is gated on that check (see `assert_finite`): compute with the return value.
    """
    rank = len(event_shape)
    if x.shape.rank is not None and (x.shape.rank < rank or not x.shape[-rank:].is_compatible_with(event_shape)):
        raise ValueError(
            f"`{arg}` must have shape [..., {', '.join(map(str, event_shape))}] for {bijector.name}; got {x.shape}."
        )
    if getattr(bijector, "validate_args", False):
        return assert_finite(x, arg, bijector.name)
    return x


def check_dtype(owner: str, x, arg: str, dtype) -> None:
    """Rejects a tensor `x` whose dtype is not `dtype`, saying how to fix it.

    TFP converts arrays and Python numbers to the flow's dtype itself and refuses tensors of another dtype with
    a message that prints the whole tensor; this says the same in one line.
    """
    dtype = tf.as_dtype(dtype)
    if not tf.is_tensor(x) or x.dtype == dtype:
        return
    if not x.dtype.is_floating:
        raise TypeError(f"`{arg}` must be a floating tensor of dtype {dtype.name} for {owner}; got {x.dtype.name}.")
    raise TypeError(
        f"`{arg}` has dtype {x.dtype.name} but {owner} computes in {dtype.name}: cast it with "
        f"tf.cast({arg}, tf.{dtype.name}) or build the flow with dtype='{x.dtype.name}'."
    )


def assert_finite(x, arg: str, owner: str):
    """`x`, gated on a check that raises `InvalidArgumentError` naming `arg` and `owner` for a NaN or an Inf.

    Eagerly the check raises at once. Inside `tf.function` an unconsumed assertion would still run (it is
    stateful) but in parallel with everything else, so a variable update downstream (ActNorm's data-dependent
    initialisation) could happen before it fails; the returned tensor carries the check as a control dependency,
    so nothing computed from it runs on bad data. XLA drops the check.
    """
    finite = tf.math.is_finite(x)
    check = tf.debugging.Assert(
        tf.reduce_all(finite),
        [f"`{arg}` passed to {owner} must be finite (no NaN or Inf); number of non-finite entries:",
         tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int32))],
        name="assert_finite",
    )
    with tf.control_dependencies([check]):
        return tf.identity(x)


@keras.saving.register_keras_serializable(package="tfp_nvp")
class ParameterLayer(keras.layers.Layer):
    """A Keras home for a bijector's own parameters (ActNorm's scale, a 1x1 conv's matrix, ...).

    Bijectors are `tf.Module`s and Keras 3 cannot see `tf.Variable`s held by them, so every parameter is
    created here with `add_weight`; the owning bijector then lists the backing `tf.Variable`s for TFP.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True

    def add(self, name: str, shape, initializer, trainable: bool = True, dtype=None):
        weight = self.add_weight(
            name=name, shape=tuple(shape), initializer=initializer, trainable=trainable, dtype=dtype or self.dtype
        )
        setattr(self, name, weight)
        return weight


class NetworkContract:
    """What a bijector's conditioner must do: map `[N, *input_shape]` to a pair `[N, *output_shape]` each.

    Shared by every network-holding bijector, so the sizing of tfp_nvp networks, the check at construction and
    the error messages are the same everywhere. `labels` name the pair in messages, e.g. ("shift", "log_scale").
    `output_widths` gives the two outputs different last-axis sizes (`output_shape[-1]` is then ignored);
    by default both are `output_shape`.
    """

    def __init__(self, input_shape, output_shape, labels: tuple[str, str], conditional_shape=None,
                 output_widths: tuple[int, int] | None = None):
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.labels = labels
        self.conditional_shape = conditional_shape
        width = self.output_shape[-1]
        self.output_widths = (width, width) if output_widths is None else tuple(int(w) for w in output_widths)

    def _shapes(self):
        return [list(self.output_shape[:-1]) + [w] for w in self.output_widths]

    def size(self, network):
        """Gives an unsized tfp_nvp network its output width; returns any callable unchanged."""

        first, second = self.output_widths
        width = first if first == second else (first, second)
        if isinstance(network, nn.DenseNetwork) and network.output_units is None:
            network.output_units = width
        elif isinstance(network, nn.ConvResNet) and network.output_channels is None:
            network.output_channels = width
        if not callable(network):
            raise ValueError(f"`network` must be a Keras layer/model or a callable; got {type(network).__name__}.")
        return network

    def split(self, out):
        """The network's output as a pair: it may return the pair itself or one tensor holding both."""
        first, second = self.labels
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return tf.convert_to_tensor(out[0]), tf.convert_to_tensor(out[1])
        if isinstance(out, (tuple, list)) or not hasattr(out, "shape"):
            raise ValueError(f"`network` must return ({first}, {second}) or one tensor holding both on its last axis.")
        out = tf.convert_to_tensor(out)
        widths = self.output_widths
        if out.shape[-1] != sum(widths):
            total = f"2 * {widths[0]}" if widths[0] == widths[1] else f"{widths[0]} + {widths[1]}"
            raise ValueError(
                f"`network` returned one tensor of shape {list(out.shape)}; a single output must have last axis "
                f"{total} ({first} then {second}), or return a ({first}, {second}) pair."
            )
        return tf.split(out, list(widths), axis=-1)

    def check(self, call, dtype):
        """Builds the network through `call(x, c)` on a dummy batch, so shape errors surface at construction."""
        x = tf.zeros((2,) + self.input_shape, dtype)
        c = None if self.conditional_shape is None else tf.zeros((2,) + tuple(self.conditional_shape), dtype)
        try:
            pair = self.split(call(x, c))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the contract spelled out
            raise ValueError(
                f"`network` failed on an input of shape {[2, *self.input_shape]}"
                + ("" if c is None else f" with conditional_input of shape {[2, *self.conditional_shape]}")
                + f": {type(e).__name__}: {e}"
            ) from e
        first, second = self.labels
        shapes = self._shapes()
        for label, t, shape in zip(self.labels, pair, shapes):
            if list(t.shape) != [2, *shape]:
                wanted = (f"each of shape [batch, *{shapes[0]}]" if shapes[0] == shapes[1]
                          else f"of shapes [batch, *{shapes[0]}] and [batch, *{shapes[1]}]")
                raise ValueError(
                    f"`network` must return ({first}, {second}) {wanted} "
                    f"for input [batch, *{list(self.input_shape)}]; its {label} has shape {list(t.shape)} for "
                    f"input {[2, *self.input_shape]}."
                )


def _backing_variables(layers: Iterable) -> list[tf.Variable]:
    found, seen = [], set()
    for layer in layers:
        if not isinstance(layer, keras.layers.Layer):
            continue  # tf_keras models and tf.Modules are walked by tf.Module itself.
        for weight in layer.weights:
            var = getattr(weight, "value", weight)
            if isinstance(var, tf.Variable) and id(var) not in seen:
                seen.add(id(var))
                found.append(var)
    return found


class KerasParameterizedBijector(tfb.Bijector):
    """Base for bijectors that keep their parameters in Keras 3 layers.

    The two doors to every parameter (DESIGN.md §2):

    * Keras door: `keras_layers` lists the layers; `tfp_nvp.FlowModel` tracks them so `fit`, `save_weights`
      and `.keras` files see every weight.
    * TFP door: `tf.Module` finds variables by walking attributes, not by calling properties, so the backing
      `tf.Variable` of every Keras weight is stored in a plain list attribute. `tfb.Chain`,
      `tfd.TransformedDistribution`, `tf.train.Checkpoint` and `tfp.vi` then see them too.
    """

    _cache = TracedOnlyCache()

    def _track_layers(self, layers: Sequence) -> None:
        self._keras_layers = list(layers)
        # Plain attribute on purpose: tf.Module's variable walk reads it.
        self._tf_variables = _backing_variables(self._keras_layers)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The event shape this bijector was built for."""
        return self._event_shape_

    def _check_event(self, x, arg):
        return check_event(self, x, arg, self._event_shape_)

    @property
    def keras_layers(self) -> list:
        """The Keras layers (and other networks) holding this bijector's parameters."""
        return list(self._keras_layers)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # Parameters are network weights, not batchable tensors: the batch shape is always [].
        return dict()

    def _sum_fn(self, x, axis=None):
        # TFP reduces every log-det over the event axes beyond the bijector's own with this sum, even when there
        # are none (the usual case: a flow's layers act on the whole event); a sum over no axes is the identity,
        # and skipping it saves its gradient's dozen shape ops per layer in every traced training step.
        axes = tf.get_static_value(axis)
        if axes is not None and np.size(axes) == 0:
            return x
        return super()._sum_fn(x, axis=axis)
