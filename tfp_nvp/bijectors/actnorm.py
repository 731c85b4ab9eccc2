"""GLOW's activation normalisation as a TFP bijector with data-dependent initialisation."""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfp_nvp.bijectors._base import KerasParameterizedBijector, ParameterLayer, as_float_dtype, as_shape

__all__ = ["ActNorm"]

# Per thread, because MirroredStrategy runs each replica's code in its own thread.
_settled = threading.local()


@contextlib.contextmanager
def initialization_settled():
    """Within this block ActNorm layers only read their parameters: no data-dependent initialisation test.

    For code that re-runs a step whose initialisation has already happened in the same call (invertible
    backprop's recomputation in the backward pass): it then adds no flag test and, under a distribution
    strategy, no synchronisation point inside a gradient function.
    """
    previous = getattr(_settled, "active", False)
    _settled.active = True
    try:
        yield
    finally:
        _settled.active = previous


class ActNorm(KerasParameterizedBijector):
    r"""Per-channel affine normalisation (Kingma & Dhariwal, 2018) with data-dependent initialisation.

    One log-scale `a_c` and one shift `b_c` per channel (the last axis; per feature for vector events):

        forward (latent -> data):  y = x * exp(a) + b
        inverse (data -> latent):  x = (y - b) * exp(-a)
        log|det dy/dx| = P * sum_c a_c,   log|det dx/dy| = -P * sum_c a_c,

    where `P = H * W` for image events `[H, W, C]` and `P = 1` for vector events `[D]`. The scale is
    log-parameterised, so it can never reach zero or change sign.

    Data-dependent initialisation. The first time `inverse` or `inverse_log_det_jacobian` receives data `y`
    while the non-trainable weight `initialized` is 0, the parameters are set from that batch so the inverse
    output has zero mean and unit variance per channel, statistics taken over every batch and spatial position:

        b_c = mean(y_c),    a_c = 0.5 * log(var(y_c) + epsilon),

    then `initialized` becomes 1. `epsilon` keeps a constant channel finite (its scale becomes
    `sqrt(epsilon)`); it also means a channel whose variance is comparable to `epsilon` ends with a variance
    slightly below 1. The same batch initialises whichever of `inverse` / `inverse_log_det_jacobian` runs
    first, and the other one sees the new values (`tfd.TransformedDistribution.log_prob` runs `inverse` and then
    `forward_log_det_jacobian` at its output, which therefore also sees them). Because the flag is a Keras weight, `save_weights`,
    `.keras` files and `tf.train.Checkpoint` restore it and a reloaded model never re-initialises.
    The update is a `tf.cond` on the flag plus variable assignments, so it also runs inside
    `tf.function(jit_compile=True)` and the first step of `FlowModel.fit`.

    Under tf.distribute. Created in a strategy's scope, the parameters are mirrored. When the first batch
    arrives inside `strategy.run` (as in `fit` with MirroredStrategy or MultiWorkerMirroredStrategy), each
    replica holds only its slice of the global batch; the statistics are then summed over all replicas and
    workers, and every replica ends with the same parameters, those one device would compute from the whole
    global batch (up to float32 rounding). Called outside `strategy.run`, the layer initialises from the batch
    it is given.

    Sampling first. `forward` and `forward_log_det_jacobian` never initialise: before any data has been seen
    they use the current parameters (the identity, `a = b = 0`, for a fresh instance) and leave the flag at 0,
    so the first data batch to reach `inverse` still initialises the layer. Use `tfp_nvp.initialize(flow, x)`
    to initialise every ActNorm of a flow before training or sampling.

    Example:
      >>> act = ActNorm([8, 8, 3])
      >>> z = act.inverse(images)          # first data batch: z has zero mean, unit variance per channel
      >>> bool(act.initialized)
      True
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        epsilon: float = 1e-6,
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "act_norm",
    ):
        parameters = dict(locals())
        event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
        dtype = as_float_dtype(dtype)
        if not np.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(f"`epsilon` must be a positive finite float; got {epsilon!r}.")
        self._event_shape_ = event_shape
        self._epsilon = float(epsilon)
        self._num_positions = int(np.prod(event_shape[:-1], dtype=np.int64))
        channels = event_shape[-1]
        with tf.name_scope(name) as name:
            holder = ParameterLayer(name=f"{name.rstrip('/')}_params", dtype=dtype.name)
            holder.add("log_scale", (channels,), "zeros")
            holder.add("shift", (channels,), "zeros")
            holder.add("initialized", (), "zeros", trainable=False, dtype="int32")
            self._holder = holder
            # The parameter layer is unique per instance, so equal-config ActNorms never share TFP's cache.
            parameters["parameter_layer"] = holder
            self._track_layers([holder])
            super().__init__(
                forward_min_event_ndims=len(event_shape),
                # The Jacobian does not depend on the input but does change at initialisation: leaving this
                # False keeps TFP from reusing a log-det computed before the data-dependent update.
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
                dtype=dtype,
                name=name,
            )

    # ----------------------------------------------------------------------------------------- properties
    @property
    def log_scale(self):
        """The per-channel log-scale `a` (a Keras weight)."""
        return self._holder.log_scale

    @property
    def shift(self):
        """The per-channel shift `b` (a Keras weight)."""
        return self._holder.shift

    @property
    def initialized(self) -> tf.Tensor:
        """Whether the data-dependent initialisation has run (a boolean tensor)."""
        return tf.convert_to_tensor(self._holder.initialized.value) > 0

    @property
    def epsilon(self) -> float:
        return self._epsilon

    # ----------------------------------------------------------------------------------------- initialisation
    def _initialize_from(self, y):
        """Sets the parameters from the batch `y` unless the flag says it was done; returns whether it ran."""
        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False:
            return self._initialize_across_replicas(y)
        flag = self._holder.initialized.value
        channels = self._event_shape_[-1]

        def initialize():
            flat = tf.reshape(tf.cast(y, self._holder.log_scale.dtype), [-1, channels])
            return self._set_from_moments(*tf.nn.moments(flat, axes=[0]))

        return tf.cond(tf.convert_to_tensor(flag) > 0, lambda: tf.constant(False), initialize)

    def _set_from_moments(self, mean, variance):
        flag = self._holder.initialized.value
        log_scale = self._holder.log_scale.value
        shift = self._holder.shift.value
        variance = tf.cast(variance, log_scale.dtype)
        updates = [
            shift.assign(tf.cast(mean, shift.dtype)),
            log_scale.assign(0.5 * tf.math.log(variance + tf.cast(self._epsilon, variance.dtype))),
        ]
        with tf.control_dependencies(updates):
            flag.assign(1)
        return tf.constant(True)

    def _initialize_across_replicas(self, y):
        """The initialisation inside `strategy.run` (e.g. `fit` under a tf.distribute strategy).

        Each replica holds a slice of the global batch, so the statistics are taken over all of them: every
        replica contributes its count, sum and sum of squares per channel (in float64, where the one-pass
        variance loses nothing that matters for float32 data), these are summed across replicas and workers,
        and the parameters are assigned once, in cross-replica context, so every replica ends with the same
        values, those a single device computes from the whole global batch.
        The summation and the assignment sit inside `merge_call` behind the flag test: a synchronisation
        point is not allowed inside a `tf.cond` branch of a replica, and this way it costs one cheap test of
        the flag per call once the layer is initialised, instead of an all-reduce every step.
        """
        flag = self._holder.initialized.value
        channels = self._event_shape_[-1]

        def local_sums():
            flat = tf.reshape(tf.cast(y, tf.float64), [-1, channels])
            count = tf.cast(tf.shape(flat)[:1], tf.float64)
            return tf.concat([count, tf.reduce_sum(flat, 0), tf.reduce_sum(tf.square(flat), 0)], axis=0)

        sums = tf.cond(
            tf.convert_to_tensor(flag) > 0, lambda: tf.zeros([1 + 2 * channels], tf.float64), local_sums
        )

        def merge(strategy, per_replica_sums):
            def initialize():
                total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_sums, axis=None)
                count, first, second = total[0], total[1 : 1 + channels], total[1 + channels :]
                mean = first / count
                # The clip only guards rounding below zero for a (near-)constant channel.
                variance = tf.maximum(second / count - tf.square(mean), 0.0)
                return self._set_from_moments(mean, variance)

            return tf.cond(tf.convert_to_tensor(flag) > 0, lambda: tf.constant(False), initialize)

        return tf.distribute.get_replica_context().merge_call(merge, args=(sums,))

    def _read_parameters(self, data=None):
        """(log_scale, shift) as tensors, read after the data-dependent initialisation when `data` is given."""
        if data is None or getattr(_settled, "active", False):
            return tf.convert_to_tensor(self._holder.log_scale.value), tf.convert_to_tensor(self._holder.shift.value)
        with tf.control_dependencies([self._initialize_from(data)]):
            # Reads placed after the tf.cond see the assigned values in eager, tf.function and XLA alike.
            return tf.identity(self._holder.log_scale.value), tf.identity(self._holder.shift.value)

    # ----------------------------------------------------------------------------------------- math
    def _log_det(self, log_scale, x):
        total = tf.cast(self._num_positions, log_scale.dtype) * tf.reduce_sum(log_scale)
        return tf.broadcast_to(total, tf.shape(x)[: -len(self._event_shape_)])

    def _forward(self, x):
        x = self._check_event(x, "x")
        log_scale, shift = self._read_parameters()
        return x * tf.exp(log_scale) + shift

    def _inverse(self, y):
        y = self._check_event(y, "y")
        log_scale, shift = self._read_parameters(y)
        return (y - shift) * tf.exp(-log_scale)

    def _forward_log_det_jacobian(self, x):
        x = self._check_event(x, "x")
        return self._log_det(self._read_parameters()[0], x)

    def _inverse_log_det_jacobian(self, y):
        y = self._check_event(y, "y")
        return -self._log_det(self._read_parameters(y)[0], y)
