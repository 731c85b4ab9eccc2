"""Builders that chain bijectors into `tfd.TransformedDistribution`s."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
# The class `tfd.TransformedDistribution(...)` actually returns for bijectors that are not CompositeTensors (ours
# are not); subclassing the public class would make the flow a CompositeTensor that cannot build its type spec.
from tensorflow_probability.python.distributions.transformed_distribution import _TransformedDistribution

from tfp_nvp.bijectors._base import as_shape, cache_in_traces_only, check_dtype, check_event, one_call
from tfp_nvp.bijectors.actnorm import ActNorm
from tfp_nvp.bijectors.conditional_affine import ConditionalAffine
from tfp_nvp.bijectors.conv1x1 import Invertible1x1Conv
from tfp_nvp.bijectors.coupling import AffineCoupling
from tfp_nvp.bijectors.factor_out import FactorOut, OnChannels
from tfp_nvp.bijectors.invertible_chain import InvertibleChain
from tfp_nvp.bijectors.leaky_relu import LeakyReLU
from tfp_nvp.bijectors.logit import LogitTransform
from tfp_nvp.bijectors.spline import SplineCoupling
from tfp_nvp.bijectors.squeeze import Squeeze
from tfp_nvp.networks import ConvResNet, DenseNetwork

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["real_nvp", "glow", "spline_flow", "standard_normal", "conditional_kwargs", "flow_bijectors", "BUILDERS"]


def standard_normal(event_shape: Sequence[int], dtype=tf.float32) -> tfd.Distribution:
    """`N(0, I)` with the given event shape (the default base of every builder)."""
    event_shape = as_shape(event_shape, "event_shape")
    zeros = tf.zeros(event_shape, dtype=dtype)
    return tfd.Independent(tfd.Normal(zeros, tf.ones_like(zeros)), reinterpreted_batch_ndims=len(event_shape))


def _check_base(base, event_shape, dtype):
    if base is None:
        return standard_normal(event_shape, dtype)
    if not isinstance(base, tfd.Distribution):
        raise ValueError(f"`base_distribution` must be a tfd.Distribution; got {type(base).__name__}.")
    if tuple(base.event_shape.as_list()) != tuple(event_shape):
        raise ValueError(
            f"`base_distribution` must have event_shape {list(event_shape)}; got {base.event_shape}."
        )
    return base


class _Flow(_TransformedDistribution):
    """The distribution the builders return: TFP's transformed distribution plus checks on the data it scores.

    `log_prob` (and `prob`) reject data of the wrong event shape or dtype with one message naming `x` and the
    flow, instead of an error from whichever bijector meets the data first; with `validate_args=True` they also
    raise `InvalidArgumentError` for non-finite data. With `support` (a bijector with `outside_support`, the one
    nearest the data) data outside the flow's image gets log-density `-inf`: the flow puts no mass there. Those
    points are swapped for an interior point before the flow runs and their result is then replaced (the
    double-where pattern), so a batch mixing both kinds has finite log-densities and gradients for the rest.

    Finite data whose latent leaves the floating-point range (a trained flow can expand a point far from its
    training data by more than the largest float, through ActNorm, 1x1-convolution or unbounded coupling
    scales, or a coupling's shift) also get `-inf`: the base density at such a latent underflows every float,
    whatever the log-determinant. Arithmetic on the overflowed values would otherwise give NaN.
    """

    def __init__(self, distribution, bijector, support=None, validate_args=False, name=None):
        parameters = dict(locals())
        self._support = support
        cache_in_traces_only(bijector)
        super().__init__(distribution, bijector, validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # `support` is a parameter-free bijector of the architecture: the batchable parts are the parent's.
        return _TransformedDistribution._parameter_properties(dtype, num_classes=num_classes)

    # TFP's log_prob runs the flow's inverse and then asks for its log-det at the same tensors; `one_call` lets
    # eager calls reuse those results as traced ones do (one network pass, not two or more), and forgets them
    # when the call returns.
    def _log_prob(self, x, **kwargs):
        with one_call():
            return self._checked_log_prob(x, **kwargs)

    def _sample_and_log_prob(self, sample_shape, seed, **kwargs):
        with one_call():
            return super()._sample_and_log_prob(sample_shape, seed=seed, **kwargs)

    def _checked_log_prob(self, x, **kwargs):
        check_dtype(f"{self.name}.log_prob", x, "x", self.dtype)
        # With validate_args the flow computes from the checked `x`, so no layer (an initialising ActNorm)
        # acts on data that fails a check.
        x = check_event(self, x, "x", self.event_shape.as_list())
        if self._support is None:
            return self._log_prob_in_range(x, **kwargs)
        outside = self._support.outside_support(x)
        if self.validate_args:
            check = tf.debugging.Assert(
                tf.logical_not(tf.reduce_any(outside)),
                [f"`x` passed to {self.name}.log_prob must lie in the open interval "
                 f"({self._support.low:.6g}, {self._support.high:.6g}), the support of the flow (data in [0, 1) "
                 "is inside); min and max given:", tf.reduce_min(x), tf.reduce_max(x)],
                name="assert_in_support",
            )
            with tf.control_dependencies([check]):
                x = tf.identity(x)
        inside_point = tf.constant(0.5 * (self._support.low + self._support.high), x.dtype)
        safe = tf.where(outside, inside_point, x)
        event_axes = list(range(-self.event_shape.rank, 0))
        any_outside = tf.reduce_any(outside, axis=event_axes)
        log_prob = self._log_prob_in_range(safe, **kwargs)
        return tf.where(any_outside, tf.constant(-np.inf, log_prob.dtype), log_prob)

    def _log_prob_in_range(self, x, **kwargs):
        """The change of variables, `-inf` where finite `x` has a latent beyond the floating-point range."""
        # TFP's own inverse call inside the parent's log_prob finds this result in the bijector's cache (same
        # tensor, same arguments; eagerly too, within `one_call`), so the flow still runs once.
        latent = self.bijector.inverse(x, **self._kwargs_split_fn(kwargs)[1])
        log_prob = super()._log_prob(x, **kwargs)
        finite_data = tf.reduce_all(tf.math.is_finite(x), axis=list(range(-self.event_shape.rank, 0)))
        finite_latent = tf.reduce_all(tf.math.is_finite(latent),
                                      axis=list(range(-self.distribution.event_shape.rank, 0)))
        # NaN data keeps its NaN (validate_args is the way to reject it); only overflow becomes -inf.
        overflow = finite_data & tf.logical_not(finite_latent)
        return tf.where(overflow, tf.constant(-np.inf, log_prob.dtype), log_prob)


# Version of the builder specs written into `.keras` files. 2: the "sigmoid" log-scale bound scales the
# data -> latent pass (GLOW's orientation); specs without a format were written when it scaled the other one.
SPEC_FORMAT = 2


def _remember(dist, builder: str, config: dict):
    # FlowModel.get_config needs to rebuild the same flow when a `.keras` file is loaded.
    dist._tfp_nvp_spec = {"builder": builder, "config": config, "format": SPEC_FORMAT}
    return dist


def from_spec(spec: dict):
    """The flow a builder spec (what `FlowModel` and `FlowLayer` write into `.keras` files) describes.

    Refuses, with the reason, specs this version would rebuild into a different function: those of unknown
    builders, of a newer format, and the "sigmoid" log-scale bound of files written before its orientation
    was GLOW's (their weights were trained for the inverse transformer; loading them would silently change
    every density the model gives).
    """
    builder, config, version = spec.get("builder"), spec.get("config", {}), spec.get("format", 1)
    if builder not in BUILDERS:
        raise ValueError(f"The saved flow names builder {builder!r}, which this tfp_nvp does not have "
                         f"(it has {', '.join(sorted(BUILDERS))}).")
    if version > SPEC_FORMAT:
        raise ValueError(f"The saved {builder} flow was written by a newer tfp_nvp (spec format {version}; this "
                         f"version reads up to {SPEC_FORMAT}): upgrade tfp_nvp to load it.")
    if version < 2 and config.get("log_scale_bound") == "sigmoid":
        raise ValueError(
            f"The saved {builder} flow uses log_scale_bound='sigmoid' and was written by a tfp_nvp older than "
            "2026-11-27, whose sigmoid bound scaled the latent -> data pass; this version scales the data -> "
            "latent pass (GLOW's orientation), so its weights would give different densities and samples. "
            f"Retrain it, or rebuild the flow with tfp_nvp.{builder}(...) and call load_weights to start "
            "from its weights.")
    return BUILDERS[builder](**config)


# `real_nvp`'s network for vector events when none is given (benchmarks/defaults.py measured the choice).
REAL_NVP_VECTOR_DEFAULTS = dict(num_coupling_layers=16, hidden_units=(64, 64))


def real_nvp(
    event_shape: Sequence[int],
    num_coupling_layers: int | None = None,
    hidden_units: Sequence[int] | None = None,
    mask: str | None = None,
    log_scale_bound: str = "tanh",
    separate_towers: bool = False,
    activation: str = "relu",
    l2: float = 0.0,
    num_blocks: int = 2,
    mixing: str | None = None,
    conditional_shape: Sequence[int] | None = None,
    base_distribution: tfd.Distribution | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    validate_args: bool = False,
    name: str = "real_nvp",
    invertible_backprop: bool = False,
    leaky_relu: float | str | None = None,
) -> tfd.TransformedDistribution:
    """RealNVP: a chain of affine couplings whose mask flips from layer to layer.

    Vector events `[D]` use dense networks (`hidden_units`, `activation`, `separate_towers`); image events
    `[H, W, C]` use convolutional ResNets (`hidden_units[0]` channels, `num_blocks` residual blocks).
    Defaults: 16 couplings of `(64, 64)` for vectors (on two moons, deep and narrow beat 8 couplings of
    `(128, 128)` at equal training time), 8 couplings of 128 channels for images.
    `mask` defaults to `"half"` for vectors and `"checkerboard"` for images. `mixing="conv1x1"` puts a learned
    `Invertible1x1Conv` (LU, random-rotation start) between consecutive couplings, so the split the couplings
    see is learned rather than fixed (GLOW's replacement for permutations); `None` uses only the mask flips.
    `leaky_relu` puts an elementwise `tfp_nvp.LeakyReLU` between consecutive couplings (as in flows that
    alternate couplings with a leaky-ReLU layer): a number fixes its negative-side slope (e.g. 0.5);
    `"learnable"` learns one slope per entry, starting at 1 (the identity, so the flow still starts as one).
    Couplings are named
    `f"{name}_coupling_{i}"`; with `conditional_shape` set, pass the condition with
    `bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c)`.

    Returns a `tfd.TransformedDistribution` (base `N(0, I)` unless `base_distribution` is given) whose
    `sample`, `log_prob` and `prob` come from TFP; `forward` maps base samples to data. `log_prob` rejects data
    of the wrong event shape or dtype (cast float64 data to a float32 flow yourself); `validate_args=True` makes
    it and every bijector also raise `InvalidArgumentError` for non-finite data (at some cost per call).
    `invertible_backprop=True` chains the couplings with `tfp_nvp.InvertibleChain`: training gradients are
    recomputed by inverting the flow step by step instead of from stored activations, so activation memory stays
    flat in depth (about two extra passes of compute; gradients equal up to float32 reconstruction error).

    Example:
      >>> flow = real_nvp([2], num_coupling_layers=6, hidden_units=(64, 64))
      >>> flow.log_prob(flow.sample(3, seed=1)).shape
      TensorShape([3])
    """
    event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
    vector = len(event_shape) == 1
    if num_coupling_layers is None:
        num_coupling_layers = REAL_NVP_VECTOR_DEFAULTS["num_coupling_layers"] if vector else 8
    if hidden_units is None:
        hidden_units = REAL_NVP_VECTOR_DEFAULTS["hidden_units"] if vector else (128,)
    if isinstance(num_coupling_layers, bool) or int(num_coupling_layers) != num_coupling_layers \
            or num_coupling_layers <= 0:
        raise ValueError(f"`num_coupling_layers` must be a positive integer; got {num_coupling_layers!r}.")
    hidden = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
    config = dict(
        event_shape=list(event_shape), num_coupling_layers=int(num_coupling_layers), hidden_units=list(hidden),
        mask=mask, log_scale_bound=log_scale_bound, separate_towers=separate_towers, activation=activation,
        l2=l2, num_blocks=num_blocks, mixing=mixing,
        conditional_shape=None if conditional_shape is None else list(conditional_shape),
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
        invertible_backprop=_flag(invertible_backprop, "invertible_backprop"),
    )
    if mixing not in (None, "conv1x1"):
        raise ValueError(f"`mixing` must be None or 'conv1x1'; got {mixing!r}.")
    if leaky_relu is not None:
        if isinstance(leaky_relu, str):
            if leaky_relu != "learnable":
                raise ValueError(f"`leaky_relu` must be None, a slope > 0 or 'learnable'; got {leaky_relu!r}.")
        elif isinstance(leaky_relu, bool) or not isinstance(leaky_relu, (int, float, np.integer, np.floating)) \
                or not np.isfinite(leaky_relu) or leaky_relu <= 0:
            raise ValueError(f"`leaky_relu` must be None, a slope > 0 or 'learnable'; got {leaky_relu!r}.")
        # Recorded only when used, so the configuration of a flow without it stays what it always was.
        config["leaky_relu"] = leaky_relu if isinstance(leaky_relu, str) else float(leaky_relu)
    image = len(event_shape) == 3
    mask = mask or ("checkerboard" if image else "half")
    base = _check_base(base_distribution, event_shape, dtype)
    couplings = []
    for i in range(int(num_coupling_layers)):
        layer_seed = None if seed is None else int(seed) + 1000 * i
        if image:
            net = ConvResNet(hidden_channels=max(hidden), num_blocks=num_blocks, l2=l2, seed=layer_seed,
                             dtype=dtype, name=f"{name}_net_{i}")
        else:
            net = DenseNetwork(hidden, activation=activation, separate_towers=separate_towers, l2=l2,
                               seed=layer_seed, dtype=dtype, name=f"{name}_net_{i}")
        if leaky_relu is not None and i > 0:
            learnable = leaky_relu == "learnable"
            couplings.append(LeakyReLU(1.0 if learnable else float(leaky_relu), learnable=learnable,
                                       shape=tuple(event_shape) if learnable else (), dtype=dtype,
                                       validate_args=validate_args, name=f"{name}_leaky_relu_{i}"))
        if mixing == "conv1x1" and i > 0:
            couplings.append(Invertible1x1Conv(event_shape, seed=None if seed is None else int(seed) + 1000 * i + 1,
                                               dtype=dtype, validate_args=validate_args, name=f"{name}_mixing_{i}"))
        couplings.append(
            AffineCoupling(event_shape, network=net, mask=mask, flip=i % 2 == 1, log_scale_bound=log_scale_bound,
                           conditional_shape=conditional_shape, dtype=dtype, validate_args=validate_args,
                           name=f"{name}_coupling_{i}")
        )
    # tfb.Chain's forward applies its list right to left, so sampling runs coupling_0 first and the density
    # (inverse) pass runs it last.
    chain_type = _chain_type(invertible_backprop)
    chain = chain_type(list(reversed(couplings)), validate_args=validate_args, name=name)
    dist = _Flow(base, chain, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return _remember(dist, "real_nvp", config)


def _chain_type(invertible_backprop: bool):
    """The chain class a builder puts its steps in: `InvertibleChain` for invertible backprop, else `tfb.Chain`."""
    return InvertibleChain if invertible_backprop else tfb.Chain


def _flag(value, name) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return bool(value)


def _positive(value, name):
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def glow(
    image_shape: Sequence[int],
    num_levels: int = 2,
    num_steps_per_level: int = 4,
    hidden_channels: int = 64,
    num_blocks: int = 1,
    exit_fraction: float = 0.5,
    lu_decomposed: bool = True,
    log_scale_bound: str = "tanh",
    l2: float = 0.0,
    logit_alpha: float | None = 0.05,
    conditional_shape: Sequence[int] | None = None,
    coupling: str = "affine",
    num_bins: int = 8,
    bound: float = 4.0,
    base_distribution: tfd.Distribution | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    validate_args: bool = False,
    name: str = "glow",
    invertible_backprop: bool = False,
) -> tfd.TransformedDistribution:
    """GLOW (Kingma & Dhariwal, 2018): a multi-scale flow of ActNorm -> invertible 1x1 conv -> affine coupling.

    From data to latent, each level squeezes its input (2x2 space-to-depth), runs `num_steps_per_level` steps,
    and, except at the last level, lets `exit_fraction` of the channels leave through a learned conditional
    Gaussian (`FactorOut`, GLOW's split prior) while the next level runs on the kept channels (`OnChannels`).
    Each level unsqueezes at its end, so the latent has `image_shape` and the whole model is one
    `tfd.TransformedDistribution` with a standard normal base. Couplings use a channel mask and a
    `tfp_nvp.networks.ConvResNet` (`hidden_channels`, `num_blocks`, zero-initialised head).

    The model is meant for data in `[0, 1)` (see `tfp_nvp.images.dequantize`). With `logit_alpha` set (the
    default) the data side starts with RealNVP's logit transform `u = logit(alpha + (1 - 2 alpha) x)`
    (`tfp_nvp.bijectors.logit.LogitTransform`, log-det included), so the flow models unbounded values. Its
    support is the open interval `(-alpha, 1 - alpha) / (1 - 2 alpha)`, slightly wider than `[0, 1)`: samples land there
    (clip them for display), the mass outside the cube only makes bits/dim an upper bound, and `log_prob` is
    `-inf` for data with any value outside it (or, with `validate_args=True`, raises `InvalidArgumentError`).
    `None` models `x` directly. `log_prob` rejects data of the wrong shape or dtype; `validate_args=True` also
    checks that data are finite, inside every bijector too. ActNorm layers initialise from the first data batch
    (`tfp_nvp.initialize`). H and W must be divisible by `2 ** num_levels`.

    `conditional_shape=[m]` makes a conditional GLOW `p(x | c)` for a context vector `c` (e.g. a one-hot class
    label): every coupling network sees `c` broadcast over the image, every split prior predicts its mean and
    log-scale from the kept channels and `c` (`FactorOut(conditional_shape=...)`), and the top level ends in a
    `tfp_nvp.ConditionalAffine` named `f"{name}_top_prior"`, whose shift and log-scale come from `c` through a
    small dense network (`hidden_channels` wide): on a standard normal base that is a conditional Gaussian
    top-level prior. Pass `c` with `bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c)` to `log_prob` and
    `sample`, or as `{"x": x, "conditional_input": c}` to `tfp_nvp.FlowModel`.

    Affine couplings bound their log-scale with `log_scale_bound`: `"tanh"` (the default, `scale * tanh(h)`
    with a learnable `scale`), `"sigmoid"` (GLOW's: the data -> latent pass multiplies by `sigmoid(h + 2)`,
    normalised to 1 at `h = 0`, so it can expand an activation by at most 1.135) or `"none"`. On digits the
    tanh bound reached lower test bits/dim than GLOW's sigmoid in every one of five seeds (README).

    `coupling="spline"` replaces each affine coupling by a `tfp_nvp.SplineCoupling` on the same channel mask
    and network: a monotone rational-quadratic spline of `num_bins` bins on `[-bound, bound]` (the identity
    outside; the ActNorm before each coupling keeps activations near unit scale, so the default 4 covers
    nearly all of them). `log_scale_bound` then has no effect.

    `invertible_backprop=True` builds every level (and the whole flow) as a `tfp_nvp.InvertibleChain`: the
    training gradient rebuilds each step's input by inverting the flow instead of storing activations, so the
    activation memory of a training step stays flat in depth (about two extra passes of compute; gradients
    equal up to float32 reconstruction error; measured in benchmarks/memory.py).

    Example:
      >>> flow = glow([8, 8, 1], num_levels=2, num_steps_per_level=2, hidden_channels=32)
      >>> flow.sample(4, seed=0).shape
      TensorShape([4, 8, 8, 1])
    """
    image_shape = as_shape(image_shape, "image_shape", rank=3)
    num_levels = _positive(num_levels, "num_levels")
    num_steps = _positive(num_steps_per_level, "num_steps_per_level")
    hidden_channels = _positive(hidden_channels, "hidden_channels")
    height, width, _ = image_shape
    factor = 2 ** num_levels
    if height % factor or width % factor:
        raise ValueError(
            f"`image_shape` {list(image_shape)}: H and W must be divisible by 2 ** num_levels = {factor} "
            f"(num_levels={num_levels} squeezes halve them each time)."
        )
    if not 0.0 < exit_fraction < 1.0:
        raise ValueError(f"`exit_fraction` must be in (0, 1); got {exit_fraction!r}.")
    # Level l squeezes to 4 * kept channels; the fraction must leave whole channels at every level that splits.
    channels = 4 * image_shape[-1]
    for index in range(num_levels - 1):
        exiting = channels * exit_fraction
        if abs(exiting - round(exiting)) > 1e-9 or not 0 < round(exiting) < channels:
            valid = [f"{k}/{channels}" for k in range(1, channels)]
            raise ValueError(
                f"`exit_fraction` must leave a whole number of channels at every split: level {index} has "
                f"{channels} channels, so it must be one of {', '.join(valid)}; got {exit_fraction!r}."
            )
        channels = 4 * (channels - int(round(exiting)))
    config = dict(
        image_shape=list(image_shape), num_levels=num_levels, num_steps_per_level=num_steps,
        hidden_channels=hidden_channels, num_blocks=num_blocks, exit_fraction=exit_fraction,
        lu_decomposed=lu_decomposed, log_scale_bound=log_scale_bound, l2=l2, logit_alpha=logit_alpha,
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
        invertible_backprop=_flag(invertible_backprop, "invertible_backprop"),
    )
    if coupling not in ("affine", "spline"):
        raise ValueError(f"`coupling` must be 'affine' or 'spline'; got {coupling!r}.")
    if coupling == "spline":
        # Only spline flows record these, so the configuration of an affine GLOW stays what it always was.
        config.update(coupling=coupling, num_bins=num_bins, bound=bound)
    if conditional_shape is not None:
        # Checked here so the message names the builder's argument, not the first coupling.
        conditional_shape = as_shape(conditional_shape, "conditional_shape")
        if len(conditional_shape) != 1:
            raise ValueError(f"`conditional_shape` must be [m], the shape of a context vector; got "
                             f"{list(conditional_shape)}.")
        config["conditional_shape"] = list(conditional_shape)
    chain_type = _chain_type(invertible_backprop)
    if logit_alpha is not None and (isinstance(logit_alpha, bool) or not isinstance(logit_alpha, (int, float))
                                    or not 0.0 <= logit_alpha < 0.5):
        raise ValueError(f"`logit_alpha` must be in [0, 0.5) or None; got {logit_alpha!r}.")
    counter = iter(range(10**6))

    def next_seed():
        return None if seed is None else int(seed) + 7919 * next(counter)

    def make_coupling(inner, net, flip, coupling_name):
        if coupling == "spline":
            return SplineCoupling(inner, network=net, mask="channel", flip=flip, num_bins=num_bins, bound=bound,
                                  conditional_shape=conditional_shape, dtype=dtype, validate_args=validate_args,
                                  name=coupling_name)
        return AffineCoupling(inner, network=net, mask="channel", flip=flip, log_scale_bound=log_scale_bound,
                              conditional_shape=conditional_shape, dtype=dtype, validate_args=validate_args,
                              name=coupling_name)

    def level(shape, index):
        squeeze = Squeeze(shape, validate_args=validate_args, name=f"{name}_l{index}_squeeze")
        h, w, c = squeeze.forward_event_shape(shape).as_list()
        inner = (h, w, c)
        # Listed data side first: tfb.Chain's inverse (the density pass) runs left to right.
        parts = [tfb.Invert(squeeze, validate_args=validate_args)]
        for step in range(num_steps):
            prefix = f"{name}_l{index}_s{step}"
            net = ConvResNet(hidden_channels=hidden_channels, num_blocks=num_blocks, l2=l2, seed=next_seed(),
                             dtype=dtype, name=f"{prefix}_net")
            parts += [
                ActNorm(inner, dtype=dtype, validate_args=validate_args, name=f"{prefix}_actnorm"),
                Invertible1x1Conv(inner, lu_decomposed=lu_decomposed, seed=next_seed(), dtype=dtype,
                                  validate_args=validate_args, name=f"{prefix}_conv1x1"),
                make_coupling(inner, net, step % 2 == 1, f"{prefix}_coupling"),
            ]
        if index < num_levels - 1:
            split = FactorOut(inner, exit_fraction=exit_fraction, conditional_shape=conditional_shape, dtype=dtype,
                              validate_args=validate_args, name=f"{name}_l{index}_split")
            kept = c - split.num_exit_channels
            parts += [split, OnChannels(level((h, w, kept), index + 1), kept, inner, validate_args=validate_args,
                                        name=f"{name}_l{index}_next")]
        elif conditional_shape is not None:
            # Last in the density pass of the top level: the latent it leaves is N(shift(c), scale(c)^2).
            parts.append(ConditionalAffine(inner, conditional_shape, hidden_units=(hidden_channels,), dtype=dtype,
                                           validate_args=validate_args, name=f"{name}_top_prior"))
        parts.append(squeeze)
        return chain_type(parts, validate_args=validate_args, name=f"{name}_level_{index}")

    base = _check_base(base_distribution, image_shape, dtype)
    bijector = level(image_shape, 0)
    support = None
    if logit_alpha is not None:
        # Parameter-free, so sharing TFP's cache between equal instances is harmless here.
        support = LogitTransform(float(logit_alpha), dtype=dtype, validate_args=validate_args, name=f"{name}_logit")
        bijector = chain_type([support, bijector], validate_args=validate_args, name=name)
    dist = _Flow(base, bijector, support=support, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return _remember(dist, "glow", config)


def spline_flow(
    event_shape: Sequence[int],
    num_coupling_layers: int = 4,
    hidden_units: Sequence[int] = (128, 128),
    num_bins: int = 8,
    bound: float = 4.0,
    mask: str | None = None,
    min_bin_width: float = 1e-3,
    min_slope: float = 1e-3,
    separate_towers: bool = False,
    activation: str = "relu",
    l2: float = 0.0,
    num_blocks: int = 2,
    mixing: str | None = None,
    conditional_shape: Sequence[int] | None = None,
    base_distribution: tfd.Distribution | None = None,
    dtype: str = "float32",
    seed: int | None = None,
    validate_args: bool = False,
    name: str = "spline_flow",
    invertible_backprop: bool = False,
) -> tfd.TransformedDistribution:
    """Neural spline flow: a chain of rational-quadratic spline couplings whose mask flips from layer to layer.

    The same layout and arguments as `real_nvp`, with `tfp_nvp.SplineCoupling` in place of the affine
    coupling: each transformed entry goes through a monotone spline of `num_bins` bins on `[-bound, bound]`
    (the identity outside, so put `bound` where standardised data and the base's mass lie; 4 covers all but
    6e-5 of a standard normal), with `min_bin_width` and `min_slope` as numerical guards. Splines bend where
    an affine map only scales, so a few spline couplings often match many affine ones. Couplings are named
    `f"{name}_coupling_{i}"`; with `conditional_shape` set, pass the condition with
    `bijector_kwargs=tfp_nvp.conditional_kwargs(flow, c)`. Saved and reloaded like `real_nvp` (`FlowModel`
    `.keras` files and weights). `invertible_backprop=True` chains the couplings with
    `tfp_nvp.InvertibleChain`, as in `real_nvp`: training memory flat in depth for about two extra passes.

    Example:
      >>> flow = spline_flow([2], num_coupling_layers=4, hidden_units=(64, 64), num_bins=8)
      >>> flow.log_prob(flow.sample(3, seed=1)).shape
      TensorShape([3])
    """
    event_shape = as_shape(event_shape, "event_shape", rank=(1, 3))
    num_layers = _positive(num_coupling_layers, "num_coupling_layers")
    hidden = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
    config = dict(
        event_shape=list(event_shape), num_coupling_layers=num_layers, hidden_units=list(hidden),
        num_bins=num_bins, bound=bound, mask=mask, min_bin_width=min_bin_width, min_slope=min_slope,
        separate_towers=separate_towers, activation=activation, l2=l2, num_blocks=num_blocks, mixing=mixing,
        conditional_shape=None if conditional_shape is None else list(conditional_shape),
        dtype=dtype, seed=seed, validate_args=bool(validate_args), name=name,
        invertible_backprop=_flag(invertible_backprop, "invertible_backprop"),
    )
    if mixing not in (None, "conv1x1"):
        raise ValueError(f"`mixing` must be None or 'conv1x1'; got {mixing!r}.")
    image = len(event_shape) == 3
    mask = mask or ("checkerboard" if image else "half")
    base = _check_base(base_distribution, event_shape, dtype)
    couplings = []
    for i in range(num_layers):
        layer_seed = None if seed is None else int(seed) + 1000 * i
        if image:
            net = ConvResNet(hidden_channels=max(hidden), num_blocks=num_blocks, l2=l2, seed=layer_seed,
                             dtype=dtype, name=f"{name}_net_{i}")
        else:
            net = DenseNetwork(hidden, activation=activation, separate_towers=separate_towers, l2=l2,
                               seed=layer_seed, dtype=dtype, name=f"{name}_net_{i}")
        if mixing == "conv1x1" and i > 0:
            couplings.append(Invertible1x1Conv(event_shape, seed=None if seed is None else int(seed) + 1000 * i + 1,
                                               dtype=dtype, validate_args=validate_args, name=f"{name}_mixing_{i}"))
        couplings.append(
            SplineCoupling(event_shape, network=net, mask=mask, flip=i % 2 == 1, num_bins=num_bins, bound=bound,
                           min_bin_width=min_bin_width, min_slope=min_slope, conditional_shape=conditional_shape,
                           dtype=dtype, validate_args=validate_args, name=f"{name}_coupling_{i}")
        )
    # As in real_nvp: sampling runs coupling_0 first, the density pass runs it last.
    chain_type = _chain_type(invertible_backprop)
    chain = chain_type(list(reversed(couplings)), validate_args=validate_args, name=name)
    dist = _Flow(base, chain, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return _remember(dist, "spline_flow", config)


BUILDERS = {"real_nvp": real_nvp, "glow": glow, "spline_flow": spline_flow}


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


def _is_conditional(flow) -> bool:
    return bool(_route(_root_bijector(flow), None))
