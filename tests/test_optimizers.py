"""FusedAdam: Adam's update rule with one fused op per weight, in every way Keras runs an optimizer."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp
from tfp_nvp import FusedAdam

SHAPES = [(3, 4), (4,), (2, 5)]


def _gradients(step, dtype):
    # Deterministic, sign-changing gradients of different sizes per weight.
    return [np.sin((step + 1) * np.arange(np.prod(s)).reshape(s) + 0.3).astype(dtype) for s in SHAPES]


def _initial(dtype):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _run(optimizer, dtype, steps, jit_compile=None):
    weights = [keras.Variable(w) for w in _initial(dtype)]

    def step(grads):
        optimizer.apply(grads, weights)

    if jit_compile is not None:
        step = tf.function(step, jit_compile=jit_compile)
    for i in range(steps):
        step([tf.constant(g) for g in _gradients(i, dtype)])
    return [np.asarray(w) for w in weights]


def _reference_adam(dtype, steps, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Kingma & Ba's Adam with epsilon outside the square root (Keras' convention), in float64 NumPy."""
    weights = [w.astype(np.float64) for w in _initial(dtype)]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    for i in range(steps):
        t = i + 1
        lr = learning_rate(i)
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for w, mi, vi, g in zip(weights, m, v, _gradients(i, np.float64)):
            mi += (1 - beta_1) * (g - mi)
            vi += (1 - beta_2) * (g * g - vi)
            w -= alpha * mi / (np.sqrt(vi) + epsilon)
    return weights


def test_float64_update_is_adams_rule_exactly():
    # A decaying schedule: the rate differs at every step, so a rate read at the wrong step is caught.
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)
    got = _run(FusedAdam(schedule), "float64", steps=6, jit_compile=False)
    # Keras keeps the learning rate in a float32 variable: the reference uses the same rounded rates.
    want = _reference_adam("float64", 6, lambda i: float(np.float32(0.05 * 0.5**i)))
    for g, w, w0 in zip(got, want, _initial("float64")):
        assert np.abs(g - w0).max() > 1e-2  # the weights moved
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-13)


@pytest.mark.parametrize("jit_compile", [None, False, True])
def test_matches_keras_adam(jit_compile):
    # Keras' own Adam rounds `1 - beta_2` and the bias correction differently in float32 (a relative 6e-6 of a
    # step); after five steps of rate 0.1 the two agree to 1e-5 while every weight has moved by ~0.5.
    got = _run(FusedAdam(0.1), "float32", steps=5, jit_compile=jit_compile)
    want = _run(keras.optimizers.Adam(0.1), "float32", steps=5, jit_compile=jit_compile)
    for g, w, w0 in zip(got, want, _initial("float32")):
        assert np.abs(w - w0).max() > 0.3
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("jit_compile", [None, True])
def test_keeps_keras_features_around_the_update(jit_compile):
    # Weight decay runs in Keras' code before the update; amsgrad keeps Keras' update; clipnorm is FusedAdam's
    # own and must clip exactly as Keras does: at 0.1 every gradient is clipped, at 1.4 the (4,) weight's
    # gradient (norm 0.36-1.35 over these steps) is not while the others (norm >= 1.5) are.
    norms = [[np.linalg.norm(g) for g in _gradients(i, "float64")] for i in range(4)]
    assert all(n[1] < 1.4 < min(n[0], n[2]) for n in norms), norms
    for kwargs in (dict(clipnorm=0.1), dict(clipnorm=1.4), dict(weight_decay=0.1), dict(amsgrad=True)):
        got = _run(FusedAdam(0.1, **kwargs), "float32", steps=4, jit_compile=jit_compile)
        want = _run(keras.optimizers.Adam(0.1, **kwargs), "float32", steps=4, jit_compile=jit_compile)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=str(kwargs))


def test_clipnorm_scales_each_gradient_to_the_norm():
    optimizer = FusedAdam(0.1, clipnorm=1.0)
    grads = [tf.constant([3.0, 4.0]), tf.constant([0.3, 0.4]), tf.zeros([3]), None]
    clipped = optimizer._clip_gradients(grads)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped[1], grads[1])  # under the norm: untouched
    np.testing.assert_array_equal(clipped[2], np.zeros(3))  # zero gradient: no division by zero
    assert clipped[3] is None


def _update_ops_per_weight(optimizer_class, n, **kwargs):
    weights = [keras.Variable(np.ones((4, 4), "float32")) for _ in range(n)]
    optimizer = optimizer_class(1e-3, **kwargs)
    optimizer.build(weights)
    graph = tf.function(lambda grads: optimizer.apply(grads, weights)).get_concrete_function(
        [tf.TensorSpec((4, 4))] * n).graph
    # Placeholders (the weight, its two slots, its gradient) come with every weight whatever the optimizer.
    return sum(op.type != "Placeholder" for op in graph.get_operations())


