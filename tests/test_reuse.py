"""The one result-reuse mechanism (`tfp_nvp.bijectors._reuse`): what it keeps, for how long, and for whom.

Eagerly a result is found again only inside one `one_call` scope, never after it (so never across a weight
update between two calls); while tracing it is found again in the same graph only, and it neither keeps that
graph nor its owner alive.
"""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import tensorflow as tf

import tfp_nvp
from tfp_nvp.bijectors import AffineCoupling
from tfp_nvp.bijectors import _reuse
from tfp_nvp.bijectors._reuse import one_call, recall, remember, reuse_allowed


class Owner:
    """Anything weak-referenceable owns results; bijectors in the package."""


def test_eager_results_are_kept_only_inside_one_call():
    owner, t = Owner(), tf.constant([1.0, 2.0])
    assert not reuse_allowed()
    remember(owner, t, "value")
    with one_call():
        assert reuse_allowed()
        assert recall(owner, t) is None, "nothing is kept eagerly outside one_call"
        value = tf.constant(3.0)
        remember(owner, t, value, key=("x", None))
        assert recall(owner, t, key=("x", None)) is value  # a second lookup in the same call hits
        with one_call():  # nested scopes share the outer one's results
            assert recall(owner, t, key=("x", None)) is value
        assert recall(owner, t, key=("x", None)) is value, "leaving an inner scope forgets nothing"
    assert recall(owner, t, key=("x", None)) is None
    with one_call():
        assert recall(owner, t, key=("x", None)) is None, "a new call starts empty"


def test_keys_match_tensors_by_identity_and_other_values_by_equality():
    owner, t = Owner(), tf.constant([1.0])
    c, array = tf.constant([[0.5]]), np.array([1.0, 2.0])
    with one_call():
        remember(owner, t, "with c", key=("x", {"conditional_input": c}, 1))
        remember(owner, t, "with array", key=("x", array))
        assert recall(owner, t, key=("x", {"conditional_input": c}, 1)) == "with c"
        assert recall(owner, t, key=("x", {"conditional_input": tf.identity(c)}, 1)) is None
        assert recall(owner, t, key=("x", {"conditional_input": c}, 2)) is None
        assert recall(owner, t, key=("y", {"conditional_input": c}, 1)) is None
        assert recall(owner, t, key=("x", {"other_name": c}, 1)) is None, "the structure is part of the key"
        assert recall(owner, t, key=("x", array)) == "with array"
        assert recall(owner, t, key=("x", array.copy())) is None, "arrays without a truth value match by identity"
        assert recall(owner, tf.identity(t), key=("x", array)) is None, "an equal tensor is not the tensor"
        assert recall(Owner(), t, key=("x", array)) is None, "results belong to their owner"


def test_each_owner_keeps_its_latest_entries():
    owner = Owner()
    tensors = [tf.constant(float(i)) for i in range(12)]
    with one_call():
        for i, t in enumerate(tensors):
            remember(owner, t, i)
        found = [recall(owner, t) for t in tensors]
    assert found[-_reuse._ENTRIES_PER_OWNER:] == list(range(12 - _reuse._ENTRIES_PER_OWNER, 12))
    assert found[: 12 - _reuse._ENTRIES_PER_OWNER] == [None] * (12 - _reuse._ENTRIES_PER_OWNER)


def test_traced_results_stay_in_their_graph():
    owner, seen = Owner(), {}
    t = tf.constant([1.0, 2.0])  # an eager tensor both traces capture

    @tf.function
    def first():
        remember(owner, t, t * 2.0, key="k")
        seen["same_graph"] = recall(owner, t, key="k")
        return t

    @tf.function
    def second():
        seen["other_graph"] = recall(owner, t, key="k")
        return t

    first()
    second()
    assert seen["same_graph"] is not None and seen["other_graph"] is None
    with one_call():
        assert recall(owner, t, key="k") is None, "an eager call never sees a traced result"


def test_traced_results_keep_nothing_alive():
    owner, seen = Owner(), {}

    def body(x):
        y = x * 2.0
        remember(owner, x, (y, {"parts": [y, 1]}), key=("k", x))
        seen["graph"] = weakref.ref(tf.compat.v1.get_default_graph())
        return y

    fn = tf.function(body)
    fn(tf.ones([2]))
    del fn
    gc.collect()
    assert seen["graph"]() is None, "a remembered result must not keep its graph alive"


def test_traced_entries_go_with_their_owner():
    owner = Owner()
    tf.function(lambda x: remember(owner, x, x + 1.0) or x)(tf.ones([1]))
    assert id(owner) in _reuse._traced_entries
    key = id(owner)
    del owner
    gc.collect()
    assert key not in _reuse._traced_entries


def test_a_one_call_scope_is_per_thread():
    owner, t = Owner(), tf.constant(1.0)
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        with one_call():
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=other_thread)
    worker.start()
    inside.wait(10)
    try:
        assert not reuse_allowed(), "another thread's scope must not open this one"
        remember(owner, t, 1)
        assert recall(owner, t) is None
    finally:
        release.set()
        worker.join()


def test_a_coupling_runs_its_network_once_per_call_and_never_reuses_across_a_weight_update(randomize):
    calls = []
    bij = AffineCoupling([4], hidden_units=(8,))
    randomize(bij, seed=1)
    network_call = bij.network.call
    bij.network.call = lambda *a, **k: calls.append(1) or network_call(*a, **k)
    y = tf.random.stateless_normal([3, 4], seed=[1, 2])
    with one_call():
        x = bij.inverse(y)
        ildj = bij.inverse_log_det_jacobian(y, event_ndims=1)
        fldj = bij.forward_log_det_jacobian(x, event_ndims=1)
    assert len(calls) == 1, "the log-dets at the call's input and output come from its network pass"
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-6)
    for v in bij.trainable_variables:
        v.assign(v * 1.5)
    calls.clear()
    with one_call():
        after = bij.inverse_log_det_jacobian(y, event_ndims=1)  # the same tensor, in a new call
        stale_x = bij.forward_log_det_jacobian(x, event_ndims=1)
    assert len(calls) == 2, "nothing from before the update may be found"
    np.testing.assert_allclose(after, bij.inverse_log_det_jacobian(tf.identity(y), event_ndims=1), rtol=1e-6)
    assert np.abs(after.numpy() - ildj.numpy()).max() > 1e-3
    np.testing.assert_allclose(stale_x, bij.forward_log_det_jacobian(tf.identity(x), event_ndims=1), rtol=1e-6)
    # Outside a scope every eager call computes afresh.
    calls.clear()
    bij.inverse(y)
    bij.inverse_log_det_jacobian(y, event_ndims=1)
    assert len(calls) == 2


def test_flows_reuse_inside_one_log_prob_and_within_a_trace(randomize):
    flow = tfp_nvp.real_nvp([3], num_coupling_layers=2, hidden_units=(8,), invertible_backprop=True, seed=0)
    randomize(flow, seed=4)
    y = tf.random.stateless_normal([5, 3], seed=[3, 4])
    chain = flow.bijector
    seen = {}

    @tf.function
    def traced(t):
        z = chain.inverse(t)
        seen["input"] = chain._recall(t, "input", 1, {})
        seen["output"] = chain._recall(z, "output", 1, {})
        seen["other_rank"] = chain._recall(t, "input", 2, {})
        return z

    traced(y)
    assert seen["input"] is not None and seen["output"] is seen["input"] and seen["other_rank"] is None
    assert chain._recall(y, "input", 1, {}) is None, "eagerly nothing outside one_call"
