"""Checking a bijector's `conditional_input` and lining its batch up with the data's.

Shared by the bijectors whose parameters depend on a context vector besides (or instead of) part of the data
(`FactorOut` with `conditional_shape`, `ConditionalAffine`), so their checks and messages agree with the
couplings'.
"""

from __future__ import annotations

import tensorflow as tf

from tfp_nvp.bijectors._base import assert_finite, check_dtype

__all__ = ["broadcast_condition", "missing_condition", "unexpected_condition"]


def missing_condition(owner: str, conditional_shape) -> ValueError:
    """The error for a conditional bijector called without its condition."""
    return ValueError(
        f"{owner} was built with conditional_shape={list(conditional_shape)}: pass "
        f"bijector_kwargs={{'{owner}': {{'conditional_input': c}}}} (see tfp_nvp.conditional_kwargs)."
    )


def unexpected_condition(owner: str) -> ValueError:
    """The error for a condition given to a bijector built without `conditional_shape`."""
    return ValueError(
        f"{owner} was built without `conditional_shape` and takes no `conditional_input`; build it with "
        "conditional_shape=[k] to condition it."
    )


def broadcast_condition(bijector, x, conditional_input, event_rank: int):
    """`(x, c, batch_shape)` with the batch dimensions of `x` and `c` broadcast against each other.

    `x` is `[*batch_x, *event]` (its last `event_rank` axes are the event) and `c` is `[*batch_c, k]`; both come
    back with the broadcast batch shape (also returned, as a tensor). `c` is checked first: dtype equal to the
    data's, last axis equal to the bijector's `conditional_shape`, batch shape broadcastable, and finite when
    the bijector has `validate_args`. Every error names the bijector and the shapes involved.
    """
    shape = tuple(bijector._conditional_shape)
    owner = bijector.name
    check_dtype(owner, conditional_input, "conditional_input", x.dtype)
    c = tf.convert_to_tensor(conditional_input, dtype=x.dtype)
    if c.shape.rank is not None and (c.shape.rank == 0 or tuple(c.shape[-1:]) != shape):
        raise ValueError(f"`conditional_input` must have shape [..., {shape[0]}] for {owner}; got {c.shape}.")
    if bijector.validate_args:
        c = assert_finite(c, "conditional_input", owner)
    x_batch = x.shape[:-event_rank] if x.shape.rank is not None else tf.TensorShape(None)
    try:  # statically known batch shapes: say which ones disagree instead of failing inside BroadcastTo
        tf.broadcast_static_shape(x_batch, c.shape[:-1])
    except ValueError:
        raise ValueError(
            f"`conditional_input` of shape {c.shape} must broadcast with the data's batch shape {x_batch} "
            f"(batch dimensions before the event) in {owner}."
        ) from None
    event_shape = tf.shape(x)[tf.rank(x) - event_rank:]
    batch_shape = tf.broadcast_dynamic_shape(tf.shape(x)[: tf.rank(x) - event_rank], tf.shape(c)[:-1])
    x = tf.broadcast_to(x, tf.concat([batch_shape, event_shape], 0))
    c = tf.broadcast_to(c, tf.concat([batch_shape, shape], 0))
    return x, c, batch_shape
