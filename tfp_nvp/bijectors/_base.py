"""Shared plumbing for bijectors whose parameters live in Keras 3 layers."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow_probability import bijectors as tfb

from tfp_nvp import nn
from tfp_nvp._compat import BijectorCache, BijectorCacheWithGreedyAttrs

__all__ = ["KerasParameterizedBijector", "NetworkContract", "ParameterLayer", "as_float_dtype", "as_shape",
           "assert_finite", "check_dtype", "check_event"]


def as_shape(value, name: str, rank: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """Normalises a user-given event shape and rejects bad ones with a message naming `name`."""
    try:
        shape = tuple(int(d) for d in tf.TensorShape(value).as_list())
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`{name}` must be a fully defined shape of positive sizes such as (2,) or (8, 8, 1); got {value!r}."
        ) from e
    if any(d <= 0 for d in shape):
        raise ValueError(f"`{name}` must have positive sizes; got {shape}.")
    if rank is not None:
        ranks = (rank,) if isinstance(rank, int) else tuple(rank)
        if len(shape) not in ranks:
            raise ValueError(
                f"`{name}` must have rank {' or '.join(map(str, ranks))} "
                f"([D] for vectors, [H, W, C] for images); got {shape}."
            )
    return shape


def as_float_dtype(dtype) -> tf.DType:
    """The `tf.DType` for `dtype`, which must be floating: network weights and log-dets need it."""
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise ValueError(f"`dtype` must be a floating dtype such as tf.float32; got {dtype.name}.")
    return dtype


def check_event(bijector, x, arg: str, event_shape):
    """Rejects an `x` whose static trailing shape is not `event_shape`, naming the argument and the bijector.

    `bijector` is anything with a `name` (a distribution too); when its `validate_args` is set, `x` must also be
    finite, and the returned `x` is gated on that check (see `assert_finite`): compute with the return value.
    """
    rank = len(event_shape)
    if x.shape.rank is not None and (x.shape.rank < rank or not x.shape[-rank:].is_compatible_with(event_shape)):
        raise ValueError(
            f"`{arg}` must have shape [..., {', '.join(map(str, event_shape))}] for {bijector.name}; got {x.shape}."
        )
    if getattr(bijector, "validate_args", False):
        return assert_finite(x, arg, bijector.name)
    return x


def check_dtype(owner: str, x, arg: str, dtype) -> None:
    """Rejects a tensor `x` whose dtype is not `dtype`, saying how to fix it.

    TFP converts arrays and Python numbers to the flow's dtype itself and refuses tensors of another dtype with
    a message that prints the whole tensor; this says the same in one line.
    """
    dtype = tf.as_dtype(dtype)
    if not tf.is_tensor(x) or x.dtype == dtype:
        return
    if not x.dtype.is_floating:
        raise TypeError(f"`{arg}` must be a floating tensor of dtype {dtype.name} for {owner}; got {x.dtype.name}.")
    raise TypeError(
        f"`{arg}` has dtype {x.dtype.name} but {owner} computes in {dtype.name}: cast it with "
        f"tf.cast({arg}, tf.{dtype.name}) or build the flow with dtype='{x.dtype.name}'."
    )


def assert_finite(x, arg: str, owner: str):
    """`x`, gated on a check that raises `InvalidArgumentError` naming `arg` and `owner` for a NaN or an Inf.

    Eagerly the check raises at once. Inside `tf.function` an unconsumed assertion would still run (it is
    stateful) but in parallel with everything else, so a variable update downstream (ActNorm's data-dependent
    initialisation) could happen before it fails; the returned tensor carries the check as a control dependency,
    so nothing computed from it runs on bad data. XLA drops the check.
    """
    finite = tf.math.is_finite(x)
    check = tf.debugging.Assert(
        tf.reduce_all(finite),
        [f"`{arg}` passed to {owner} must be finite (no NaN or Inf); number of non-finite entries:",
         tf.reduce_sum(tf.cast(tf.logical_not(finite), tf.int32))],
        name="assert_finite",
    )
    with tf.control_dependencies([check]):
        return tf.identity(x)


@keras.saving.register_keras_serializable(package="tfp_nvp")
class ParameterLayer(keras.layers.Layer):
    """A Keras home for a bijector's own parameters (ActNorm's scale, a 1x1 conv's matrix, ...).

    Bijectors are `tf.Module`s and Keras 3 cannot see `tf.Variable`s held by them, so every parameter is
    created here with `add_weight`; the owning bijector then lists the backing `tf.Variable`s for TFP.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True

    def add(self, name: str, shape, initializer, trainable: bool = True, dtype=None):
        weight = self.add_weight(
            name=name, shape=tuple(shape), initializer=initializer, trainable=trainable, dtype=dtype or self.dtype
        )
        setattr(self, name, weight)
        return weight


