"""FFJORD: a continuous normalizing flow whose dynamics is a time-conditioned Keras 3 network.

`f` is `tfp_nvp.nn.TimeDerivativeNetwork`, an MLP that sees the time at every layer; its weights are Keras
variables, so the flow trains with `tfp_nvp.FlowModel` as well as with `tfp.vi` or a `tf.GradientTape` loop.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import as_float_dtype, as_shape
from tfp_nvp.bijectors.ffjord import FFJORDFlow
from tfp_nvp.flows._base import _Flow, _check_base, _remember
from tfp_nvp.nn.ffjord import TimeDerivativeNetwork, hidden_units_of

tfd = tfp.distributions

__all__ = ["ffjord"]


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

    Mixed precision: the dynamics network keeps the flow's dtype even under a mixed global Keras policy: the
    adaptive ODE solver's error control (`atol`, `rtol` ~1e-5) cannot work with bfloat16's ~3 significant
    digits or float16's ~3.5 (its step size would chase the rounding noise).

    Example:
      >>> flow = ffjord([2], hidden_units=(32, 32))
      >>> flow.log_prob(flow.sample(3, seed=1)).shape
      TensorShape([3])
    """
    event_shape = as_shape(event_shape, "event_shape", rank=1)
    hidden = hidden_units_of(hidden_units)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"`seed` must be an integer or None; got {seed!r}.")
    config = dict(
        event_shape=list(event_shape), hidden_units=list(hidden), activation=activation, trace=trace,
        hutchinson_samples=hutchinson_samples, atol=atol, rtol=rtol, solver=solver, final_time=final_time,
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
    )
    dtype = as_float_dtype(dtype)
    base = _check_base(base_distribution, event_shape, dtype)
    net = TimeDerivativeNetwork(event_shape[0], hidden, activation=activation, seed=seed, dtype=dtype.name,
                                name=f"{name}_dynamics")
    bijector = FFJORDFlow(event_shape, net, trace=trace, hutchinson_samples=hutchinson_samples, atol=atol,
                          rtol=rtol, solver=solver, final_time=final_time, seed=seed, dtype=dtype,
                          validate_args=validate_args, name=name)
    dist = _Flow(base, bijector, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return _remember(dist, "ffjord", config)
