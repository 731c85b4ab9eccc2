"""Every upstream internal tfp_nvp relies on is still where `tfp_nvp._compat` says it is.

When a TensorFlow, TFP or Keras release moves one, these tests fail naming the upstream symbol and what the
package uses it for, instead of a flow failing somewhere deep inside TensorFlow.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp import _compat

tfb, tfd = tfp.bijectors, tfp.distributions


MODULE_SYMBOLS = sorted(s for s in _compat.UPSTREAM
                        if s.startswith(("tensorflow.python.", "tensorflow_probability.python.", "keras.src.")))
ATTRIBUTES = sorted(s for s in _compat.UPSTREAM if s not in MODULE_SYMBOLS)


def _instance_for(owner: str):
    """A small live object of the class an attribute symbol names."""
    model = tfd.JointDistributionSequential([tfd.Normal(0.0, 1.0), lambda a: tfd.Normal(a, 1.0)])
    optimizer = keras.optimizers.Adam()
    variable = keras.Variable(tf.zeros([2]))
    optimizer.build([variable])
    return {
        "tfb.Bijector": tfb.Exp(),
        "tfd.TransformedDistribution": tfd.TransformedDistribution(tfd.Normal(0.0, 1.0), tfb.Exp()),
        "tfd.JointDistribution": model,
        # Keras sets a direction on its own metrics (accuracy: "up") and its callbacks read it; FlowModel sets it.
        "keras.Metric": keras.metrics.BinaryAccuracy(),
        "keras.optimizers.Adam": optimizer,
        "BijectorCache": tfb.Exp()._cache,
        "BijectorCacheWithGreedyAttrs": _compat.gated_cache_types(lambda: True, lambda storage: None)[1](),
        "tfd.Distribution": tfd.Normal(0.0, 1.0),
        "tf.Module": tf.Module(),
        "keras.optimizers.Optimizer": optimizer,
    }[owner]


def test_every_use_says_why():
    for symbol, why in _compat.UPSTREAM.items():
        assert len(why) > 30, f"{symbol}: say why tfp_nvp needs it and which public API was tried"


@pytest.mark.parametrize("symbol", MODULE_SYMBOLS)
def test_upstream_symbol_exists(symbol):
    module, _, name = symbol.rpartition(".")
    try:
        found = getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{symbol} has moved ({error}); tfp_nvp uses it for: {_compat.UPSTREAM[symbol]}")
    assert found is not None or symbol.endswith("MetricsList"), symbol


@pytest.mark.parametrize("symbol", ATTRIBUTES)
def test_upstream_private_attribute_exists(symbol):
    owner, _, attribute = symbol.rpartition(".")
    instance = _instance_for(owner)
    assert hasattr(instance, attribute), (
        f"{symbol} is gone from {type(instance).__name__}; tfp_nvp uses it for: {_compat.UPSTREAM[symbol]}")


def test_accessors_answer_on_live_objects():
    assert _compat.is_injective(tfb.Exp()) and not _compat.is_injective(tfb.AbsoluteValue())
    model = tfd.JointDistributionSequential([tfd.Normal(0.0, 1.0), lambda a: tfd.Normal(a, 1.0)])
    # TFP names the parts after the lambdas' arguments; the first part is named by the second's argument.
    assert _compat.flat_part_names(model) == ["a", "x"]
    dist = tfd.TransformedDistribution(tfd.Normal(0.0, 1.0), tfb.Exp())
    assert _compat.split_distribution_kwargs(dist, {"bijector_kwargs": {"k": 1}})[1] == {"k": 1}


def test_greedy_gated_cache_keeps_the_log_det_of_the_augmented_pass():
    """The hook TFP's greedy cache calls (`_invoke` of `forward_name`) and the gate around it, on a toy bijector."""
    calls = []
    plain, greedy = _compat.gated_cache_types(lambda: True, lambda storage: None)

    class Doubling(tfb.Bijector):
        _cache = greedy(forward_name="_augmented_forward", inverse_name="_augmented_inverse")

        def __init__(self):
            super().__init__(forward_min_event_ndims=0, name="doubling")

        def _augmented_forward(self, x):
            calls.append("forward")
            log_det = tf.fill(tf.shape(x), tf.math.log(2.0))
            return 2.0 * x, {"fldj": log_det, "ildj": -log_det}

        def _augmented_inverse(self, y):
            calls.append("inverse")
            log_det = tf.fill(tf.shape(y), tf.math.log(2.0))
            return y / 2.0, {"ildj": -log_det, "fldj": log_det}

        def _forward_log_det_jacobian(self, x):
            calls.append("fldj")
            return tf.fill(tf.shape(x), tf.math.log(2.0))

    bijector = Doubling()
    x = tf.constant([1.0, 3.0])
    bijector.forward(x)
    fldj = bijector.forward_log_det_jacobian(x, event_ndims=0)
    symbol = "tensorflow_probability.python.internal.cache_util.BijectorCacheWithGreedyAttrs"
    assert calls == ["forward"], (
        f"{symbol} no longer keeps the log-det returned with the output (calls: {calls}); tfp_nvp relies on it "
        f"for: {_compat.UPSTREAM[symbol]}")
    np.testing.assert_allclose(fldj, [np.log(2.0)] * 2, rtol=1e-6)
