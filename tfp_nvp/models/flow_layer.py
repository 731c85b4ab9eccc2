"""`FlowLayer`: a (conditional) flow as a Keras 3 layer returning log-densities, to build into larger models."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp import flows
from tfp_nvp.flows import flow_layers
from tfp_nvp.flows.conditioned import ConditionedFlow, _as_context, _conditional_size, condition

tfd = tfp.distributions

__all__ = ["FlowLayer", "NegativeLogLikelihood"]


@keras.saving.register_keras_serializable(package="tfp_nvp")
class FlowLayer(keras.layers.Layer):
    """A flow from a `tfp_nvp` builder as a Keras layer: `log p(y | context)` per example.

    Call it on data `y` of shape `[batch, *event_shape]` and, for a flow built with `conditional_shape=[m]`,
    a context `[batch, m]`, which another layer (an encoder) may compute:

      >>> x_in = keras.Input([1]); y_in = keras.Input([2])
      >>> context = keras.layers.Dense(16, activation="relu")(x_in)
      >>> flow = tfp_nvp.real_nvp([2], conditional_shape=[16])
      >>> log_prob = tfp_nvp.FlowLayer(flow, nll_loss=True)(y_in, context=context)
      >>> model = keras.Model([x_in, y_in], log_prob)
      >>> model.compile(optimizer="adam")   # the layer adds the loss itself
      >>> model.fit([x, y], epochs=10)      # no targets: the data are inputs

    `layer([y, context])` is the same as `layer(y, context=context)`. The result has shape `[batch]`.
    Maximum likelihood minimises its negative mean, and gradients reach the encoder through the context. Two
    ways to train: `nll_loss=True` makes every call add `-mean(log_prob)` to the model's losses (`add_loss`),
    so `compile` needs no loss and `fit` no targets; or keep `nll_loss=False`, compile with
    `loss=tfp_nvp.NegativeLogLikelihood()` and give `fit` dummy targets (Keras needs some), which also honours
    `sample_weight` and mixes with other outputs' losses. Every weight of the flow is a weight of the layer
    (`trainable_weights`, `fit`, `save_weights`); for flows made by `tfp_nvp` builders with their default base,
    `.keras` files rebuild the flow from the builder's arguments. `sample(n, context)` draws from the flow.
    """

    def __init__(self, flow, nll_loss: bool = False, **kwargs):
        if isinstance(flow, dict):  # from_config: the builder's name and arguments
            flow = flows.from_spec(flow)
        if not isinstance(flow, tfd.Distribution) or not hasattr(flow, "bijector"):
            raise TypeError(f"`flow` must be a flow distribution from a tfp_nvp builder; got {type(flow).__name__}.")
        if isinstance(flow, ConditionedFlow):
            raise TypeError("`flow` has a context bound by tfp_nvp.condition; give FlowLayer the conditional flow "
                            "itself (`.flow`) and pass contexts when calling the layer.")
        kwargs.setdefault("dtype", flow.dtype.name)
        if not isinstance(nll_loss, (bool, np.bool_)):
            raise TypeError(f"`nll_loss` must be True or False; got {nll_loss!r}.")
        super().__init__(**kwargs)
        self._nll_loss = bool(nll_loss)
        self._flow = flow
        # Keras 3 sees only layers assigned to it: this list is the Keras door to the flow's parameters.
        self.flow_layers = flow_layers(flow)
        keras_side = {id(w.value) for w in self.trainable_weights}
        hidden = [v.name for v in flow.trainable_variables if id(v) not in keras_side]
        if hidden:
            raise ValueError(
                "`flow` has trainable variables that Keras cannot train (raw tf.Variables or tf_keras networks): "
                f"{hidden[:5]}{'...' if len(hidden) > 5 else ''}. Keep every parameter in a Keras 3 layer."
            )
        self._event_shape = tuple(flow.event_shape.as_list())
        self._context_size = _conditional_size(flow) if flows.is_conditional(flow) else None
        self.built = True

    @property
    def flow(self) -> tfd.Distribution:
        """The wrapped flow distribution (its weights are this layer's)."""
        return self._flow

    @property
    def conditional(self) -> bool:
        """Whether the flow needs a context."""
        return self._context_size is not None

    # ---------------------------------------------------------------------------------------------- checks
    def _split(self, inputs, context):
        if isinstance(inputs, dict):
            raise TypeError(f"{self.name} takes `y` or `[y, context]`, not a dict; got keys {sorted(inputs)}.")
        if isinstance(inputs, (list, tuple)):
            if len(inputs) == 1:
                inputs = inputs[0]
            elif len(inputs) == 2:
                if context is not None:
                    raise ValueError(f"{self.name}: give the context either as `[y, context]` or as `context=`, "
                                     "not both.")
                inputs, context = inputs
            else:
                raise ValueError(f"{self.name} takes `y` or `[y, context]`; got a list of {len(inputs)} inputs.")
        return inputs, context

    def _check_shapes(self, y_shape, context_shape):
        """Static checks shared by the symbolic (functional API) and the eager/traced paths."""
        event = list(self._event_shape)
        y_shape = tuple(y_shape)
        if len(y_shape) != 1 + len(event) or any(
                d is not None and d != e for d, e in zip(y_shape[1:], event)):
            raise ValueError(f"`y` for {self.name} must have shape [batch, {', '.join(map(str, event))}]; "
                             f"got {list(y_shape)}.")
        if self._context_size is None:
            if context_shape is not None:
                raise ValueError(f"{self.name} wraps an unconditional flow and takes no `context`; build the flow "
                                 "with conditional_shape=[m] to condition it.")
            return
        if context_shape is None:
            raise ValueError(f"{self.name} wraps a conditional flow: pass `context` of shape "
                             f"[batch, {self._context_size}], as layer(y, context=c) or layer([y, c]).")
        context_shape = tuple(context_shape)
        if len(context_shape) != 2 or context_shape[-1] not in (None, self._context_size):
            raise ValueError(f"`context` for {self.name} must have shape [batch, {self._context_size}]; got "
                             f"{list(context_shape)}.")
        if None not in (y_shape[0], context_shape[0]) and y_shape[0] != context_shape[0]:
            raise ValueError(f"`y` and `context` for {self.name} must have the same batch size; got {y_shape[0]} "
                             f"and {context_shape[0]}.")

    @staticmethod
    def _static_shape(t):
        return None if t is None else tuple(t.shape)

    # ---------------------------------------------------------------------------------------------- calls
    def compute_output_spec(self, inputs, context=None):
        # Shapes alone decide the output: checked here, bad inputs fail when the functional model is built.
        y, context = self._split(inputs, context)
        self._check_shapes(self._static_shape(y), self._static_shape(context))
        return keras.KerasTensor((y.shape[0],), dtype=self.compute_dtype)

    def call(self, inputs, context=None):
        log_prob = self._log_prob(inputs, context)
        if self._nll_loss:
            self.add_loss(-tf.reduce_mean(log_prob))
        return log_prob

    def _log_prob(self, inputs, context):
        y, context = self._split(inputs, context)
        y = self._as_data(y)
        if context is not None:
            context = tf.convert_to_tensor(context)
        self._check_shapes(self._static_shape(y), self._static_shape(context))
        if context is None:
            return self._flow.log_prob(y)
        context = _as_context(context, self._flow.dtype, self._context_size, self.name)
        return self._flow.log_prob(y, bijector_kwargs=flows.conditional_kwargs(self._flow, context))

    def _as_data(self, y):
        try:
            y = tf.convert_to_tensor(y)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`y` for {self.name} must be an array or tensor; got {type(y).__name__}.") from e
        if not y.dtype.is_floating:
            raise TypeError(f"`y` for {self.name} must hold floating-point data; got dtype {y.dtype.name}.")
        return tf.cast(y, self._flow.dtype)

    def log_prob(self, y, context=None):
        """`log p(y | context)` in nats, shape `[batch]`: the layer's output, without adding any loss."""
        return self._log_prob(y, context)

    def sample(self, n: int, context=None, seed=None):
        """`n` draws from the flow: `[n, *event_shape]`, or `[n, *context.shape[:-1], *event_shape]` given contexts.

        A single context `[m]` gives `n` draws from `p(y | context)`; a batch `[batch, m]` gives `n` draws for
        each row (`[n, batch, *event_shape]`). Unconditional flows take no context.
        """
        if not tf.is_tensor(n) and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
            raise ValueError(f"`n` must be a non-negative integer (the number of samples); got {n!r}.")
        if self._context_size is None:
            if context is not None:
                raise ValueError(f"{self.name} wraps an unconditional flow and takes no `context`.")
            return self._flow.sample(n, seed=seed)
        if context is None:
            raise ValueError(f"{self.name} wraps a conditional flow: pass `context` of shape [{self._context_size}] "
                             f"or [batch, {self._context_size}] to sample.")
        return condition(self._flow, _as_context(context, self._flow.dtype, self._context_size, self.name)
                         ).sample(n, seed=seed)

    # ---------------------------------------------------------------------------------------------- saving
    def get_config(self):
        spec = getattr(self._flow, "_tfp_nvp_spec", None)
        if spec is None or spec["config"].get("base_distribution") == "custom":
            raise NotImplementedError(
                "Only flows made by tfp_nvp builders with their default base can be saved in `.keras` files; "
                "use `save_weights` / `load_weights` on a model built the same way instead."
            )
        return {**super().get_config(), "flow": spec, "nll_loss": self._nll_loss}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(config.pop("flow"), **config)


@keras.saving.register_keras_serializable(package="tfp_nvp")
class NegativeLogLikelihood(keras.losses.Loss):
    """The loss for models whose output is a log-density: `-mean(y_pred)`; the targets are ignored.

    Keras passes targets to every compiled loss, so `fit` needs some: give zeros of length `batch`
    (`fit([x, y], np.zeros(len(y)))`); their values never matter. Sample weights weight the examples with
    Keras' `reduction`: the default, `"sum_over_batch_size"`, gives `sum(w * nll) / batch_size` (Keras'
    convention for every loss; `FlowModel` divides by `sum(w)` instead).
    """

    def __init__(self, name="negative_log_likelihood", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return -y_pred

    def get_config(self):
        return {"name": self.name, "reduction": self.reduction}
