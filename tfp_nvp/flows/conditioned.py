"""A conditional flow with its context bound: `p(y | c)` as an ordinary distribution over `y`.

TFP models built from distributions (`tfd.JointDistribution*`, `tfd.Mixture`, ...) call `sample()` and
`log_prob(y)` without keyword arguments, so a conditional flow cannot receive its context through
`bijector_kwargs` there. `condition(flow, c)` binds `c` once and gives the flow the batch shape of `c`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
import tensorflow_probability as tfp
from tfp_nvp._compat import set_distribution_kwargs_split, set_distribution_parameters
from tfp_nvp.flows._base import _Flow
from tfp_nvp.flows.routing import conditional_kwargs, flow_bijectors

tfd = tfp.distributions

__all__ = ["ConditionedFlow", "condition"]


def _conditional_size(flow) -> int:
    """The context width `m` every conditional bijector of `flow` expects (they must agree)."""
    sizes = set()
    for bijector in flow_bijectors(flow):
        shape = getattr(bijector, "_conditional_shape", None)
        if shape is not None:
            sizes.add(tuple(int(d) for d in shape))
    if not sizes:
        raise ValueError(
            f"`flow` ({flow.name}) is not conditional: build it with `conditional_shape=[m]` to condition it, "
            "or use it as it is."
        )
    if len(sizes) > 1:
        raise ValueError(f"the conditional bijectors of {flow.name} expect different context shapes {sorted(sizes)}.")
    (shape,) = sizes
    if len(shape) != 1:
        raise ValueError(f"contexts must be vectors [m]; {flow.name} expects shape {list(shape)}.")
    return shape[0]


def _as_context(context, dtype, size: int, owner: str):
    """`context` as a tensor `[..., size]` of `dtype`; floating data of another precision is cast."""
    try:
        c = tf.convert_to_tensor(context)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`context` for {owner} must be an array or tensor; got {type(context).__name__}.") from e
    if not c.dtype.is_floating and not c.dtype.is_integer:
        raise TypeError(f"`context` for {owner} must hold numbers; got dtype {c.dtype.name}.")
    c = tf.cast(c, dtype)
    if c.shape.rank == 0 or (c.shape.rank is not None and c.shape[-1] is not None and c.shape[-1] != size):
        raise ValueError(f"`context` for {owner} must have shape [..., {size}]; got {c.shape}.")
    return c


class ConditionedFlow(_Flow):
    """`p(y | context)`: a conditional flow whose context is fixed, with batch shape `context.shape[:-1]`.

    Built by `tfp_nvp.condition`. `sample(n)` has shape `[n, *batch_shape, *event_shape]`, one draw per
    context row for each of the `n`; `log_prob(y)` broadcasts `y`'s batch dimensions against the contexts'.
    The flow's bijectors (and so its weights) are shared, not copied: training one trains the other.
    """

    def __init__(self, flow, context, validate_args=None, name=None):
        parameters = dict(locals())
        if isinstance(flow, ConditionedFlow):
            raise ValueError(f"`flow` ({flow.name}) has its context bound already; condition `flow.flow` instead.")
        size = _conditional_size(flow)
        validate_args = flow.validate_args if validate_args is None else bool(validate_args)
        name = name or flow.name
        # A variable context (a learned embedding, a value set between calls) is read at every call, as TFP's
        # distributions read their variable parameters; anything else is converted once.
        self._context_variable = context if isinstance(context, (tf.Variable, keras.Variable)) else None
        self._context_spec = (flow.dtype, size, name)
        context = _as_context(context, flow.dtype, size, name)
        self._flow = flow
        self._context = context
        base = flow.distribution
        if context.shape.rank is None or context.shape.rank > 1:
            # The base draws one latent per context row; the flow's bijectors broadcast over batch dimensions.
            base = tfd.BatchBroadcast(base, tf.shape(context)[:-1] if not context.shape[:-1].is_fully_defined()
                                      else context.shape[:-1])
        super().__init__(base, flow.bijector, support=flow._support, validate_args=validate_args, name=name)
        set_distribution_parameters(self, parameters)
        bound = conditional_kwargs(flow, context)

        def split(kwargs):
            kwargs = dict(kwargs)
            if kwargs.pop("bijector_kwargs", None):
                raise ValueError(f"{name} has its context bound already; call it without `bijector_kwargs`.")
            now = bound if self._context_variable is None else conditional_kwargs(flow, self.context)
            return kwargs.pop("distribution_kwargs", {}), now

        set_distribution_kwargs_split(self, split)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # Only the context is batched; the flow is shared by every batch member.
        # A context is any real vector, so the default (identity) constraining bijector is the right one.
        return dict(context=tfp.util.ParameterProperties(event_ndims=1))

    @property
    def flow(self):
        """The conditional flow whose weights this distribution uses."""
        return self._flow

    @property
    def context(self):
        """The bound context, `[*batch_shape, m]` (a variable context's current value)."""
        if self._context_variable is not None:
            return _as_context(self._context_variable, *self._context_spec)
        return self._context


def condition(flow, context, validate_args=None, name=None) -> ConditionedFlow:
    """The conditional flow `flow` with `context` bound: a distribution over `y` for `p(y | context)`.

    Use it wherever TFP calls a distribution without keyword arguments, e.g. as the likelihood of a joint
    model whose context is another model variable:

      >>> flow = tfp_nvp.real_nvp([2], conditional_shape=[3])
      >>> model = tfd.JointDistributionSequential([
      ...     tfd.Sample(tfd.Normal(0.0, 1.0), 3, name="x"),
      ...     lambda x: tfp_nvp.condition(flow, x, name="y"),
      ... ])
      >>> x, y = model.sample(5)   # x: [5, 3], y: [5, 2], each y row drawn given its x row
      >>> model.log_prob([x, y])   # = prior.log_prob(x) + flow.log_prob(y, bijector_kwargs=...)

    `context` has shape `[..., m]` (`m` from the flow's `conditional_shape`), its leading dimensions become the
    batch shape. Floating contexts of another precision are cast to the flow's dtype. A `tf.Variable` (or
    Keras variable) context is read at every call, so it can be assigned or trained through the result.
    Equivalent to passing `bijector_kwargs=tfp_nvp.conditional_kwargs(flow, context)` to every call of `flow`.
    """
    return ConditionedFlow(flow, context, validate_args=validate_args, name=name)
