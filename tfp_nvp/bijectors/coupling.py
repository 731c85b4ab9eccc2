"""RealNVP affine coupling as a TFP bijector whose conditioner is a Keras network."""

from __future__ import annotations

import math
import weakref
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfp_nvp.bijectors._base import (
    KerasParameterizedBijector,
    NetworkContract,
    ParameterLayer,
    as_float_dtype,
    as_shape,
    assert_finite,
    check_dtype,
)

__all__ = ["AffineCoupling", "VECTOR_MASKS", "IMAGE_MASKS", "LOG_SCALE_BOUNDS"]

VECTOR_MASKS = ("half", "alternate")
IMAGE_MASKS = ("checkerboard", "channel")
LOG_SCALE_BOUNDS = ("tanh", "sigmoid", "none")

# sigmoid(h + 2) is GLOW's scale; dividing by sigmoid(2) makes h = 0 the identity, as DESIGN.md §4 asks.
_LOG_SIGMOID_2 = -math.log1p(math.exp(-2.0))


class AffineCoupling(KerasParameterizedBijector):
    r"""RealNVP affine coupling (Dinh et al., 2017) with a Keras conditioner network.

    The event `x` is split by a mask into a conditioning part `x_a` and a transformed part `x_b`:

        forward (latent -> data):  y_a = x_a,  y_b = x_b * exp(s(x_a)) + t(x_a)
        inverse (data -> latent):  x_a = y_a,  x_b = (y_b - t(y_a)) * exp(-s(y_a))
        log|det dy/dx| = sum(s(x_a))  over the event,   and   log|det dx/dy| = -sum(s(y_a)).

    The log-scale is bounded: `"tanh"` gives `s = scale * tanh(h)` with a learnable per-dimension (per-channel
    for images) `scale` (RealNVP paper); `"sigmoid"` gives `s = log sigmoid(h + 2) - log sigmoid(2)` (GLOW's
    bounded scale, shifted so `h = 0` is the identity); `"none"` uses `s = h`.

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
        event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
        dtype = as_float_dtype(dtype)
        if log_scale_bound not in LOG_SCALE_BOUNDS:
            raise ValueError(f"`log_scale_bound` must be one of {LOG_SCALE_BOUNDS}; got {log_scale_bound!r}.")
        self._event_shape_ = event_shape
        self._flip = bool(flip)
        self._log_scale_bound = log_scale_bound
        self._conditional_shape = (
            None if conditional_shape is None else as_shape(conditional_shape, "conditional_shape", rank=1)
        )
        with tf.name_scope(name) as name:
            self._setup_mask(mask, event_shape)
            self._contract = NetworkContract(self._network_input_shape, self._param_shape, ("shift", "log_scale"),
                                             self._conditional_shape)
            network = self._setup_network(network, hidden_units, dtype, name)
            holder = ParameterLayer(name=f"{name.rstrip('/')}_params", dtype=dtype.name)
            if log_scale_bound == "tanh":
                scale_shape = self._param_shape[-1:] if len(event_shape) == 3 else self._param_shape
                holder.add("scale", scale_shape, "ones")
            self._holder = holder
            self._network = network
            self._contract.check(self._call_network, dtype)
            # TFP keys its cache on `parameters`: the network and the parameter layer are unique per
            # instance, so two equal-config couplings never return each other's cached results.
            parameters["network"] = network
            parameters["parameter_layer"] = holder
            self._track_layers([network, holder])
            super().__init__(
                forward_min_event_ndims=len(event_shape),
                is_constant_jacobian=False,
                validate_args=validate_args,
                parameters=parameters,
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
            self._network_input_shape = tuple(event_shape[:-1]) + (self._idx_a.size,)
            self._param_shape = tuple(event_shape[:-1]) + (self._idx_b.size,)
        else:  # spatial mask: the network sees x * mask and its output is masked to the other side
            self._gather = False
            self._keep = keep
            self._network_input_shape = tuple(event_shape)
            self._param_shape = tuple(event_shape)

    def _setup_network(self, network, hidden_units, dtype, name):
        from tfp_nvp import networks  # local import keeps bijectors importable without the network zoo

        out = self._param_shape[-1]
        if network is None:
            if len(self._event_shape_) == 1:
                network = networks.DenseNetwork(hidden_units, output_units=out, dtype=dtype.name,
                                                name=f"{name.rstrip('/')}_network")
            else:
                width = hidden_units if isinstance(hidden_units, int) else max(hidden_units)
                network = networks.ConvResNet(hidden_channels=width, output_channels=out, dtype=dtype.name,
                                              name=f"{name.rstrip('/')}_network")
        return self._contract.size(network)

    def _call_network(self, x_a, conditional_input):
        if conditional_input is None:
            return self._network(x_a)
        return self._network(x_a, conditional_input=conditional_input)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def network(self):
        """The conditioner network."""
        return self._network

    @property
    def scale(self):
        """The learnable bound of the `"tanh"` log-scale, or `None`."""
        return getattr(self._holder, "scale", None)

    @property
    def network_input_shape(self) -> tuple[int, ...]:
        """Per-example shape the network receives."""
        return self._network_input_shape

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Per-example shape of `shift` and `log_scale`."""
        return self._param_shape

    # ----------------------------------------------------------------------------------------- math
    def _split(self, x):
        if self._gather:
            return tf.gather(x, self._idx_a, axis=-1), tf.gather(x, self._idx_b, axis=-1)
        keep = tf.constant(self._keep, x.dtype)
        return x * keep, x

    def _merge(self, a, b):
        if not self._gather:
            return b
        merged = tf.concat([a, b], axis=-1)
        return merged if self._identity_merge else tf.gather(merged, self._inv_perm, axis=-1)

    def _shift_log_scale(self, x_a, conditional_input):
        """Runs the network on the conditioning part, whatever the batch rank, and bounds the log-scale."""
        n_event = len(self._event_shape_)
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
        shift, h = self._contract.split(self._call_network(flat, c))
        shape = tf.concat([batch_shape, self._param_shape], 0)
        shift = tf.reshape(tf.cast(shift, x_a.dtype), shape)
        h = tf.reshape(tf.cast(h, x_a.dtype), shape)
        if self._log_scale_bound == "tanh":
            log_scale = tf.cast(self._holder.scale.value, x_a.dtype) * tf.tanh(h)
        elif self._log_scale_bound == "sigmoid":
            # tf.constant, not a cast: casting a Python float goes through float32 and would round it.
            log_scale = tf.math.log_sigmoid(h + 2.0) - tf.constant(_LOG_SIGMOID_2, h.dtype)
        else:
            log_scale = h
        if not self._gather:
            free = tf.constant(~self._keep, x_a.dtype)
            shift, log_scale = shift * free, log_scale * free
        return shift, log_scale

    def _reduce_event(self, t):
        return tf.reduce_sum(t, axis=list(range(-len(self._event_shape_), 0)))

    # TFP's log_prob calls `_inverse(y)` and then `_forward_log_det_jacobian` on its output, and sampling with
    # log-densities does the mirror image; each would run the network again on the same conditioning half.
    # XLA merges the two forward passes but not their gradients (measured: 1.5x steps/s for 8 couplings when
    # the log-scale is reused). Inside one traced function the tensors a call saw and returned are remembered
    # with the log-scale computed from them; eager calls never reuse it, so a tape or a weight update between
    # two eager calls can never meet a stale value.
    def _remember(self, tensors, conditional_input, log_scale):
        if tf.executing_eagerly():
            return
        self._log_scale_memo = [(weakref.ref(t), conditional_input, log_scale) for t in tensors]

    def _recall(self, t, conditional_input):
        if tf.executing_eagerly():
            return None
        for ref, c, log_scale in getattr(self, "_log_scale_memo", ()):
            if ref() is t and c is conditional_input and log_scale.graph is t.graph:
                return log_scale
        return None

    def _log_scale_of(self, t, checked, conditional_input):
        """The log-scale at `t`, remembered or computed from `checked` (`t` after its `validate_args` check)."""
        log_scale = self._recall(t, conditional_input)
        if log_scale is None:
            log_scale = self._shift_log_scale(self._split(checked)[0], conditional_input)[1]
        return log_scale

    # The memo is keyed on the tensors TFP passes in and out; the arithmetic uses the checked input, which is
    # the same tensor unless `validate_args` gates it on its finiteness check.
    def _forward(self, x, conditional_input=None):
        a, b = self._split(self._check_event(x, "x"))
        shift, log_scale = self._shift_log_scale(a, conditional_input)
        y = self._merge(a, b * tf.exp(log_scale) + shift)
        self._remember((x, y), conditional_input, log_scale)
        return y

    def _inverse(self, y, conditional_input=None):
        a, b = self._split(self._check_event(y, "y"))
        shift, log_scale = self._shift_log_scale(a, conditional_input)
        x = self._merge(a, (b - shift) * tf.exp(-log_scale))
        self._remember((y, x), conditional_input, log_scale)
        return x

    def _forward_log_det_jacobian(self, x, conditional_input=None):
        return self._reduce_event(self._log_scale_of(x, self._check_event(x, "x"), conditional_input))

    def _inverse_log_det_jacobian(self, y, conditional_input=None):
        return -self._reduce_event(self._log_scale_of(y, self._check_event(y, "y"), conditional_input))
