"""Shared plumbing for bijectors whose parameters live in Keras 3 layers."""

from __future__ import annotations

from typing import Iterable, Sequence

import keras
import tensorflow as tf
from tensorflow_probability import bijectors as tfb

__all__ = ["KerasParameterizedBijector", "ParameterLayer", "as_shape"]


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

    def _track_layers(self, layers: Sequence) -> None:
        self._keras_layers = list(layers)
        # Plain attribute on purpose: tf.Module's variable walk reads it.
        self._tf_variables = _backing_variables(self._keras_layers)

    @property
    def keras_layers(self) -> list:
        """The Keras layers (and other networks) holding this bijector's parameters."""
        return list(self._keras_layers)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # Parameters are network weights, not batchable tensors: the batch shape is always [].
        return dict()
