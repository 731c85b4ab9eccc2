"""Property-based tests: every public bijector and builder on random shapes, masks, depths, bounds and weights.

Hypothesis draws the structure of each configuration (event shape, mask, flip, log-scale bound, depth, dtype,
...) and a seed from which the weights and the points are drawn. Every configuration is built in float64 with
random, non-identity weights (`randomize_variables`; ActNorm is initialised from random data) and checked for

* bijectivity: `inverse(forward(z)) = z` and `forward(inverse(x)) = x`, every output and log-det finite;
* both log-dets against `log|det J|` of the autodiff Jacobian (`flat_log_det`), within 1e-6;
* `fldj(z) = -ildj(forward(z))`;
* for the builders, `log_prob(x) = log N(inverse(x); 0, I) + log|det J_inverse(x)|`, the normal density written
  out here and the log-det taken from the autodiff Jacobian.

When hypothesis draws float32, a float32 twin with the same weights is built as well; its round trips are
checked at a float32 tolerance and its outputs and log-dets against the float64 model's. All round trips and
comparisons use fresh tensors, so TFP's bijector cache can never return the input it was given.

Round trips and float32 comparisons use the mixed error `max |a - b| / (1 + |b|)` (1e-9 in float64, 1e-3 in
float32); log-dets and log_prob use the absolute error (1e-6, float64).

Profiles (registered in tests/conftest.py):

* `ci` (default): 6 examples for a single bijector, fewer for the costly flows (`share`), with
  `derandomize=True` so every run checks the same configurations; no shrinking. About 80 s on 2 cores.
* `slow`: about seven times as many fresh random examples, shrunk to a minimal one on failure (about 7.5
  CPU-minutes; 7.5 minutes wall on 2 cores, longer when they are shared):

      python -m pytest tests/test_properties.py --hypothesis-profile=slow
      HYPOTHESIS_PROFILE=slow python -m pytest tests/test_properties.py

The terminal summary prints a row per bijector: the configurations checked and the largest error of each
property (`round trip`, `fldj=-ildj` per dtype; `ldj-autodiff`; `log_prob-CoV` for the builders; `f32 vs f64`;
`untouched part`: entries a coupling conditions on, channels FactorOut keeps or OnChannels leaves, bit for bit).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tfp_nvp
from conftest import flat_log_det, randomize_variables
from tfp_nvp import (ActNorm, AffineCoupling, FactorOut, Invertible1x1Conv, LeakyReLU, OnChannels, SplineCoupling,
                     Squeeze)
from tfp_nvp import initialize
from tfp_nvp.networks import ConvResNet, DenseNetwork

tfb, tfd = tfp.bijectors, tfp.distributions

# Round trips and float32-vs-float64 agreement, as mixed errors: about 1e4 float32 epsilons, and a float64 bound
# that still fails any float32 rounding slipped into a float64 computation (a cast Python constant is 1e-8 off).
TOLERANCE = {"float32": 1e-3, "float64": 1e-9}
# Log-dets against autodiff and log_prob against change of variables, absolute, float64 only.
LOG_DET_TOLERANCE = 1e-6

DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 2**31 - 1)
BOUNDS = st.sampled_from(["tanh", "sigmoid", "none"])
WEIGHT_SCALES = st.sampled_from([0.5, 1.0])


def share(fraction: float) -> settings:
    """This test's share of the profile's `max_examples`: the costly flows run fewer examples than one bijector.

    Read when the module is imported, after pytest has loaded the chosen profile.
    """
    return settings(max_examples=max(1, round(settings.default.max_examples * fraction)))


# ------------------------------------------------------------------------------------------------ helpers
def fresh(t, dtype=None) -> tf.Tensor:
    """A new tensor holding the values of `t`: TFP's cache keys on tensor identity, so it cannot answer."""
    a = np.asarray(t)
    return tf.constant(a if dtype is None else a.astype(dtype))


def mixed_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected) / (1.0 + np.abs(expected)), initial=0.0))


def abs_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected), initial=0.0))