class NetworkContract:
    """What a bijector's conditioner must do: map `[N, *input_shape]` to a pair `[N, *output_shape]` each.

    Shared by every network-holding bijector, so the sizing of tfp_nvp networks, the check at construction and
    the error messages are the same everywhere. `labels` name the pair in messages, e.g. ("shift", "log_scale").
    `output_widths` gives the two outputs different last-axis sizes (`output_shape[-1]` is then ignored);
    by default both are `output_shape`.
    """

    def __init__(self, input_shape, output_shape, labels: tuple[str, str], conditional_shape=None,
                 output_widths: tuple[int, int] | None = None):
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.labels = labels
        self.conditional_shape = conditional_shape
        width = self.output_shape[-1]
        self.output_widths = (width, width) if output_widths is None else tuple(int(w) for w in output_widths)

    def _shapes(self):
        return [list(self.output_shape[:-1]) + [w] for w in self.output_widths]

    def size(self, network):
        """Gives an unsized tfp_nvp network its output width; returns any callable unchanged."""

        first, second = self.output_widths
        width = first if first == second else (first, second)
        if isinstance(network, nn.DenseNetwork) and network.output_units is None:
            network.output_units = width
        elif isinstance(network, nn.ConvResNet) and network.output_channels is None:
            network.output_channels = width
        if not callable(network):
            raise ValueError(f"`network` must be a Keras layer/model or a callable; got {type(network).__name__}.")
        return network

    def split(self, out):
        """The network's output as a pair: it may return the pair itself or one tensor holding both."""
        first, second = self.labels
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return tf.convert_to_tensor(out[0]), tf.convert_to_tensor(out[1])
        if isinstance(out, (tuple, list)) or not hasattr(out, "shape"):
            raise ValueError(f"`network` must return ({first}, {second}) or one tensor holding both on its last axis.")
        out = tf.convert_to_tensor(out)
        widths = self.output_widths
        if out.shape[-1] != sum(widths):
            total = f"2 * {widths[0]}" if widths[0] == widths[1] else f"{widths[0]} + {widths[1]}"
            raise ValueError(
                f"`network` returned one tensor of shape {list(out.shape)}; a single output must have last axis "
                f"{total} ({first} then {second}), or return a ({first}, {second}) pair."
            )
        return tf.split(out, list(widths), axis=-1)

    def check(self, call, dtype):
        """Builds the network through `call(x, c)` on a dummy batch, so shape errors surface at construction."""
        x = tf.zeros((2,) + self.input_shape, dtype)
        c = None if self.conditional_shape is None else tf.zeros((2,) + tuple(self.conditional_shape), dtype)
        try:
            pair = self.split(call(x, c))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the contract spelled out
            raise ValueError(
                f"`network` failed on an input of shape {[2, *self.input_shape]}"
                + ("" if c is None else f" with conditional_input of shape {[2, *self.conditional_shape]}")
                + f": {type(e).__name__}: {e}"
            ) from e
        first, second = self.labels
        shapes = self._shapes()
        for label, t, shape in zip(self.labels, pair, shapes):
            if list(t.shape) != [2, *shape]:
                wanted = (f"each of shape [batch, *{shapes[0]}]" if shapes[0] == shapes[1]
                          else f"of shapes [batch, *{shapes[0]}] and [batch, *{shapes[1]}]")
                raise ValueError(
                    f"`network` must return ({first}, {second}) {wanted} "
                    f"for input [batch, *{list(self.input_shape)}]; its {label} has shape {list(t.shape)} for "
                    f"input {[2, *self.input_shape]}."
                )


