"""Every upstream internal tfp_nvp relies on is still where `tfp_nvp._compat` says it is.

When a TensorFlow, TFP or Keras release moves one, these tests fail naming the upstream symbol and what the
package uses it for, instead of a flow failing somewhere deep inside TensorFlow.
"""

from __future__ import annotations

import keras
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
