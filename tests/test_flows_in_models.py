"""Flows inside other TFP models: every JointDistribution flavour, Mixture, Sample, Independent, and the limits.

A flow distribution has batch shape [] and event shape [D]; a conditional flow with its context bound by
`tfp_nvp.condition` has the context's batch shape. Every log-density below is checked against the parts
computed by hand.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp

tfb, tfd = tfp.bijectors, tfp.distributions
Root = tfd.JointDistributionCoroutine.Root


@pytest.fixture(scope="module")
def prior_flow():
    """An unconditional flow with random (non-identity) weights."""
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=0, name="z")
    _scramble(flow, 1)
    return flow


@pytest.fixture(scope="module")
def conditional_flow():
    """A flow p(y | x) for a context x in R^3, with random weights."""
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=1, conditional_shape=[3], name="y")
    _scramble(flow, 2)
    return flow


def _scramble(flow, seed):
    rng = np.random.default_rng(seed)
    for v in flow.trainable_variables:
        v.assign(rng.normal(0.0, 0.4, v.shape).astype(v.dtype.as_numpy_dtype))


def _likelihood(z):
    return tfd.Independent(tfd.Normal(z, 0.5), 1)


def _x_prior():
    return tfd.Sample(tfd.Normal(0.0, 1.0), 3)


def flow_prior_model(kind, flow):
    """z ~ flow, y | z ~ N(z, 0.25 I), in the given JointDistribution flavour."""
    if kind in ("Coroutine", "CoroutineAutoBatched"):
        auto = kind.endswith("AutoBatched")

        def program():
            z = yield (flow if auto else Root(flow))
            yield _likelihood(z)

        return getattr(tfd, f"JointDistribution{kind}")(program)
    if kind.startswith("Sequential"):
        # Sequential models match a lambda's argument names to the distributions' names: the flow is named "z".
        return getattr(tfd, f"JointDistribution{kind}")([flow, lambda z: _likelihood(z)])
    return getattr(tfd, f"JointDistribution{kind}")(dict(z=flow, y=lambda z: _likelihood(z)))


def conditional_model(kind, flow):
    """x ~ N(0, I_3), y | x ~ flow(. | x) with x bound by tfp_nvp.condition."""
    if kind in ("Coroutine", "CoroutineAutoBatched"):
        auto = kind.endswith("AutoBatched")

        def program():
            x = yield (_x_prior() if auto else Root(_x_prior()))
            yield tfp_nvp.condition(flow, x)

        return getattr(tfd, f"JointDistribution{kind}")(program)
    if kind.startswith("Sequential"):
        return getattr(tfd, f"JointDistribution{kind}")([_x_prior(), lambda x: tfp_nvp.condition(flow, x)])
    return getattr(tfd, f"JointDistribution{kind}")(dict(x=_x_prior(), y=lambda x: tfp_nvp.condition(flow, x)))


def parts(sample):
    return list(sample.values()) if isinstance(sample, dict) else list(sample)


KINDS = ["Coroutine", "CoroutineAutoBatched", "Sequential", "SequentialAutoBatched", "Named", "NamedAutoBatched"]


# ------------------------------------------------------------------------------------------- joint distributions
@pytest.mark.parametrize("kind", KINDS)
def test_flow_as_prior(kind, prior_flow):
    model = flow_prior_model(kind, prior_flow)
    # Integer seeds: auto-batched models run stateless (pair) seeds through a slow loop instead of vectorizing.
    drawn = model.sample(seed=1)
    single = parts(drawn)
    assert [t.shape for t in single] == [(2,), (2,)]
    z, y = parts(model.sample(4, seed=2))
    assert z.shape == (4, 2) and y.shape == (4, 2)
    by_hand = prior_flow.log_prob(z) + _likelihood(z).log_prob(y)
    value = dict(z=z, y=y) if kind.startswith("Named") else [z, y]
    np.testing.assert_allclose(model.log_prob(value), by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.log_prob(drawn), prior_flow.log_prob(single[0])
                               + _likelihood(single[0]).log_prob(single[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_conditional_flow_as_likelihood_of_another_variable(kind, conditional_flow):
    model = conditional_model(kind, conditional_flow)
    drawn = model.sample(seed=3)
    single = parts(drawn)
    assert [t.shape for t in single] == [(3,), (2,)]
    x, y = parts(model.sample(4, seed=4))
    assert x.shape == (4, 3) and y.shape == (4, 2)
    flow_part = conditional_flow.log_prob(y, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, x))
    by_hand = _x_prior().log_prob(x) + flow_part
    value = dict(x=x, y=y) if kind.startswith("Named") else [x, y]
    np.testing.assert_allclose(model.log_prob(value), by_hand, rtol=1e-5, atol=1e-5)
    x1, y1 = single
    np.testing.assert_allclose(model.log_prob(drawn), _x_prior().log_prob(x1) + conditional_flow.log_prob(
        y1, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, x1)), rtol=1e-5, atol=1e-5)


def test_each_draw_of_y_is_conditioned_on_its_own_x(conditional_flow):
    model = conditional_model("Sequential", conditional_flow)
    x, y = model.sample(5, seed=(2, 1))
    kwargs = tfp_nvp.conditional_kwargs(conditional_flow, x)
    latent = conditional_flow.bijector.inverse(y, **kwargs)
    np.testing.assert_allclose(conditional_flow.bijector.forward(latent, **kwargs), y, rtol=1e-5, atol=1e-5)
    # Under another row's context the same latents land elsewhere: the rows were not mixed up.
    shifted = tfp_nvp.conditional_kwargs(conditional_flow, tf.roll(x, 1, axis=0))
    assert not np.allclose(conditional_flow.bijector.forward(latent, **shifted), y, atol=1e-3)


def test_joint_log_prob_gradient_reaches_every_flow_weight(conditional_flow):
    model = conditional_model("NamedAutoBatched", conditional_flow)
    sample = model.sample(8, seed=5)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(model.log_prob(sample))
    grads = tape.gradient(loss, conditional_flow.trainable_variables)
    assert grads and all(g is not None and np.any(g.numpy() != 0) for g in grads)


# ------------------------------------------------------------------------------------------- other wrappers
def test_mixture_of_flows(prior_flow, conditional_flow):
    other = tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=5, name="other")
    _scramble(other, 5)
    mixture = tfd.Mixture(tfd.Categorical(probs=[0.3, 0.7]), [prior_flow, other])
    y = mixture.sample(6, seed=(4, 1))
    assert y.shape == (6, 2)
    by_hand = tf.reduce_logsumexp(tf.stack([np.log(0.3) + prior_flow.log_prob(y),
                                            np.log(0.7) + other.log_prob(y)]), axis=0)
    np.testing.assert_allclose(mixture.log_prob(y), by_hand, rtol=1e-5, atol=1e-5)


def test_sample_and_independent_wrappers(prior_flow, conditional_flow):
    iid = tfd.Sample(prior_flow, 3)
    draws = iid.sample(4, seed=(5, 1))
    assert draws.shape == (4, 3, 2)
    np.testing.assert_allclose(iid.log_prob(draws), tf.reduce_sum(prior_flow.log_prob(draws), -1), rtol=1e-5)
    np.testing.assert_allclose(tfd.Independent(prior_flow, 0).log_prob(draws[0]), prior_flow.log_prob(draws[0]))
    # A bound batch of contexts is a batch of flows: Independent turns it into one joint over the rows.
    x = tf.random.stateless_normal([4, 3], seed=[6, 1])
    rows = tfd.Independent(tfp_nvp.condition(conditional_flow, x), reinterpreted_batch_ndims=1)
    assert rows.batch_shape == () and rows.event_shape == (4, 2)
    y = rows.sample(2, seed=(6, 2))
    assert y.shape == (2, 4, 2)
    per_row = conditional_flow.log_prob(y, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, x))
    np.testing.assert_allclose(rows.log_prob(y), tf.reduce_sum(per_row, -1), rtol=1e-5, atol=1e-5)


def test_mixture_same_family_over_contexts_of_one_conditional_flow(conditional_flow):
    contexts = tf.random.stateless_normal([3, 3], seed=[7, 1])
    weights = tf.constant([0.2, 0.5, 0.3])
    mixture = tfd.MixtureSameFamily(tfd.Categorical(probs=weights), tfp_nvp.condition(conditional_flow, contexts))
    y = mixture.sample(5, seed=(7, 2))
    assert y.shape == (5, 2)
    component = conditional_flow.log_prob(y[:, None, :],
                                          bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, contexts))
    by_hand = tf.reduce_logsumexp(tf.math.log(weights) + component, axis=-1)
    np.testing.assert_allclose(mixture.log_prob(y), by_hand, rtol=1e-5, atol=1e-5)


def test_condition_matches_bijector_kwargs_and_batches_like_its_context(conditional_flow):
    x = tf.random.stateless_normal([2, 5, 3], seed=[8, 1])
    bound = tfp_nvp.condition(conditional_flow, x)
    assert bound.batch_shape == (2, 5) and bound.event_shape == (2,)
    y = bound.sample(3, seed=(8, 2))
    assert y.shape == (3, 2, 5, 2)
    np.testing.assert_allclose(
        bound.log_prob(y),
        conditional_flow.log_prob(y, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, x)), rtol=1e-6)
    # Batch slicing slices the contexts; float64 contexts are cast to the flow's dtype.
    np.testing.assert_allclose(bound[1].log_prob(y[:, 1]), bound.log_prob(y)[:, 1], rtol=1e-6)
    assert tfp_nvp.condition(conditional_flow, np.zeros([3], np.float64)).sample(seed=(8, 3)).dtype == tf.float32


@pytest.mark.parametrize("make_variable", [tf.Variable, keras.Variable], ids=["tf", "keras"])
def test_variable_context_is_read_at_every_call_and_trained_through(conditional_flow, make_variable):
    context = make_variable(np.zeros([4, 3], np.float32))
    bound = tfp_nvp.condition(conditional_flow, context)
    y = tf.random.stateless_normal([4, 2], seed=[8, 4])
    before = bound.log_prob(y)
    context.assign(np.ones([4, 3], np.float32))
    after = bound.log_prob(y)
    np.testing.assert_allclose(after, conditional_flow.log_prob(
        y, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, tf.ones([4, 3]))), rtol=1e-6)
    assert np.abs(after.numpy() - before.numpy()).max() > 1e-4
    np.testing.assert_array_equal(bound.context.numpy(), 1.0)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_sum(bound.log_prob(y))
    grad = tape.gradient(loss, context.value if isinstance(context, keras.Variable) else context)
    assert grad is not None and np.any(grad.numpy() != 0)


# ------------------------------------------------------------------------------------------- limits and errors
def test_what_a_flow_without_batch_shape_cannot_do(prior_flow, conditional_flow):
    # A flow has batch shape []: nothing to reinterpret as event dimensions, and no component axis to mix over.
    with pytest.raises(ValueError, match=r"reinterpreted_batch_ndims\(1\) cannot exceed distribution.batch_ndims\(0\)"):
        tfd.Independent(prior_flow, reinterpreted_batch_ndims=1)
    with pytest.raises(ValueError, match="must have rank at least 1"):
        tfd.MixtureSameFamily(tfd.Categorical(probs=[0.5, 0.5]), prior_flow)
    with pytest.raises(ValueError, match="batch shape must be compatible with cat shape"):
        tfd.Mixture(tfd.Categorical(probs=[[0.5, 0.5]] * 3), [prior_flow, prior_flow])
    # The documented ways round: tfd.Sample for iid copies, tfd.BatchBroadcast for a batch of one flow.
    broadcast = tfd.BatchBroadcast(prior_flow, [3])
    assert tfd.Mixture(tfd.Categorical(probs=[[0.5, 0.5]] * 3), [broadcast, broadcast]).batch_shape == (3,)


def test_condition_rejects_bad_arguments(prior_flow, conditional_flow):
    with pytest.raises(ValueError, match="is not conditional: build it with `conditional_shape"):
        tfp_nvp.condition(prior_flow, tf.zeros([3]))
    with pytest.raises(ValueError, match=r"`context` for y must have shape \[..., 3\]; got \(4, 2\)"):
        tfp_nvp.condition(conditional_flow, tf.zeros([4, 2]))
    with pytest.raises(ValueError, match="has its context bound already"):
        tfp_nvp.condition(conditional_flow, tf.zeros([3])).log_prob(
            tf.zeros([2]), bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, tf.zeros([3])))
    with pytest.raises(ValueError, match="has its context bound already; condition `flow.flow`"):
        tfp_nvp.condition(tfp_nvp.condition(conditional_flow, tf.zeros([3])), tf.zeros([3]))
    with pytest.raises(TypeError, match="must hold numbers"):
        tfp_nvp.condition(conditional_flow, tf.constant(["a", "b", "c"]))