def _backing_variables(layers: Iterable) -> list[tf.Variable]:
    found, seen = [], set()
    for layer in layers:
        if not isinstance(layer, keras.layers.Layer):
            continue  # tf_keras models and tf.Modules are walked by tf.Module itself.
        for weight in layer.weights:
            var = getattr(weight, "value", weight)
            if isinstance(var, tf.Variable) and id(var) not in seen:
                seen.add(id(var))
                found.append(var)
    return found


# ------------------------------------------------------------------------------------------- result reuse
# A bijector's result may be read back by a later call in the same computation: TFP's log_prob runs `inverse`
# and then asks for the log-det at the same tensors, sampling with log-densities does the mirror image. TFP's
# cache keeps such results per input tensor for as long as the caller holds it, which outlives a weight update
# in eager code (`flow.log_prob(x)` for one `x` tensor before and after training returned the old log-det;
# TFP's own bijectors over `tf.Variable`s behave the same). Here results are reused only where they cannot
# go stale: inside a traced function (every call builds fresh tensors that read the weights when the function
# runs), and eagerly within one scoring call (`one_call`), after which everything kept eagerly is dropped.
_reuse = threading.local()


def reuse_allowed() -> bool:
    """Whether a result computed now may be read back later: while tracing, or eagerly inside `one_call`."""
    return not tf.executing_eagerly() or getattr(_reuse, "depth", 0) > 0


@contextlib.contextmanager
def one_call():
    """Eager calls inside share results as traced ones do; leaving the outermost scope forgets them all."""
    depth = getattr(_reuse, "depth", 0)
    if depth == 0:
        _reuse.forget = {}
    _reuse.depth = depth + 1
    try:
        yield
    finally:
        _reuse.depth = depth
        if depth == 0:
            forget, _reuse.forget = _reuse.forget, {}
            for drop in forget.values():
                drop()


def forget_after_call(key, drop) -> None:
    """Registers `drop()` to run when the current eager `one_call` ends (nothing to do while tracing)."""
    if tf.executing_eagerly() and getattr(_reuse, "depth", 0) > 0:
        _reuse.forget.setdefault(key, drop)


def keep_for_call(owner, attr: str, value, empty=None) -> None:
    """Sets `owner.attr = value` (a memo of tensors) where `reuse_allowed()`; an eager `one_call` resets it to
    `empty` when it ends."""
    if not reuse_allowed():
        return
    setattr(owner, attr, value)
    forget_after_call(("memo", id(owner), attr), lambda: setattr(owner, attr, empty))


def same_graph(a, b) -> bool:
    """Whether two tensors belong to the same graph (both eager counts as the same)."""
    return getattr(a, "graph", None) is getattr(b, "graph", None)


def _drop_eager_entries(storage) -> None:
    for key in list(storage.keys()):
        if key.alive and any(tf.is_tensor(t) and not tf.is_symbolic_tensor(t) for t in tf.nest.flatten(key())):
            key.cancel()
            storage.pop(key, None)