def all_finite(*tensors) -> bool:
    return all(np.all(np.isfinite(np.asarray(t))) for t in tensors)


def copy_variables(source, target) -> None:
    """Gives `target` (an equal-structure twin of another dtype) the values of every variable of `source`."""
    src, dst = list(source.variables), list(target.variables)
    assert len(src) == len(dst), (len(src), len(dst))
    for s, d in zip(src, dst):
        assert tuple(s.shape) == tuple(d.shape), (s.name, d.name)
        d.assign(s.numpy().astype(d.dtype.as_numpy_dtype))


def well_conditioned(channels: int, rng: np.random.Generator) -> np.ndarray:
    """`Q1 diag(exp(u)) Q2` with Haar rotations and |u| <= 0.5: random, far from identity, condition <= e."""
    q1, _ = np.linalg.qr(rng.normal(size=(channels, channels)))
    q2, _ = np.linalg.qr(rng.normal(size=(channels, channels)))
    return q1 @ np.diag(np.exp(rng.uniform(-0.5, 0.5, channels))) @ q2


def randomize(module, seed: int, scale: float) -> None:
    """Random weights everywhere; a plain (non-LU) 1x1 conv gets a well-conditioned random matrix instead.

    A Gaussian matrix can be arbitrarily close to singular, which would test the conditioning of that draw
    rather than the code; the LU variant is nonsingular by construction and keeps its Gaussian factors.
    """
    randomize_variables(module, seed=seed, scale=scale)
    rng = np.random.default_rng(seed + 1)
    for b in tfp_nvp.flow_bijectors(module) if isinstance(module, (tfb.Bijector, tfd.Distribution)) else ():
        if isinstance(b, Invertible1x1Conv) and not b.lu_decomposed:
            kernel = b.keras_layers[0].kernel
            kernel.assign(well_conditioned(kernel.shape[0], rng).astype(kernel.dtype))


def std_normal_log_pdf(z, rank: int) -> np.ndarray:
    z = np.asarray(z, np.float64)
    axes = tuple(range(-rank, 0))
    return -0.5 * np.sum(z**2, axis=axes) - 0.5 * np.prod(z.shape[-rank:]) * np.log(2 * np.pi)


def check_one_dtype(rec, subject, bij, z, x, rank, kwargs, dtype):
    """Round trips both ways, finiteness and fldj(z) = -ildj(forward(z)) for `bij` in `dtype`.

    `z` is a batch of latent points and `x` of data points (numpy float64). Returns the outputs and log-dets.
    """
    tol = TOLERANCE[dtype]
    y = bij.forward(fresh(z, dtype), **kwargs)
    z_back = bij.inverse(fresh(y), **kwargs)
    x_latent = bij.inverse(fresh(x, dtype), **kwargs)
    x_back = bij.forward(fresh(x_latent), **kwargs)
    fldj_z = bij.forward_log_det_jacobian(fresh(z, dtype), event_ndims=rank, **kwargs)
    ildj_y = bij.inverse_log_det_jacobian(fresh(y), event_ndims=rank, **kwargs)
    ildj_x = bij.inverse_log_det_jacobian(fresh(x, dtype), event_ndims=rank, **kwargs)
    fldj_latent = bij.forward_log_det_jacobian(fresh(x_latent), event_ndims=rank, **kwargs)
    for t in (y, z_back, x_latent, x_back):
        assert t.dtype == tf.as_dtype(dtype)
    assert all_finite(y, z_back, x_latent, x_back, fldj_z, ildj_y, ildj_x, fldj_latent), f"{subject}: not finite"
    batch = z.shape[: z.ndim - rank]
    for t in (fldj_z, ildj_y, ildj_x, fldj_latent):
        assert tuple(np.broadcast_shapes(np.shape(t), batch)) == tuple(batch)
    tag = {"float64": "f64", "float32": "f32"}[dtype]
    # Both directions share one column: inverse(forward(z)) = z and forward(inverse(x)) = x.
    rec.check(subject, f"round trip {tag}", max(mixed_error(z_back, z), mixed_error(x_back, x)), tol)
    # fldj(z) = -ildj(forward(z)) and fldj(inverse(x)) = -ildj(x).
    rec.check(subject, f"fldj=-ildj {tag}",
              max(mixed_error(np.broadcast_to(fldj_z, batch), -np.broadcast_to(ildj_y, batch)),
                  mixed_error(np.broadcast_to(fldj_latent, batch), -np.broadcast_to(ildj_x, batch))), tol)
    return {"y": y.numpy(), "x_latent": x_latent.numpy(), "fldj_z": np.broadcast_to(fldj_z, batch),
            "ildj_x": np.broadcast_to(ildj_x, batch)}


