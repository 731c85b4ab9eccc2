"""Data-dependent initialisation of every ActNorm in a flow."""

from __future__ import annotations

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp import flows, images
from tfp_nvp.bijectors.actnorm import ActNorm

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["initialize"]


def initialize(flow_or_model, x, conditional_input=None) -> int:
    """Runs the density (inverse) pass of a flow once on the data batch `x`, initialising its ActNorm layers.

    The inverse pass visits the ActNorms in data -> latent order, and each one is initialised from the
    activations that reach it (already normalised by the ones before), exactly as GLOW does. Layers that are
    already initialised (a previous call, the first training step, a reloaded model) are left unchanged.

    Args:
      flow_or_model: a `tfd.TransformedDistribution`, a `tfb.Bijector`, or an object with a `.distribution`
        attribute such as `tfp_nvp.FlowModel` (its own `log_prob` is used, so it sees the data as training will).
      x: a data batch `[N, *event_shape]`; use a few hundred examples so the statistics are representative.
        For a `FlowModel(..., levels=L)`, integer images are dequantized first, as `fit` does.
      conditional_input: the condition for conditional flows, routed with `tfp_nvp.conditional_kwargs`.

    Returns:
      The number of ActNorm layers this call initialised.

    Example:
      >>> model = tfp_nvp.FlowModel(flow)
      >>> tfp_nvp.initialize(model, x_train[:512])
      8
    """
    if isinstance(flow_or_model, (tfd.Distribution, tfb.Bijector)):
        model, root = None, flow_or_model
    elif isinstance(getattr(flow_or_model, "distribution", None), tfd.Distribution):
        model, root = flow_or_model, flow_or_model.distribution
    else:
        raise ValueError(
            "`flow_or_model` must be a tfd.TransformedDistribution, a tfb.Bijector, or an object with a "
            f"`.distribution` (such as tfp_nvp.FlowModel); got {type(flow_or_model).__name__}."
        )
    # Not isinstance(root, tfd.TransformedDistribution): TFP returns a private subclass-less twin of that class
    # when the bijector is not a CompositeTensor, so the check is on what the code needs, a bijector.
    if isinstance(root, tfd.Distribution) and not isinstance(getattr(root, "bijector", None), tfb.Bijector):
        raise ValueError(f"`flow_or_model` must hold a tfd.TransformedDistribution; got {type(root).__name__}.")
    actnorms = [b for b in flows.flow_bijectors(root) if isinstance(b, ActNorm)]
    before = [bool(a.initialized) for a in actnorms]
    # A tfb.Chain reports no dtype of its own; its members do.
    dtypes = [d for d in [root.dtype, *(b.dtype for b in flows.flow_bijectors(root))] if d is not None]
    x = tf.convert_to_tensor(x)
    levels = getattr(model, "levels", None)
    if levels is not None and x.dtype.is_integer:
        # Integer images of a `levels` model: initialise from what training feeds the flow, dequantized data.

        x = images.dequantize(x, levels, dtype=dtypes[0] if dtypes else tf.float32)
    elif x.dtype.is_integer or x.dtype.is_bool:
        # Cast to floats, integer images would sit far outside the flow's support and leave ActNorm with
        # non-finite statistics that it then keeps.
        raise TypeError(f"`x` holds integers (dtype {x.dtype.name}) and the flow takes continuous data: pass "
                        "dequantized images (tfp_nvp.images.dequantize(x, levels)), or a FlowModel with `levels`, "
                        "which dequantizes them itself.")
    if dtypes:
        x = tf.cast(x, dtypes[0])

    if model is not None and hasattr(model, "log_prob"):
        # A model's own log_prob applies whatever it does to the data before the flow.
        if conditional_input is None:
            model.log_prob(x)
        else:
            model.log_prob(x, conditional_input=conditional_input)
    else:
        kwargs = {} if conditional_input is None else flows.conditional_kwargs(root, conditional_input)
        bijector = root.bijector if isinstance(root, tfd.Distribution) else root
        bijector.inverse(x, **kwargs)
    return sum(1 for a, was in zip(actnorms, before) if bool(a.initialized) and not was)
