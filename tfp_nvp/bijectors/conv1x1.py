"""GLOW's invertible 1x1 convolution (learned channel mixing) as a TFP bijector."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from tfp_nvp.bijectors._base import KerasParameterizedBijector, ParameterLayer, as_float_dtype, as_shape

__all__ = ["Invertible1x1Conv", "random_rotation"]


def random_rotation(size: int, seed: int | None = None) -> np.ndarray:
    """A Haar-random orthogonal `size x size` matrix (float64): QR of a seeded Gaussian matrix.

    Multiplying each column of Q by the sign of R's diagonal makes the factorisation unique, which is what
    makes the result uniformly distributed over the orthogonal group.
    """
    gaussian = np.random.default_rng(seed).standard_normal((size, size))
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))[None, :]


def _constant(value: np.ndarray):
    def initializer(shape, dtype=None):
        return tf.constant(np.reshape(value, shape), dtype=dtype)

    return initializer


class Invertible1x1Conv(KerasParameterizedBijector):
    r"""Invertible 1x1 convolution (Kingma & Dhariwal, 2018): `y = x W` over the last (channel) axis.

    For image events `[H, W, C]` every pixel's channel vector is multiplied by the same `C x C` matrix `W`;
    for vector events `[D]` this is an invertible dense layer without bias.

        forward (latent -> data):  y = x W,         log|det dy/dx| = P * log|det W|
        inverse (data -> latent):  x = y W^{-1},    log|det dx/dy| = -P * log|det W|

    with `P = H * W` for images and `P = 1` for vectors.

    `lu_decomposed=True` (default) parameterises

        W = Perm · L · (U + diag(sign_s * exp(log_s))),    log|det W| = sum(log_s),

    with `Perm` a fixed permutation and `sign_s` fixed signs (both non-trainable weights, so a reload is exact),
    `L` unit lower-triangular (its strictly lower part trainable), `U` strictly upper-triangular (trainable)
    and `log_s` trainable. The determinant is then never zero, the log-det costs `O(C)` and the inverse uses
    two triangular solves. The trainable `lower` / `upper` weights are full `C x C` matrices multiplied by a
    fixed triangular mask; entries outside the mask get zero gradient and never matter.

    `lu_decomposed=False` learns the full matrix `W`; the log-det is `tf.linalg.slogdet(W)` and the inverse
    `tf.linalg.inv(W)` (`O(C^3)`, and `W` may drift towards singular during training).

    Both start from a random rotation (`random_rotation(C, seed)`, factorised with `scipy.linalg.lu` for the
    LU variant), so a fresh layer mixes channels yet has `log|det W| = 0`.

    Example:
      >>> conv = Invertible1x1Conv([8, 8, 4], seed=0)
      >>> conv.forward(tf.zeros([2, 8, 8, 4])).shape
      TensorShape([2, 8, 8, 4])
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        lu_decomposed: bool = True,
        seed: int | None = None,
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "invertible_1x1_conv",
    ):
        parameters = dict(locals())
        event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
        dtype = as_float_dtype(dtype)
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
            raise ValueError(f"`seed` must be None or a non-negative integer; got {seed!r}.")
        self._event_shape_ = event_shape
        self._lu = bool(lu_decomposed)
        self._num_positions = int(np.prod(event_shape[:-1], dtype=np.int64))
        channels = event_shape[-1]
        rotation = random_rotation(channels, seed)
        with tf.name_scope(name) as name:
            holder = ParameterLayer(name=f"{name.rstrip('/')}_params", dtype=dtype.name)
            if self._lu:
                import scipy.linalg  # only needed once, to factorise the initial rotation

                perm, lower, upper = scipy.linalg.lu(rotation)
                diag = np.diag(upper)
                holder.add("permutation", (channels, channels), _constant(perm), trainable=False)
                holder.add("lower", (channels, channels), _constant(np.tril(lower, -1)))
                holder.add("upper", (channels, channels), _constant(np.triu(upper, 1)))
                holder.add("log_s", (channels,), _constant(np.log(np.abs(diag))))
                holder.add("sign_s", (channels,), _constant(np.sign(diag)), trainable=False)
                self._lower_mask = np.tril(np.ones((channels, channels)), -1)
            else:
                holder.add("kernel", (channels, channels), _constant(rotation))
            self._holder = holder
            # The parameter layer is unique per instance, so equal-config convolutions never share TFP's cache.
            parameters["parameter_layer"] = holder
            self._track_layers([holder])
            super().__init__(
                forward_min_event_ndims=len(event_shape),
                is_constant_jacobian=False,  # constant in x, but trainable: never let TFP reuse a stale log-det
                validate_args=validate_args,
                parameters=parameters,
                dtype=dtype,
                name=name,
            )

    # ----------------------------------------------------------------------------------------- properties
    @property
    def lu_decomposed(self) -> bool:
        return self._lu

    def _factors(self):
        """(Perm, L, U + diag(sign_s * exp(log_s))) as tensors (LU variant only)."""
        h = self._holder
        lower_mask = tf.constant(self._lower_mask, self.dtype)
        lower = tf.convert_to_tensor(h.lower.value) * lower_mask + tf.eye(self._event_shape_[-1], dtype=self.dtype)
        diag = tf.convert_to_tensor(h.sign_s.value) * tf.exp(tf.convert_to_tensor(h.log_s.value))
        upper = tf.convert_to_tensor(h.upper.value) * tf.transpose(lower_mask) + tf.linalg.diag(diag)
        return tf.convert_to_tensor(h.permutation.value), lower, upper

    def matrix(self) -> tf.Tensor:
        """The current mixing matrix `W`."""
        if not self._lu:
            return tf.convert_to_tensor(self._holder.kernel.value)
        perm, lower, upper = self._factors()
        return perm @ lower @ upper

    def inverse_matrix(self) -> tf.Tensor:
        """`W^{-1}`: two triangular solves for the LU variant, `tf.linalg.inv` otherwise."""
        if not self._lu:
            return tf.linalg.inv(self.matrix())
        perm, lower, upper = self._factors()
        # W^{-1} = U'^{-1} L^{-1} Perm^T; Perm^T is the inverse of a permutation matrix.
        lower_solved = tf.linalg.triangular_solve(lower, tf.transpose(perm), lower=True)
        return tf.linalg.triangular_solve(upper, lower_solved, lower=False)

    def log_abs_det(self) -> tf.Tensor:
        """`log|det W|` for one pixel (one vector)."""
        if self._lu:
            return tf.reduce_sum(tf.convert_to_tensor(self._holder.log_s.value))
        return tf.linalg.slogdet(self.matrix())[1]

    # ----------------------------------------------------------------------------------------- math
    @staticmethod
    def _mix(x, matrix):
        # Row vector times matrix over the last axis, for any number of leading dimensions. tensordot runs it as
        # one [pixels, C] x [C, C] matmul; matvec broadcast a batched matmul of one C-vector per pixel, which
        # oneDNN ran several times slower without XLA.
        return tf.tensordot(x, matrix, axes=1)

    def _log_det(self, x):
        total = tf.cast(self._num_positions, self.dtype) * self.log_abs_det()
        return tf.broadcast_to(total, tf.shape(x)[: -len(self._event_shape_)])

    def _forward(self, x):
        return self._mix(self._check_event(x, "x"), self.matrix())

    def _inverse(self, y):
        return self._mix(self._check_event(y, "y"), self.inverse_matrix())

    def _forward_log_det_jacobian(self, x):
        return self._log_det(self._check_event(x, "x"))

    def _inverse_log_det_jacobian(self, y):
        return -self._log_det(self._check_event(y, "y"))
