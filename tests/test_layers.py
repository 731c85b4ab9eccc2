"""FlowLayer: a flow as a Keras 3 layer inside functional and subclassed models (training, saving, sampling, errors)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp
from tfp_nvp import FlowLayer, NegativeLogLikelihood

CONTEXT = 4


def small_flow(name="flow", conditional=True, seed=0, **kwargs):
    return tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=seed, name=name,
                            conditional_shape=[CONTEXT] if conditional else None, **kwargs)


def regression_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, 1)).astype("float32")
    sign = rng.choice([-1.0, 1.0], (n, 1))
    y = np.concatenate([sign * np.sin(3 * x), x ** 2], axis=1) + 0.1 * rng.normal(size=(n, 2))
    return x, y.astype("float32")


def functional_model(nll_loss=True, name="flow"):
    x_in, y_in = keras.Input([1], name="x"), keras.Input([2], name="y")
    context = keras.layers.Dense(CONTEXT, activation="tanh", name="encoder")(x_in)
    log_prob = FlowLayer(small_flow(name), nll_loss=nll_loss, name="density")(y_in, context=context)
    return keras.Model([x_in, y_in], log_prob)


class ConditionalDensity(keras.Model):
    """The subclassed form: an encoder and a FlowLayer as attributes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.Sequential([keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(CONTEXT)])
        self.density = FlowLayer(small_flow("sub"), nll_loss=True)

    def call(self, inputs):
        x, y = inputs
        return self.density(y, context=self.encoder(x))


def snapshot(model):
    return [w.numpy().copy() for w in model.trainable_weights]


def assert_every_weight_moved(model, before):
    after = snapshot(model)
    unmoved = [w.path for w, a, b in zip(model.trainable_weights, after, before) if np.array_equal(a, b)]
    assert not unmoved, f"weights fit did not change: {unmoved}"


# ------------------------------------------------------------------------------------------- functional API
def test_functional_model_computes_the_flow_log_prob_and_tracks_every_weight(same_variable_set, randomize):
    model = functional_model()
    layer = model.get_layer("density")
    randomize(layer.flow, seed=1)
    # Both doors: the layer's Keras weights are exactly the flow's TFP variables.
    assert same_variable_set([w.value for w in layer.trainable_weights], layer.flow.trainable_variables)
    flow_ids = {id(v) for v in layer.flow.trainable_variables}
    assert flow_ids <= {id(w.value) for w in model.trainable_weights}
    assert len(model.trainable_weights) == len(flow_ids) + 2  # + the encoder's kernel and bias
    x, y = regression_data(16)
    context = model.get_layer("encoder")(x)
    expected = layer.flow.log_prob(y, bijector_kwargs=tfp_nvp.conditional_kwargs(layer.flow, context))
    got = model([x, y])
    assert got.shape == (16,)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # The list form is the same call.
    np.testing.assert_allclose(layer([y, context]), expected, rtol=1e-6, atol=1e-6)