def check_bijector(rec, subject, build, z, x, rank, dtype, *, prepare=None, kwargs=None, flow=False,
                   moves=True):
    """Every property of one configuration: float64 (with autodiff), plus a float32 twin when drawn.

    `build(dtype)` returns a bijector (or, with `flow=True`, a transformed distribution); `prepare(model64)`
    gives the float64 model its random weights; `kwargs(model, dtype)` the keyword arguments of every call;
    `z` may be a function of the float64 bijector. Returns the float64 model and its outputs.
    """
    rec.example(subject)
    kwargs = kwargs or (lambda model, dt: {})
    model64 = build("float64")
    if prepare is not None:
        prepare(model64)
    bij64 = model64.bijector if flow else model64
    kw64 = kwargs(model64, "float64")
    if callable(z):  # latent points that depend on the model
        z = z(bij64)
    out64 = check_one_dtype(rec, subject, bij64, z, x, rank, kw64, "float64")
    if moves:  # a map that left every point in place would pass the log-det checks trivially
        assert np.max(np.abs(out64["y"] - z)) > 1e-3, f"{subject}: the random map is (nearly) the identity"
    ad_forward = flat_log_det(lambda t: bij64.forward(t, **kw64), fresh(z), rank)
    ad_inverse = flat_log_det(lambda t: bij64.inverse(t, **kw64), fresh(x), rank)
    # fldj(z) and ildj(x) against the autodiff Jacobians of forward and inverse.
    rec.check(subject, "ldj-autodiff",
              max(abs_error(out64["fldj_z"], ad_forward), abs_error(out64["ildj_x"], ad_inverse)), LOG_DET_TOLERANCE)
    if flow:
        log_prob = model64.log_prob(fresh(x), bijector_kwargs=kw64).numpy()
        by_hand = std_normal_log_pdf(out64["x_latent"], rank) + ad_inverse
        rec.check(subject, "log_prob-CoV", abs_error(log_prob, by_hand), LOG_DET_TOLERANCE)
    if dtype == "float32":
        model32 = build("float32")
        copy_variables(model64, model32)
        bij32 = model32.bijector if flow else model32
        kw32 = kwargs(model32, "float32")
        out32 = check_one_dtype(rec, subject, bij32, z, x, rank, kw32, "float32")
        error = max(mixed_error(out32[k], out64[k]) for k in out64)
        if flow:
            log_prob32 = model32.log_prob(fresh(x, np.float32), bijector_kwargs=kw32).numpy()
            error = max(error, mixed_error(log_prob32, log_prob))
        rec.check(subject, "f32 vs f64", error, TOLERANCE["float32"])
    return model64, out64


def normal(rng, shape, scale=1.0):
    return scale * rng.normal(size=shape)


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def vector_masks(draw, d):
    kind = draw(st.sampled_from(["half", "alternate", "array"]))
    if kind != "array":
        return kind
    ones = draw(st.integers(1, d - 1))
    order = draw(st.permutations(range(d)))
    mask = np.zeros(d, np.int64)
    mask[list(order[:ones])] = 1
    return mask


