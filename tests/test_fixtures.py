"""Files saved by an earlier tfp_nvp load into this one and give the densities they gave when written.

tests/fixtures holds `.keras` and `.weights.h5` files written by tfp_nvp 0.1.0 with its flat module layout
(tests/fixtures/make_fixtures.py, which also says how), with data points and the log-densities the writing
version computed. A refactor that renames a class, moves a module, reorders weights or changes a builder's
arithmetic fails here, where a save-and-reload within one version cannot notice.
"""

from __future__ import annotations

import importlib.util
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp


HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
_spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(HERE, "make_fixtures.py"))
make_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixtures)
FLOWS = make_fixtures._flows()

# Same weights and the same arithmetic give the same numbers up to the order of float32 reductions, which
# TensorFlow and oneDNN may pick differently between releases; a wrong weight moves a log-density by far more.
RTOL, ATOL = 2e-6, 2e-5


def _expected(name):
    with np.load(os.path.join(HERE, f"{name}.npz")) as f:
        return f["x"], f["log_prob"]


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_keras_file_from_the_earlier_version_loads_to_the_same_densities(name):
    x, log_prob = _expected(name)
    model = keras.saving.load_model(os.path.join(HERE, f"{name}.keras"))
    assert isinstance(model, tfp_nvp.FlowModel)
    np.testing.assert_allclose(model.log_prob(tf.constant(x)).numpy(), log_prob, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_weights_file_from_the_earlier_version_loads_into_a_fresh_flow(name):
    make, _, model_kwargs = FLOWS[name]
    x, log_prob = _expected(name)
    model = tfp_nvp.FlowModel(make(), **model_kwargs)
    before = model.log_prob(tf.constant(x)).numpy()
    model.load_weights(os.path.join(HERE, f"{name}.weights.h5"))
    after = model.log_prob(tf.constant(x)).numpy()
    assert not np.allclose(before, log_prob, rtol=1e-3), "a fresh flow already gave the saved densities"
    np.testing.assert_allclose(after, log_prob, rtol=RTOL, atol=ATOL)
