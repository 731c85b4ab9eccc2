"""Flow surrogates for JointDistribution models (tfp_nvp.surrogate_posterior) and NeuTra MCMC (neutra_kernel).

Every model has a positive scale (HalfNormal, mapped by softplus), a vector latent and observed data, in each
JointDistribution flavour. Flows are tiny and their weights randomised so no check passes by the identity.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp

tfb, tfd = tfp.bijectors, tfp.distributions
Root = tfd.JointDistributionCoroutine.Root
Y_OBS = np.array([0.5, -1.0, 2.0])
TINY = dict(num_coupling_layers=2, hidden_units=(8,))


def make_model(flavour: str, dtype=tf.float32):
    """The same model, p(scale) p(theta | scale) p(y | theta), in the requested flavour (y observed)."""
    zeros = tf.zeros(3, dtype)
    one = tf.constant(1.0, dtype)
    if flavour == "coroutine":
        @tfd.JointDistributionCoroutine
        def model():
            scale = yield Root(tfd.HalfNormal(one, name="scale"))
            theta = yield tfd.Independent(tfd.Normal(zeros, scale[..., None]), 1, name="theta")
            yield tfd.Independent(tfd.Normal(theta, one), 1, name="y")
        return model
    if flavour == "coroutine_ab":
        @tfd.JointDistributionCoroutineAutoBatched
        def model():
            scale = yield tfd.HalfNormal(one, name="scale")
            theta = yield tfd.Normal(zeros, scale, name="theta")  # batch dims the autobatching makes event dims
            yield tfd.Normal(theta, one, name="y")
        return model
    if flavour == "sequential":
        return tfd.JointDistributionSequential([
            tfd.HalfNormal(one),
            lambda scale: tfd.Independent(tfd.Normal(zeros, scale[..., None]), 1),
            lambda theta: tfd.Independent(tfd.Normal(theta, one), 1),
        ])
    if flavour == "sequential_ab":
        return tfd.JointDistributionSequentialAutoBatched([
            tfd.HalfNormal(one),
            lambda scale: tfd.Normal(zeros, scale),
            lambda theta: tfd.Normal(theta, one),
        ])
    if flavour == "named":
        return tfd.JointDistributionNamed(dict(
            scale=tfd.HalfNormal(one),
            theta=lambda scale: tfd.Independent(tfd.Normal(zeros, scale[..., None]), 1),
            y=lambda theta: tfd.Independent(tfd.Normal(theta, one), 1),
        ))
    if flavour == "named_ab":
        return tfd.JointDistributionNamedAutoBatched(dict(
            scale=tfd.HalfNormal(one),
            theta=lambda scale: tfd.Normal(zeros, scale),
            y=lambda theta: tfd.Normal(theta, one),
        ))
    raise AssertionError(flavour)


FLAVOURS = ["coroutine", "coroutine_ab", "sequential", "sequential_ab", "named", "named_ab"]


def pinned_model(flavour, dtype=tf.float32):
    model = make_model(flavour, dtype)
    y = tf.constant(Y_OBS, dtype)
    if flavour.startswith("sequential"):
        return model.experimental_pin(None, None, y)
    return model.experimental_pin(y=y)


def scale_and_theta(sample):
    """The (scale, theta) parts of a sample of any flavour."""
    if isinstance(sample, dict):
        return sample["scale"], sample["theta"]
    return sample[0], sample[1]


def independent_log_prob(flow, scale, theta):
    """log q by hand: flow density of (softplus^-1(scale), theta) minus log softplus'(u) = log sigmoid(u)."""
    u = tfp.math.softplus_inverse(scale)
    flat = tf.concat([u[..., None], theta], axis=-1)
    return flow.log_prob(flat) - tf.math.log_sigmoid(u)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_structure_support_and_exact_log_prob(flavour, randomize):
    pinned = pinned_model(flavour)
    q = tfp_nvp.surrogate_posterior(pinned, "real_nvp", seed=1, flow_kwargs=TINY)
    randomize(q, seed=2)
    assert q.num_latent_dims == 4
    draws = q.sample(5, seed=3)
    reference = pinned.sample_unpinned(5, seed=4)
    tf.nest.assert_same_structure(draws, reference)
    assert type(draws) is type(reference)
    for got, want in zip(tf.nest.flatten(draws), tf.nest.flatten(reference)):
        assert got.shape == want.shape and got.dtype == want.dtype
    scale, theta = scale_and_theta(draws)
    assert np.all(scale.numpy() > 0)
    log_q = q.log_prob(draws)
    assert log_q.shape == [5]
    np.testing.assert_allclose(log_q, independent_log_prob(q.flow, scale, theta), rtol=1e-4, atol=1e-4)
    # The target scores the surrogate's samples (same structure the model expects), finitely.
    assert np.all(np.isfinite(pinned.unnormalized_log_prob(draws).numpy()))


