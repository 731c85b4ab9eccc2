"""Serving: write a trained flow as a TensorFlow SavedModel that runs with TensorFlow alone.

The SavedModel holds only TensorFlow ops and the flow's variables, so the process that serves it needs neither
`tfp_nvp`, TensorFlow Probability nor Keras: `tf.saved_model.load(path)` (or TensorFlow Serving) is enough.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp import flows, images
from tfp_nvp.flows import flow_layers
from tfp_nvp.bijectors.actnorm import ActNorm

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["export_flow", "SERVING_OFFSET"]

# Serving must be deterministic, so `levels` models dequantize with the centre of each bin instead of noise.
SERVING_OFFSET = 0.5


def _resolve(model_or_flow, levels):
    """(model or None, distribution, levels) for a FlowModel or a bare transformed distribution."""
    dist = getattr(model_or_flow, "distribution", None)
    if isinstance(model_or_flow, keras.Model) and isinstance(dist, tfd.Distribution):
        model_levels = getattr(model_or_flow, "levels", None)
        if levels is not None and levels != model_levels:
            raise ValueError(
                f"`levels` is set by the model ({model_levels!r}); got levels={levels!r}. Leave `levels` unset "
                "when exporting a FlowModel."
            )
        return model_or_flow, dist, model_levels
    # Duck-typed: TFP builds a private twin of tfd.TransformedDistribution around non-CompositeTensor bijectors.
    bijector = getattr(model_or_flow, "bijector", None)
    if not (isinstance(model_or_flow, tfd.Distribution) and isinstance(bijector, tfb.Bijector)):
        raise ValueError(
            "`model_or_flow` must be a tfp_nvp.FlowModel or a transformed distribution such as "
            f"tfp_nvp.real_nvp(...); got {type(model_or_flow).__name__}."
        )
    if levels is not None and (isinstance(levels, bool) or int(levels) != levels or levels < 2):
        raise ValueError(f"`levels` must be an integer >= 2 (number of discrete values) or None; got {levels!r}.")
    return None, model_or_flow, None if levels is None else int(levels)


def _conditional_size(dist):
    """The length k of the condition vector, or None for an unconditional flow."""
    shapes = {tuple(s) for b in flows.flow_bijectors(dist)
              if (s := getattr(b, "_conditional_shape", None)) is not None}
    if len(shapes) > 1:
        raise ValueError(f"the conditional bijectors of the flow disagree on conditional_shape: {sorted(shapes)}.")
    return shapes.pop()[0] if shapes else None


def _check_initialized(dist):
    # An ActNorm that has not seen data would initialise itself from the first serving request: a model that
    # changes with its traffic. Refuse instead of exporting something that is not what was trained.
    fresh = [b.name for b in flows.flow_bijectors(dist) if isinstance(b, ActNorm) and not bool(b.initialized)]
    if fresh:
        raise ValueError(
            f"the flow has {len(fresh)} ActNorm layer(s) that have not been initialised from data "
            f"({', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''}); served as is, they would initialise "
            "from the first request. Train the model or call tfp_nvp.initialize(model, x_train[:512]) before "
            "exporting."
        )


def _serve_signature(input_signature, event_shape, levels, cond_size, dtype):
    x_dtype = tf.int32 if levels is not None else dtype
    default = [tf.TensorSpec([None, *event_shape], x_dtype, name="x")]
    if cond_size is not None:
        default.append(tf.TensorSpec([None, cond_size], dtype, name="conditional_input"))
    if input_signature is None:
        return default
    if not isinstance(input_signature, (list, tuple)) or len(input_signature) != len(default):
        expected = "[x_spec" + (", conditional_input_spec]" if cond_size is not None else "]")
        raise ValueError(
            f"`input_signature` must be a list {expected} describing the `serve` endpoint's inputs; "
            f"got {input_signature!r}."
        )
    specs = []
    for spec, ref in zip(input_signature, default):
        try:
            shape, spec_dtype = tf.TensorShape(spec.shape), tf.as_dtype(spec.dtype)
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(
                f"`input_signature` entries must be tf.TensorSpec or keras.InputSpec; got {spec!r}."
            ) from e
        if not shape.is_compatible_with(ref.shape):
            raise ValueError(
                f"`input_signature`: `{ref.name}` must have shape {ref.shape.as_list()} (batch size free or "
                f"fixed); got {shape.as_list() if shape.rank is not None else shape}."
            )
        wants_float = ref.name == "conditional_input" or levels is None
        if not (spec_dtype.is_floating or (not wants_float and spec_dtype.is_integer)):
            kind = "a floating" if wants_float else "an integer or floating"
            raise ValueError(f"`input_signature`: `{ref.name}` must have {kind} dtype; got {spec_dtype.name}.")
        specs.append(tf.TensorSpec(shape.merge_with(ref.shape), spec_dtype, name=ref.name))
    return specs


def export_flow(model_or_flow, filepath, levels: int | None = None, input_signature=None,
                verbose: bool | None = True):
    """Writes `model_or_flow` as a TensorFlow SavedModel with a `serve` (density) and a `sample` endpoint.

    Built with Keras' `keras.export.ExportArchive` and explicit input signatures; loading it needs only
    TensorFlow. Serving never changes the flow's variables: flows whose ActNorm layers have not seen data are
    refused (served as they are, they would initialise themselves from the first request), and in the others
    the initialisation sits behind a flag that is already set.

    Endpoints (`D = event_shape`, `k` the length of the condition of a conditional flow, dtype the flow's):

    * `serve(x)` -> `{"log_prob": [batch]}`, the log-density in nats of `x` `[batch, *D]`.
      Conditional flows: `serve(x, conditional_input)` with `conditional_input` `[batch, k]` (or `[1, k]`,
      shared by the whole batch).
      `levels` models: `x` holds integer images in `[0, levels)` (int32) and the output is
      `{"log_prob": [batch], "bits_per_dim": [batch]}`; the images are dequantized with the fixed offset
      `u = 0.5` (`(x + 0.5) / levels`, the centre of each bin) instead of random noise, so serving is
      deterministic, and `log_prob` is the density of those points in the flow's `[0, 1)` space.
      Values outside `[0, levels)` raise an `InvalidArgumentError`.
    * `sample(n, seed)` -> `[n, *D]`: `n` samples drawn statelessly from the int32 scalar `seed`, so the same
      seed gives the same samples in any process. In-process, `model.sample(n, seed=(seed, 0))` (or
      `flow.sample(n, seed=(seed, 0))`) draws the same ones. Conditional flows: `sample(n, seed, conditional_input)` with `conditional_input` `[n, k]`
      (one condition per sample) or `[1, k]` (the same condition for all `n`). For `levels` models samples are
      in the flow's continuous space; `floor(levels * x)` clipped to `[0, levels - 1]` gives integer images.

    The endpoints are also saved as signatures for TensorFlow Serving: `serve` (also `serving_default`) with
    inputs `x` (and `conditional_input`) and outputs `log_prob` (and `bits_per_dim`), and `sample` with inputs
    `n`, `seed` (and `conditional_input`) and the output `output_0`.

    Args:
      model_or_flow: a `tfp_nvp.FlowModel`, or a transformed distribution from a builder (or any
        `tfd.TransformedDistribution` whose bijectors are TensorFlow-traceable).
      filepath: directory to write the SavedModel to.
      levels: for a bare distribution, treat inputs as integer images with this many levels (a `FlowModel`
        brings its own).
      input_signature: optional list of `tf.TensorSpec` / `keras.InputSpec` for `serve`'s inputs
        (`[x]` or `[x, conditional_input]`), e.g. to accept `uint8` images or fix the batch size. The event
        dimensions must match the flow's.
      verbose: print the endpoints after writing.

    Example:
      >>> tfp_nvp.export_flow(model, "/tmp/flow")          # or model.export("/tmp/flow")
      >>> served = tf.saved_model.load("/tmp/flow")         # TensorFlow only
      >>> served.serve(x)["log_prob"], served.sample(16, 0)
    """
    model, dist, levels = _resolve(model_or_flow, levels)
    _check_initialized(dist)
    dtype = tf.as_dtype(dist.dtype)
    event_shape = dist.event_shape.as_list()
    num_dims = int(np.prod(event_shape))
    cond_size = _conditional_size(dist)
    serve_spec = _serve_signature(input_signature, event_shape, levels, cond_size, dtype)

    def bijector_kwargs(conditional_input):
        if conditional_input is None:
            return {}
        return {"bijector_kwargs": flows.conditional_kwargs(dist, tf.cast(conditional_input, dtype))}

    def log_density(x, conditional_input=None):
        if levels is not None:
            message = f"`x` must hold integers in [0, {levels})"
            # Compared in 64 bits: `levels` cast to a narrow input type would wrap (256 is 0 as uint8).
            wide = tf.cast(x, tf.uint64 if x.dtype.is_unsigned else tf.int64)
            checks = [tf.debugging.assert_less(wide, tf.constant(levels, wide.dtype), message=message)]
            if not x.dtype.is_unsigned:
                checks.append(tf.debugging.assert_non_negative(wide, message=message))
            with tf.control_dependencies(checks):
                x = (tf.cast(x, dtype) + tf.constant(SERVING_OFFSET, dtype)) / tf.constant(levels, dtype)
        log_prob = dist.log_prob(tf.cast(x, dtype), **bijector_kwargs(conditional_input))
        out = {"log_prob": log_prob}
        if levels is not None:
            out["bits_per_dim"] = images.bits_per_dim(-log_prob, num_dims, levels)
        return out

    def draw(n, seed, conditional_input=None):
        checks = [tf.debugging.assert_non_negative(n, message="`n` must be >= 0")]
        if conditional_input is not None:
            rows = tf.shape(conditional_input)[0]
            checks.append(tf.debugging.Assert(
                tf.logical_or(tf.equal(rows, 1), tf.equal(rows, n)),
                ["`conditional_input` must have shape [n, k] or [1, k]; got rows", rows, "for n", n]))
        with tf.control_dependencies(checks):
            n = tf.identity(n)
        if conditional_input is not None:
            conditional_input = tf.broadcast_to(conditional_input, tf.stack([n, cond_size]))
        # Stateless: the pair (seed, 0) fixes every random draw, so the samples are the same in any process.
        stateless_seed = tf.stack([seed, tf.zeros([], seed.dtype)])
        return dist.sample(n, seed=stateless_seed, **bijector_kwargs(conditional_input))

    # Exact arities, so the saved signatures list exactly the inputs a caller must feed.
    if cond_size is None:
        def serve(x):
            return log_density(x)

        def sample(n, seed):
            return draw(n, seed)
    else:
        def serve(x, conditional_input):
            return log_density(x, conditional_input)

        def sample(n, seed, conditional_input):
            return draw(n, seed, conditional_input)

    sample_spec = [tf.TensorSpec([], tf.int32, name="n"), tf.TensorSpec([], tf.int32, name="seed")]
    if cond_size is not None:
        sample_spec.append(tf.TensorSpec([None, cond_size], dtype, name="conditional_input"))

    archive = keras.export.ExportArchive()
    if model is not None:
        archive.track(model)
    else:
        for layer in flow_layers(dist):
            archive.track(layer)
    archive.add_endpoint("serve", serve, input_signature=serve_spec)
    archive.add_endpoint("sample", sample, input_signature=sample_spec)
    archive.write_out(filepath, verbose=verbose is None or bool(verbose))  # None: Keras' default, print
