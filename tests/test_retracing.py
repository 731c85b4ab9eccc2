"""FlowModel traces its training and evaluation steps once, whatever the batch sizes and number of calls, for every
builder family and with compile()'s default optimizer."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import tfp_nvp
from tfp_nvp import FlowModel


def count_traces(model):
    """Makes `model` count the Python executions of its train and test step bodies.

    Keras builds its step functions from `model.train_step` / `model.test_step` when `fit` / `evaluate` first
    run, so instance attributes set before then are what the traced functions call. Once traced, a graph runs
    without executing the Python body again: each count is the number of traces.
    """
    counts = {"train": 0, "test": 0}

    def counting(kind, step):
        def step_body(data):
            counts[kind] += 1
            return step(data)

        return step_body

    model.train_step = counting("train", model.train_step)
    model.test_step = counting("test", model.test_step)
    return counts


def _model_and_data(builder):
    """A small flow of each builder family in a FlowModel, and 50 examples of its data."""
    rng = np.random.default_rng(0)
    if builder == "glow":
        # Integer images through `levels`: the dequantization noise is drawn inside the traced step.
        flow = tfp_nvp.glow([4, 4, 1], num_levels=2, num_steps_per_level=1, hidden_channels=4, seed=0)
        return FlowModel(flow, levels=17), rng.integers(0, 17, size=(50, 4, 4, 1))
    build = getattr(tfp_nvp, builder)
    depth = {"num_layers": 2} if builder == "maf" else {"num_coupling_layers": 2}
    flow = build([2], hidden_units=(8,), seed=0, **depth)
    return FlowModel(flow), tfp_nvp.data.two_moons(50, seed=0).astype("float32")


@pytest.mark.parametrize("builder", ["real_nvp", "spline_flow", "maf", "glow"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_and_evaluate_trace_each_step_once(builder, jit_compile):
    keras.utils.set_random_seed(0)
    model, x = _model_and_data(builder)
    counts = count_traces(model)
    # compile()'s own default optimizer for one builder, an explicit Keras one for the others.
    model.compile(optimizer=None if builder == "real_nvp" else keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    # 50 = 3 x 16 + 2: every epoch ends in a partial batch; the step is traced once for any batch size.
    history = model.fit(x, batch_size=16, epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3
    assert counts == {"train": 1, "test": 0}
    for batch_size in (16, 7, 50):  # partial last batches of 2 and 1, and one whole batch
        model.evaluate(x, batch_size=batch_size, verbose=0)
    assert counts == {"train": 1, "test": 1}
    # A second fit with another batch size and validation data (partial batches on both sides), then one that
    # splits its own validation set: still the same two traced steps.
    model.fit(x, batch_size=20, epochs=2, validation_data=x[:13], verbose=0)
    model.fit(x, epochs=2, validation_split=0.2, verbose=0)
    assert counts == {"train": 1, "test": 1}


def test_trace_counter_sees_eager_steps():
    """The counter is live: run eagerly, the step body executes once per batch."""
    model = FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), seed=0))
    counts = count_traces(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    x = tfp_nvp.data.two_moons(20, seed=1).astype("float32")
    model.fit(x, batch_size=8, epochs=2, verbose=0)  # 3 batches per epoch
    model.evaluate(x, batch_size=8, verbose=0)
    assert counts == {"train": 6, "test": 3}