def test_log_prob_against_autodiff_jacobian(randomize, autodiff_log_det):
    """float64: log q(x) = log flow(z) - log|det d x / d z| with the Jacobian of the whole plumbing by autodiff."""
    pinned = pinned_model("named", tf.float64)
    q = tfp_nvp.surrogate_posterior(pinned, "real_nvp", seed=5, flow_kwargs=dict(TINY, hidden_units=(6,)))
    assert q.dtype == {"scale": tf.float64, "theta": tf.float64}
    randomize(q, seed=6, scale=0.8)
    flat = q.flow.sample(4, seed=7)

    def to_model_flat(z):
        parts = q.to_model_structure.forward(z)
        return tf.concat([parts["scale"][..., None], parts["theta"]], axis=-1)

    log_det = autodiff_log_det(to_model_flat, flat, event_rank=1)
    x = q.to_model_structure.forward(flat)
    np.testing.assert_allclose(q.log_prob(x), q.flow.log_prob(flat).numpy() - log_det, rtol=1e-9, atol=1e-9)


def test_batched_parts_in_non_autobatched_flavour_are_refused():
    @tfd.JointDistributionCoroutine
    def model():
        scale = yield Root(tfd.HalfNormal(1.0, name="scale"))
        theta = yield tfd.Normal(tf.zeros(3), scale[..., None], name="theta")  # batch shape [3]
        yield tfd.Normal(theta, 1.0, name="y")

    with pytest.raises(ValueError, match=r"scalar batch shape.*'theta' has batch shape \(3,\).*Independent"):
        tfp_nvp.surrogate_posterior(model.experimental_pin(y=Y_OBS.astype(np.float32)))


@pytest.fixture(scope="module")
def trained():
    """A surrogate of the coroutine model, its weights before training, and the fit's losses."""
    pinned = pinned_model("coroutine")
    q = tfp_nvp.surrogate_posterior(pinned, "real_nvp", seed=8, flow_kwargs=TINY)
    before = [v.numpy().copy() for v in q.trainable_variables]

    def loss(seed):
        # A fixed-seed estimate of the negative ELBO, so before and after see the same base draws.
        z = q.sample(512, seed=seed)
        return float(tf.reduce_mean(q.log_prob(z) - pinned.unnormalized_log_prob(z)))

    initial = loss(9)
    losses = tfp.vi.fit_surrogate_posterior(pinned.unnormalized_log_prob, q, tf.keras.optimizers.Adam(2e-2),
                                            num_steps=40, sample_size=16, seed=10)
    return dict(pinned=pinned, q=q, before=before, losses=losses.numpy(), initial=initial, final=loss(9))


def test_both_doors_and_fit_surrogate_posterior_trains_every_weight(trained, same_variable_set):
    q = trained["q"]
    # TFP door: every flow weight, nothing else (the model and the plumbing have no parameters).
    assert same_variable_set(q.trainable_variables, q.flow.trainable_variables)
    assert len(q.trainable_variables) == 2 * 5  # per coupling: 2 dense kernels, 2 biases, the tanh scale
    # Keras door: the flow's layers, and a FlowModel over the flow tracking exactly the same variables.
    keras_weights = [w.value for layer in tfp_nvp.flow_layers(q) for w in layer.trainable_weights]
    assert same_variable_set(keras_weights, q.trainable_variables)
    model = tfp_nvp.FlowModel(q.flow)
    assert same_variable_set([w.value for w in model.trainable_weights], q.trainable_variables)
    assert np.all(np.isfinite(trained["losses"]))
    assert trained["final"] < trained["initial"]
    for old, new in zip(trained["before"], q.trainable_variables):
        assert np.max(np.abs(new.numpy() - old)) > 0, f"{new.name} did not move"