class _TracedOnlyCache(BijectorCache):
    """TFP's bijector cache, consulted only where `reuse_allowed()`: while tracing, or within one eager call."""

    def _note_eager_use(self):
        storage = self.storage
        forget_after_call(("cache", id(storage)), lambda: _drop_eager_entries(storage))

    def _lookup(self, input, forward_name, inverse_name, **kwargs):  # noqa: A002 (TFP's signature)
        if not reuse_allowed():
            return self._invoke(input, forward_name, kwargs, {})
        self._note_eager_use()
        return super()._lookup(input, forward_name, inverse_name, **kwargs)

    def _attributes(self, input, fn_name, **kwargs):  # noqa: A002
        if not reuse_allowed():
            return {}
        self._note_eager_use()
        return super()._attributes(input, fn_name, **kwargs)


class _TracedOnlyGreedyCache(_TracedOnlyCache, BijectorCacheWithGreedyAttrs):
    """The same, for bijectors whose `_augmented_forward`/`_augmented_inverse` return the log-det with the output."""


def traced_only_cache(forward_name: str = "_forward", inverse_name: str = "_inverse", greedy: bool = False):
    """An unbound cache to assign as a bijector class's `_cache` (TFP binds it to each instance)."""
    cls = _TracedOnlyGreedyCache if greedy else _TracedOnlyCache
    return cls(forward_name=forward_name, inverse_name=inverse_name)


def cache_in_traces_only(bijector) -> None:
    """Give `bijector` and every bijector nested in it (chains, `tfb.Invert`, ...) the traced-only cache.

    This package's bijectors choose their own (traced-only) caches; the TFP containers a flow is built from
    cache too, and a chain keeps `inverse(x)` for as long as the caller holds `x` (a sample kept for a later
    plot), across a weight update. TFP bijectors that return their log-det with their output (`tfb.FFJORD`)
    keep doing so, within the same limits. The builders' flows and the surrogates of `tfp_nvp.vi` call this on
    their bijector.
    """
    for b in (bijector, *bijector.submodules):
        if isinstance(b, tfb.Bijector) and not isinstance(b, KerasParameterizedBijector):
            current = b._cache
            cls = (_TracedOnlyGreedyCache if isinstance(current, BijectorCacheWithGreedyAttrs)
                   else _TracedOnlyCache)
            if type(current) is not cls:
                b._cache = cls(forward_name=current._forward_name, inverse_name=current._inverse_name,
                               bijector=b, bijector_class=type(b))


class KerasParameterizedBijector(tfb.Bijector):
    """Base for bijectors that keep their parameters in Keras 3 layers.

    The two doors to every parameter (DESIGN.md §2):

    * Keras door: `keras_layers` lists the layers; `tfp_nvp.FlowModel` tracks them so `fit`, `save_weights`
      and `.keras` files see every weight.
    * TFP door: `tf.Module` finds variables by walking attributes, not by calling properties, so the backing
      `tf.Variable` of every Keras weight is stored in a plain list attribute. `tfb.Chain`,
      `tfd.TransformedDistribution`, `tf.train.Checkpoint` and `tfp.vi` then see them too.
    """

    _cache = _TracedOnlyCache()

    def _track_layers(self, layers: Sequence) -> None:
        self._keras_layers = list(layers)
        # Plain attribute on purpose: tf.Module's variable walk reads it.
        self._tf_variables = _backing_variables(self._keras_layers)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The event shape this bijector was built for."""
        return self._event_shape_

    def _check_event(self, x, arg):
        return check_event(self, x, arg, self._event_shape_)

    @property
    def keras_layers(self) -> list:
        """The Keras layers (and other networks) holding this bijector's parameters."""
        return list(self._keras_layers)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # Parameters are network weights, not batchable tensors: the batch shape is always [].
        return dict()

    def _sum_fn(self, x, axis=None):
        # TFP reduces every log-det over the event axes beyond the bijector's own with this sum, even when there
        # are none (the usual case: a flow's layers act on the whole event); a sum over no axes is the identity,
        # and skipping it saves its gradient's dozen shape ops per layer in every traced training step.
        axes = tf.get_static_value(axis)
        if axes is not None and np.size(axes) == 0:
            return x
        return super()._sum_fn(x, axis=axis)
