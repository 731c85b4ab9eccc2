"""An invertible leaky ReLU with a fixed or learnable negative slope."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfp_nvp.bijectors._base import KerasParameterizedBijector, ParameterLayer, as_float_dtype, assert_finite

__all__ = ["LeakyReLU"]


class LeakyReLU(KerasParameterizedBijector):
    r"""Elementwise invertible leaky ReLU with slope `alpha > 0` on the negative side.

        forward (latent -> data):  y = x          if x >= 0,    y = alpha * x    otherwise
        inverse (data -> latent):  x = y          if y >= 0,    x = y / alpha    otherwise
        log|dy/dx| = log(alpha) for each x < 0 and 0 otherwise (summed over the event dimensions).

    `alpha` in `(0, 1)` is the familiar leaky ReLU; `alpha = 1` is the identity and `alpha > 1` is still a
    bijection (steeper on the negative side). The map is piecewise linear, so its log-det is exact; at `x = 0`
    the right-hand slope 1 is used. The bijector acts elementwise (`forward_min_event_ndims=0`), so it fits
    between couplings in a `tfb.Chain` for any event shape.

    Args:
      alpha: the negative-side slope (finite, > 0); with `learnable=True` the starting value.
      learnable: learn `alpha`. It is stored as `log_alpha` (a Keras weight in a `ParameterLayer`, visible to
        both `trainable_variables` and `tfp_nvp.FlowModel`), so `alpha = exp(log_alpha)` stays positive.
      shape: shape of the learnable `alpha`, broadcast against the trailing axes of the input: `()` for one
        slope, `(D,)` for one per vector entry, `(C,)` per image channel. A fixed `alpha` is a scalar.
      dtype: floating dtype of the learnable weight.

    Example:
      >>> chain = tfb.Chain([coupling_2, LeakyReLU(0.5, learnable=True), coupling_1])
    """

    def __init__(
        self,
        alpha: float = 0.5,
        learnable: bool = False,
        shape: Sequence[int] = (),
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "leaky_relu",
    ):
        parameters = dict(locals())
        if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, np.floating, np.integer)) \
                or not math.isfinite(float(alpha)) or float(alpha) <= 0.0:
            raise ValueError(
                f"`alpha` must be a finite number > 0 (the slope for negative inputs; (0, 1) is the usual leaky "
                f"ReLU); got {alpha!r}."
            )
        self._alpha = float(alpha)
        self._learnable = bool(learnable)
        try:
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`shape` must be a tuple of positive sizes such as () or (2,); got {shape!r}.") from e
        if any(d <= 0 for d in shape):
            raise ValueError(f"`shape` must be a tuple of positive sizes such as () or (2,); got {shape!r}.")
        if shape and not learnable:
            raise ValueError("`shape` applies to a learnable `alpha`; a fixed `alpha` is one number.")
        self._alpha_shape = shape
        dtype = as_float_dtype(dtype)
        with tf.name_scope(name) as name:
            layers = []
            if self._learnable:
                holder = ParameterLayer(name=f"{name.rstrip('/')}_params", dtype=dtype.name)
                holder.add("log_alpha", shape, keras.initializers.Constant(math.log(self._alpha)))
                self._holder = holder
                layers.append(holder)
                # The parameter layer is unique per instance, so equal learnable ones never share TFP's cache.
                parameters["parameter_layer"] = holder
            self._track_layers(layers)
            super().__init__(
                forward_min_event_ndims=0,
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                dtype=dtype if self._learnable else None,
                name=name,
            )

    @property
    def learnable(self) -> bool:
        return self._learnable

    @property
    def log_alpha(self):
        """The learnable `log(alpha)` (a Keras weight), or `None` for a fixed `alpha`."""
        return self._holder.log_alpha if self._learnable else None

    @property
    def alpha(self) -> tf.Tensor:
        """The current negative-side slope."""
        if self._learnable:
            return tf.exp(tf.convert_to_tensor(self._holder.log_alpha.value))
        return tf.constant(self._alpha)

    def _log_alpha(self, dtype):
        if self._learnable:
            return tf.cast(tf.convert_to_tensor(self._holder.log_alpha.value), dtype)
        return tf.constant(math.log(self._alpha), dtype)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """`()`: the bijector acts elementwise (a learnable `alpha` of shape `shape` broadcasts over inputs)."""
        return ()

    def _check(self, t, arg):
        t = tf.convert_to_tensor(t)
        shape = tf.TensorShape(self._alpha_shape)
        if self._alpha_shape and t.shape.rank is not None:
            try:
                fits = tf.broadcast_static_shape(t.shape, shape) == t.shape
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(
                    f"`{arg}` must have trailing shape [..., {', '.join(map(str, self._alpha_shape))}] to match "
                    f"`alpha` of {self.name}; got {t.shape}."
                )
        if self.validate_args:
            t = assert_finite(t, arg, self.name)
        return t

    def _forward(self, x):
        x = self._check(x, "x")
        alpha = tf.exp(self._log_alpha(x.dtype))
        return tf.where(x >= 0, x, alpha * x)

    def _inverse(self, y):
        y = self._check(y, "y")
        inv_alpha = tf.exp(-self._log_alpha(y.dtype))
        return tf.where(y >= 0, y, inv_alpha * y)

    def _forward_log_det_jacobian(self, x):
        x = self._check(x, "x")
        return tf.where(x >= 0, tf.zeros([], x.dtype), self._log_alpha(x.dtype))

    def _inverse_log_det_jacobian(self, y):
        y = self._check(y, "y")
        return tf.where(y >= 0, tf.zeros([], y.dtype), -self._log_alpha(y.dtype))
