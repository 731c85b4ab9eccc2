"""FFJORD: a continuous normalizing flow whose dynamics is a time-conditioned Keras 3 network.

The flow maps a latent `z` to data `x` by integrating `dh/dt = f(h, t)` from `t = 0` to `t = final_time`
(TFP's `tfb.FFJORD` does the integration and the log-determinant, `log|det dx/dz| = ∫ tr(∂f/∂h) dt`).
`f` is `TimeDerivativeNetwork`, an MLP that sees the time at every layer; its weights are Keras variables, so
the flow trains with `tfp_nvp.FlowModel` as well as with `tfp.vi` or a `tf.GradientTape` loop.
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import layers, ops

from tfp_nvp import flows
from tfp_nvp.bijectors._base import KerasParameterizedBijector, as_float_dtype, as_shape, one_call, traced_only_cache

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["FFJORDFlow", "TimeDerivativeNetwork", "ffjord", "TRACE_ESTIMATORS", "SOLVERS"]

TRACE_ESTIMATORS = ("exact", "hutchinson")
SOLVERS = ("dormand_prince", "bdf")


def _hidden_units(value) -> tuple[int, ...]:
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


def _tolerance(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive finite number such as 1e-5; got {value!r}.")
    return float(value)


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
        self.hidden_units = _hidden_units(hidden_units)
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


def ffjord(
    event_shape: Sequence[int],
    hidden_units: Sequence[int] = (64, 64),
    activation: str = "tanh",
    trace: str = "exact",
    hutchinson_samples: int = 1,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    solver: str = "dormand_prince",
    final_time: float = 1.0,
    base_distribution: tfd.Distribution | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    validate_args: bool = False,
    name: str = "ffjord",
) -> tfd.TransformedDistribution:
    """FFJORD (Grathwohl et al., 2019): a continuous normalizing flow on vectors `[D]`.

    Data are the end point at `t = final_time` of `dh/dt = f(h, t)` started from a base sample; `f` is a
    `TimeDerivativeNetwork` (`hidden_units`, smooth `activation`, time fed to every layer, zero-initialised
    last layer so training starts at the identity), integrated by TFP's `tfb.FFJORD`. The log-density is
    exact up to the solver's tolerance (`atol`, `rtol`) with `trace="exact"`, which costs one gradient per
    dimension at every solver stage: use it for small `D` (up to a few dozen). `trace="hutchinson"` replaces
    the trace by an unbiased Rademacher estimate (`hutchinson_samples` draws, fresh noise every call, reproducible
    with `seed`), cheaper for large `D`; `log_prob` is then a random (unbiased) estimate, so evaluate final
    likelihoods with a flow built with `trace="exact"` and the same weights (`load_weights`).
    `solver` is `"dormand_prince"` (adaptive Runge-Kutta) or `"bdf"` (for stiff fields). Gradients flow through
    TFP's ODE solver by the adjoint method, which solves a second ODE backwards instead of storing the solver's
    steps: training memory is already flat in the number of steps, so there is no `invertible_backprop` here.

    Every solve runs an adaptive loop, so each `log_prob` or `sample` costs tens to hundreds of network
    evaluations; the first call in a `tf.function` (a `FlowModel.fit`) traces for several seconds (tens of
    seconds for the training step, whose adjoint gradient is a second ODE solve). Train with
    `tfp_nvp.FlowModel(flow)` compiled with `jit_compile=False` (XLA cannot compile the solver's adaptive loop:
    "XLA compilation requires a fixed tensor list size"; Keras' default `"auto"` is no XLA on CPU), or with
    `tfp.vi` / a `tf.GradientTape` loop over `flow.trainable_variables` (again without `jit_compile`).
    `FlowModel` `.keras` files and weights files save and reload it exactly.

    Example:
      >>> flow = ffjord([2], hidden_units=(32, 32))
      >>> flow.log_prob(flow.sample(3, seed=1)).shape
      TensorShape([3])
    """
    event_shape = as_shape(event_shape, "event_shape", rank=1)
    hidden = _hidden_units(hidden_units)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"`seed` must be an integer or None; got {seed!r}.")
    config = dict(
        event_shape=list(event_shape), hidden_units=list(hidden), activation=activation, trace=trace,
        hutchinson_samples=hutchinson_samples, atol=atol, rtol=rtol, solver=solver, final_time=final_time,
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
    )
    dtype = as_float_dtype(dtype)
    base = flows._check_base(base_distribution, event_shape, dtype)
    net = TimeDerivativeNetwork(event_shape[0], hidden, activation=activation, seed=seed, dtype=dtype.name,
                                name=f"{name}_dynamics")
    bijector = FFJORDFlow(event_shape, net, trace=trace, hutchinson_samples=hutchinson_samples, atol=atol,
                          rtol=rtol, solver=solver, final_time=final_time, seed=seed, dtype=dtype,
                          validate_args=validate_args, name=name)
    dist = flows._Flow(base, bijector, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return flows._remember(dist, "ffjord", config)


# `.keras` files name their builder; registering here keeps flows.py free of an import cycle.
flows.BUILDERS["ffjord"] = ffjord
