"""FFJORD's bijector: TFP's `tfb.FFJORD` integrating a Keras 3 dynamics network (`tfp_nvp.nn.TimeDerivativeNetwork`).

The flow maps a latent `z` to data `x` by integrating `dh/dt = f(h, t)` from `t = 0` to `t = final_time`
(TFP's `tfb.FFJORD` does the integration and the log-determinant, `log|det dx/dz| = ∫ tr(∂f/∂h) dt`).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import KerasParameterizedBijector, as_float_dtype, as_shape
from tfp_nvp.bijectors._reuse import one_call, traced_only_cache

tfb = tfp.bijectors

__all__ = ["FFJORDFlow", "TRACE_ESTIMATORS", "SOLVERS"]

TRACE_ESTIMATORS = ("exact", "hutchinson")
SOLVERS = ("dormand_prince", "bdf")


def _tolerance(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive finite number such as 1e-5; got {value!r}.")
    return float(value)

class FFJORDFlow(KerasParameterizedBijector):
    """A continuous normalizing flow on vectors `[..., D]`: TFP's `tfb.FFJORD` around a Keras dynamics network.

    `forward` (latent -> data) integrates `dh/dt = network(h, t)` from 0 to `final_time`; `inverse` integrates
    backwards. Each direction returns its log-determinant from the same ODE solve (cached, so `log_prob`
    integrates once).

    Args:
      event_shape: `[D]`.
      network: a Keras layer called as `network(state, time)` with `state` of shape `[N, D]` and a scalar
        `time`, returning `[N, D]` (e.g. `TimeDerivativeNetwork`). Keras 3 weights are listed for both doors.
      trace: `"exact"` computes `tr(∂f/∂h)` with one gradient per dimension (exact; cost grows with `D`, fine
        for small `D`); `"hutchinson"` uses the unbiased estimate `E[εᵀ (∂f/∂h) ε]` with Rademacher `ε`
        (`hutchinson_samples` draws per example, fresh noise on every call, one vector-Jacobian product per
        draw; cheaper for large `D`, but `log_prob` is then a random estimate).
      hutchinson_samples: noise draws per example for `"hutchinson"`.
      atol, rtol: absolute and relative tolerances of the ODE solver.
      solver: `"dormand_prince"` (explicit adaptive Runge-Kutta, TFP's default) or `"bdf"` (implicit, for stiff
        dynamics).
      final_time: integration time `T` (the network sees `t` in `[0, T]`).
      seed: seed for the Hutchinson noise (a reproducible sequence of draws); `None` draws from fresh entropy.
    """

    # FFJORD computes the map and its log-det in one solve; the cache keeps the log-det with the output (while
    # tracing, or within one eager scoring call: never across a weight update).
    _cache = traced_only_cache("_augmented_forward", "_augmented_inverse", greedy=True)

    def __init__(self, event_shape, network, trace: str = "exact", hutchinson_samples: int = 1,
                 atol: float = 1e-5, rtol: float = 1e-5, solver: str = "dormand_prince", final_time: float = 1.0,
                 seed: int | None = None, dtype=tf.float32, validate_args: bool = False, name: str = "ffjord"):
        parameters = dict(locals())
        event_shape = as_shape(event_shape, "event_shape", rank=1)
        dtype = as_float_dtype(dtype)
        if trace not in TRACE_ESTIMATORS:
            raise ValueError(f"`trace` must be one of {TRACE_ESTIMATORS} ('exact' for small D, 'hutchinson' for "
                             f"large D); got {trace!r}.")
        if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, (int, np.integer)) \
                or hutchinson_samples <= 0:
            raise ValueError(f"`hutchinson_samples` must be a positive integer; got {hutchinson_samples!r}.")
        atol, rtol = _tolerance(atol, "atol"), _tolerance(rtol, "rtol")
        final_time = _tolerance(final_time, "final_time")
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}; got {solver!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"`seed` must be an integer or None; got {seed!r}.")
        if not callable(network):
            raise ValueError(f"`network` must be a Keras layer called as network(state, time); got "
                             f"{type(network).__name__}.")
        self._event_shape_ = event_shape
        self._trace = trace
        self._atol, self._rtol, self._final_time = atol, rtol, final_time
        with tf.name_scope(name) as name:
            self._network = network
            self._check_network(dtype)
            ode = (tfp.math.ode.DormandPrince if solver == "dormand_prince" else tfp.math.ode.BDF)(
                rtol=rtol, atol=atol)

            def dynamics(time, state):
                return self._network(state, tf.cast(time, state.dtype))

            if trace == "exact":
                augment = tfb.ffjord.trace_jacobian_exact
            else:
                # A generator, not an op seed: a fixed seed gives the same sequence of draws in eager mode and
                # in every tf.function trace, and each call still gets fresh noise.
                self._noise = (tf.random.Generator.from_non_deterministic_state() if seed is None
                               else tf.random.Generator.from_seed(int(seed)))
                augment = self._hutchinson(int(hutchinson_samples))
            # The closure is unique to this instance, so TFP's cache never mixes two FFJORDs' results.
            self._ffjord = tfb.FFJORD(dynamics, ode_solve_fn=ode.solve, trace_augmentation_fn=augment,
                                      initial_time=0.0, final_time=final_time, validate_args=validate_args,
                                      dtype=dtype, name="ode")
            parameters["network"] = network
            self._track_layers([network])
            super().__init__(forward_min_event_ndims=1, is_constant_jacobian=False, validate_args=validate_args,
                             parameters=parameters, dtype=dtype, name=name)

    def _hutchinson(self, num_samples):
        def rademacher(shape, dtype, seed=None):
            del seed  # the generator owns the randomness
            bits = self._noise.uniform(shape, minval=0, maxval=2, dtype=tf.int32)
            return tf.cast(2 * bits - 1, dtype)

        def augment(ode_fn, state_shape, dtype):
            return tfb.ffjord.trace_jacobian_hutchinson(ode_fn, state_shape, dtype, sample_fn=rademacher,
                                                        num_samples=num_samples)

        return augment

    def _check_network(self, dtype):
        d = self._event_shape_[0]
        try:
            out = self._network(tf.zeros([2, d], dtype), tf.constant(0.0, dtype))
        except Exception as e:  # noqa: BLE001 - re-raised with the contract spelled out
            raise ValueError(f"`network` failed on a state of shape [2, {d}] and a scalar time: "
                             f"{type(e).__name__}: {e}") from e
        if list(getattr(out, "shape", [])) != [2, d]:
            raise ValueError(f"`network(state, time)` must return the time derivative of shape [batch, {d}] for a "
                             f"state of shape [batch, {d}]; got shape {list(getattr(out, 'shape', []))}.")

    # ------------------------------------------------------------------------------------------- properties
    @property
    def network(self):
        """The dynamics network `f(h, t)`."""
        return self._network

    @property
    def trace(self) -> str:
        """The trace estimator, `"exact"` or `"hutchinson"`."""
        return self._trace

    @property
    def ffjord(self) -> tfb.FFJORD:
        """The TFP `tfb.FFJORD` bijector doing the integration (on a flat batch `[N, D]`)."""
        return self._ffjord

    # ------------------------------------------------------------------------------------------- the map
    def _solve(self, value, direction: str):
        """Runs the ODE on `value` flattened to `[N, D]`; returns the result and the summed log-det."""
        value = self._check_event(value, "x" if direction == "forward" else "y")
        batch = tf.shape(value)[:-1]
        flat = tf.reshape(value, [-1, self._event_shape_[0]])
        # TFP's FFJORD returns the log-det from the solve that gave the output; its cache hands it over.
        with one_call():
            if direction == "forward":
                out = self._ffjord.forward(flat)
                log_det = self._ffjord.forward_log_det_jacobian(flat, event_ndims=1)
            else:
                out = self._ffjord.inverse(flat)
                log_det = self._ffjord.inverse_log_det_jacobian(flat, event_ndims=1)
        return tf.reshape(out, tf.shape(value)), tf.reshape(log_det, batch)

    def _augmented_forward(self, x):
        y, fldj = self._solve(x, "forward")
        return y, {"fldj": fldj, "ildj": -fldj}

    def _augmented_inverse(self, y):
        x, ildj = self._solve(y, "inverse")
        return x, {"ildj": ildj, "fldj": -ildj}

    def _forward(self, x):
        return self._augmented_forward(x)[0]

    def _inverse(self, y):
        return self._augmented_inverse(y)[0]

    def _forward_log_det_jacobian(self, x):
        # Reached only when the cache has no entry for `x`: the solve gives the output too, which is dropped.
        return self._augmented_forward(x)[1]["fldj"]

    def _inverse_log_det_jacobian(self, y):
        return self._augmented_inverse(y)[1]["ildj"]
