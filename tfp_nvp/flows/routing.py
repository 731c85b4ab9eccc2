"""Finding the bijectors and Keras layers inside a flow, and routing a condition to its conditional bijectors."""

from __future__ import annotations

import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import KerasParameterizedBijector

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["conditional_kwargs", "flow_bijectors", "flow_layers"]


def _root_bijector(flow):
    # Not isinstance(flow, tfd.TransformedDistribution): TFP substitutes a private twin of that class when the
    # bijector is not a CompositeTensor, as ours are not. What is needed is a distribution with a bijector.
    bijector = getattr(flow, "bijector", None)
    if isinstance(flow, tfd.Distribution) and isinstance(bijector, tfb.Bijector):
        return bijector
    if isinstance(flow, tfb.Bijector):
        return flow
    raise ValueError(f"`flow` must be a transformed distribution or a bijector; got {type(flow).__name__}.")


def flow_bijectors(flow) -> list:
    """Every bijector inside `flow` (a transformed distribution or a bijector), outermost first."""
    root = _root_bijector(flow)
    return [m for m in (root, *root.submodules) if isinstance(m, tfb.Bijector)]


def _route(bijector, conditional_input):
    """The keyword arguments `bijector` must receive so every conditional bijector inside it gets the input."""
    if getattr(bijector, "_conditional_shape", None) is not None:
        return {"conditional_input": conditional_input}
    children = getattr(bijector, "bijectors", None)
    if isinstance(bijector, tfb.Chain) or children is not None:
        routed = {}
        for child in children or ():
            kwargs = _route(child, conditional_input)
            if kwargs:
                if child.name in routed:
                    raise ValueError(
                        f"conditional bijectors must have unique names inside {bijector.name} to be routed; "
                        f"{child.name!r} appears twice."
                    )
                routed[child.name] = kwargs
        return routed
    inner = getattr(bijector, "bijector", None)  # tfb.Invert, OnChannels: keyword arguments pass straight in
    return _route(inner, conditional_input) if isinstance(inner, tfb.Bijector) else {}


def conditional_kwargs(flow, conditional_input) -> dict:
    """The `bijector_kwargs` that route `conditional_input` to every conditional bijector of `flow`.

    `tfb.Chain` routes keyword arguments to its direct children by name, so the result mirrors the nesting of
    the flow: `{coupling_name: {"conditional_input": c}}` for a flat chain, nested dicts for chains inside
    chains (wrappers such as `tfb.Invert` and `OnChannels` pass their arguments straight through):

      >>> flow.log_prob(x, bijector_kwargs=conditional_kwargs(flow, c))
      >>> flow.sample(5, bijector_kwargs=conditional_kwargs(flow, c))
    """
    routed = _route(_root_bijector(flow), conditional_input)
    if not routed:
        raise ValueError(
            "`conditional_input` was given but `flow` has no conditional bijectors: drop it, or build the flow "
            "with `conditional_shape=`."
        )
    return routed


def is_conditional(flow) -> bool:
    return bool(_route(_root_bijector(flow), None))


def flow_layers(distribution) -> list:
    """The Keras layers holding the parameters of every tfp_nvp bijector inside `distribution`."""
    found, seen = [], set()
    for bij in flow_bijectors(distribution):
        if isinstance(bij, KerasParameterizedBijector):
            for layer in bij.keras_layers:
                if id(layer) not in seen:
                    seen.add(id(layer))
                    found.append(layer)
    return found
