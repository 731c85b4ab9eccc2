"""FlowModel and the two doors to every parameter: TFP (tf.Module) and Keras (fit, callbacks, saving)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import AffineCoupling, FlowModel
from tfp_nvp.data import two_moons

tfb, tfd = tfp.bijectors, tfp.distributions

MOONS_CONFIG = dict(event_shape=[2], num_coupling_layers=4, hidden_units=(64, 64))


def keras_door(model):
    return [w.value for w in model.trainable_weights]


def coupling_variables(flow):
    return [v for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, AffineCoupling) for v in b.trainable_variables]


def small_flows():
    return {
        "vector_tanh": tfp_nvp.real_nvp([3], num_coupling_layers=3, hidden_units=(8,), seed=0),
        "vector_sigmoid_towers": tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), separate_towers=True,
                                                  log_scale_bound="sigmoid", seed=1),
        "image": tfp_nvp.real_nvp([4, 4, 2], num_coupling_layers=2, hidden_units=(8,), num_blocks=1, seed=2),
        "conditional": tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), conditional_shape=[3], seed=3),
    }


def example_batch(flow, n=64):
    x = tf.random.stateless_normal([n, *flow.event_shape], seed=[1, 1])
    cond = any(getattr(b, "_conditional_shape", None) for b in tfp_nvp.flow_bijectors(flow))
    kwargs = {}
    if cond:
        kwargs["bijector_kwargs"] = tfp_nvp.conditional_kwargs(flow, tf.random.stateless_normal([n, 3], seed=[2, 2]))
    return x, kwargs


# --------------------------------------------------------------------------------------------- two doors
@pytest.mark.parametrize("kind", list(small_flows()))
def test_both_doors_list_the_same_variables(kind, same_variable_set):
    flow = small_flows()[kind]
    model = FlowModel(flow)
    keras_side = keras_door(model)
    couplings = [b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, AffineCoupling)]
    assert len(couplings) == len(flow.bijector.bijectors)
    assert same_variable_set(flow.trainable_variables, keras_side)
    assert same_variable_set(flow.bijector.trainable_variables, keras_side)
    assert same_variable_set(coupling_variables(flow), keras_side)
    # The learnable tanh bound is a parameter like any other, on both sides.
    scales = [b.scale.value for b in couplings if b.scale is not None]
    assert len(scales) == (len(couplings) if kind != "vector_sigmoid_towers" else 0)
    assert {id(s) for s in scales} <= {id(v) for v in keras_side}
    # Every network weight is there too.
    net_vars = [w.value for b in couplings for w in b.network.trainable_weights]
    assert {id(v) for v in net_vars} <= {id(v) for v in keras_side}
    assert len(keras_side) == len(net_vars) + len(scales)


@pytest.mark.parametrize("kind", list(small_flows()))
def test_every_weight_gets_a_gradient(kind, randomize):
    flow = small_flows()[kind]
    model = FlowModel(flow)
    randomize(flow, seed=4)
    x, kwargs = example_batch(flow)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(flow.log_prob(x, **kwargs))
    grads = tape.gradient(loss, keras_door(model))
    assert all(g is not None for g in grads)
    assert all(np.any(g.numpy() != 0) for g in grads)


def test_tfp_vi_trains_every_variable():
    """The TFP door alone is enough to train: tfp.vi moves every weight that Keras also tracks."""
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=5)
    model = FlowModel(flow)
    before = [v.numpy().copy() for v in keras_door(model)]
    target = tfd.MultivariateNormalTriL(loc=[1.0, -1.0], scale_tril=[[1.0, 0.0], [0.8, 0.5]])
    # Adam's first step sees zero gradients for the hidden layers and the tanh scale (the zero-initialised head
    # blocks them), so a few steps are needed before every variable has moved.
    losses = tfp.vi.fit_surrogate_posterior(target.log_prob, surrogate_posterior=flow,
                                            optimizer=tf.optimizers.Adam(1e-2), num_steps=6, sample_size=32,
                                            seed=(1, 2))
    assert np.all(np.isfinite(losses.numpy()))
    assert all(np.any(b != v.numpy()) for b, v in zip(before, keras_door(model)))


def test_flow_model_rejects_tf_keras_networks():
    import tf_keras

    net = tf_keras.Sequential([tf_keras.layers.Dense(8, activation="tanh"), tf_keras.layers.Dense(2)])
    flow = tfd.TransformedDistribution(tfp_nvp.standard_normal([2]),
                                       tfb.Chain([AffineCoupling([2], network=net)]))
    with pytest.raises(ValueError, match="tf_keras"):
        FlowModel(flow)


def test_flow_model_rejects_bad_inputs():
    with pytest.raises(ValueError, match="`distribution`"):
        FlowModel("real_nvp")
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,)))
    with pytest.raises(ValueError, match="'x'"):
        model({"data": tf.zeros([3, 2])})
    with pytest.raises(ValueError, match=r"must have shape \[\.\.\., 2\]"):
        model.log_prob(tf.zeros([3, 5]))
    model.compile()
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match=rf"`batch_size` must be a positive integer or None; got {bad}"):
            model.fit(np.zeros([8, 2], np.float32), batch_size=bad, verbose=0)
    with pytest.raises(ValueError, match="`validation_batch_size` must be a positive integer"):
        model.fit(np.zeros([8, 2], np.float32), validation_split=0.5, validation_batch_size=0, verbose=0)


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def moons_data():
    return dict(train=two_moons(2000, seed=0), val=two_moons(500, seed=2), test=two_moons(20000, seed=1))


@pytest.fixture(scope="module")
def trained(moons_data):
    """RealNVP trained on two moons with validation data (one fit shared by many tests).

    XLA is exercised by the smaller model in test_weight_penalty_validation_split_and_callbacks: compiling this
    one costs more than its whole training.
    """
    keras.utils.set_random_seed(0)
    model = FlowModel(tfp_nvp.real_nvp(**MOONS_CONFIG, seed=0))
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(5e-3))
    history = model.fit(moons_data["train"], epochs=20, batch_size=250, validation_data=(moons_data["val"],),
                        verbose=0)
    return dict(model=model, history=history.history, before=before)


def test_fit_history(trained):
    h = trained["history"]
    for key in ("loss", "nll", "val_loss", "val_nll"):
        assert len(h[key]) == 20 and np.all(np.isfinite(h[key])), key
    # Without weight penalties the loss is exactly the mean NLL.
    np.testing.assert_allclose(h["loss"], h["nll"], rtol=1e-5)
    np.testing.assert_allclose(h["val_loss"], h["val_nll"], rtol=1e-5)
    assert h["nll"][-1] < h["nll"][0] - 0.3
    assert h["val_nll"][-1] < h["val_nll"][0] - 0.2


def test_fit_changes_every_weight(trained):
    after = [w.numpy() for w in trained["model"].trainable_weights]
    assert len(after) == len(trained["before"]) == 4 * (3 * 2 + 1)
    assert all(np.any(b != a) for b, a in zip(trained["before"], after))


def test_evaluate_reports_mean_nll(trained, moons_data):
    model = trained["model"]
    result = model.evaluate(moons_data["val"], batch_size=100, verbose=0, return_dict=True)
    expected = -np.mean(model.log_prob(moons_data["val"]).numpy())
    np.testing.assert_allclose(result["nll"], expected, rtol=1e-5)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)


def test_held_out_nll_between_gaussian_fit_and_entropy(trained, moons_data, moons_entropy_coarse):
    """Training beats the best Gaussian on fresh data, and no model can beat the true entropy."""
    train = moons_data["train"].astype(np.float64)
    gaussian_nll = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * np.cov(train.T)))
    held_out_nll = -np.mean(trained["model"].log_prob(moons_data["test"]).numpy())
    assert held_out_nll < gaussian_nll - 0.2
    # 20000 test points put the Monte Carlo error of the held-out NLL near 0.01 nats.
    assert held_out_nll > moons_entropy_coarse + 0.05


def test_sample(trained):
    model = trained["model"]
    s = model.sample(7, seed=(1, 2))
    assert s.shape == (7, 2)
    np.testing.assert_array_equal(s, model.sample(7, seed=(1, 2)))
    assert np.any(s.numpy() != model.sample(7, seed=(1, 3)).numpy())


def test_save_weights_into_fresh_flow(trained, moons_data, tmp_path):
    model = trained["model"]
    path = tmp_path / "moons.weights.h5"
    model.save_weights(path)
    fresh = FlowModel(tfp_nvp.real_nvp(**MOONS_CONFIG, seed=99))
    x = moons_data["val"]
    assert np.any(fresh.log_prob(x).numpy() != model.log_prob(x).numpy())
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh.log_prob(x), model.log_prob(x))


def test_keras_file_round_trip(trained, moons_data, tmp_path):
    model = trained["model"]
    path = tmp_path / "moons.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FlowModel)
    x = moons_data["val"]
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))
    np.testing.assert_array_equal(loaded.sample(5, seed=(4, 4)), model.sample(5, seed=(4, 4)))


def test_keras_save_rejects_custom_base(tmp_path):
    base = tfd.MultivariateNormalDiag(loc=[0.0, 1.0], scale_diag=[1.0, 2.0])
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), base_distribution=base))
    with pytest.raises(NotImplementedError, match="default base"):
        model.save(tmp_path / "custom.keras")


def test_weight_penalty_validation_split_and_callbacks(tmp_path):
    """Under XLA, with l2 > 0 the loss carries the penalty; EarlyStopping reads val_nll; TensorBoard logs."""
    x = two_moons(400, seed=3)
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(16,), l2=1e-2, seed=6))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=True)
    assert model.jit_compile  # Keras silently falls back to no XLA for models it deems unsupported.
    # min_delta above any possible gain makes epoch 2 a non-improvement, so patience 0 stops right there.
    # No mode="min": FlowModel declares its metrics lower-is-better, so Keras infers the direction.
    stop = keras.callbacks.EarlyStopping(monitor="val_nll", patience=0, min_delta=1e6)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "logs"))
    h = model.fit(x, epochs=10, batch_size=100, validation_split=0.25, callbacks=[stop, board], verbose=0).history
    assert len(h["loss"]) == 2 and len(h["val_nll"]) == 2 and stop.stopped_epoch == 1
    assert all(l > n for l, n in zip(h["loss"], h["nll"]))
    assert all(l > n for l, n in zip(h["val_loss"], h["val_nll"]))
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*")), "TensorBoard wrote no event file"
    result = model.evaluate(x, batch_size=100, verbose=0, return_dict=True)
    penalty = float(tf.add_n(model.losses))
    assert penalty > 0
    np.testing.assert_allclose(result["loss"] - result["nll"], penalty, rtol=1e-4)
    np.testing.assert_allclose(result["nll"], -np.mean(model.log_prob(x).numpy()), rtol=1e-5)


def test_terminate_on_nan_stops_training():
    x = two_moons(200, seed=4)
    x[7, 0] = np.nan
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), seed=7))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    h = model.fit(x, epochs=5, batch_size=200, shuffle=False, callbacks=[keras.callbacks.TerminateOnNaN()],
                  verbose=0).history
    assert len(h["loss"]) == 1 and np.isnan(h["loss"][0])


def test_conditional_flow_model_fits_dict_inputs():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(512, 3)).astype(np.float32)
    # The data's mean is set by the condition, so a conditional flow can do much better than a marginal one.
    x = (2.0 * c[:, :2] + 0.3 * rng.normal(size=(512, 2))).astype(np.float32)
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(32,), conditional_shape=[3], seed=8))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = -np.mean(model.log_prob(x, conditional_input=c).numpy())
    h = model.fit({"x": x, "conditional_input": c}, epochs=15, batch_size=128, verbose=0).history
    after = -np.mean(model.log_prob(x, conditional_input=c).numpy())
    assert np.all(np.isfinite(h["nll"]))
    assert after < before - 0.5
    # The fitted density really uses the condition: shuffling it makes the data less likely.
    shuffled = -np.mean(model.log_prob(x, conditional_input=c[::-1]).numpy())
    assert shuffled > after + 0.5
    assert model.sample(4, seed=(5, 5), conditional_input=c[:4]).shape == (4, 2)
    # A float64 condition (NumPy's default) is cast to the flow's dtype, in sample as in log_prob.
    np.testing.assert_array_equal(model.sample(4, seed=(5, 5), conditional_input=c[:4].astype(np.float64)),
                                  model.sample(4, seed=(5, 5), conditional_input=c[:4]))


def test_levels_dequantizes_and_reports_bits_per_dim():
    """levels=L: integer images are dequantized per batch and bits/dim = (nll + D ln L) / (D ln 2) is reported."""
    x = np.random.default_rng(0).integers(0, 5, size=(64, 4, 4, 1))
    model = FlowModel(tfp_nvp.real_nvp([4, 4, 1], num_coupling_layers=2, hidden_units=(8,), seed=1), levels=5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    stop = keras.callbacks.EarlyStopping(monitor="val_bits_per_dim", patience=5)  # direction inferred
    h = model.fit(x, validation_data=(x,), epochs=2, batch_size=32, callbacks=[stop], verbose=0).history
    for nll, bpd in ((h["nll"][-1], h["bits_per_dim"][-1]), (h["val_nll"][-1], h["val_bits_per_dim"][-1])):
        np.testing.assert_allclose(bpd, (nll + 16 * np.log(5)) / (16 * np.log(2)), rtol=1e-5)
    # Fresh noise per call: the same integer batch scores differently twice, but each is a dequantized density.
    a, b = model(x).numpy(), model(x).numpy()
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="levels"):
        FlowModel(tfp_nvp.real_nvp([2]), levels=1)


@pytest.mark.parametrize("n", [-1, 2.5, "3", True])
def test_sample_count_must_be_a_non_negative_integer(n):
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,)))
    with pytest.raises(ValueError, match=r"`n` must be a non-negative integer"):
        model.sample(n)


@pytest.mark.parametrize("shuffle", [True, False])
def test_fit_pipelines_run_without_tf_data_autotuning(shuffle, monkeypatch):
    # The autotuner's background thread held the input iterator's destruction when `fit` returned, for up to
    # its optimization period (15-18 s after a 25 s run, in about one run in five): FlowModel's own pipelines,
    # training and validation, have nothing to tune and switch it off.
    seen = {}
    keras_fit = keras.Model.fit

    def spy(self, x=None, *args, validation_data=None, **kwargs):
        seen["train"], seen["val"] = x, validation_data
        return keras_fit(self, x, *args, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=0))
    model.compile()
    history = model.fit(two_moons(200, seed=0), batch_size=50, epochs=2, validation_split=0.25, shuffle=shuffle,
                        verbose=0)
    assert len(history.history["val_nll"]) == 2
    for name in ("train", "val"):
        assert isinstance(seen[name], tf.data.Dataset), name
        assert seen[name].options().autotune.enabled is False, name


def test_validation_split_is_made_once_when_keras_runs_the_fit(monkeypatch):
    # 100 examples, 20% held out, batches of 16: 5 training steps an epoch, which steps_per_execution=2 does not
    # divide, so Keras' own fit runs; it must get the data whole and split it once (80 to train on, not 64).
    seen = {}
    keras_fit = keras.Model.fit

    def spy(self, x=None, *args, **kwargs):
        seen["examples"], seen["validation_split"] = len(x), kwargs.get("validation_split")
        return keras_fit(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), seed=0))
    model.compile(optimizer=keras.optimizers.SGD(1e-3), steps_per_execution=2)
    history = model.fit(two_moons(100, seed=0), batch_size=16, epochs=1, validation_split=0.2, verbose=0)
    assert seen == {"examples": 100, "validation_split": 0.2}
    assert int(model.optimizer.iterations) == 5
    assert len(history.history["val_nll"]) == 1


def test_sample_weights_weight_training_and_every_reported_mean():
    """Keras drops the weights of data without targets; FlowModel must not (a flow has no targets)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 2)).astype(np.float32) * np.array([1.0, 3.0], np.float32)
    w = np.r_[np.ones(32), np.zeros(32)].astype(np.float32)

    def model(seed=4):
        m = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=seed))
        m.compile(optimizer=keras.optimizers.SGD(0.1))
        return m

    weighted, first_half = model(), model()
    nll = -weighted.log_prob(x).numpy()
    expected = float(np.sum(w * nll) / np.sum(w))
    assert abs(expected - nll.mean()) > 1e-3, "the weights must matter for this data"
    scores = weighted.evaluate(x, sample_weight=w, batch_size=16, verbose=0, return_dict=True)
    np.testing.assert_allclose(scores["nll"], expected, rtol=1e-5)
    # `loss` averages the batches' weighted means: the two all-zero batches count as 0.
    halves = [np.sum(w[i:i + 16] * nll[i:i + 16]) / np.sum(w[i:i + 16]) for i in (0, 16)]
    np.testing.assert_allclose(scores["loss"], np.sum(halves) / 4, rtol=1e-5)
    history = weighted.fit(x[:8], epochs=1, batch_size=8, verbose=0, shuffle=False,
                           validation_data=(x, None, w), validation_batch_size=16).history
    np.testing.assert_allclose(history["val_nll"][0], -np.sum(w * weighted.log_prob(x).numpy()) / np.sum(w),
                               rtol=1e-5)
    # One full-batch step with weights 1 on the first half and 0 on the rest is a step on the first half.
    weighted, first_half = model(), model()
    weighted.fit(x, sample_weight=w, epochs=1, batch_size=64, shuffle=False, verbose=0)
    first_half.fit(x[:32], epochs=1, batch_size=32, shuffle=False, verbose=0)
    moved = False
    for a, b, start in zip(weighted.trainable_weights, first_half.trainable_weights, model().trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        moved |= not np.array_equal(a.numpy(), start.numpy())
    assert moved
    with pytest.raises(ValueError, match="`sample_weight` needs `x` as arrays"):
        weighted.evaluate(tf.data.Dataset.from_tensor_slices(x).batch(8), sample_weight=w, verbose=0)


def test_training_noise_jitters_training_batches_only(tmp_path):
    """training_noise=s: training batches become x + s * e (per entry), everything else sees x as given."""
    noise = [0.5, 1.0]
    x = np.random.default_rng(3).normal(size=(8192, 2)).astype(np.float32)
    # A new real_nvp is the identity on a standard normal base, so log p(x + s e) = log N(x + s e; 0, I) and
    # the training NLL exceeds the clean one by E|s e|^2 / 2 = (0.25 + 1) / 2 on average.
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), seed=2), training_noise=noise)
    clean = -np.mean(model.log_prob(x).numpy())
    np.testing.assert_array_equal(model(x).numpy(), model.log_prob(x).numpy())  # training=False: no noise
    jittered = -np.mean(model(x, training=True).numpy())
    np.testing.assert_allclose(jittered - clean, 0.625, atol=0.04)
    # A zero rate leaves the flow as it is: fit's NLL is that of jittered batches, evaluate's is the clean one.
    model.compile(optimizer=keras.optimizers.Adam(0.0))
    h = model.fit(x, epochs=1, batch_size=1024, validation_data=(x,), verbose=0).history
    np.testing.assert_allclose(h["nll"][0] - clean, 0.625, atol=0.04)
    np.testing.assert_allclose(h["val_nll"][0], clean, rtol=1e-5)
    np.testing.assert_allclose(model.evaluate(x, batch_size=1024, verbose=0, return_dict=True)["nll"], clean,
                               rtol=1e-5)
    # Per-entry scales: only the first entry jittered.
    one = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), seed=2), training_noise=[0.5, 0])
    np.testing.assert_allclose(-np.mean(one(x, training=True).numpy()) - clean, 0.125, atol=0.02)
    # Saved with the model, and fixed: the traced training step holds it.
    model.save(tmp_path / "noisy.keras")
    assert keras.saving.load_model(tmp_path / "noisy.keras").training_noise == noise
    with pytest.raises(AttributeError):
        model.training_noise = 0.1
    # Conditional flows: the data entry of dict inputs is jittered (the condition is passed as given).
    cond = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), conditional_shape=[3], seed=2),
                     training_noise=noise)
    inputs = {"x": x, "conditional_input": np.ones([len(x), 3], np.float32)}
    np.testing.assert_allclose(-np.mean(cond(inputs, training=True).numpy()) - clean, 0.625, atol=0.04)
    np.testing.assert_array_equal(cond(inputs).numpy(), model.log_prob(x).numpy())


