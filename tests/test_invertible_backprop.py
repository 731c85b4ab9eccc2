"""Invertible backprop (`tfp_nvp.InvertibleChain`, `invertible_backprop=True`) against standard backprop.

Every comparison builds the same flow twice from the same builder arguments, once with `tfb.Chain` and once
with `InvertibleChain`, gives both the same random non-identity weights, and compares `log_prob` and the
gradients of the mean log-likelihood with respect to every variable (and the conditional input).

Tolerances. The two gradients differ only by the rounding of the reconstruction (each step's input rebuilt
from its output) and of the order of additions. In float64 that is ~1e-16 relative to the gradient norm
(asserted: `F64_RTOL = 1e-10`). In float32 measured differences were ~1e-7 of the gradient norm for these small
flows (eager, tf.function and XLA alike); `F32_RTOL = 1e-4` of the norm leaves room for other random weights
and is still far below what a wrong gradient gives (a missed variable or a stale cached step is O(1)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import ActNorm, FlowModel, InvertibleChain

tfb = tfp.bijectors

F64_RTOL = 1e-10
F32_RTOL = 1e-4
WEIGHT_ATOL = 1e-5  # after a few SGD steps from equal weights (as in tests/test_distribute.py)


def _build(builder, invertible, **kwargs):
    return getattr(tfp_nvp, builder)(invertible_backprop=invertible, **kwargs)


def _set_random_weights(flows, seed, keep_vectors=False):
    """The same random non-identity weights in every flow (the builders list variables in the same order)."""
    rng = np.random.default_rng(seed)
    for group in zip(*(f.trainable_variables for f in flows), strict=True):
        shape = tuple(group[0].shape)
        if len(shape) >= 2:
            value = rng.normal(0.0, 0.5 / np.sqrt(np.prod(shape[:-1])), size=shape)
        else:
            value = rng.normal(0.0, 0.2, size=shape) + (group[0].numpy() if keep_vectors else 0.0)
        for v in group:
            v.assign(value.astype(v.dtype.as_numpy_dtype))


def _loss_and_grads(flow, x, c=None):
    kwargs = {} if c is None else {"bijector_kwargs": tfp_nvp.conditional_kwargs(flow, c)}
    sources = list(flow.trainable_variables) + ([] if c is None else [c])
    with tf.GradientTape() as tape:
        if c is not None:
            tape.watch(c)
        log_prob = flow.log_prob(x, **kwargs)
        loss = -tf.reduce_mean(log_prob)
    return log_prob, tape.gradient(loss, sources)


def _assert_same_gradients(standard, invertible, rtol):
    assert len(standard) == len(invertible)
    assert all(g is not None for g in invertible), "a variable got no gradient through InvertibleChain"
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in standard))
    assert norm > 0
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(standard, invertible))
    assert worst <= rtol * norm, f"gradients differ by {worst:.3g} for a gradient norm of {norm:.3g}"


FLOWS = {
    # couplings + learned LU 1x1 convs on vectors
    "real_nvp_conv1x1": ("real_nvp", dict(event_shape=[6], num_coupling_layers=4, hidden_units=(8,),
                                          mixing="conv1x1", seed=1), (16, 6)),
    # couplings conditioned on c (gradient to c checked too)
    "real_nvp_conditional": ("real_nvp", dict(event_shape=[5], num_coupling_layers=3, hidden_units=(8,),
                                              conditional_shape=[3], seed=2), (16, 5)),
    # ActNorm, LU 1x1 conv, channel couplings, squeezes, split prior, the next level inside OnChannels
    "glow_lu": ("glow", dict(image_shape=[4, 4, 2], num_levels=2, num_steps_per_level=1, hidden_channels=4,
                             seed=3), (6, 4, 4, 2)),
    # the same with the plain (non-LU) 1x1 conv
    "glow_plain": ("glow", dict(image_shape=[4, 4, 2], num_levels=2, num_steps_per_level=1, hidden_channels=4,
                                lu_decomposed=False, seed=4), (6, 4, 4, 2)),
    # conditional GLOW: couplings, split prior and top prior all see c
    "glow_conditional": ("glow", dict(image_shape=[4, 4, 1], num_levels=2, num_steps_per_level=1,
                                      hidden_channels=4, conditional_shape=[3], seed=9), (6, 4, 4, 1)),
    # rational-quadratic spline couplings (TFP's spline inside the recomputed step), conditioned
    "spline_flow_conditional": ("spline_flow", dict(event_shape=[5], num_coupling_layers=3, hidden_units=(8,),
                                                    conditional_shape=[3], seed=5), (16, 5)),
    # MAF layers and the tfb.Permute between them: rebuilding a layer's input is its sequential sampling pass
    "maf": ("maf", dict(event_shape=[4], num_layers=3, hidden_units=(8,), seed=6), (16, 4)),
    # IAF, conditioned: its density pass is the sequential one
    "iaf_conditional": ("iaf", dict(event_shape=[4], num_layers=2, hidden_units=(8,), conditional_shape=[3],
                                    seed=7), (16, 4)),
}


def _data(kind, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if kind.startswith("glow"):
        return tf.constant(rng.uniform(0.05, 0.95, size=shape), dtype)  # inside the logit transform's support
    return tf.constant(rng.normal(size=shape), dtype)


# glow_lu runs in float32 below (eager, tf.function, XLA): eager GLOW is slow, one float64 GLOW is enough.
@pytest.mark.parametrize("kind", ["real_nvp_conv1x1", "real_nvp_conditional", "glow_plain", "glow_conditional",
                                  "spline_flow_conditional", "maf", "iaf_conditional"])
def test_float64_gradients_and_log_prob_equal_standard_backprop(kind):
    builder, kwargs, shape = FLOWS[kind]
    standard, invertible = (_build(builder, flag, dtype="float64", **kwargs) for flag in (False, True))
    assert not isinstance(standard.bijector, InvertibleChain) and isinstance(invertible.bijector, InvertibleChain)
    x = _data(kind, shape, tf.float64)
    c = tf.constant(np.random.default_rng(5).normal(size=(shape[0], 3))) if "conditional" in kind else None
    if builder == "glow":
        for flow in (standard, invertible):
            assert tfp_nvp.initialize(flow, x, conditional_input=c) == 2 * kwargs["num_steps_per_level"]
    _set_random_weights([standard, invertible], seed=7, keep_vectors=True)
    lp_std, g_std = _loss_and_grads(standard, x, c)
    lp_inv, g_inv = _loss_and_grads(invertible, x, c)
    np.testing.assert_allclose(lp_inv, lp_std, rtol=1e-12)
    _assert_same_gradients(g_std, g_inv, F64_RTOL)
    if c is not None:
        assert float(tf.reduce_max(tf.abs(g_inv[-1]))) > 0, "no gradient reached the conditional input"


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_float32_gradients_equal_standard_backprop(mode):
    _, kwargs, shape = FLOWS["glow_lu"]
    if mode == "xla":
        # One level (squeeze, ActNorm, LU 1x1 conv, coupling, unsqueeze): XLA compiles the two-level GLOW for
        # minutes on two cores, and the split prior is covered by the other modes.
        kwargs = {**kwargs, "num_levels": 1}
    standard, invertible = (tfp_nvp.glow(invertible_backprop=flag, **kwargs) for flag in (False, True))
    x = _data("glow", shape, tf.float32)
    run = {"eager": lambda f: f, "function": tf.function, "xla": lambda f: tf.function(f, jit_compile=True)}[mode]
    steps = [run(lambda x, flow=flow: _loss_and_grads(flow, x)) for flow in (standard, invertible)]
    # The first call initialises every ActNorm (inside the traced function for "function" and "xla"), the
    # invertible chain's forward pass included; both must end with the same data-dependent parameters.
    for step in steps:
        step(x)
    actnorms = [[b for b in tfp_nvp.flow_bijectors(f) if isinstance(b, ActNorm)] for f in (standard, invertible)]
    assert len(actnorms[1]) == kwargs["num_levels"] and all(bool(a.initialized) for a in actnorms[1])
    for a, b in zip(*actnorms):
        np.testing.assert_allclose(b.log_scale.numpy(), a.log_scale.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.shift.numpy(), a.shift.numpy(), rtol=1e-5, atol=1e-6)
    _set_random_weights([standard, invertible], seed=11, keep_vectors=True)
    (lp_std, g_std), (lp_inv, g_inv) = (step(x) for step in steps)
    np.testing.assert_allclose(lp_inv, lp_std, rtol=1e-6)
    _assert_same_gradients(g_std, g_inv, F32_RTOL)


def _fit(build, x, strategy=None):
    with (strategy or tf.distribute.get_strategy()).scope():
        model = FlowModel(build())
        model.compile(optimizer=keras.optimizers.SGD(1e-3))
    _set_random_weights([model.distribution], seed=13)
    start = [np.array(w) for w in model.weights]
    history = model.fit(x, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model, history.history, start


def test_mirrored_fit_matches_single_device_standard_backprop():
    """GLOW (ActNorm initialised inside the first distributed step, LU 1x1 convs, multi-scale split) trained by
    `fit` under MirroredStrategy over two logical CPUs with invertible backprop ends at the weights a single
    device reaches with standard backprop. In a separate process: an aborted collective would poison this one."""
    job = Path(__file__).with_name("_mirrored_invertible_job.py")
    out = subprocess.run([sys.executable, str(job), "1"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["copies_agree"], result
    assert result["max_weight_diff"] < WEIGHT_ATOL, result
    np.testing.assert_allclose(result["loss"], result["single_loss"], rtol=1e-5)


def test_xla_fit_of_multiscale_glow_matches_standard_backprop(monkeypatch):
    """`fit` with jit_compile=True through two GLOW levels (the second inside the first's OnChannels, behind
    the split prior) ends at the weights standard backprop reaches from the same start on the same batches."""
    passes = set()
    density_pass = InvertibleChain._density_pass
    monkeypatch.setattr(InvertibleChain, "_density_pass",
                        lambda self, *a: passes.add(self.name) or density_pass(self, *a))
    x = _data("glow", (32, 4, 4, 2), tf.float32).numpy()
    runs = {}
    for invertible in (False, True):
        flow = tfp_nvp.glow([4, 4, 2], num_levels=2, num_steps_per_level=1, hidden_channels=4, seed=0,
                            invertible_backprop=invertible)
        tfp_nvp.initialize(flow, x)
        # Random non-identity weights: from a fresh flow's zero-initialised coupling outputs the first step
        # gives the inner coupling layers no gradient, and an identity step has no reconstruction error to show.
        _set_random_weights([flow], seed=13, keep_vectors=True)
        model = FlowModel(flow)
        model.compile(optimizer=keras.optimizers.SGD(1e-2), jit_compile=True)
        start = [v.numpy() for v in flow.trainable_variables]
        history = model.fit(x, batch_size=16, epochs=2, shuffle=False, verbose=0)
        runs[invertible] = start, [v.numpy() for v in flow.trainable_variables], history.history["loss"]
    # The invertible run's loss went through every level's density pass, not a plain chain's.
    assert passes == {"glow", "glow_level_0", "glow_level_1"}, passes
    (start, standard, loss_std), (start_inv, invertible, loss_inv) = runs[False], runs[True]
    assert np.all(np.isfinite(loss_inv)) and loss_inv[-1] < loss_inv[0], loss_inv
    np.testing.assert_allclose(loss_inv, loss_std, rtol=1e-5)
    names = [v.name for v in flow.trainable_variables]
    for name, a, b, s, s_inv in zip(names, standard, invertible, start, start_inv, strict=True):
        np.testing.assert_array_equal(s_inv, s)
        # Each weight moves by more than the tolerance (the least, an inner coupling kernel, by ~3e-5 in 4 SGD
        # steps), so a variable the invertible pass left without its gradient could not pass the comparison.
        assert np.max(np.abs(a - s)) > WEIGHT_ATOL, f"{name} did not move"
        # Measured: the two runs agree to ~1e-7 after these 4 steps.
        assert np.max(np.abs(b - a)) < WEIGHT_ATOL, f"{name}: {np.max(np.abs(b - a)):.3g}"


def test_keras_file_round_trip_and_helpers(tmp_path):
    kwargs = dict(event_shape=[4], num_coupling_layers=3, hidden_units=(8,), conditional_shape=[2], seed=5)
    flow = tfp_nvp.real_nvp(invertible_backprop=True, **kwargs)
    assert flow._tfp_nvp_spec["config"]["invertible_backprop"] is True
    _set_random_weights([flow], seed=17)
    # flow_bijectors and conditional_kwargs see through the chain as through tfb.Chain.
    standard = tfp_nvp.real_nvp(**kwargs)
    assert len(tfp_nvp.flow_bijectors(flow)) == len(tfp_nvp.flow_bijectors(standard))
    assert tfp_nvp.conditional_kwargs(flow, 1.0).keys() == tfp_nvp.conditional_kwargs(standard, 1.0).keys()
    model = FlowModel(flow)
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(8, 4)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    path = tmp_path / "invertible.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.distribution.bijector, InvertibleChain)
    np.testing.assert_array_equal(loaded.log_prob(x, conditional_input=c), model.log_prob(x, conditional_input=c))


@pytest.mark.parametrize("builder", ["spline_flow", "maf", "iaf"])
def test_later_builders_take_the_flag_and_reload_with_it(builder, tmp_path):
    flow = getattr(tfp_nvp, builder)([3], 2, hidden_units=(8,), seed=1, invertible_backprop=True)
    assert isinstance(flow.bijector, InvertibleChain)
    assert flow._tfp_nvp_spec["config"]["invertible_backprop"] is True
    assert not isinstance(getattr(tfp_nvp, builder)([3], 2, hidden_units=(8,)).bijector, InvertibleChain)
    _set_random_weights([flow], seed=19)
    model = FlowModel(flow)
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    model.save(tmp_path / "flow.keras")
    loaded = keras.saving.load_model(tmp_path / "flow.keras")
    assert isinstance(loaded.distribution.bijector, InvertibleChain)
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))
    with pytest.raises(TypeError, match="`invertible_backprop` must be True or False"):
        getattr(tfp_nvp, builder)([3], invertible_backprop=None)


@pytest.mark.parametrize("builder", ["iaf", "real_nvp"])
def test_surrogate_gradient_of_own_samples_uses_the_forward_pass(builder, monkeypatch):
    """tfp.vi's loss scores the flow's own samples: the log-det comes from the sampling pass (standard
    backprop), so the invertible chain adds no density pass, and the gradient is the plain chain's."""
    passes = []
    density_pass = InvertibleChain._density_pass
    monkeypatch.setattr(InvertibleChain, "_density_pass", lambda self, *a: passes.append(1) or density_pass(self, *a))
    kwargs = dict(event_shape=[4], hidden_units=(8,), seed=8, dtype="float64")
    kwargs["num_layers" if builder == "iaf" else "num_coupling_layers"] = 3
    flows = [_build(builder, flag, **kwargs) for flag in (False, True)]
    _set_random_weights(flows, seed=23, keep_vectors=True)

    def surrogate_loss(flow):
        with tf.GradientTape() as tape:
            z, log_q = flow.experimental_sample_and_log_prob(32, seed=(3, 4))
            loss = tf.reduce_mean(log_q + 0.5 * tf.reduce_sum(z**2, -1))   # KL to N(0, I) up to a constant
        return loss, tape.gradient(loss, flow.trainable_variables)

    (loss_std, g_std), (loss_inv, g_inv) = (tf.function(surrogate_loss)(f) for f in flows)
    assert not passes, "scoring the flow's own samples ran the invertible density pass"
    np.testing.assert_allclose(loss_inv, loss_std, rtol=1e-12)
    _assert_same_gradients(g_std, g_inv, F64_RTOL)
    # The counter does see the pass where there is one: the density of data the flow did not just produce.
    flows[1].log_prob(tf.random.stateless_normal([4, 4], seed=[5, 6], dtype=tf.float64))
    assert passes


