"""What every builder shares: the distribution it returns, its spec for `.keras` files, argument checks."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp._compat import TransformedDistribution, split_distribution_kwargs
from tfp_nvp.bijectors._base import as_shape, check_dtype, check_event
from tfp_nvp.bijectors._reuse import cache_in_traces_only, one_call
from tfp_nvp.bijectors.invertible_chain import InvertibleChain

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["standard_normal"]


def standard_normal(event_shape: Sequence[int], dtype=tf.float32) -> tfd.Distribution:
    """`N(0, I)` with the given event shape (the default base of every builder)."""
    event_shape = as_shape(event_shape, "event_shape")
    zeros = tf.zeros(event_shape, dtype=dtype)
    return tfd.Independent(tfd.Normal(zeros, tf.ones_like(zeros)), reinterpreted_batch_ndims=len(event_shape))


def _check_base(base, event_shape, dtype):
    if base is None:
        return standard_normal(event_shape, dtype)
    if not isinstance(base, tfd.Distribution):
        raise ValueError(f"`base_distribution` must be a tfd.Distribution; got {type(base).__name__}.")
    if tuple(base.event_shape.as_list()) != tuple(event_shape):
        raise ValueError(
            f"`base_distribution` must have event_shape {list(event_shape)}; got {base.event_shape}."
        )
    return base


class _Flow(TransformedDistribution):
    """The distribution the builders return: TFP's transformed distribution plus checks on the data it scores.

    `log_prob` (and `prob`) reject data of the wrong event shape or dtype with one message naming `x` and the
    flow, instead of an error from whichever bijector meets the data first; with `validate_args=True` they also
    raise `InvalidArgumentError` for non-finite data. With `support` (a bijector with `outside_support`, the one
    nearest the data) data outside the flow's image gets log-density `-inf`: the flow puts no mass there. Those
    points are swapped for an interior point before the flow runs and their result is then replaced (the
    double-where pattern), so a batch mixing both kinds has finite log-densities and gradients for the rest.

    Finite data whose latent leaves the floating-point range (a trained flow can expand a point far from its
    training data by more than the largest float, through ActNorm, 1x1-convolution or unbounded coupling
    scales, or a coupling's shift) also get `-inf`: the base density at such a latent underflows every float,
    whatever the log-determinant. Arithmetic on the overflowed values would otherwise give NaN.
    """

    def __init__(self, distribution, bijector, support=None, validate_args=False, name=None):
        parameters = dict(locals())
        self._support = support
        cache_in_traces_only(bijector)
        super().__init__(distribution, bijector, validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # `support` is a parameter-free bijector of the architecture: the batchable parts are the parent's.
        return TransformedDistribution._parameter_properties(dtype, num_classes=num_classes)

    # TFP's log_prob runs the flow's inverse and then asks for its log-det at the same tensors; `one_call` lets
    # eager calls reuse those results as traced ones do (one network pass, not two or more), and forgets them
    # when the call returns.
    def _log_prob(self, x, **kwargs):
        with one_call():
            return self._checked_log_prob(x, **kwargs)

    def _sample_and_log_prob(self, sample_shape, seed, **kwargs):
        with one_call():
            return super()._sample_and_log_prob(sample_shape, seed=seed, **kwargs)

    def _checked_log_prob(self, x, **kwargs):
        check_dtype(f"{self.name}.log_prob", x, "x", self.dtype)
        # With validate_args the flow computes from the checked `x`, so no layer (an initialising ActNorm)
        # acts on data that fails a check.
        x = check_event(self, x, "x", self.event_shape.as_list())
        if self._support is None:
            return self._log_prob_in_range(x, **kwargs)
        outside = self._support.outside_support(x)
        if self.validate_args:
            check = tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(outside)),
                [f"`x` passed to {self.name}.log_prob must lie in the open interval "
                 f"({self._support.low:.6g}, {self._support.high:.6g}), the support of the flow (data in [0, 1) "
                 "is inside); min and max given:", tf.reduce_min(x), tf.reduce_max(x)],
                name="assert_in_support",
            )
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        inside_point = tf.constant(0.5 * (self._support.low + self._support.high), x.dtype)
        safe = tf.where(outside, inside_point, x)
        event_axes = list(range(-self.event_shape.rank, 0))
        any_outside = tf.reduce_any(outside, axis=event_axes)
        log_prob = self._log_prob_in_range(safe, **kwargs)
        return tf.where(any_outside, tf.constant(-np.inf, log_prob.dtype), log_prob)

    def _log_prob_in_range(self, x, **kwargs):
        """The change of variables, `-inf` where finite `x` has a latent beyond the floating-point range."""
        # TFP's own inverse call inside the parent's log_prob finds this result in the bijector's cache (same
        # tensor, same arguments; eagerly too, within `one_call`), so the flow still runs once.
        latent = self.bijector.inverse(x, **split_distribution_kwargs(self, kwargs)[1])
        log_prob = super()._log_prob(x, **kwargs)
        finite_data = tf.reduce_all(tf.math.is_finite(x), axis=list(range(-self.event_shape.rank, 0)))
        finite_latent = tf.reduce_all(tf.math.is_finite(latent),
                                      axis=list(range(-self.distribution.event_shape.rank, 0)))
        # NaN data keeps its NaN (validate_args is the way to reject it); only overflow becomes -inf.
        overflow = finite_data & tf.logical_not(finite_latent)
        return tf.where(overflow, tf.constant(-np.inf, log_prob.dtype), log_prob)


# Version of the builder specs written into `.keras` files. 2: the "sigmoid" log-scale bound scales the
# data -> latent pass (GLOW's orientation); specs without a format were written when it scaled the other one.
SPEC_FORMAT = 2


def _remember(dist, builder: str, config: dict):
    # FlowModel.get_config needs to rebuild the same flow when a `.keras` file is loaded.
    dist._tfp_nvp_spec = {"builder": builder, "config": config, "format": SPEC_FORMAT}
    return dist


def _chain_type(invertible_backprop: bool):
    """The chain class a builder puts its steps in: `InvertibleChain` for invertible backprop, else `tfb.Chain`."""
    return InvertibleChain if invertible_backprop else tfb.Chain


def _flag(value, name) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return bool(value)


def _positive(value, name):
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)