def test_update_builds_a_few_ops_per_weight():
    # The point of the class: the graph grows by a handful of ops per weight (the fused update and reads),
    # where Keras' Adam adds dozens.
    fused = (_update_ops_per_weight(FusedAdam, 20) - _update_ops_per_weight(FusedAdam, 10)) / 10
    plain = (_update_ops_per_weight(keras.optimizers.Adam, 20)
             - _update_ops_per_weight(keras.optimizers.Adam, 10)) / 10
    assert fused <= 3, fused
    assert plain >= 8 * fused, (plain, fused)
    # Clipping each gradient's norm adds two ops per weight (its L2Loss and the scaling), not Keras' ~17.
    clipped = (_update_ops_per_weight(FusedAdam, 20, clipnorm=1.0)
               - _update_ops_per_weight(FusedAdam, 10, clipnorm=1.0)) / 10
    assert clipped <= fused + 2, (clipped, fused)


def test_state_and_checkpoints_are_keras_adams(tmp_path):
    # FusedAdam finds each weight's moments by watching Adam's build create them: the optimizer's variables
    # (names, shapes, order) and its checkpoint dependencies must stay exactly Adam's, in both directions.
    weights = [keras.Variable(w) for w in _initial("float32")]
    fused, plain = FusedAdam(0.1), keras.optimizers.Adam(0.1)
    for optimizer in (fused, plain):
        optimizer.build(weights)
    def layout(optimizer):  # paths start with the optimizer's own name
        return [(v.path.split("/", 1)[1], tuple(v.shape), v.dtype) for v in optimizer.variables]

    assert layout(fused) == layout(plain)
    for step in range(2):
        fused.apply([tf.constant(g) for g in _gradients(step, "float32")], weights)
    for source, target_class in ((fused, keras.optimizers.Adam), (plain, FusedAdam)):
        path = tf.train.Checkpoint(optimizer=source).save(str(tmp_path / type(source).__name__))
        target = target_class(0.1)
        target.build(weights)
        tf.train.Checkpoint(optimizer=target).restore(path).assert_consumed()
        for a, b in zip(source.variables, target.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_each_weight_updates_its_own_moments():
    # Two weights of the same shape: a mix-up of their moments would go unnoticed by shape checks.
    weights = [keras.Variable(np.zeros(3, "float32")) for _ in range(2)]
    optimizer = FusedAdam(0.1)
    optimizer.apply([tf.constant([1.0, 2.0, 3.0]), tf.constant([-4.0, 0.0, 5.0])], weights)
    plain = keras.optimizers.Adam(0.1)
    reference = [keras.Variable(np.zeros(3, "float32")) for _ in range(2)]
    plain.apply([tf.constant([1.0, 2.0, 3.0]), tf.constant([-4.0, 0.0, 5.0])], reference)
    # Equal up to Keras' own rounding of `1 - beta_2` (see the class docstring).
    for a, b in zip(optimizer.variables, plain.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, err_msg=a.path)


def test_flow_model_save_and_reload(tmp_path):
    x = tfp_nvp.data.two_moons(256, seed=0)
    model = tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=0))
    model.compile(optimizer=FusedAdam(tfp_nvp.WarmupCosineDecay()))
    model.fit(x, batch_size=64, epochs=2, verbose=0)
    path = tmp_path / "flow.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is FusedAdam
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 8
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The schedule's cycle, sized by fit, is saved too: the reloaded optimizer is at the same rate (the end of
    # the decay, not the peak), for a custom training loop as for fit.
    rate = float(model.optimizer.learning_rate)
    assert rate < 0.1 * tfp_nvp.WarmupCosineDecay().peak_learning_rate
    assert float(loaded.optimizer.learning_rate) == rate
    # Reloaded state continues exactly: one more epoch from both gives the same weights.
    for m in (model, loaded):
        m.fit(x, batch_size=64, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


def test_mirrored_training_matches_single_device():
    cpus = tf.config.list_logical_devices("CPU")
    assert len(cpus) >= 2, "tests/conftest.py should have split the CPU into two logical devices"
    x = tfp_nvp.data.two_moons(128, seed=1)
    results = []
    # Reduction through one device, not collectives: a second collective MirroredStrategy in the process (the
    # suite's distribution tests make one) can reuse their collective instance keys with other shapes.
    mirrored = tf.distribute.MirroredStrategy([c.name for c in cpus[:2]],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    for strategy in (tf.distribute.get_strategy(), mirrored):
        with strategy.scope():
            model = tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=0))
            model.compile(optimizer=FusedAdam(1e-2))
        model.fit(x, batch_size=32, epochs=2, shuffle=False, verbose=0)
        if strategy is mirrored:
            for w in model.weights:  # every replica got the same update
                copies = [np.asarray(v) for v in strategy.experimental_local_results(w.value)]
                np.testing.assert_array_equal(copies[1], copies[0])
        results.append([np.asarray(w) for w in model.trainable_weights])
    for a, b, w0 in zip(*results, [np.asarray(w) for w in tfp_nvp.FlowModel(tfp_nvp.real_nvp(
            [2], num_coupling_layers=2, hidden_units=(8,), seed=0)).trainable_weights]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
        assert not np.array_equal(a, w0)  # trained
