"""GLOW: multi-scale ActNorm -> invertible 1x1 convolution -> coupling steps on images."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import tensorflow_probability as tfp

from tfp_nvp.bijectors._base import as_shape
from tfp_nvp.bijectors.actnorm import ActNorm
from tfp_nvp.bijectors.conditional_affine import ConditionalAffine
from tfp_nvp.bijectors.conv1x1 import Invertible1x1Conv
from tfp_nvp.bijectors.coupling import AffineCoupling
from tfp_nvp.bijectors.factor_out import FactorOut, OnChannels
from tfp_nvp.bijectors.logit import LogitTransform
from tfp_nvp.bijectors.spline import SplineCoupling
from tfp_nvp.bijectors.squeeze import Squeeze
from tfp_nvp.flows._base import _chain_type, _check_base, _flag, _Flow, _positive, _remember
from tfp_nvp.nn import ConvResNet, network_dtype

tfb, tfd = tfp.bijectors, tfp.distributions

__all__ = ["glow"]


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

    Mixed precision: with a mixed global Keras policy (`keras.mixed_precision.set_global_policy("mixed_bfloat16")`
    or `"mixed_float16"`) set before building, a float32 flow's networks take that policy (float32 weights,
    low-precision compute; their outputs are cast back to float32), while the bijector math, parameter layers,
    log-dets and `log_prob` stay float32; a float64 flow stays float64 (`tfp_nvp.nn.network_dtype`).

    Example:
      >>> flow = glow([8, 8, 1], num_levels=2, num_steps_per_level=2, hidden_channels=32)
      >>> flow.sample(4, seed=0).shape
      TensorShape([4, 8, 8, 1])
    """
    image_shape = as_shape(image_shape, "image_shape", rank=3)
    num_levels = _positive(num_levels, "num_levels")
    num_steps = _positive(num_steps_per_level, "num_steps_per_level")
    hidden_channels = _positive(hidden_channels, "hidden_channels")
    _check_levels(image_shape, num_levels, exit_fraction)
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
    if logit_alpha is not None and (isinstance(logit_alpha, bool) or not isinstance(logit_alpha, (int, float))
                                    or not 0.0 <= logit_alpha < 0.5):
        raise ValueError(f"`logit_alpha` must be in [0, 0.5) or None; got {logit_alpha!r}.")
    parts = _GlowParts(num_levels=num_levels, num_steps=num_steps, hidden_channels=hidden_channels,
                       num_blocks=num_blocks, exit_fraction=exit_fraction, lu_decomposed=lu_decomposed,
                       log_scale_bound=log_scale_bound, l2=l2, conditional_shape=conditional_shape,
                       coupling=coupling, num_bins=num_bins, bound=bound, dtype=dtype, seed=seed,
                       validate_args=validate_args, name=name, chain_type=_chain_type(invertible_backprop))
    bijector = parts.level(image_shape, 0)
    support = None
    if logit_alpha is not None:
        # Parameter-free, so sharing TFP's cache between equal instances is harmless here.
        support = LogitTransform(float(logit_alpha), dtype=dtype, validate_args=validate_args, name=f"{name}_logit")
        bijector = parts.chain_type([support, bijector], validate_args=validate_args, name=name)
    base = _check_base(base_distribution, image_shape, dtype)
    dist = _Flow(base, bijector, support=support, validate_args=validate_args, name=name)
    if base_distribution is not None:
        config["base_distribution"] = "custom"
    return _remember(dist, "glow", config)


def _check_levels(image_shape, num_levels: int, exit_fraction: float) -> None:
    """Every level must halve H and W and let a whole number of channels exit."""
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


@dataclasses.dataclass
class _GlowParts:
    """Builds GLOW's levels from the (checked) arguments of `glow`; one instance per flow."""

    num_levels: int
    num_steps: int
    hidden_channels: int
    num_blocks: int
    exit_fraction: float
    lu_decomposed: bool
    log_scale_bound: str
    l2: float
    conditional_shape: Sequence[int] | None
    coupling: str
    num_bins: int
    bound: float
    dtype: str
    seed: int | None
    validate_args: bool
    name: str
    chain_type: type
    _draws: int = 0

    def next_seed(self):
        """Seeds in construction order, so a seeded GLOW always gets the same initial weights."""
        if self.seed is None:
            return None
        self._draws += 1
        return int(self.seed) + 7919 * (self._draws - 1)

    def make_coupling(self, inner, net, flip, coupling_name):
        common = dict(network=net, mask="channel", flip=flip, conditional_shape=self.conditional_shape,
                      dtype=self.dtype, validate_args=self.validate_args, name=coupling_name)
        if self.coupling == "spline":
            return SplineCoupling(inner, num_bins=self.num_bins, bound=self.bound, **common)
        return AffineCoupling(inner, log_scale_bound=self.log_scale_bound, **common)

    def step(self, inner, index, step):
        """ActNorm -> invertible 1x1 convolution -> coupling, listed data side first."""
        prefix = f"{self.name}_l{index}_s{step}"
        net = ConvResNet(hidden_channels=self.hidden_channels, num_blocks=self.num_blocks, l2=self.l2,
                         seed=self.next_seed(), dtype=network_dtype(self.dtype), name=f"{prefix}_net")
        return [
            ActNorm(inner, dtype=self.dtype, validate_args=self.validate_args, name=f"{prefix}_actnorm"),
            Invertible1x1Conv(inner, lu_decomposed=self.lu_decomposed, seed=self.next_seed(), dtype=self.dtype,
                              validate_args=self.validate_args, name=f"{prefix}_conv1x1"),
            self.make_coupling(inner, net, step % 2 == 1, f"{prefix}_coupling"),
        ]

    def level(self, shape, index):
        """Level `index` on images of `shape`: squeeze, steps, then a split and the next level (or the top)."""
        name, validate_args = self.name, self.validate_args
        squeeze = Squeeze(shape, validate_args=validate_args, name=f"{name}_l{index}_squeeze")
        h, w, c = squeeze.forward_event_shape(shape).as_list()
        inner = (h, w, c)
        # Listed data side first: tfb.Chain's inverse (the density pass) runs left to right.
        parts = [tfb.Invert(squeeze, validate_args=validate_args)]
        for step in range(self.num_steps):
            parts += self.step(inner, index, step)
        if index < self.num_levels - 1:
            split = FactorOut(inner, exit_fraction=self.exit_fraction, conditional_shape=self.conditional_shape,
                              dtype=self.dtype, validate_args=validate_args, name=f"{name}_l{index}_split")
            kept = c - split.num_exit_channels
            parts += [split, OnChannels(self.level((h, w, kept), index + 1), kept, inner,
                                        validate_args=validate_args, name=f"{name}_l{index}_next")]
        elif self.conditional_shape is not None:
            # Last in the density pass of the top level: the latent it leaves is N(shift(c), scale(c)^2).
            parts.append(ConditionalAffine(inner, self.conditional_shape, hidden_units=(self.hidden_channels,),
                                           dtype=self.dtype, validate_args=validate_args,
                                           name=f"{name}_top_prior"))
        parts.append(squeeze)
        return self.chain_type(parts, validate_args=validate_args, name=f"{name}_level_{index}")