@pytest.mark.parametrize("kernel, adaptation", [("nuts", 6), ("hmc", 6), ("hmc", 0)])
def test_neutra_chain_has_model_structure_and_moves(trained, kernel, adaptation):
    pinned, q = trained["pinned"], trained["q"]
    sampler = tfp_nvp.neutra_kernel(pinned, q, kernel=kernel, step_size=0.3, num_leapfrog_steps=2,
                                    max_tree_depth=3, num_adaptation_steps=adaptation)
    init = tfp_nvp.neutra_initial_state(q, num_chains=3, seed=11)

    @tf.function
    def run():
        # No separate burn-in: its loop would trace the sampler a second time; adaptation runs in the first steps.
        return tfp.mcmc.sample_chain(10, init, kernel=sampler, trace_fn=tfp_nvp.neutra_trace_fn, seed=12)

    draws, trace = run()
    tf.nest.assert_same_structure(draws, init)
    assert type(draws) is type(init)
    assert draws.scale.shape == [10, 3] and draws.theta.shape == [10, 3, 3]
    assert np.all(draws.scale.numpy() > 0)
    assert np.mean(trace["is_accepted"].numpy()) > 0
    assert np.all(trace["leapfrogs"].numpy() >= 1)
    if kernel == "hmc":
        assert np.all(trace["leapfrogs"].numpy() == 2)
    assert np.all(np.isfinite(pinned.unnormalized_log_prob(draws).numpy()))
    # The chain moved: draws differ from the starting state.
    assert np.max(np.abs(draws.theta.numpy()[-1] - init.theta.numpy())) > 0


def test_flow_choices_and_single_dimension():
    pinned = pinned_model("coroutine_ab")
    for flow in ("iaf", "maf", "spline"):
        q = tfp_nvp.surrogate_posterior(pinned, flow, seed=13,
                                        flow_kwargs=dict(num_layers=1, hidden_units=(4,)) if flow != "spline"
                                        else dict(num_coupling_layers=1, hidden_units=(4,), num_bins=4))
        assert np.all(np.isfinite(q.log_prob(q.sample(2, seed=14)).numpy()))
    q = tfp_nvp.surrogate_posterior(pinned, tfp_nvp.iaf, seed=15, flow_kwargs=dict(num_layers=1))
    assert q.flow.name.startswith("surrogate_posterior_flow")
    ready = tfp_nvp.real_nvp([4], **TINY)
    q = tfp_nvp.surrogate_posterior(pinned, ready)
    assert q.flow is ready
    with pytest.raises(ValueError, match=r"event shape \[4\]"):
        tfp_nvp.surrogate_posterior(pinned, tfp_nvp.real_nvp([5], **TINY))

    # One latent dimension: coupling flows refuse with a pointer to the alternatives, autoregressive ones work.
    @tfd.JointDistributionCoroutineAutoBatched
    def one_dim():
        scale = yield tfd.HalfNormal(1.0, name="scale")
        yield tfd.Normal(tf.zeros(3), scale, name="y")

    one = one_dim.experimental_pin(y=Y_OBS.astype(np.float32))
    with pytest.raises(ValueError, match=r"single unconstrained dimension.*flow='iaf'"):
        tfp_nvp.surrogate_posterior(one, "real_nvp")
    q = tfp_nvp.surrogate_posterior(one, "iaf", flow_kwargs=dict(num_layers=1, hidden_units=(4,)))
    draws = q.sample(3, seed=16)
    assert draws.scale.shape == [3] and np.all(draws.scale.numpy() > 0)
    np.testing.assert_allclose(q.log_prob(draws), independent_log_prob(q.flow, draws.scale, tf.zeros([3, 0])),
                               rtol=1e-5, atol=1e-5)


def test_unpinned_model_with_pins():
    model = make_model("named")
    q = tfp_nvp.surrogate_posterior(model, pins={"y": Y_OBS.astype(np.float32)}, flow_kwargs=TINY)
    assert sorted(q.sample(seed=17)) == ["scale", "theta"]
    # Nothing observed: `pins={}` approximates the model itself (here all three parts).
    q = tfp_nvp.surrogate_posterior(model, pins={}, flow_kwargs=TINY)
    assert q.num_latent_dims == 7 and sorted(q.sample(seed=18)) == ["scale", "theta", "y"]


