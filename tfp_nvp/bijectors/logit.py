"""RealNVP's logit preprocessing of data in the unit interval, as one elementwise TFP bijector."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from tensorflow_probability import bijectors as tfb

from tfp_nvp.bijectors._base import as_float_dtype, assert_finite

__all__ = ["LogitTransform"]


class LogitTransform(tfb.Bijector):
    r"""The data side of a flow for data in `[0, 1)`: `u = logit(alpha + (1 - 2 alpha) x)` (Dinh et al., 2017).

    Elementwise, with `p = alpha + (1 - 2 alpha) x`:

        inverse (data -> latent):  u = log p - log(1 - p)
        forward (latent -> data):  x = (sigmoid(u) - alpha) / (1 - 2 alpha)
        log|dx/du| = log sigmoid(u) + log sigmoid(-u) - log(1 - 2 alpha),
        log|du/dx| = log(1 - 2 alpha) - log p - log(1 - p).

    `alpha` in `[0, 0.5)` keeps the logit away from the infinities at 0 and 1. The data side is the open interval
    `(low, high) = (-alpha, 1 - alpha) / (1 - 2 alpha)`, which contains `[0, 1)` for `alpha > 0` (`alpha = 0` is
    a bare sigmoid on `(0, 1)`). Outside it the inverse has no value (NaN or an infinity, as for `tfb.Sigmoid`);
    `outside_support(x)` says where, and `tfp_nvp.glow` uses it to give such points log-density `-inf`. With
    `validate_args=True`, `inverse` and `inverse_log_det_jacobian` raise `InvalidArgumentError` for data outside
    `(low, high)` or not finite.

    Example:
      >>> LogitTransform(0.05).inverse(tf.constant([0.0, 0.5]))  # logit(0.05), logit(0.5)
      <tf.Tensor: shape=(2,), dtype=float32, numpy=array([-2.944439,  0.      ], dtype=float32)>
    """

    def __init__(self, alpha: float = 0.05, dtype=tf.float32, validate_args: bool = False,
                 name: str = "logit_transform"):
        parameters = dict(locals())
        if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
                or not 0.0 <= alpha < 0.5:
            raise ValueError(f"`alpha` must be a float in [0, 0.5); got {alpha!r}.")
        self._alpha = float(alpha)
        self._low = -self._alpha / (1.0 - 2.0 * self._alpha)
        self._high = (1.0 - self._alpha) / (1.0 - 2.0 * self._alpha)
        with tf.name_scope(name) as name:
            super().__init__(
                forward_min_event_ndims=0,
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                dtype=as_float_dtype(dtype),
                name=name,
            )

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def low(self) -> float:
        """The lower end of the (open) data interval, `-alpha / (1 - 2 alpha)`."""
        return self._low

    @property
    def high(self) -> float:
        """The upper end of the (open) data interval, `(1 - alpha) / (1 - 2 alpha)`."""
        return self._high

    @classmethod
    def _is_increasing(cls):
        return True

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # `alpha` is a Python constant of the architecture, not a batchable parameter.
        return dict()

    def _p(self, x):
        # tf.constant, not a cast: casting a Python float goes through float32 and would round alpha.
        return tf.constant(self._alpha, x.dtype) + tf.constant(1.0 - 2.0 * self._alpha, x.dtype) * x

    def outside_support(self, x):
        """Elementwise: True where `x` is not inside `(low, high)`, or its `p` rounds onto 0 or 1; False for NaN."""
        x = tf.convert_to_tensor(x, self.dtype)
        p = self._p(x)
        low, high = tf.constant(self._low, x.dtype), tf.constant(self._high, x.dtype)
        return (x <= low) | (x >= high) | (p <= 0.0) | (p >= 1.0)

    def _validate(self, y):
        """`y` gated on being finite and inside `(low, high)`."""
        # `outside_support` also looks at `p` itself, so the check and the arithmetic it protects agree at the ends.
        y = assert_finite(y, "y", self.name)
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(self.outside_support(y))),
            [f"`y` passed to {self.name} must lie in the open interval ({self._low:.6g}, {self._high:.6g}) "
             f"(alpha={self._alpha:g}; data in [0, 1) is inside); min and max given:", tf.reduce_min(y),
             tf.reduce_max(y)],
            name="assert_in_support",
        )
        with tf.control_dependencies([check]):
            return tf.identity(y)

    def _forward(self, u):
        scale = tf.constant(1.0 / (1.0 - 2.0 * self._alpha), u.dtype)
        return (tf.sigmoid(u) - tf.constant(self._alpha, u.dtype)) * scale

    def _inverse(self, y):
        if self.validate_args:
            y = self._validate(y)
        p = self._p(y)
        return tf.math.log(p) - tf.math.log1p(-p)

    def _forward_log_det_jacobian(self, u):
        return -tf.math.softplus(-u) - tf.math.softplus(u) - tf.constant(math.log1p(-2.0 * self._alpha), u.dtype)

    def _inverse_log_det_jacobian(self, y):
        if self.validate_args:
            y = self._validate(y)
        p = self._p(y)
        return tf.constant(math.log1p(-2.0 * self._alpha), y.dtype) - tf.math.log(p) - tf.math.log1p(-p)
