"""Affine autoregressive bijectors with a Keras 3 MADE conditioner: MAF and IAF."""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf

from tfp_nvp.nn.made import MADE
from tfp_nvp.nn.precision import network_dtype
from tfp_nvp.bijectors._base import (
    KerasParameterizedBijector,
    NetworkContract,
    ParameterLayer,
    as_float_dtype,
    as_shape,
    assert_finite,
    check_dtype,
)
from tfp_nvp.bijectors._reuse import traced_only_cache
from tfp_nvp.bijectors.transformers import LOG_SCALE_BOUNDS, _bounded_log_scale

__all__ = ["MaskedAutoregressive", "InverseAutoregressive", "DIRECTIONS"]

DIRECTIONS = ("maf", "iaf")


class MaskedAutoregressive(KerasParameterizedBijector):
    r"""Affine autoregressive bijector (MAF, Papamakarios et al. 2017; IAF, Kingma et al. 2016) with a MADE.

    An autoregressive network `(t, s) = net(u)` gives, for every dimension `d`, a shift `t_d` and a log-scale
    `s_d` that depend only on the entries of `u` generated before `d` (`tfp_nvp.networks.MADE`). With `z` the
    latent side and `x` the data side (`forward` maps `z -> x`):

        direction="maf":  x = z * exp(s(x)) + t(x)      the network reads the data side
        direction="iaf":  x = z * exp(s(z)) + t(z)      the network reads the latent side
        log|det dx/dz| = sum_d s_d                      (s evaluated where the network reads)

    The side the network reads makes one direction a single network call and the other `D` sequential calls
    (entry `d` becomes exact once all entries generated before it are):

        ==========  ================================  ==============================================
        direction   one pass                          D sequential passes
        ==========  ================================  ==============================================
        "maf"       `inverse`: density evaluation     `forward`: sampling
        "iaf"       `forward`: sampling               `inverse`: density of arbitrary data
        ==========  ================================  ==============================================

    MAF suits density estimation (training by maximum likelihood); IAF suits variational surrogates, which
    sample and score their own samples. Every call stores its log-determinant in TFP's bijector cache next to
    its output, so scoring a sample the same bijector just produced costs no network call at all: inside one
    traced function (`tfp.vi` losses, `fit`), and eagerly within one call such as
    `experimental_sample_and_log_prob`. An eager `log_prob` of a sample drawn by an earlier eager call runs the
    inverse again, so it reflects any weight update in between. The sequential pass is a
    `tf.while_loop` of `D` iterations, so graphs stay small; it runs eagerly, in `tf.function` and under XLA.

    The log-scale is bounded as in `tfp_nvp.AffineCoupling`: `"tanh"` gives `s = scale * tanh(h)` with a
    learnable per-dimension `scale` (starting at 1), `"sigmoid"` gives GLOW's `s = log sigmoid(2) -
    log sigmoid(h + 2)` (the data -> latent direction multiplies by `sigmoid(h + 2) / sigmoid(2)`, at most 1.14
    per layer), `"none"` uses `s = h`.

    Vector events `[D]` only (flatten other events with `tfb.Reshape`). Batches of any rank work. `network`
    defaults to a MADE with `hidden_units`, `input_order`, `activation` and `seed` (used only then); any Keras
    layer or callable mapping `[N, D]` to `(shift, log_scale)` pairs of `[N, D]` (or one `[N, 2D]` tensor) may
    be given instead, but it must be autoregressive in some order for the sequential pass to invert the map.
    With `conditional_shape=[C]` the network is called as `network(u, conditional_input=c)`; pass `c` with
    `bijector_kwargs={name: {"conditional_input": c}}` (see `tfp_nvp.conditional_kwargs`). The default MADE takes
    the policy `tfp_nvp.nn.network_dtype(dtype)` (a mixed global policy for a float32 bijector); the network's
    outputs are cast to `dtype` before the log-scale bound and the log-det.

    Every weight is visible to TFP (`trainable_variables`) and to Keras (`keras_layers`, tracked by
    `tfp_nvp.FlowModel`).

    Example:
      >>> maf = MaskedAutoregressive(event_shape=[3], hidden_units=(32, 32))
      >>> z = maf.inverse(tf.random.normal([10, 3]))          # one network call
      >>> iaf = MaskedAutoregressive([3], direction="iaf")     # or InverseAutoregressive([3])
    """

    # Forward and inverse return their log-determinant too; TFP's cache stores it with the output (while
    # tracing, or within one eager scoring call: never across a weight update).
    _cache = traced_only_cache("_augmented_forward", "_augmented_inverse", greedy=True)

    def __init__(
        self,
        event_shape: Sequence[int],
        network: keras.layers.Layer | Callable | None = None,
        direction: str = "maf",
        hidden_units: Sequence[int] = (64, 64),
        input_order: str | Sequence[int] = "left-to-right",
        activation: str = "relu",
        log_scale_bound: str = "tanh",
        conditional_shape: Sequence[int] | None = None,
        dtype=tf.float32,
        seed: int | None = None,
        validate_args: bool = False,
        name: str | None = None,
    ):
        parameters = dict(locals())
        self._setup(parameters)

    def _setup(self, parameters):
        p = parameters
        direction = p["direction"]
        if direction not in DIRECTIONS:
            raise ValueError(f"`direction` must be one of {DIRECTIONS}; got {direction!r}.")
        self._iaf = direction == "iaf"
        event_shape = as_shape(p["event_shape"], "event_shape")
        if len(event_shape) != 1:
            raise ValueError(
                f"`event_shape` must be a vector shape [D]: autoregressive bijectors support vector events only; "
                f"got {list(event_shape)}. Flatten other events first, e.g. with "
                f"tfb.Reshape([-1], {list(event_shape)})."
            )
        if p["log_scale_bound"] not in LOG_SCALE_BOUNDS:
            raise ValueError(f"`log_scale_bound` must be one of {LOG_SCALE_BOUNDS}; got {p['log_scale_bound']!r}.")
        self._log_scale_bound = p["log_scale_bound"]
        dtype = as_float_dtype(p["dtype"])
        conditional_shape = p["conditional_shape"]
        self._conditional_shape = (
            None if conditional_shape is None else as_shape(conditional_shape, "conditional_shape", rank=1)
        )
        self._event_shape_ = event_shape
        self._size = event_shape[0]
        name = p["name"] or ("inverse_autoregressive" if self._iaf else "masked_autoregressive")
        with tf.name_scope(name) as scope:
            network = self._make_network(p, dtype, scope.rstrip("/"))
            self._network = network
            self._contract = NetworkContract(event_shape, event_shape, ("shift", "log_scale"),
                                             self._conditional_shape)
            holder = ParameterLayer(name=f"{scope.rstrip('/')}_params", dtype=dtype.name)
            if self._log_scale_bound == "tanh":
                holder.add("scale", event_shape, "ones")
            self._holder = holder
            self._contract.check(self._call_network, dtype)
            # TFP keys its cache on `parameters`: the network and the parameter layer are unique per instance,
            # so two equal-config bijectors never return each other's cached results.
            p["network"] = network
            p["parameter_layer"] = holder
            self._track_layers([network, holder])
            super().__init__(
                forward_min_event_ndims=1,
                is_constant_jacobian=False,
                validate_args=p["validate_args"],
                parameters=p,
                dtype=dtype,
                name=scope,
            )

    def _make_network(self, p, dtype, name):

        network = p["network"]
        conditional_size = None if self._conditional_shape is None else self._conditional_shape[0]
        if network is None:
            return MADE(hidden_units=p["hidden_units"], event_size=self._size, input_order=p["input_order"],
                        conditional_size=conditional_size, activation=p["activation"], seed=p["seed"],
                        dtype=network_dtype(dtype), name=f"{name}_made")
        if isinstance(network, MADE):
            if network.event_size is not None and network.event_size != self._size:
                raise ValueError(
                    f"`network` is a MADE for event_size={network.event_size} but `event_shape` is [{self._size}]."
                )
            if network.conditional_size != conditional_size:
                raise ValueError(
                    f"`network` is a MADE with conditional_size={network.conditional_size} but the bijector has "
                    f"conditional_shape={None if conditional_size is None else [conditional_size]}: they must agree."
                )
        if not callable(network):
            raise ValueError(f"`network` must be a Keras layer/model or a callable; got {type(network).__name__}.")
        return network

    # ----------------------------------------------------------------------------------------- properties
    @property
    def network(self):
        """The autoregressive conditioner network."""
        return self._network

    @property
    def direction(self) -> str:
        """`"maf"` (one-pass inverse) or `"iaf"` (one-pass forward)."""
        return "iaf" if self._iaf else "maf"

    @property
    def scale(self):
        """The learnable bound of the `"tanh"` log-scale, or `None`."""
        return getattr(self._holder, "scale", None)

    # ----------------------------------------------------------------------------------------- network
    def _call_network(self, u, conditional_input):
        if conditional_input is None:
            return self._network(u)
        return self._network(u, conditional_input=conditional_input)

    def _shift_log_scale(self, u, c):
        """Shift and bounded log-scale, each `[N, D]`, for a flat batch `u` (`[N, D]`) and condition `c`."""
        shift, h = self._contract.split(self._call_network(u, c))
        shift, h = tf.cast(shift, u.dtype), tf.cast(h, u.dtype)
        return shift, _bounded_log_scale(h, self._log_scale_bound, self.scale)

    def _flatten_batch(self, t, conditional_input):
        """`t` as `[N, D]`, the condition as `[N, C]` (or None), and the broadcast batch shape."""
        batch_shape = tf.shape(t)[:-1]
        c = None
        if conditional_input is not None:
            check_dtype(self.name, conditional_input, "conditional_input", t.dtype)
            c = tf.convert_to_tensor(conditional_input, dtype=t.dtype)
            if c.shape.rank is not None and (c.shape.rank == 0 or c.shape[-1:] != self._conditional_shape):
                if self._conditional_shape is None:
                    raise ValueError(
                        f"{self.name} was built without `conditional_shape`: it takes no `conditional_input`."
                    )
                raise ValueError(
                    f"`conditional_input` must have shape [..., {self._conditional_shape[0]}]; got {c.shape}."
                )
            if self.validate_args:
                c = assert_finite(c, "conditional_input", self.name)
            try:
                tf.broadcast_static_shape(t.shape[:-1], c.shape[:-1])
            except ValueError:
                raise ValueError(
                    f"`conditional_input` of shape {c.shape} must broadcast with the data's batch shape "
                    f"{t.shape[:-1]} (batch dimensions before the event) in {self.name}."
                ) from None
            batch_shape = tf.broadcast_dynamic_shape(batch_shape, tf.shape(c)[:-1])
            c = tf.reshape(tf.broadcast_to(c, tf.concat([batch_shape, self._conditional_shape], 0)),
                           [-1, self._conditional_shape[0]])
            t = tf.broadcast_to(t, tf.concat([batch_shape, [self._size]], 0))
        elif self._conditional_shape is not None:
            raise ValueError(
                f"{self.name} was built with conditional_shape={list(self._conditional_shape)}: pass "
                f"bijector_kwargs={{'{self.name}': {{'conditional_input': c}}}} (see tfp_nvp.conditional_kwargs)."
            )
        return tf.reshape(t, [-1, self._size]), c, batch_shape

    # ----------------------------------------------------------------------------------------- the two passes
    def _one_pass(self, u, c, inverse: bool):
        """The direction whose network input is given: `u` is the side the network reads."""
        shift, log_scale = self._shift_log_scale(u, c)
        if inverse:  # maf: u = x
            return (u - shift) * tf.exp(-log_scale), log_scale
        return u * tf.exp(log_scale) + shift, log_scale  # iaf: u = z

    def _sequential(self, known, c, inverse: bool):
        """The direction whose network input is the unknown output: fixed-point sweeps in generation order.

        After sweep `k` the entries generated `k`-th or earlier are exact; after `D` sweeps all are, and the
        log-scale of the last sweep already equals the one at the result (no output sees the last entry).
        """

        def body(i, out, _):
            shift, log_scale = self._shift_log_scale(out, c)
            if inverse:  # iaf: known = x, out -> z
                new = (known - shift) * tf.exp(-log_scale)
            else:  # maf: known = z, out -> x
                new = known * tf.exp(log_scale) + shift
            return i + 1, new, log_scale

        zeros = tf.zeros_like(known)
        _, out, log_scale = tf.while_loop(
            lambda i, *_: i < self._size, body, (tf.constant(0), zeros, zeros),
            maximum_iterations=self._size,
        )
        return out, log_scale

    def _transform(self, t, conditional_input, arg, inverse: bool):
        """`t` mapped in the requested direction and log|det d(latent)/d(data)| (the `ildj`) per example."""
        t = self._check_event(t, arg)
        flat, c, batch_shape = self._flatten_batch(t, conditional_input)
        one_pass = inverse != self._iaf  # maf inverts in one pass, iaf goes forward in one pass
        if one_pass:
            out, log_scale = self._one_pass(flat, c, inverse)
        else:
            out, log_scale = self._sequential(flat, c, inverse)
        out = tf.reshape(out, tf.concat([batch_shape, [self._size]], 0))
        ildj = -tf.reshape(tf.reduce_sum(log_scale, axis=-1), batch_shape)
        return out, ildj

    def _augmented_forward(self, x, conditional_input=None):
        y, ildj = self._transform(x, conditional_input, "x", inverse=False)
        return y, {"ildj": ildj}

    def _augmented_inverse(self, y, conditional_input=None):
        x, ildj = self._transform(y, conditional_input, "y", inverse=True)
        return x, {"ildj": ildj}

    def _forward(self, x, conditional_input=None):
        return self._augmented_forward(x, conditional_input)[0]

    def _inverse(self, y, conditional_input=None):
        return self._augmented_inverse(y, conditional_input)[0]

    # TFP looks in its cache before calling these: they run only for points this bijector has not mapped (in
    # this trace or eager scoring call).
    def _forward_log_det_jacobian(self, x, conditional_input=None):
        if self._iaf:  # the network reads x (the latent side): one pass, no need to map x
            flat, c, batch_shape = self._flatten_batch(self._check_event(x, "x"), conditional_input)
            return tf.reshape(tf.reduce_sum(self._shift_log_scale(flat, c)[1], axis=-1), batch_shape)
        return -self._augmented_forward(x, conditional_input)[1]["ildj"]  # the sequential pass

    def _inverse_log_det_jacobian(self, y, conditional_input=None):
        if not self._iaf:  # the network reads y (the data side): one pass
            flat, c, batch_shape = self._flatten_batch(self._check_event(y, "y"), conditional_input)
            return -tf.reshape(tf.reduce_sum(self._shift_log_scale(flat, c)[1], axis=-1), batch_shape)
        return self._augmented_inverse(y, conditional_input)[1]["ildj"]


class InverseAutoregressive(MaskedAutoregressive):
    """`MaskedAutoregressive` with `direction="iaf"`: sampling (`forward`) in one pass, `inverse` sequential.

    The bijector for variational surrogates (`tfp.vi.fit_surrogate_posterior`): they draw samples and score
    those same samples, which TFP's cache answers without running the network again (see `MaskedAutoregressive`).

    Example:
      >>> iaf = InverseAutoregressive(event_shape=[3], hidden_units=(32, 32))
      >>> x = iaf.forward(tf.random.normal([10, 3]))          # one network call
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        network: keras.layers.Layer | Callable | None = None,
        hidden_units: Sequence[int] = (64, 64),
        input_order: str | Sequence[int] = "left-to-right",
        activation: str = "relu",
        log_scale_bound: str = "tanh",
        conditional_shape: Sequence[int] | None = None,
        dtype=tf.float32,
        seed: int | None = None,
        validate_args: bool = False,
        name: str | None = None,
    ):
        parameters = dict(locals())
        parameters["direction"] = "iaf"
        self._setup(parameters)