def test_bad_arguments():
    with pytest.raises(TypeError, match="`invertible_backprop` must be True or False"):
        tfp_nvp.real_nvp([2], invertible_backprop="yes")
    with pytest.raises(TypeError, match="`invertible_backprop` must be True or False"):
        tfp_nvp.glow([4, 4, 1], invertible_backprop=1)
    with pytest.raises(TypeError, match="`bijectors` must hold tfb.Bijector"):
        InvertibleChain([tfb.Exp(), "exp"])
    with pytest.raises(ValueError, match="injective"):
        InvertibleChain([tfb.Exp(), tfb.AbsoluteValue()])
    with pytest.raises(ValueError, match="single-tensor"):
        InvertibleChain([tfb.JointMap([tfb.Exp(), tfb.Exp()])])


def _step_peaks(kind, *depths):
    """Tensor memory of one tf.function training step per (variant, depth), measured in a fresh process."""
    probe = Path(__file__).with_name("_memory_probe.py")
    out = subprocess.run([sys.executable, str(probe), kind, *map(str, depths)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_step_memory_stays_flat_in_depth_under_tf_function():
    # The allocator's own peak, not the process RSS (which also holds the executable graph, three times larger
    # here). Standard backprop keeps every coupling's activations: 4x the depth, ~3x the peak (measured 11-13 ->
    # 41 MB). Invertible backprop keeps one step's activations; what it still adds with depth is
    # the extra couplings' weight gradients (0.3 MB each) plus the allocator's run-to-run noise (about 1 MB):
    # measured at 3-9 % of what standard backprop adds; a chain that kept activations adds ~100 %.
    peaks = _step_peaks("real_nvp", 2, 8)
    standard_growth = peaks["standard_8"] - peaks["standard_2"]
    assert peaks["standard_8"] > 2.0 * peaks["standard_2"], peaks
    assert peaks["invertible_8"] - peaks["invertible_2"] < 0.25 * standard_growth, peaks
    assert peaks["invertible_8"] < 0.5 * peaks["standard_8"], peaks
