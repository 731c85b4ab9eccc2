"""Coupling bijectors whose conditioner is a Keras network: `Coupling`, which takes its elementwise
transformer as an argument, and the affine coupling of RealNVP."""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfp_nvp import nn
from tfp_nvp.bijectors._base import (
    KerasParameterizedBijector,
    NetworkContract,
    ParameterLayer,
    as_float_dtype,
    as_shape,
    assert_finite,
    check_dtype,
)
from tfp_nvp.bijectors._reuse import recall, remember
from tfp_nvp.bijectors.transformers import LOG_SCALE_BOUNDS, AffineTransformer, Transformer, as_transformer

__all__ = ["AffineCoupling", "Coupling", "VECTOR_MASKS", "IMAGE_MASKS", "LOG_SCALE_BOUNDS"]

VECTOR_MASKS = ("half", "alternate")
IMAGE_MASKS = ("checkerboard", "channel")


class Coupling(KerasParameterizedBijector):
    r"""A coupling layer with a Keras conditioner network and any elementwise transformer.

    The event `x` is split by a mask into a conditioning part `x_a` and a transformed part `x_b`; a network
    reads `x_a` and gives the parameters `theta` of a monotone scalar map `g` for every entry of `x_b`:

        forward (latent -> data):  y_a = x_a,  y_b = g(x_b; theta(x_a))
        inverse (data -> latent):  x_a = y_a,  x_b = g^{-1}(y_b; theta(y_a))
        log|det dy/dx| = sum over x_b of log g'(x_b),   log|det dx/dy| = -sum over y_b of log g'(g^{-1}(y_b)).

    The map `g` is the `transformer` (see `tfp_nvp.bijectors.Transformer`): `AffineTransformer` gives RealNVP's
    affine coupling (`AffineCoupling`), `SplineTransformer` the neural spline coupling (`SplineCoupling`), and a
    new family needs only a new `Transformer` subclass. Everything else is done here, the same way for every
    transformer: masks and `flip`, building and sizing the network, conditioning, batches of any rank, and
    reusing the network's result between a call and the log-det TFP asks for next.

    Masks. Vector events `[D]`: `"half"` conditions on the first `D // 2` entries, `"alternate"` on the even
    indices; odd `D` is fine. Image events `[H, W, C]`: `"checkerboard"` conditions on pixels with even `h + w`
    (all channels), `"channel"` on the first `C // 2` channels. `flip=True` swaps the roles, so alternating
    `flip` between layers transforms every entry. An explicit 0/1 array of the event shape (1 = conditioning)
    is accepted too. Masks along the last axis hand the network `x_a` alone; the other image masks hand it
    `x * mask` and transform the whole event, keeping the conditioning entries exactly (zero log-det there).

    The network sees `x_a` with shape `[N] + network_input_shape` (batch dimensions of any rank are flattened
    into `N`) and returns a pair named by the transformer's `labels`, each `[N] + param_shape[:-1]` with last
    axis `param_shape[-1] * width` for the transformer's `output_widths()` (entries grouped per transformed
    element), or one tensor holding both on its last axis (first then second). Any Keras 3 layer or model,
    tf_keras model or plain callable works; a `tfp_nvp.networks` network with `output_units` /
    `output_channels` left `None` is sized here. With `conditional_shape` set, the network is called as
    `network(x_a, conditional_input=c)` and `c` reaches the bijector through
    `bijector_kwargs={name: {"conditional_input": c}}` (see `tfp_nvp.conditional_kwargs`).

    Args:
      event_shape: `[D]` for vectors or `[H, W, C]` for images.
      transformer: a `Transformer`, or `"affine"` / `"spline"` for `AffineTransformer()` /
        `SplineTransformer()` with their defaults.
      network: the conditioner; `None` builds a `DenseNetwork(hidden_units)` (vectors) or a `ConvResNet`
        (images, `max(hidden_units)` channels), both ending in a zero-initialised layer, with the dtype policy
        `tfp_nvp.nn.network_dtype(dtype)` (a mixed global policy for float32 couplings). Whatever the network
        computes in, its outputs are cast to `dtype` before the transformer sees them.
      mask, flip: which entries condition (see above).
      hidden_units: sizes of the default network.
      conditional_shape: `[m]` to condition the network on a context vector.
      dtype, validate_args, name: as for every TFP bijector.

    The network is built at construction and every weight, the transformer's own included, is visible to both
    TFP (`trainable_variables`) and Keras (`keras_layers`, tracked by `tfp_nvp.FlowModel`).

    Example:
      >>> bij = Coupling([4], SplineTransformer(num_bins=8, bound=3.0), mask="alternate", hidden_units=(64, 64))
      >>> y = bij.forward(tf.random.normal([10, 4]))
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        transformer: Transformer | str,
        network: keras.layers.Layer | Callable | None = None,
        mask: str | np.ndarray = "half",
        flip: bool = False,
        hidden_units: Sequence[int] = (128, 128),
        conditional_shape: Sequence[int] | None = None,
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "coupling",
    ):
        parameters = dict(locals())
        transformer = as_transformer(transformer)
        parameters["transformer"] = transformer
        self._setup(parameters, transformer)

    def _setup(self, parameters: dict, transformer: Transformer):
        """Builds the coupling from its constructor's `parameters` (what TFP keeps) and its transformer."""
        p = parameters
        event_shape = as_shape(p["event_shape"], "event_shape", rank=(1, 3))
        dtype = as_float_dtype(p["dtype"])
        self._event_shape_ = event_shape
        self._transformer = transformer
        self._flip = bool(p["flip"])
        conditional_shape = p["conditional_shape"]
        self._conditional_shape = (
            None if conditional_shape is None else as_shape(conditional_shape, "conditional_shape", rank=1)
        )
        with tf.name_scope(p["name"]) as name:
            self._setup_mask(p["mask"], event_shape)
            widths = tuple(transformer.output_widths())
            n = self._param_shape[-1]
            self._contract = NetworkContract(
                self._network_input_shape, self._param_shape, tuple(transformer.labels), self._conditional_shape,
                output_widths=None if widths == (1, 1) else (n * widths[0], n * widths[1]),
            )
            network = self._setup_network(p["network"], p["hidden_units"], dtype, name)
            holder = ParameterLayer(name=f"{name.rstrip('/')}_params", dtype=dtype.name)
            transformer.add_weights(holder, self._param_shape)
            self._holder = holder
            self._network = network
            self._contract.check(self._call_network, dtype)
            # TFP keys its cache on `parameters`: the network and the parameter layer are unique per
            # instance, so two equal-config couplings never return each other's cached results.
            p["network"] = network
            p["parameter_layer"] = holder
            self._track_layers([network, holder])
            super().__init__(
                forward_min_event_ndims=len(event_shape),
                is_constant_jacobian=False,
                validate_args=p["validate_args"],
                parameters=p,
                dtype=dtype,
                name=name,
            )

    # ----------------------------------------------------------------------------------------- setup
    def _setup_mask(self, mask, event_shape):
        rank = len(event_shape)
        if isinstance(mask, str):
            allowed = VECTOR_MASKS if rank == 1 else IMAGE_MASKS
            if mask not in allowed:
                kind = "vector events [D]" if rank == 1 else "image events [H, W, C]"
                raise ValueError(f"`mask` for {kind} must be one of {allowed} or a 0/1 array; got {mask!r}.")
            if rank == 1:
                d = event_shape[0]
                idx = np.arange(d)
                keep = idx < d // 2 if mask == "half" else idx % 2 == 0
            elif mask == "channel":
                c = event_shape[-1]
                keep = np.arange(c) < c // 2
            else:
                h, w, c = event_shape
                keep = np.broadcast_to(((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0)[..., None], (h, w, c))
            self._mask_name = mask
        else:
            keep = np.asarray(mask)
            expected = event_shape if rank == 1 else (event_shape, event_shape[-1:])
            if keep.shape != tuple(event_shape) and not (rank == 3 and keep.shape == event_shape[-1:]):
                raise ValueError(f"`mask` array must have shape {expected} (1 = conditioning); got {keep.shape}.")
            if not np.all((keep == 0) | (keep == 1)):
                raise ValueError("`mask` array must contain only 0 and 1.")
            keep = keep.astype(bool)
            self._mask_name = "custom"
        if self._flip:
            keep = ~keep
        if keep.all() or not keep.any():
            raise ValueError(
                f"`mask` leaves nothing to {'transform' if keep.all() else 'condition on'} for event_shape "
                f"{event_shape}: a coupling needs at least one entry on each side."
            )
        if keep.ndim == 1:  # split along the last axis by index: the network sees only x_a
            self._gather = True
            self._idx_a = np.flatnonzero(keep)
            self._idx_b = np.flatnonzero(~keep)
            self._inv_perm = np.argsort(np.concatenate([self._idx_a, self._idx_b]))
            self._identity_merge = bool(np.all(self._inv_perm == np.arange(keep.size)))
            # Two contiguous blocks (the "half" mask, flipped or not): a split and a concat, whose gradients
            # are a concat and a split, instead of gathers, whose gradients are scatters. For 16 couplings
            # on 2-D data this is a sixth of the training step's graph.
            first = keep[0]
            blocks = int(np.count_nonzero(keep[1:] != keep[:-1])) + 1
            self._a_first = bool(first) if blocks == 2 else None
            self._network_input_shape = tuple(event_shape[:-1]) + (self._idx_a.size,)
            self._param_shape = tuple(event_shape[:-1]) + (self._idx_b.size,)
        else:  # spatial mask: the network sees x * mask and its output is masked to the other side
            self._gather = False
            self._a_first = None
            self._keep = keep
            self._network_input_shape = tuple(event_shape)
            self._param_shape = tuple(event_shape)

    def _setup_network(self, network, hidden_units, dtype, name):

        # The default networks are left unsized: the contract gives them the widths this transformer needs.
        if network is None:
            if len(self._event_shape_) == 1:
                network = nn.DenseNetwork(hidden_units, output_units=None, dtype=nn.network_dtype(dtype),
                                                name=f"{name.rstrip('/')}_network")
            else:
                width = hidden_units if isinstance(hidden_units, int) else max(hidden_units)
                network = nn.ConvResNet(hidden_channels=width, output_channels=None, dtype=nn.network_dtype(dtype),
                                              name=f"{name.rstrip('/')}_network")
        return self._contract.size(network)

    def _call_network(self, x_a, conditional_input):
        if conditional_input is None:
            return self._network(x_a)
        return self._network(x_a, conditional_input=conditional_input)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def transformer(self) -> Transformer:
        """The elementwise map applied to the transformed part."""
        return self._transformer

    @property
    def network(self):
        """The conditioner network."""
        return self._network

    @property
    def network_input_shape(self) -> tuple[int, ...]:
        """Per-example shape the network receives."""
        return self._network_input_shape

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Per-example shape of the transformed part (each element gets its own transformer parameters)."""
        return self._param_shape

    # ----------------------------------------------------------------------------------------- math
    def _split(self, x):
        if self._gather and self._a_first is not None:
            a_size, b_size = self._idx_a.size, self._idx_b.size
            if self._a_first:
                return tuple(tf.split(x, [a_size, b_size], axis=-1))
            b, a = tf.split(x, [b_size, a_size], axis=-1)
            return a, b
        if self._gather:
            return tf.gather(x, self._idx_a, axis=-1), tf.gather(x, self._idx_b, axis=-1)
        keep = tf.constant(self._keep, x.dtype)
        return x * keep, x

    def _merge(self, a, b):
        if not self._gather:
            return b
        if self._conditional_shape is not None and not (
                a.shape.rank is not None and a.shape[:-1].is_fully_defined() and a.shape[:-1] == b.shape[:-1]):
            # A condition with more batch dimensions than the data gives `b` the broadcast batch shape.
            a = tf.broadcast_to(a, tf.concat([tf.shape(b)[:-1], tf.shape(a)[-1:]], 0))
        if self._a_first is not None:
            return tf.concat([a, b] if self._a_first else [b, a], axis=-1)
        merged = tf.concat([a, b], axis=-1)
        return merged if self._identity_merge else tf.gather(merged, self._inv_perm, axis=-1)

    def _network_outputs(self, x_a, conditional_input):
        """Runs the network on the conditioning part, whatever the batch rank.

        Returns the network's pair, each `batch_shape + param_shape[:-1] + (param_shape[-1] * width,)`.
        """
        n_event = len(self._event_shape_)
        if conditional_input is None and self._conditional_shape is None and x_a.shape.rank == n_event + 1:
            # One batch axis, the usual case: no reshapes in or out (each would add shape ops to the graph and
            # to its gradient).
            first, second = self._contract.split(self._call_network(x_a, None))
            widths = self._contract.output_widths
            if all(t.shape[1:] == self._param_shape[:-1] + (w,) for t, w in zip((first, second), widths)):
                return tf.cast(first, x_a.dtype), tf.cast(second, x_a.dtype)
            return tuple(tf.reshape(tf.cast(t, x_a.dtype), [-1, *self._param_shape[:-1], w])
                         for t, w in zip((first, second), widths))
        batch_shape = tf.shape(x_a)[:-n_event]
        flat = tf.reshape(x_a, tf.concat([[-1], self._network_input_shape], 0))
        c = None
        if conditional_input is not None:
            check_dtype(self.name, conditional_input, "conditional_input", x_a.dtype)
            c = tf.convert_to_tensor(conditional_input, dtype=x_a.dtype)
            if c.shape.rank is not None and (c.shape.rank == 0 or c.shape[-1:] != self._conditional_shape):
                raise ValueError(
                    f"`conditional_input` must have shape [..., {self._conditional_shape[0]}]; got {c.shape}."
                )
            if self.validate_args:
                c = assert_finite(c, "conditional_input", self.name)
            try:  # statically known batch shapes: say which ones disagree instead of failing inside BroadcastArgs
                tf.broadcast_static_shape(x_a.shape[:-n_event], c.shape[:-1])
            except ValueError:
                raise ValueError(
                    f"`conditional_input` of shape {c.shape} must broadcast with the data's batch shape "
                    f"{x_a.shape[:-n_event]} (batch dimensions before the event) in {self.name}."
                ) from None
            batch_shape = tf.broadcast_dynamic_shape(batch_shape, tf.shape(c)[:-1])
            c = tf.reshape(tf.broadcast_to(c, tf.concat([batch_shape, self._conditional_shape], 0)),
                           [-1, self._conditional_shape[0]])
            flat = tf.reshape(tf.broadcast_to(x_a, tf.concat([batch_shape, self._network_input_shape], 0)),
                              tf.concat([[-1], self._network_input_shape], 0))
        elif self._conditional_shape is not None:
            raise ValueError(
                f"{self.name} was built with conditional_shape={list(self._conditional_shape)}: pass "
                f"bijector_kwargs={{'{self.name}': {{'conditional_input': c}}}} (see tfp_nvp.conditional_kwargs)."
            )
        first, second = self._contract.split(self._call_network(flat, c))
        first_width, second_width = self._contract.output_widths
        shape = tf.concat([batch_shape, self._param_shape[:-1] + (first_width,)], 0)
        first = tf.reshape(tf.cast(first, x_a.dtype), shape)
        if second_width != first_width:
            shape = tf.concat([batch_shape, self._param_shape[:-1] + (second_width,)], 0)
        second = tf.reshape(tf.cast(second, x_a.dtype), shape)
        return first, second

    def _params_of(self, x_a, conditional_input):
        """The transformer's parameters for the transformed part, from the network run on `x_a`."""
        first, second = self._network_outputs(x_a, conditional_input)
        if not self._gather:
            # Conditioning entries get zero raw parameters (the identity for the default transformers), so no
            # value the network gives there can reach the result or its gradient as an overflow.
            first, second = (t * tf.constant(free, t.dtype) for t, free in zip((first, second), self._free_outputs()))
        return self._transformer.params(first, second, self._holder)

    def _free_outputs(self):
        """Per network output, 1 where it parameterises a transformed entry of a spatial mask, else 0."""
        return [np.repeat(~self._keep, w, axis=-1) for w in self._transformer.output_widths()]

    def _transform(self, b, params, inverse: bool, with_output: bool = True):
        """The transformed part and its elementwise log-det in the direction of the call (log-det alone without
        `with_output`); with a spatial mask the conditioning entries come back exactly, with zero log-det."""
        t = self._transformer
        if with_output:
            out, log_det = t.inverse(b, params) if inverse else t.forward(b, params)
        else:
            out, log_det = None, t.inverse_log_det(b, params) if inverse else t.forward_log_det(b, params)
        if self._gather:
            return out, log_det
        keep = tf.constant(self._keep)
        out = None if out is None else tf.where(keep, b, out)
        return out, tf.where(keep, tf.zeros_like(log_det), log_det)

    def _reduce_event(self, t):
        return tf.reduce_sum(t, axis=list(range(-len(self._event_shape_), 0)))

    # TFP's log_prob calls `_inverse(y)` and then a log-det at its input or output, and sampling with
    # log-densities does the mirror image; each would run the network again on the same conditioning half.
    # XLA merges the two forward passes but not their gradients (measured: 1.5x steps/s for 8 affine couplings
    # when the log-scale is reused). The tensors a call saw and returned are therefore remembered (see
    # `_reuse`) with the elementwise log-det computed with them; a later log-det at the latent side `x`
    # (log|dy/dx|) or the data side `y` (log|dx/dy|) of that call is read from it.
    def _remember(self, x, y, conditional_input, log_det, inverse):
        # `log_det` is log|dx/dy| after an inverse call and log|dy/dx| after a forward call: the flag says
        # whether the log-det asked for at that side is its negation.
        remember(self, x, (log_det, inverse), key=("x", conditional_input))
        remember(self, y, (log_det, not inverse), key=("y", conditional_input))

    def _recall(self, t, side, conditional_input):
        """The summed log-det in the direction of `side` ("x": forward, "y": inverse) if `t` was just seen."""
        found = recall(self, t, key=(side, conditional_input))
        if found is None:
            return None
        log_det, negate = found
        total = self._reduce_event(log_det)
        return -total if negate else total

    # The memo is keyed on the tensors TFP passes in and out; the arithmetic uses the checked input, which is
    # the same tensor unless `validate_args` gates it on its finiteness check.
    def _forward(self, x, conditional_input=None):
        a, b = self._split(self._check_event(x, "x"))
        params = self._params_of(a, conditional_input)
        out, log_det = self._transform(b, params, inverse=False)
        y = self._merge(a, out)
        self._remember(x, y, conditional_input, log_det, inverse=False)
        return y

    def _inverse(self, y, conditional_input=None):
        a, b = self._split(self._check_event(y, "y"))
        params = self._params_of(a, conditional_input)
        out, log_det = self._transform(b, params, inverse=True)
        x = self._merge(a, out)
        self._remember(x, y, conditional_input, log_det, inverse=True)
        return x

    def _log_det_at(self, t, arg, side, conditional_input, inverse):
        checked = self._check_event(t, arg)
        log_det = self._recall(t, side, conditional_input)
        if log_det is None:
            a, b = self._split(checked)
            params = self._params_of(a, conditional_input)
            log_det = self._reduce_event(self._transform(b, params, inverse, with_output=False)[1])
        return log_det

    def _forward_log_det_jacobian(self, x, conditional_input=None):
        return self._log_det_at(x, "x", "x", conditional_input, inverse=False)

    def _inverse_log_det_jacobian(self, y, conditional_input=None):
        return self._log_det_at(y, "y", "y", conditional_input, inverse=True)


class AffineCoupling(Coupling):
    r"""RealNVP affine coupling (Dinh et al., 2017) with a Keras conditioner network.

    The event `x` is split by a mask into a conditioning part `x_a` and a transformed part `x_b`:

        forward (latent -> data):  y_a = x_a,  y_b = x_b * exp(s(x_a)) + t(x_a)
        inverse (data -> latent):  x_a = y_a,  x_b = (y_b - t(y_a)) * exp(-s(y_a))
        log|det dy/dx| = sum(s(x_a))  over the event,   and   log|det dx/dy| = -sum(s(y_a)).

    It is `Coupling(event_shape, AffineTransformer(log_scale_bound), ...)` under its own name and defaults.
    The log-scale is bounded: `"tanh"` gives `s = scale * tanh(h)` with a learnable per-dimension (per-channel
    for images) `scale` (RealNVP paper); `"sigmoid"` is GLOW's bounded scale, `s = log sigmoid(2) -
    log sigmoid(h + 2)`: as in GLOW, the data -> latent pass multiplies `x_b` by `sigmoid(h + 2)` (divided by
    `sigmoid(2)`, so `h = 0` is the identity), a factor in `(0, 1.14]`, so the density pass, which training
    runs, can shrink an entry without limit but never expand it by more than 1.14 (sampling is where it
    expands); `"none"` uses `s = h`.

    Masks. Vector events `[D]`: `"half"` conditions on the first `D // 2` entries, `"alternate"` on the even
    indices; odd `D` is fine. Image events `[H, W, C]`: `"checkerboard"` conditions on pixels with even `h + w`
    (all channels), `"channel"` on the first `C // 2` channels. `flip=True` swaps the roles, so alternating
    `flip` between layers transforms every entry. An explicit 0/1 array of the event shape (1 = conditioning)
    is accepted too.

    The network sees `x_a` with shape `[N] + network_input_shape` (batch dimensions of any rank are flattened
    into `N`) and returns `(shift, log_scale)`, each `[N] + param_shape`, or one tensor whose last axis holds
    both (shift first). Any Keras 3 layer or model, tf_keras model or plain callable works; a
    `tfp_nvp.networks` network with `output_units`/`output_channels` left `None` is sized here. With
    `conditional_shape` set, the network is called as `network(x_a, conditional_input=c)` and `c` reaches
    the bijector through `bijector_kwargs={name: {"conditional_input": c}}` (see `tfp_nvp.conditional_kwargs`).

    The network is built at construction and every weight, including `scale`, is visible to both TFP
    (`trainable_variables`) and Keras (`keras_layers`, tracked by `tfp_nvp.FlowModel`).

    Example:
      >>> bij = AffineCoupling(event_shape=[2], mask="half", hidden_units=(64, 64))
      >>> y = bij.forward(tf.random.normal([10, 2]))
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        network: keras.layers.Layer | Callable | None = None,
        mask: str | np.ndarray = "half",
        flip: bool = False,
        log_scale_bound: str = "tanh",
        hidden_units: Sequence[int] = (128, 128),
        conditional_shape: Sequence[int] | None = None,
        dtype=tf.float32,
        validate_args: bool = False,
        name: str = "affine_coupling",
    ):
        parameters = dict(locals())
        self._setup(parameters, AffineTransformer(log_scale_bound))

    @property
    def scale(self):
        """The learnable bound of the `"tanh"` log-scale, or `None`."""
        return getattr(self._holder, "scale", None)
