"""MADE, MaskedAutoregressive / InverseAutoregressive and the maf / iaf builders.

MADE's autoregressive property by autodiff; both bijector directions inverted exactly with log-dets matching
autodiff (float64, random weights, conditional too); TFP's cache answering the log-density of a flow's own
samples; both doors; training through Keras and through tfp.vi; reload; clear errors; and a tfb.Chain mixing
this package's bijectors with TFP's own MaskedAutoregressiveFlow.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import AffineCoupling, FlowModel, InverseAutoregressive, MaskedAutoregressive
from tfp_nvp.networks import MADE, MaskedDense
from tfp_nvp.bijectors._reuse import one_call

tfb, tfd = tfp.bijectors, tfp.distributions

D = 4


def randomize_keras(layer, seed, scale=1.0):
    """Random values for every weight of a Keras 3 layer (its head starts at zero, which would hide masks)."""
    rng = np.random.default_rng(seed)
    for w in layer.trainable_weights:
        shape = tuple(w.shape)
        std = scale / np.sqrt(shape[0]) if len(shape) == 2 else scale / 2
        w.assign(rng.normal(0.0, std, size=shape))


def kwargs_for(conditional, c):
    return {"conditional_input": c} if conditional else {}


# --------------------------------------------------------------------------------------------- MADE
@pytest.mark.parametrize("order", ["left-to-right", "right-to-left", "random", [2, 0, 4, 1, 3]])
def test_made_jacobian_is_strictly_lower_triangular_in_its_order(order):
    made = MADE(hidden_units=(12, 12), event_size=5, input_order=order, conditional_size=2, activation="tanh",
                seed=3, dtype="float64")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(6, 5)))
    c = tf.constant(rng.normal(size=(6, 2)))
    made(x, conditional_input=c)
    randomize_keras(made, seed=1)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, c])
        shift, log_scale = made(x, conditional_input=c)
    generation = made.input_order
    if not isinstance(order, str):
        assert generation == order
    elif order != "random":
        assert generation == (list(range(5)) if order == "left-to-right" else list(range(5))[::-1])
    assert sorted(generation) == list(range(5))
    for out in (shift, log_scale):
        jac = tape.batch_jacobian(out, x, experimental_use_pfor=False).numpy()  # [N, out, in]
        ordered = np.abs(jac[:, generation][:, :, generation]).max(axis=0)
        assert np.all(np.triu(ordered) == 0.0), "an output depends on a later or its own input"
        assert np.all(ordered[np.tril_indices(5, -1)] > 1e-8), "an allowed connection is missing"
        # The condition reaches every output, the first generated dimension's too.
        jac_c = tape.batch_jacobian(out, c, experimental_use_pfor=False).numpy()
        assert np.all(np.abs(jac_c).max(axis=(0, 2)) > 1e-8)


def test_made_starts_at_zero_and_reloads_with_its_order(tmp_path):
    made = MADE(hidden_units=(8,), input_order="random", seed=None)
    shift, log_scale = made(tf.ones((3, 6)))
    assert np.all(shift.numpy() == 0) and np.all(log_scale.numpy() == 0)
    clone = MADE.from_config(made.get_config())
    clone(tf.ones((3, 6)))
    assert clone.input_order == made.input_order
    for a, b in zip(made.masks(), clone.masks()):
        np.testing.assert_array_equal(a, b)
    # A .keras file of a model holding a conditional MADE gives identical outputs after reload.
    inputs, context = keras.Input((6,)), keras.Input((2,))
    net = MADE(hidden_units=(8,), input_order="random", conditional_size=2)
    model = keras.Model([inputs, context], list(net(inputs, conditional_input=context)))
    randomize_keras(net, seed=2)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    c = np.random.default_rng(1).normal(size=(4, 2)).astype("float32")
    model.save(tmp_path / "made.keras")
    loaded = keras.models.load_model(tmp_path / "made.keras")
    for a, b in zip(model([x, c]), loaded([x, c])):
        np.testing.assert_array_equal(a, b)
    dense = MaskedDense.from_config(MaskedDense(2, mask=[[1, 0], [1, 1]]).get_config())
    np.testing.assert_array_equal(dense.mask, [[1, 0], [1, 1]])


# --------------------------------------------------------------------------------------------- bijectors
def make_bijector(direction, conditional, dtype=tf.float64, **kwargs):
    return MaskedAutoregressive([D], direction=direction, hidden_units=(16, 16), activation="tanh",
                                conditional_shape=[2] if conditional else None, dtype=dtype, seed=5, **kwargs)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("direction", ["maf", "iaf"])
def test_round_trips_and_log_dets_match_autodiff(direction, conditional, randomize, autodiff_log_det):
    bij = make_bijector(direction, conditional)
    randomize(bij, seed=7)
    rng = np.random.default_rng(1)
    z = tf.constant(rng.normal(size=(5, D)))
    c = tf.constant(rng.normal(size=(5, 2)))
    kw = kwargs_for(conditional, c)
    x = bij.forward(z, **kw)
    assert np.abs(x.numpy() - z.numpy()).max() > 0.1, "randomized weights should give a non-identity map"
    # tf.identity: a fresh tensor, so TFP's cache cannot answer and the arithmetic runs.
    np.testing.assert_allclose(bij.inverse(tf.identity(x), **kw), z, atol=1e-10)
    np.testing.assert_allclose(bij.forward(bij.inverse(tf.identity(z), **kw), **kw), z, atol=1e-10)
    fldj = bij.forward_log_det_jacobian(tf.identity(z), event_ndims=1, **kw)
    ildj = bij.inverse_log_det_jacobian(tf.identity(x), event_ndims=1, **kw)
    np.testing.assert_allclose(fldj, -ildj, atol=1e-10)
    np.testing.assert_allclose(fldj, autodiff_log_det(lambda t: bij.forward(t, **kw), z, 1), atol=1e-9)
    np.testing.assert_allclose(ildj, autodiff_log_det(lambda t: bij.inverse(t, **kw), x, 1), atol=1e-9)


@pytest.mark.parametrize("direction", ["maf", "iaf"])
def test_batch_ranks_float32_and_xla(direction, randomize):
    bij = make_bijector(direction, conditional=True, dtype=tf.float32)
    randomize(bij, seed=11, scale=0.5)
    rng = np.random.default_rng(2)
    z = tf.constant(rng.normal(size=(2, 3, D)), tf.float32)
    c = tf.constant(rng.normal(size=(3, 2)), tf.float32)  # broadcast against the batch [2, 3]
    x = bij.forward(z, conditional_input=c)
    assert x.shape == (2, 3, D) and x.dtype == tf.float32
    assert bij.forward_log_det_jacobian(z, event_ndims=1, conditional_input=c).shape == (2, 3)
    np.testing.assert_allclose(bij.inverse(tf.identity(x), conditional_input=c), z, atol=1e-5)
    for fn, arg in ((bij.forward, z), (bij.inverse, x)):
        compiled = tf.function(lambda t, fn=fn: fn(t, conditional_input=c), jit_compile=True)
        np.testing.assert_allclose(compiled(tf.identity(arg)), fn(tf.identity(arg), conditional_input=c),
                                   atol=1e-5)


@pytest.mark.parametrize("direction", ["maf", "iaf"])
def test_passes_per_call_and_cached_log_density_of_own_samples(direction, randomize, monkeypatch):
    bij = make_bijector(direction, conditional=False)
    randomize(bij, seed=3)
    calls = []
    network_pass = bij._shift_log_scale
    monkeypatch.setattr(bij, "_shift_log_scale", lambda u, c: calls.append(1) or network_pass(u, c))
    dist = tfd.TransformedDistribution(tfp_nvp.standard_normal([D], tf.float64), bij)
    sample_passes, density_passes = (1, D) if direction == "iaf" else (D, 1)

    # Within one scoring call (tfp_nvp's flows open one for every log_prob and sample_and_log_prob; a trace
    # behaves the same), an own sample's log-density comes from the cache.
    with one_call():
        x, log_prob = dist.experimental_sample_and_log_prob(6, seed=4)
        assert len(calls) == sample_passes
        np.testing.assert_allclose(dist.log_prob(x), log_prob)
        assert len(calls) == sample_passes, "log_prob of an own sample must come from the cache"
        fresh = dist.log_prob(tf.identity(x))
        assert len(calls) == sample_passes + density_passes
        np.testing.assert_allclose(fresh, log_prob, atol=1e-10)
    # Once the call is over nothing is kept: after a weight update the same tensor is scored anew.
    randomize(bij, seed=5)
    later, copy = dist.log_prob(x), dist.log_prob(tf.identity(x))
    np.testing.assert_allclose(later, copy, atol=1e-10)
    assert np.abs(later.numpy() - log_prob.numpy()).max() > 1e-3


def test_equal_configs_do_not_share_cache_and_doors_agree(randomize, same_variable_set):
    first, second = make_bijector("iaf", False), make_bijector("iaf", False)
    randomize(second, seed=9)
    z = tf.ones((2, D), tf.float64)
    np.testing.assert_array_equal(first.forward(z), z)  # still the identity
    assert np.abs(second.forward(z).numpy() - z.numpy()).max() > 0.1
    flow = tfp_nvp.maf([3], num_layers=2, hidden_units=(8,), conditional_shape=[2])
    model = FlowModel(flow)
    assert same_variable_set([w.value for w in model.trainable_weights], flow.trainable_variables)
    # Per layer: 1 masked hidden kernel + bias, head kernel + bias, 2 context kernels, the tanh scale.
    assert len(flow.trainable_variables) == 2 * 7


# --------------------------------------------------------------------------------------------- training
def test_flow_model_fit_moves_every_weight_of_a_conditional_maf():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(512, 1)).astype("float32")
    x = np.concatenate([c + 0.3 * rng.normal(size=(512, 1)), 0.5 * c + rng.normal(size=(512, 2))], 1)
    flow = tfp_nvp.maf([3], num_layers=2, hidden_units=(16,), conditional_shape=[1], seed=0)
    model = FlowModel(flow)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit({"x": x.astype("float32"), "conditional_input": c}, epochs=2, batch_size=128, verbose=0)
    still = [w.path for w, b in zip(model.trainable_weights, before) if np.array_equal(w.numpy(), b)]
    assert not still, f"weights not moved by fit: {still}"
    assert np.isfinite(history.history["loss"]).all()


def test_iaf_surrogate_approaches_a_correlated_gaussian():
    cov = np.array([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 0.6]])
    target = tfd.MultivariateNormalTriL(loc=[1.0, -1.0, 0.5], scale_tril=np.linalg.cholesky(cov).astype("float32"))
    surrogate = tfp_nvp.iaf([3], num_layers=2, hidden_units=(16, 16), seed=1)

    def kl(n=4000):
        x, log_q = surrogate.experimental_sample_and_log_prob(n, seed=5)
        return float(tf.reduce_mean(log_q - target.log_prob(x)))

    initial = kl()
    tfp.vi.fit_surrogate_posterior(target.log_prob, surrogate, optimizer=tf.optimizers.Adam(3e-2), num_steps=200,
                                   sample_size=64, seed=2)
    final = kl()
    assert initial > 1.0, "the test needs a target the untrained flow misses"
    # The best Gaussian without the correlations is 0.82 nats away: 0.15 demands the correlations be learned.
    assert final < 0.15, f"KL(q || p) after training: {final:.3f} (started at {initial:.3f})"


# --------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("builder", ["maf", "iaf"])
def test_exact_reload_keras_file_and_weights(builder, tmp_path, randomize):
    make = getattr(tfp_nvp, builder)
    flow = make([3], num_layers=2, hidden_units=(8,), seed=0)
    randomize(flow, seed=4, scale=0.5)
    model = FlowModel(flow)
    x = np.random.default_rng(0).normal(size=(7, 3)).astype("float32")
    expected = model.log_prob(x).numpy()
    model.save(tmp_path / "flow.keras")
    loaded = keras.models.load_model(tmp_path / "flow.keras")
    np.testing.assert_array_equal(loaded.log_prob(x), expected)
    model.save_weights(tmp_path / "flow.weights.h5")
    other = FlowModel(make([3], num_layers=2, hidden_units=(8,), seed=1))
    other.load_weights(tmp_path / "flow.weights.h5")
    np.testing.assert_array_equal(other.log_prob(x), expected)


# --------------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="vector events only"):
        MaskedAutoregressive([2, 2])
    with pytest.raises(ValueError, match="vector events only"):
        tfp_nvp.iaf([4, 4, 1])
    with pytest.raises(ValueError, match="`direction` must be one of"):
        MaskedAutoregressive([3], direction="forward")
    with pytest.raises(ValueError, match="`log_scale_bound`"):
        InverseAutoregressive([3], log_scale_bound="exp")
    with pytest.raises(ValueError, match="permutation of range"):
        MaskedAutoregressive([3], input_order=[0, 0, 1])
    with pytest.raises(ValueError, match="`input_order` must be one of"):
        MADE(input_order="sideways")
    with pytest.raises(ValueError, match="`hidden_units`"):
        MADE(hidden_units=())
    with pytest.raises(ValueError, match="event_size=4"):
        MaskedAutoregressive([3], network=MADE(event_size=4))
    with pytest.raises(ValueError, match="conditional_size"):
        MaskedAutoregressive([3], network=MADE(event_size=3), conditional_shape=[2])
    with pytest.raises(ValueError, match="`num_layers` must be a positive integer"):
        tfp_nvp.maf([3], num_layers=0)
    with pytest.raises(ValueError, match="mask"):
        MaskedDense(3, mask=np.ones((2, 2)))
    bij = MaskedAutoregressive([3], conditional_shape=[2], name="cond")
    with pytest.raises(ValueError, match="conditional_kwargs"):
        bij.forward(tf.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"`conditional_input` must have shape \[\.\.\., 2\]"):
        bij.forward(tf.zeros((1, 3)), conditional_input=tf.zeros((1, 3)))
    with pytest.raises(ValueError, match="takes no `conditional_input`"):
        MaskedAutoregressive([3]).inverse(tf.zeros((1, 3)), conditional_input=tf.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"`y` must have shape \[\.\.\., 3\]"):
        MaskedAutoregressive([3]).inverse(tf.zeros((1, 4)))
    checked = MaskedAutoregressive([3], direction="iaf", validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be finite"):
        checked.inverse(tf.constant([[np.nan, 0.0, 0.0]]))


# --------------------------------------------------------------------------------------------- interop
def test_chain_with_tfp_masked_autoregressive_flow(randomize, autodiff_log_det):
    """One tfb.Chain: AffineCoupling, MaskedAutoregressive (conditional), Permute, TFP's MAF, Reshape.

    TFP's `tfb.AutoregressiveNetwork` is a tf_keras (Keras 2) layer: the TFP door sees and trains its
    variables, Keras 3 (and so FlowModel) cannot.
    """
    made = tfb.AutoregressiveNetwork(params=2, event_shape=[D], hidden_units=[8], activation="tanh",
                                     dtype=tf.float64)
    ours = MaskedAutoregressive([D], hidden_units=(8,), activation="tanh", conditional_shape=[1],
                                dtype=tf.float64, name="ours_maf")
    chain = tfb.Chain([
        tfb.Reshape(event_shape_out=[2, 2], event_shape_in=[D]),
        tfb.MaskedAutoregressiveFlow(shift_and_log_scale_fn=made, name="tfp_maf"),
        tfb.Permute([3, 1, 0, 2]),
        ours,
        AffineCoupling([D], hidden_units=(8,), dtype=tf.float64, name="coupling"),
    ])
    dist = tfd.TransformedDistribution(tfp_nvp.standard_normal([D], tf.float64), chain)
    rng = np.random.default_rng(3)
    z = tf.constant(rng.normal(size=(5, D)))
    c = tf.constant(rng.normal(size=(5, 1)))
    dist.log_prob(tf.zeros((1, 2, 2), tf.float64),  # builds TFP's network
                  bijector_kwargs=tfp_nvp.conditional_kwargs(chain, tf.zeros((1, 1), tf.float64)))
    # TFP's network keeps its masks through a kernel constraint that only optimizers apply: assigning random
    # values to it would break its autoregressive structure, and its default initialisation is not the identity.
    randomize(ours, seed=12, scale=0.7)
    randomize(chain.bijectors[-1], seed=13, scale=0.7)
    kw = tfp_nvp.conditional_kwargs(chain, c)
    assert set(kw) == {"ours_maf"}

    x = chain.forward(z, **kw)
    assert x.shape == (5, 2, 2)
    np.testing.assert_allclose(chain.inverse(tf.identity(x), **kw), z, atol=1e-10)
    fldj = chain.forward_log_det_jacobian(z, event_ndims=1, **kw)
    np.testing.assert_allclose(fldj, autodiff_log_det(lambda t: chain.forward(t, **kw), z, 1), atol=1e-9)
    np.testing.assert_allclose(chain.inverse_log_det_jacobian(tf.identity(x), event_ndims=2, **kw), -fldj,
                               atol=1e-10)

    variables = dist.trainable_variables
    assert len(variables) == len(made.trainable_variables) + len(ours.trainable_variables) + len(
        chain.bijectors[-1].trainable_variables)
    data = tf.constant(rng.normal(size=(64, 2, 2)) @ np.array([[1.0, 0.6], [0.0, 0.5]]))
    cond = tf.constant(rng.normal(size=(64, 1)))
    optimizer = tf.optimizers.Adam(1e-2)

    def loss():
        return -tf.reduce_mean(dist.log_prob(data, bijector_kwargs=tfp_nvp.conditional_kwargs(chain, cond)))

    with tf.GradientTape() as tape:
        initial = loss()
    grads = tape.gradient(initial, variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads), [v.name for v in variables]
    optimizer.apply_gradients(zip(grads, variables))
    for _ in range(2):
        with tf.GradientTape() as tape:
            value = loss()
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
    assert loss() < initial
    # Still invertible after training: Keras 3 optimizers apply the constraint that keeps TFP's masks.
    x = chain.forward(tf.identity(z), **kw)
    np.testing.assert_allclose(chain.inverse(tf.identity(x), **kw), z, atol=1e-10)
    with pytest.raises(ValueError, match="tf_keras"):
        FlowModel(dist)
