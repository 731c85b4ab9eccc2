"""Mixed precision: under a mixed global Keras policy a float32 flow's networks compute in bfloat16 / float16.

The rule (`tfp_nvp.nn.network_dtype`): networks of a float32 flow take the global mixed policy (float32 weights,
low-precision compute); parameter layers, bijector math, log-dets and `log_prob` stay float32; a float64 flow
stays float64. Every test restores the global policy (a leaked policy would change every later test in the
worker process).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp
from tfp_nvp.bijectors._base import ParameterLayer


@pytest.fixture
def mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


BUILDERS = {
    "real_nvp": lambda dtype="float32": tfp_nvp.real_nvp([4], num_coupling_layers=4, hidden_units=(32, 32),
                                                         dtype=dtype, seed=0),
    "glow": lambda dtype="float32": tfp_nvp.glow([8, 8, 1], num_levels=2, num_steps_per_level=2,
                                                 hidden_channels=16, dtype=dtype, seed=0),
    "maf": lambda dtype="float32": tfp_nvp.maf([4], num_layers=3, hidden_units=(32, 32), dtype=dtype, seed=0),
}


def data(flow, n=64, seed=0):
    """Points inside the support (GLOW's logit transform wants (0, 1))."""
    shape = [n, *flow.event_shape]
    if len(shape) == 4:
        return tf.random.stateless_uniform(shape, seed=[seed, 1], minval=0.05, maxval=0.95)
    return tf.random.stateless_normal(shape, seed=[seed, 1])


def networks_and_parameters(flow):
    layers = tfp_nvp.flow_layers(flow)
    parameters = [layer for layer in layers if isinstance(layer, ParameterLayer)]
    networks = [layer for layer in layers if not isinstance(layer, ParameterLayer)]
    assert networks and parameters
    return networks, parameters


def float32_twin(builder, flow):
    """The same flow built under the float32 policy and given `flow`'s weights (ActNorm flags included)."""
    keras.mixed_precision.set_global_policy("float32")
    try:
        twin = BUILDERS[builder]()
    finally:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    for mine, theirs in zip(tfp_nvp.flow_layers(twin), tfp_nvp.flow_layers(flow), strict=True):
        mine.set_weights(theirs.get_weights())
    return twin


def test_network_dtype_rule(mixed_bfloat16):
    assert tfp_nvp.nn.network_dtype("float32") == "mixed_bfloat16"
    assert tfp_nvp.nn.network_dtype(tf.float64) == "float64"
    keras.mixed_precision.set_global_policy("float32")
    assert tfp_nvp.nn.network_dtype("float32") == "float32"
    keras.mixed_precision.set_global_policy("bfloat16")  # not mixed: bfloat16 variables too; the flow's dtype wins
    assert tfp_nvp.nn.network_dtype("float32") == "float32"


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_networks_compute_in_bfloat16_and_the_math_in_float32(mixed_bfloat16, randomize, builder):
    flow = BUILDERS[builder]()
    networks, parameters = networks_and_parameters(flow)
    for layer in networks:
        assert layer.compute_dtype == "bfloat16", layer.name
        assert layer.variable_dtype == "float32", layer.name
        assert all(w.dtype == "float32" for w in layer.weights), layer.name
    for layer in parameters:
        assert layer.dtype_policy.name == "float32", layer.name
        assert all(w.dtype in ("float32", "int32") for w in layer.weights), layer.name
    x = data(flow)
    flow.log_prob(x)  # GLOW's ActNorm initialises itself from this first batch
    randomize(flow, seed=3, scale=0.5)
    log_prob = flow.log_prob(x)
    assert log_prob.dtype == tf.float32
    assert np.all(np.isfinite(log_prob.numpy()))
    expected = float32_twin(builder, flow).log_prob(x).numpy()
    # bfloat16 keeps ~3 significant digits (2**-8) of every network output and the log-density sums many of them:
    # measured relative differences 1.2e-3 (real_nvp, maf) and 1.2e-2 (glow, |log_prob| ~ 1000 with these weights).
    np.testing.assert_allclose(log_prob.numpy(), expected, rtol=3e-2, atol=0.1)
    assert not np.allclose(log_prob.numpy(), expected, rtol=0, atol=0)  # bfloat16 really ran
    sample = flow.sample(8, seed=4)
    assert sample.dtype == tf.float32
    assert np.all(np.isfinite(sample.numpy()))


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_fit_moves_every_weight_and_reload_matches(mixed_bfloat16, tmp_path, builder):
    model = tfp_nvp.FlowModel(BUILDERS[builder]())
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # bfloat16 needs no scaling
    x = data(model.distribution, n=32).numpy()
    model.log_prob(x[:8])  # ActNorm's data-dependent init, so "moved" below means moved by the optimizer
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, epochs=1, batch_size=16, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    unmoved = [w.path for w, b in zip(model.trainable_weights, before) if np.array_equal(w.numpy(), b)]
    assert not unmoved
    log_prob = model.log_prob(x).numpy()
    assert np.all(np.isfinite(log_prob))

    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    networks, _ = networks_and_parameters(reloaded.distribution)
    assert {layer.compute_dtype for layer in networks} == {"bfloat16"}
    np.testing.assert_allclose(reloaded.log_prob(x).numpy(), log_prob, rtol=1e-6, atol=1e-5)

    model.save_weights(tmp_path / "m.weights.h5")
    fresh = tfp_nvp.FlowModel(BUILDERS[builder]())
    fresh.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_allclose(fresh.log_prob(x).numpy(), log_prob, rtol=1e-6, atol=1e-5)


def test_export_serves_float32(mixed_bfloat16, randomize, tmp_path):
    model = tfp_nvp.FlowModel(BUILDERS["real_nvp"]())
    randomize(model.distribution, seed=5, scale=0.5)
    x = data(model.distribution, n=16)
    tfp_nvp.export_flow(model, str(tmp_path / "served"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    out = served.serve(x)["log_prob"]
    assert out.dtype == tf.float32
    # The SavedModel runs a graph, whose (fused) bfloat16 kernels round differently from eager ones: measured
    # 7e-4 relative here, so the check is at bfloat16's resolution, not float32's.
    np.testing.assert_allclose(out.numpy(), model.log_prob(x).numpy(), rtol=1e-2, atol=1e-2)
    samples = served.sample(tf.constant(5), tf.constant(1))
    assert samples.dtype == tf.float32 and np.all(np.isfinite(samples.numpy()))


@pytest.mark.parametrize("builder", ["real_nvp", "maf"])
def test_float64_flow_stays_float64(mixed_bfloat16, builder):
    flow = BUILDERS[builder]("float64")
    assert {layer.compute_dtype for layer in tfp_nvp.flow_layers(flow)} == {"float64"}
    assert all(v.dtype == tf.float64 for v in flow.trainable_variables)
    log_prob = flow.log_prob(tf.cast(data(flow), tf.float64))
    assert log_prob.dtype == tf.float64 and np.all(np.isfinite(log_prob.numpy()))


def test_float64_glow_stays_float64(mixed_bfloat16):
    flow = tfp_nvp.glow([4, 4, 1], num_levels=2, num_steps_per_level=1, hidden_channels=8, dtype="float64", seed=0)
    assert {layer.compute_dtype for layer in tfp_nvp.flow_layers(flow)} == {"float64"}


def test_mixed_float16_fit_uses_loss_scaling(mixed_float16):
    model = tfp_nvp.FlowModel(BUILDERS["real_nvp"]())
    networks, _ = networks_and_parameters(model.distribution)
    assert {layer.compute_dtype for layer in networks} == {"float16"}
    model.compile()  # the default Adam with its schedule, wrapped
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = data(model.distribution, n=128).numpy()
    before = [w.numpy().copy() for w in model.trainable_weights]
    # Dynamic loss scaling starts at 2**15 and skips the steps whose gradients overflow while it halves.
    history = model.fit(x, epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(model.optimizer.iterations.numpy()) > 0  # some steps were applied
    unmoved = [w.path for w, b in zip(model.trainable_weights, before) if np.array_equal(w.numpy(), b)]
    assert not unmoved
    assert np.all(np.isfinite(model.log_prob(x).numpy()))