@st.composite
def image_masks(draw, shape):
    h, w, c = shape
    kinds = (["checkerboard"] if h * w >= 2 else []) + (["channel", "channel array"] if c >= 2 else [])
    kinds += ["full array"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("checkerboard", "channel"):
        return kind
    size = c if kind == "channel array" else h * w * c
    ones = draw(st.integers(1, size - 1))
    order = draw(st.permutations(range(size)))
    mask = np.zeros(size, np.int64)
    mask[list(order[:ones])] = 1
    return mask if kind == "channel array" else mask.reshape(shape)


def conditioning_entries(shape, mask, flip):
    """The entries a coupling must pass through unchanged, computed from the documented mask rules."""
    if isinstance(mask, str):
        if len(shape) == 1:
            idx = np.arange(shape[0])
            keep = idx < shape[0] // 2 if mask == "half" else idx % 2 == 0
        elif mask == "channel":
            keep = np.broadcast_to(np.arange(shape[2]) < shape[2] // 2, shape)
        else:
            h, w, c = shape
            keep = np.broadcast_to(((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0)[..., None], shape)
    else:
        keep = np.broadcast_to(np.asarray(mask).astype(bool), shape)
    return ~keep if flip else keep


image_shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)).filter(lambda s: np.prod(s) >= 2)


# ------------------------------------------------------------------------------------------------ AffineCoupling
def _check_coupling(rec, subject, shape, mask, flip, bound, conditional, dtype, seed, scale, make_network,
                    spline=None):
    """`spline=(num_bins, half_width)` checks a SplineCoupling, else `bound` is the affine log-scale bound."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    cond_dims = int(rng.integers(1, 4))
    z, x = normal(rng, (n, *shape)), normal(rng, (n, *shape), scale=1.5)
    c = normal(rng, (n, cond_dims))

    def build(dt):
        cond = [cond_dims] if conditional else None
        if spline is not None:
            return SplineCoupling(shape, network=make_network(dt), mask=mask, flip=flip, num_bins=spline[0],
                                  bound=spline[1], conditional_shape=cond, dtype=dt)
        return AffineCoupling(shape, network=make_network(dt), mask=mask, flip=flip, log_scale_bound=bound,
                              conditional_shape=cond, dtype=dt)

    def kwargs(_, dt):
        return {"conditional_input": tf.constant(c.astype(dt))} if conditional else {}

    _, out = check_bijector(rec, subject, build, z, x, len(shape), dtype, kwargs=kwargs,
                            prepare=lambda b: randomize(b, seed, scale))
    # The conditioning entries pass through bit for bit; every other entry is transformed.
    keep = conditioning_entries(shape, mask, flip)
    y = out["y"]
    keep = np.broadcast_to(keep, z.shape)
    if spline is not None:  # the linear tails: entries beyond the spline's interval pass through too
        keep = keep | (np.abs(z) >= spline[1])
    rec.check(subject, "untouched part", abs_error(y[keep], z[keep]), 0.0)
    assert np.all(np.abs(y[~keep] - z[~keep]) > 0), f"{subject}: a transformed entry did not move"


@share(1.0)
@given(d=st.integers(2, 9), data=st.data(), flip=st.booleans(), bound=BOUNDS, conditional=st.booleans(),
       hidden=st.lists(st.integers(2, 16), min_size=1, max_size=2), activation=st.sampled_from(["tanh", "relu"]),
       dtype=DTYPES, seed=SEEDS, scale=WEIGHT_SCALES)
def test_affine_coupling_vector(property_recorder, d, data, flip, bound, conditional, hidden, activation, dtype,
                                seed, scale):
    mask = data.draw(vector_masks(d), label="mask")

    def network(dt):
        return DenseNetwork(hidden, activation=activation, dtype=dt)

    _check_coupling(property_recorder, "AffineCoupling [D]", (d,), mask, flip, bound, conditional, dtype, seed,
                    scale, network)


@share(0.67)
@given(shape=image_shapes, data=st.data(), flip=st.booleans(), bound=BOUNDS, conditional=st.booleans(),
       hidden=st.integers(2, 8), blocks=st.integers(0, 1), dtype=DTYPES, seed=SEEDS, scale=WEIGHT_SCALES)
def test_affine_coupling_image(property_recorder, shape, data, flip, bound, conditional, hidden, blocks, dtype,
                               seed, scale):
    mask = data.draw(image_masks(shape), label="mask")

    def network(dt):
        return ConvResNet(hidden_channels=hidden, num_blocks=blocks, dtype=dt)

    _check_coupling(property_recorder, "AffineCoupling [H, W, C]", shape, mask, flip, bound, conditional, dtype,
                    seed, scale, network)


# ------------------------------------------------------------------------------------------------ SplineCoupling
# The spline's autodiff Jacobians are the slow part (TFP's bin search and gathers): fewer, smaller examples.
@share(0.34)
@given(shape=st.one_of(st.tuples(st.integers(2, 7)), image_shapes), data=st.data(), flip=st.booleans(),
       conditional=st.booleans(), num_bins=st.integers(2, 6), half_width=st.sampled_from([1.0, 2.5]),
       hidden=st.integers(2, 8), dtype=DTYPES, seed=SEEDS, scale=WEIGHT_SCALES)
def test_spline_coupling(property_recorder, shape, data, flip, conditional, num_bins, half_width, hidden, dtype,
                         seed, scale):
    mask = data.draw(vector_masks(shape[0]) if len(shape) == 1 else image_masks(shape), label="mask")

    def network(dt):
        if len(shape) == 1:
            return DenseNetwork((hidden,), activation="tanh", dtype=dt)
        return ConvResNet(hidden_channels=hidden, num_blocks=1, dtype=dt)

    kind = "[D]" if len(shape) == 1 else "[H, W, C]"
    _check_coupling(property_recorder, f"SplineCoupling {kind}", shape, mask, flip, None, conditional, dtype, seed,
                    scale, network, spline=(num_bins, half_width))


# ------------------------------------------------------------------------------------------------ LeakyReLU
@share(0.5)
@given(shape=st.one_of(st.tuples(st.integers(1, 6)), image_shapes), learnable=st.booleans(), per_entry=st.booleans(),
       alpha=st.sampled_from([0.1, 0.5, 3.0]), dtype=DTYPES, seed=SEEDS)
def test_leaky_relu(property_recorder, shape, learnable, per_entry, alpha, dtype, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, *shape)), normal(rng, (n, *shape), scale=1.5)
    z.flat[0] = -abs(z.flat[0])  # at least one entry on the negative side, where the map is not the identity
    alpha_shape = shape[-1:] if learnable and per_entry else ()

    def build(dt):
        return LeakyReLU(alpha, learnable=learnable, shape=alpha_shape, dtype=dt)

    def prepare(bij):  # random slopes away from 1, so the map is not the identity
        if learnable:
            signs = rng.choice([-1.0, 1.0], size=alpha_shape)
            bij.log_alpha.assign(signs * rng.uniform(0.3, 2.0, size=alpha_shape))

    check_bijector(property_recorder, "LeakyReLU", build, z, x, len(shape), dtype, prepare=prepare)


# ------------------------------------------------------------------------------------------------ ActNorm
event_shapes = st.one_of(st.tuples(st.integers(1, 9)), image_shapes)


@share(1.0)
@given(shape=event_shapes, dtype=DTYPES, seed=SEEDS)
def test_act_norm(property_recorder, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    # Random per-channel location and spread, so the data-dependent initialisation is far from the identity.
    loc, spread = rng.uniform(-3, 3, channels), np.exp(rng.uniform(-1.5, 1.5, channels))
    init_data = loc + spread * rng.normal(size=(32, *shape))
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, *shape)), loc + spread * rng.normal(size=(n, *shape))

    def prepare(act):
        act.inverse(tf.constant(init_data))
        assert bool(act.initialized)

    check_bijector(property_recorder, "ActNorm", lambda dt: ActNorm(shape, dtype=dt), z, x, len(shape), dtype,
                   prepare=prepare)


# ------------------------------------------------------------------------------------------------ Invertible1x1Conv
@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
@share(0.5)
@given(shape=st.one_of(st.tuples(st.integers(1, 8)), st.tuples(st.integers(1, 4), st.integers(1, 4),
                                                                  st.integers(1, 6))),
       dtype=DTYPES, seed=SEEDS, scale=WEIGHT_SCALES)
def test_invertible_1x1_conv(property_recorder, lu, shape, dtype, seed, scale):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, *shape)), normal(rng, (n, *shape), scale=2.0)

    def build(dt):
        return Invertible1x1Conv(shape, lu_decomposed=lu, seed=seed % 1000, dtype=dt)

    check_bijector(property_recorder, f"Invertible1x1Conv ({'LU' if lu else 'plain'})", build, z, x, len(shape),
                   dtype, prepare=lambda b: randomize(b, seed, scale))


# ------------------------------------------------------------------------------------------------ Squeeze
@share(0.67)
@given(blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)), channels=st.integers(1, 3),
       factor=st.integers(2, 3), dtype=DTYPES, seed=SEEDS)
def test_squeeze(property_recorder, blocks, channels, factor, dtype, seed):
    shape = (blocks[0] * factor, blocks[1] * factor, channels)
    out_shape = (blocks[0], blocks[1], factor * factor * channels)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, *shape)), normal(rng, (n, *out_shape))
    # A different, independent statement of space-to-depth.
    np.testing.assert_array_equal(Squeeze(shape, factor=factor).forward(fresh(z)).numpy(),
                                  tf.nn.space_to_depth(z, factor).numpy())
    check_bijector(property_recorder, "Squeeze", lambda dt: Squeeze(shape, factor=factor), z, x, 3, dtype,
                   moves=False)


# ------------------------------------------------------------------------------------------------ FactorOut
@st.composite
def exit_arguments(draw, channels):
    exiting = draw(st.integers(1, channels - 1))
    kind = draw(st.sampled_from(["num_exit_channels", "exit_fraction"] + (["default"] if channels % 2 == 0 else [])))
    if kind == "default":
        return {}, channels // 2
    if kind == "exit_fraction":
        return {"exit_fraction": exiting / channels}, exiting
    return {"num_exit_channels": exiting}, exiting


@share(1.0)
@given(shape=st.one_of(st.tuples(st.integers(2, 8)),
                       st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 6))),
       data=st.data(), network=st.sampled_from(["default", "tfp_nvp"]), dtype=DTYPES, seed=SEEDS,
       scale=WEIGHT_SCALES)
def test_factor_out(property_recorder, shape, data, network, dtype, seed, scale):
    exit_kwargs, exiting = data.draw(exit_arguments(shape[-1]), label="exit")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, *shape)), normal(rng, (n, *shape), scale=1.5)

    def build(dt):
        net = None
        if network == "tfp_nvp":
            net = (DenseNetwork((8,), dtype=dt) if len(shape) == 1 else ConvResNet(4, num_blocks=1, dtype=dt))
        bij = FactorOut(shape, network=net, dtype=dt, **exit_kwargs)
        assert bij.num_exit_channels == exiting
        return bij

    _, out = check_bijector(property_recorder, "FactorOut", build, z, x, len(shape), dtype,
                            prepare=lambda b: randomize(b, seed, scale))
    keep = shape[-1] - exiting
    property_recorder.check("FactorOut", "untouched part", abs_error(out["y"][..., :keep], z[..., :keep]), 0.0)


# ------------------------------------------------------------------------------------------------ OnChannels
@pytest.mark.parametrize("kind", ["conv1x1", "actnorm+coupling", "squeezed level"])
@share(0.34)
@given(vector=st.booleans(), d=st.integers(2, 8), hw=st.tuples(st.sampled_from([2, 4]), st.sampled_from([2, 4])),
       c=st.integers(2, 4), data=st.data(), dtype=DTYPES, seed=SEEDS, scale=WEIGHT_SCALES)
def test_on_channels(property_recorder, kind, vector, d, hw, c, data, dtype, seed, scale):
    shape = (d,) if vector and kind != "squeezed level" else (*hw, c)
    k = data.draw(st.integers(1, shape[-1] - 1), label="num_channels")
    inner_shape = (*shape[:-1], k)
    if kind == "actnorm+coupling":
        assume(np.prod(inner_shape) >= 2)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, *shape)), normal(rng, (n, *shape), scale=1.5)

    def build(dt):
        if kind == "conv1x1":
            inner = Invertible1x1Conv(inner_shape, seed=1, dtype=dt)
        elif kind == "actnorm+coupling":
            if len(shape) == 1:
                net, mask = DenseNetwork((8,), dtype=dt), "alternate"
            else:
                net, mask = ConvResNet(4, num_blocks=0, dtype=dt), "checkerboard"
            inner = tfb.Chain([ActNorm(inner_shape, dtype=dt), AffineCoupling(inner_shape, net, mask=mask, dtype=dt)])
        else:
            squeeze = Squeeze(inner_shape)
            squeezed = squeeze.event_shape_out
            inner = tfb.Chain([tfb.Invert(squeeze), Invertible1x1Conv(squeezed, seed=2, dtype=dt),
                               AffineCoupling(squeezed, ConvResNet(4, num_blocks=0, dtype=dt), mask="channel",
                                              dtype=dt), squeeze])
        return OnChannels(inner, k, shape)

    def prepare(bij):
        for act in (b for b in tfp_nvp.flow_bijectors(bij) if isinstance(b, ActNorm)):
            act.keras_layers[0].initialized.assign(1)  # keep the random parameters below
        randomize(bij, seed, scale)

    _, out = check_bijector(property_recorder, f"OnChannels ({kind})", build, z, x, len(shape), dtype,
                            prepare=prepare)
    property_recorder.check(f"OnChannels ({kind})", "untouched part",
                            abs_error(out["y"][..., k:], z[..., k:]), 0.0)


# ------------------------------------------------------------------------------------------------ real_nvp
@share(0.5)
@given(d=st.integers(2, 8), depth=st.integers(1, 4), mask=st.sampled_from(["half", "alternate"]), bound=BOUNDS,
       mixing=st.sampled_from([None, "conv1x1"]), hidden=st.lists(st.integers(2, 16), min_size=1, max_size=2),
       towers=st.booleans(), activation=st.sampled_from(["relu", "tanh"]), conditional=st.booleans(), dtype=DTYPES,
       seed=SEEDS, scale=WEIGHT_SCALES)
def test_real_nvp_vector(property_recorder, d, depth, mask, bound, mixing, hidden, towers, activation, conditional,
                         dtype, seed, scale):
    if bound == "none":
        # Unbounded, a ReLU conditioner's log-scale grows linearly with its input, so random weights compound into
        # exp(exp(...)) across layers: found here as values of 1e284 and inf after three layers. tanh hidden units
        # bound the log-scale by the head's weights and keep the random map within float range.
        activation = "tanh"
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, d)), normal(rng, (n, d), scale=1.5)
    c = normal(rng, (n, 2))

    def build(dt):
        return tfp_nvp.real_nvp([d], num_coupling_layers=depth, hidden_units=hidden, mask=mask, log_scale_bound=bound,
                                separate_towers=towers, activation=activation, mixing=mixing,
                                conditional_shape=[2] if conditional else None, dtype=dt, seed=seed % 1000)

    def kwargs(flow, dt):
        return tfp_nvp.conditional_kwargs(flow, tf.constant(c.astype(dt))) if conditional else {}

    check_bijector(property_recorder, "real_nvp [D]", build, z, x, 1, dtype, kwargs=kwargs, flow=True,
                   prepare=lambda f: randomize(f, seed, scale))


@share(0.5)
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)), data=st.data(),
       depth=st.integers(1, 3), bound=BOUNDS, mixing=st.sampled_from([None, "conv1x1"]), hidden=st.integers(2, 8),
       blocks=st.integers(0, 1), dtype=DTYPES, seed=SEEDS, scale=WEIGHT_SCALES)
def test_real_nvp_image(property_recorder, shape, data, depth, bound, mixing, hidden, blocks, dtype, seed, scale):
    masks = (["checkerboard"] if shape[0] * shape[1] >= 2 else []) + (["channel"] if shape[2] >= 2 else [])
    assume(masks)
    mask = data.draw(st.sampled_from(masks), label="mask")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3))
    z, x = normal(rng, (n, *shape)), normal(rng, (n, *shape), scale=1.5)

    def build(dt):
        return tfp_nvp.real_nvp(shape, num_coupling_layers=depth, hidden_units=(hidden,), num_blocks=blocks, mask=mask,
                                log_scale_bound=bound, mixing=mixing, dtype=dt, seed=seed % 1000)

    # The ResNet conditioner is ReLU: with an unbounded log-scale, smaller random weights keep the compounding
    # growth across layers (see test_real_nvp_vector) within float range.
    scale = min(scale, 0.5) if bound == "none" else scale
    check_bijector(property_recorder, "real_nvp [H, W, C]", build, z, x, 3, dtype, flow=True,
                   prepare=lambda f: randomize(f, seed, scale))


# ------------------------------------------------------------------------------------------------ spline_flow
@share(0.17)
@given(d=st.integers(2, 5), depth=st.integers(1, 2), mask=st.sampled_from(["half", "alternate"]),
       num_bins=st.integers(2, 6), mixing=st.sampled_from([None, "conv1x1"]), conditional=st.booleans(),
       dtype=DTYPES, seed=SEEDS, scale=WEIGHT_SCALES)
def test_spline_flow_vector(property_recorder, d, depth, mask, num_bins, mixing, conditional, dtype, seed, scale):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    z, x = normal(rng, (n, d)), normal(rng, (n, d), scale=1.5)
    c = normal(rng, (n, 2))

    def build(dt):
        return tfp_nvp.spline_flow([d], num_coupling_layers=depth, hidden_units=(8,), num_bins=num_bins, bound=3.0,
                                   mask=mask, activation="tanh", mixing=mixing,
                                   conditional_shape=[2] if conditional else None, dtype=dt, seed=seed % 1000)

    def kwargs(flow, dt):
        return tfp_nvp.conditional_kwargs(flow, tf.constant(c.astype(dt))) if conditional else {}

    check_bijector(property_recorder, "spline_flow [D]", build, z, x, 1, dtype, kwargs=kwargs, flow=True,
                   prepare=lambda f: randomize(f, seed, scale))


# ------------------------------------------------------------------------------------------------ glow
@share(0.34)
@given(h=st.sampled_from([4, 8]), w=st.sampled_from([4, 8]), c=st.integers(1, 3), levels=st.integers(1, 2),
       steps=st.integers(1, 2), logit_alpha=st.sampled_from([None, 0.05]), lu=st.booleans(),
       bound=st.sampled_from(["sigmoid", "tanh"]), blocks=st.integers(0, 1), dtype=DTYPES, seed=SEEDS)
def test_glow(property_recorder, h, w, c, levels, steps, logit_alpha, lu, bound, blocks, dtype, seed):
    shape = (h, w, c)
    rng = np.random.default_rng(seed)
    # Data in the open unit cube, where the logit preprocessing is defined.
    x = rng.uniform(0.02, 0.98, size=(2, *shape))
    init_data = rng.uniform(0.02, 0.98, size=(32, *shape))
    z = normal(rng, (2, *shape))
    if logit_alpha is not None:
        # With random weights, base samples reach |u| ~ 25 before the sigmoid, where the data end within 1e-10 of
        # the support's edge and the logit can recover u to only a few digits (the conditioning of the
        # transform, not an error). The latents of data points in the unit cube keep the round trip well posed.
        data_points = rng.uniform(0.02, 0.98, size=(2, *shape))
        z = lambda bij: bij.inverse(fresh(data_points)).numpy()  # noqa: E731

    def build(dt):
        return tfp_nvp.glow(shape, num_levels=levels, num_steps_per_level=steps, hidden_channels=4, num_blocks=blocks,
                            lu_decomposed=lu, log_scale_bound=bound, logit_alpha=logit_alpha, dtype=dt,
                            seed=seed % 1000)

    def prepare(flow):
        assert initialize(flow, init_data) == levels * steps
        randomize(flow, seed, 0.5)

    check_bijector(property_recorder, "glow", build, z, x, 3, dtype, flow=True, prepare=prepare)
