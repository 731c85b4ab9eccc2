"""Eager calls reuse a bijector's results within one scoring call, and never across a weight update.

TFP keeps a bijector's results per input tensor for as long as the caller holds it. Eagerly that outlives a
weight update; the package's flows therefore reuse results only inside a trace or within one eager
`log_prob` / `experimental_sample_and_log_prob` call, and these tests hold them to both halves of that:
nothing stale after an update, and no network (or ODE solve) run twice within a call.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp

BUILDERS = {
    "real_nvp": lambda: tfp_nvp.real_nvp([3], num_coupling_layers=3, hidden_units=(8,), seed=0),
    "real_nvp_invertible_backprop": lambda: tfp_nvp.real_nvp([3], num_coupling_layers=3, hidden_units=(8,),
                                                             invertible_backprop=True, seed=0),
    "spline": lambda: tfp_nvp.spline_flow([3], num_coupling_layers=2, hidden_units=(8,), seed=0),
    "maf": lambda: tfp_nvp.maf([3], num_layers=2, hidden_units=(8,), seed=0),
    "iaf": lambda: tfp_nvp.iaf([3], num_layers=2, hidden_units=(8,), seed=0),
    "ffjord": lambda: tfp_nvp.ffjord([2], hidden_units=(8,), atol=1e-6, rtol=1e-6, seed=0),
    "glow": lambda: tfp_nvp.glow([4, 4, 1], num_levels=2, num_steps_per_level=1, hidden_channels=4, seed=0),
    "glow_invertible_backprop": lambda: tfp_nvp.glow([4, 4, 1], num_levels=2, num_steps_per_level=1,
                                                     hidden_channels=4, invertible_backprop=True, seed=0),
}


def _ready(name, randomize):
    flow = BUILDERS[name]()
    if name.startswith("glow"):
        tfp_nvp.initialize(flow, tf.random.stateless_uniform([16, 4, 4, 1], seed=[1, 2], maxval=1.0))
    randomize(flow, seed=1, scale=0.5)
    return flow


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_eager_scores_of_held_tensors_follow_weight_updates(name, randomize):
    flow = _ready(name, randomize)
    kept = flow.sample(4, seed=3)  # a sample kept for later, as for a plot
    drawn, drawn_log_prob = flow.experimental_sample_and_log_prob(4, seed=4)
    before = flow.log_prob(kept)
    np.testing.assert_allclose(flow.log_prob(tf.identity(drawn)), drawn_log_prob, rtol=1e-4, atol=1e-4)

    randomize(flow, seed=2, scale=0.5)
    for x, old in ((kept, before), (drawn, drawn_log_prob)):
        after, copy = flow.log_prob(x), flow.log_prob(tf.identity(x))
        assert np.isfinite(copy.numpy()).all()
        np.testing.assert_allclose(after, copy, rtol=1e-6, atol=1e-6)
        assert np.abs(after.numpy() - old.numpy()).max() > 1e-3, "the update must change the log-density"


@pytest.mark.parametrize("invertible_backprop", [False, True])
def test_eager_log_det_follows_weight_updates_and_is_differentiable(invertible_backprop, randomize):
    flow = tfp_nvp.real_nvp([4], num_coupling_layers=2, hidden_units=(8,), invertible_backprop=invertible_backprop,
                            seed=0)
    randomize(flow, seed=1)
    y = tf.random.stateless_normal([3, 4], seed=[5, 6])
    before = flow.bijector.inverse_log_det_jacobian(y, event_ndims=1)
    randomize(flow, seed=2)
    with tf.GradientTape() as tape:
        after = flow.bijector.inverse_log_det_jacobian(y, event_ndims=1)
        total = tf.reduce_sum(after)
    np.testing.assert_allclose(after, flow.bijector.inverse_log_det_jacobian(tf.identity(y), event_ndims=1),
                               rtol=1e-6)
    assert np.abs(after.numpy() - before.numpy()).max() > 1e-3
    grads = tape.gradient(total, flow.trainable_variables)
    # Every weight but the last coupling's shift head reaches the log-det (the log-det ignores shifts).
    assert sum(g is not None and np.any(g.numpy() != 0) for g in grads) >= len(grads) - 4


@pytest.mark.parametrize("builder", ["real_nvp", "spline"])
def test_eager_log_prob_runs_each_coupling_network_once(builder, monkeypatch):
    make = tfp_nvp.real_nvp if builder == "real_nvp" else tfp_nvp.spline_flow
    flow = make([2], num_coupling_layers=3, hidden_units=(8,), seed=0)
    calls = []
    for coupling in flow.bijector.bijectors:
        network = coupling.network
        monkeypatch.setattr(network, "call", lambda *a, _call=network.call, **k: calls.append(1) or _call(*a, **k))
    x = tf.random.stateless_normal([5, 2], seed=[1, 1])
    flow.log_prob(x)
    assert len(calls) == 3
    flow.experimental_sample_and_log_prob(5, seed=2)
    assert len(calls) == 6
    tf.function(flow.log_prob)(x)  # the trace runs each network once too
    assert len(calls) == 9


def test_ffjord_integrates_once_per_log_prob(monkeypatch):
    solves = []
    solve = tfp.math.ode.DormandPrince.solve

    def counted(self, *args, **kwargs):
        solves.append(1)
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(tfp.math.ode.DormandPrince, "solve", counted)
    flow = tfp_nvp.ffjord([2], hidden_units=(8,), seed=0)
    x = tf.random.stateless_normal([4, 2], seed=[1, 2])
    for run in (flow.log_prob, tf.function(flow.log_prob),
                lambda x: flow.bijector.inverse_log_det_jacobian(x, event_ndims=1),
                lambda x: flow.experimental_sample_and_log_prob(4, seed=1)):
        solves.clear()
        run(x)
        assert len(solves) == 1, "the map and its log-det come from one ODE solve"