def test_clear_errors():
    pinned = pinned_model("coroutine")
    with pytest.raises(TypeError, match="`target` must be a TFP JointDistribution"):
        tfp_nvp.surrogate_posterior(tfd.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match=r"unknown flow builder 'glowy'.*real_nvp"):
        tfp_nvp.surrogate_posterior(pinned, "glowy")
    with pytest.raises(ValueError, match="unpinned JointDistribution: pass the observed values as `pins="):
        tfp_nvp.surrogate_posterior(make_model("coroutine"))
    with pytest.raises(ValueError, match="already pinned"):
        tfp_nvp.surrogate_posterior(pinned, pins={"y": Y_OBS})
    with pytest.raises(ValueError, match="`dtype` must match"):
        tfp_nvp.surrogate_posterior(pinned, dtype="float64")
    with pytest.raises(TypeError, match="`flow` must be a builder name"):
        tfp_nvp.surrogate_posterior(pinned, 3)
    q = tfp_nvp.surrogate_posterior(pinned, flow_kwargs=TINY)
    with pytest.raises(ValueError, match="`kernel` must be 'nuts' or 'hmc'"):
        tfp_nvp.neutra_kernel(pinned, q, kernel="mala")
    with pytest.raises(ValueError, match="needs `num_leapfrog_steps`"):
        tfp_nvp.neutra_kernel(pinned, q, kernel="hmc")
    with pytest.raises(ValueError, match="pin the observations first"):
        tfp_nvp.neutra_kernel(make_model("coroutine"), q)
    with pytest.raises(TypeError, match="must come from tfp_nvp.surrogate_posterior"):
        tfp_nvp.neutra_kernel(pinned, q.flow)


def test_neutra_chain_moments_match_a_target_with_known_moments(randomize):
    """NeuTra through a random, non-identity flow still samples the target: a wrong log-det anywhere in the
    transport (flow, structure, support) would bias these moments.

    Target: x ~ N([1, -2], [[1, .8], [.8, 1]]) and s ~ HalfNormal(1), so E[x] = (1, -2), sd(x) = 1,
    E[s] = sqrt(2/pi), sd(s) = sqrt(1 - 2/pi). Tolerance: 5 Monte Carlo standard errors, sd / sqrt(ESS) for
    means and sd / sqrt(2 ESS) for standard deviations (Gaussian approximation), with ESS pooled over chains by
    tfp.mcmc.effective_sample_size; the ESS itself must reach 100 so the bound is a real one.
    """
    model = tfd.JointDistributionNamed(dict(
        x=tfd.MultivariateNormalTriL([1.0, -2.0], tf.linalg.cholesky([[1.0, 0.8], [0.8, 1.0]])),
        s=tfd.HalfNormal(1.0)))
    q = tfp_nvp.surrogate_posterior(model, "real_nvp", pins={}, seed=0, flow_kwargs=TINY)
    randomize(q, seed=21, scale=0.3)
    sampler = tfp_nvp.neutra_kernel(lambda state: model.log_prob(state), q, kernel="nuts", step_size=0.3,
                                    max_tree_depth=5, num_adaptation_steps=150)
    init = tfp_nvp.neutra_initial_state(q, num_chains=4, seed=3)

    @tf.function
    def run():
        return tfp.mcmc.sample_chain(400, init, kernel=sampler, num_burnin_steps=200,
                                     trace_fn=tfp_nvp.neutra_trace_fn, seed=4)

    draws, _ = run()
    x, s = draws["x"].numpy(), draws["s"].numpy()
    samples = np.concatenate([x, s[..., None]], -1)                     # [draws, chains, 3]
    ess = tfp.mcmc.effective_sample_size(tf.constant(samples), cross_chain_dims=1).numpy()
    assert np.all(ess >= 100), ess
    mean, sd = samples.reshape(-1, 3).mean(0), samples.reshape(-1, 3).std(0)
    true_mean = np.array([1.0, -2.0, np.sqrt(2 / np.pi)])
    true_sd = np.array([1.0, 1.0, np.sqrt(1 - 2 / np.pi)])
    np.testing.assert_array_less(np.abs(mean - true_mean), 5 * true_sd / np.sqrt(ess))
    np.testing.assert_array_less(np.abs(sd - true_sd), 5 * true_sd / np.sqrt(2 * ess))