def test_fit_with_the_added_loss_moves_every_weight_and_the_keras_file_reloads_exactly(tmp_path):
    keras.utils.set_random_seed(0)
    model = functional_model(nll_loss=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y = regression_data()
    before = snapshot(model)
    history = model.fit([x, y], epochs=3, batch_size=32, verbose=0)  # no targets: the layer adds its loss
    assert_every_weight_moved(model, before)
    # The loss Keras reports is the mean negative log-likelihood the model computes.
    assert history.history["loss"][-1] < history.history["loss"][0]
    log_prob = model.predict([x, y], verbose=0, batch_size=128)
    np.testing.assert_allclose(model.evaluate([x, y], verbose=0, batch_size=128), -np.mean(log_prob), rtol=1e-5)
    path = str(tmp_path / "conditional.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(reloaded.predict([x, y], verbose=0, batch_size=128), log_prob)
    layer = reloaded.get_layer("density")
    assert layer.flow is not model.get_layer("density").flow and layer.conditional
    # The reloaded layer still adds its loss, so `fit` goes on without a loss in `compile`.
    assert np.isfinite(reloaded.fit([x, y], epochs=1, batch_size=128, verbose=0).history["loss"][0])


def test_compiled_negative_log_likelihood_with_dummy_targets_and_sample_weights():
    keras.utils.set_random_seed(1)
    model = functional_model(nll_loss=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=NegativeLogLikelihood())
    x, y = regression_data()
    before = snapshot(model)
    model.fit([x, y], np.zeros(len(x)), epochs=2, batch_size=32, verbose=0)
    assert_every_weight_moved(model, before)
    log_prob = model.predict([x, y], verbose=0, batch_size=128)
    targets = np.full(len(x), 123.0)  # values are ignored
    np.testing.assert_allclose(model.evaluate([x, y], targets, verbose=0, batch_size=128), -log_prob.mean(),
                               rtol=1e-5)
    weights = np.where(np.arange(len(x)) < 32, 1.0, 0.0)
    weighted = model.evaluate([x, y], targets, sample_weight=weights, verbose=0, batch_size=128)
    np.testing.assert_allclose(weighted, -log_prob[:32].mean() * 32 / len(x), rtol=1e-5)


# ------------------------------------------------------------------------------------------- subclassed model
def test_subclassed_model_trains_every_weight_and_reloads_its_weights(tmp_path):
    keras.utils.set_random_seed(3)
    model = ConditionalDensity()
    x, y = regression_data()
    model([x[:2], y[:2]])
    assert {id(v) for v in model.density.flow.trainable_variables} <= {id(w.value) for w in model.trainable_weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = snapshot(model)
    model.fit([x, y], epochs=3, batch_size=32, verbose=0)
    assert_every_weight_moved(model, before)
    path = str(tmp_path / "sub.weights.h5")
    model.save_weights(path)
    fresh = ConditionalDensity()
    fresh([x[:2], y[:2]])
    fresh.load_weights(path)
    np.testing.assert_array_equal(fresh([x, y]), model([x, y]))


# ------------------------------------------------------------------------------------------- sampling
def test_sample_binds_the_context():
    layer = FlowLayer(small_flow("sampler"))
    for v in layer.flow.trainable_variables:
        v.assign(tf.random.stateless_normal(v.shape, seed=[7, v.shape.num_elements()], stddev=0.3))
    flow = layer.flow
    one = tf.constant([0.5, -1.0, 2.0, 0.0])
    # Stateless (pair) seeds: the same seed gives the same base draws.
    samples = layer.sample(6, one, seed=(1, 4))
    assert samples.shape == (6, 2)
    expected = flow.sample(6, seed=(1, 4), bijector_kwargs=tfp_nvp.conditional_kwargs(flow, one))
    np.testing.assert_allclose(samples, expected, rtol=1e-6, atol=1e-6)
    many = tf.random.stateless_normal([3, CONTEXT], seed=[1, 2])
    batch = layer.sample(5, many, seed=(1, 5))
    assert batch.shape == (5, 3, 2)
    # Column b holds draws given context row b: pushing their latents forward under that row reproduces them.
    kwargs = tfp_nvp.conditional_kwargs(flow, many)
    latents = flow.bijector.inverse(batch, **kwargs)
    np.testing.assert_allclose(flow.bijector.forward(latents, **kwargs), batch, rtol=1e-5, atol=1e-5)
    other = tfp_nvp.conditional_kwargs(flow, tf.roll(many, 1, axis=0))
    assert not np.allclose(flow.bijector.forward(latents, **other), batch, atol=1e-3)
    assert np.all(np.isfinite(layer.log_prob(tf.reshape(batch, [-1, 2]), tf.tile(many, [5, 1]))))


def test_unconditional_layer(tmp_path):
    flow = small_flow("plain", conditional=False)
    y_in = keras.Input([2])
    model = keras.Model(y_in, FlowLayer(flow, name="density")(y_in))
    _, y = regression_data(8)
    np.testing.assert_allclose(model(y), flow.log_prob(y), rtol=1e-6)
    assert model.get_layer("density").sample(4, seed=0).shape == (4, 2)
    model.save(str(tmp_path / "plain.keras"))
    np.testing.assert_array_equal(keras.models.load_model(str(tmp_path / "plain.keras"))(y), model(y))
    # The layer's spec carries the format FlowModel's does; a format-less "sigmoid" spec is refused the same way.
    spec = model.get_layer("density").get_config()["flow"]
    assert spec["format"] == tfp_nvp.flows.SPEC_FORMAT
    old = {"builder": spec["builder"], "config": {**spec["config"], "log_scale_bound": "sigmoid"}}
    with pytest.raises(ValueError, match="log_scale_bound='sigmoid'"):
        FlowLayer.from_config({"flow": old})


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors_when_the_model_is_built():
    layer = FlowLayer(small_flow("errors"))
    y_in, c_in = keras.Input([2]), keras.Input([CONTEXT])
    with pytest.raises(ValueError, match=r"`y` for .* must have shape \[batch, 2\]; got \[None, 3\]"):
        layer(keras.Input([3]), context=c_in)
    with pytest.raises(ValueError, match="conditional flow: pass `context` of shape \\[batch, 4\\]"):
        layer(y_in)
    with pytest.raises(ValueError, match=r"`context` for .* must have shape \[batch, 4\]; got \[None, 5\]"):
        layer(y_in, context=keras.Input([5]))
    with pytest.raises(ValueError, match="either as `\\[y, context\\]` or as `context=`"):
        layer([y_in, c_in], context=c_in)
    with pytest.raises(ValueError, match="list of 3 inputs"):
        layer([y_in, c_in, c_in])
    plain = FlowLayer(small_flow("plain_errors", conditional=False))
    with pytest.raises(ValueError, match="unconditional flow and takes no `context`"):
        plain(y_in, context=c_in)


def test_bad_inputs_raise_clear_errors_eagerly():
    layer = FlowLayer(small_flow("eager_errors"))
    y, c = tf.zeros([3, 2]), tf.zeros([3, CONTEXT])
    with pytest.raises(ValueError, match="same batch size; got 3 and 2"):
        layer(y, context=c[:2])
    with pytest.raises(ValueError, match=r"must have shape \[batch, 2\]; got \[2\]"):
        layer(y[0], context=c[0])
    with pytest.raises(TypeError, match="floating-point data; got dtype int32"):
        layer.log_prob(tf.zeros([3, 2], tf.int32), c)
    with pytest.raises(ValueError, match="pass `context` of shape \\[4\\] or \\[batch, 4\\] to sample"):
        layer.sample(2)
    with pytest.raises(ValueError, match="`n` must be a non-negative integer"):
        layer.sample(-1, c[0])
    with pytest.raises(ValueError, match=r"`context` for .* must have shape \[..., 4\]; got \(3,\)"):
        layer.sample(2, tf.zeros([3]))
    with pytest.raises(TypeError, match="`flow` must be a flow distribution"):
        FlowLayer(tfp_nvp.flows.standard_normal([2]).sample)
    with pytest.raises(TypeError, match="context bound by tfp_nvp.condition"):
        FlowLayer(tfp_nvp.condition(layer.flow, c))
    with pytest.raises(TypeError, match="`nll_loss` must be True or False"):
        FlowLayer(small_flow("flag"), nll_loss="yes")


def test_custom_base_cannot_be_saved_as_keras_file():
    import tensorflow_probability as tfp

    base = tfp.distributions.Independent(tfp.distributions.Laplace(tf.zeros([2]), 1.0), 1)
    layer = FlowLayer(small_flow("custom", base_distribution=base))
    with pytest.raises(NotImplementedError, match="default base"):
        layer.get_config()