@pytest.mark.parametrize("bad, match", [
    (-0.1, ">= 0"), (float("nan"), ">= 0"), (True, "number"), (np.True_, "number"), ([True, False], "number"),
    ("a", "number"), ("0.1", "number"), ([0.1, "0.2"], "number"), ([[0.1], [0.1, 0.2]], "number"),
    ([0.1, 0.2, 0.3], r"event shape \[2\]"), ([[[0.1]]], r"event shape \[2\]; got shape \[1, 1, 1\]"),
])
def test_training_noise_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=f"`training_noise`.*{match}"):
        FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,)), training_noise=bad)


def test_training_noise_and_levels_exclude_each_other():
    with pytest.raises(ValueError, match="`training_noise` is for continuous data"):
        FlowModel(tfp_nvp.real_nvp([4, 4, 1], num_coupling_layers=1, hidden_units=(4,)), levels=5,
                  training_noise=0.1)


def _rewrite_spec(path, out, edit):
    """Copy of the `.keras` archive `path` with its flow spec passed through `edit` (a dict -> None)."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                edit(config["config"]["distribution"])
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    return out


@pytest.mark.parametrize("builder, kwargs", [
    ("real_nvp", dict(event_shape=[2], num_coupling_layers=2, hidden_units=(4,))),
    ("maf", dict(event_shape=[3], num_layers=2, hidden_units=(8,))),
])
def test_keras_file_spec_format(builder, kwargs, tmp_path):
    """Specs carry a format; an old file whose sigmoid bound had the other orientation is refused, not
    silently rebuilt into different densities; old tanh files, and the present format, load exactly."""
    x = tf.random.stateless_normal([16, *kwargs["event_shape"]], seed=[3, 4])
    for bound in ("sigmoid", "tanh"):
        model = FlowModel(getattr(tfp_nvp, builder)(**kwargs, log_scale_bound=bound, seed=5))
        model.log_prob(x)
        assert model.get_config()["distribution"]["format"] == tfp_nvp.flows.SPEC_FORMAT
        path = tmp_path / f"{builder}_{bound}.keras"
        model.save(path)
        np.testing.assert_array_equal(keras.saving.load_model(path).log_prob(x), model.log_prob(x))
        old = _rewrite_spec(path, tmp_path / f"old_{builder}_{bound}.keras", lambda spec: spec.pop("format"))
        if bound == "sigmoid":
            with pytest.raises(ValueError, match="log_scale_bound='sigmoid'.*older than 2026-11-27"):
                keras.saving.load_model(old)
        else:
            np.testing.assert_array_equal(keras.saving.load_model(old).log_prob(x), model.log_prob(x))
    newer = _rewrite_spec(path, tmp_path / "newer.keras", lambda spec: spec.update(format=99))
    with pytest.raises(ValueError, match="newer tfp_nvp.*format 99"):
        keras.saving.load_model(newer)
    unknown = _rewrite_spec(path, tmp_path / "unknown.keras", lambda spec: spec.update(builder="nice"))
    with pytest.raises(ValueError, match="builder 'nice'"):
        keras.saving.load_model(unknown)
