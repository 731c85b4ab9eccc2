"""WarmupCosineDecay on Keras' CosineDecay gives, at every step, the rate of the formula it had before.

`_reference` below is the schedule's `__call__` as it was before the decay moved onto
`keras.optimizers.schedules.CosineDecay` (tfp_nvp 048b15a), kept verbatim as the reference: the rebuilt schedule
must agree with it everywhere (measured bit for bit on Keras 3.15; the tolerance allows a few float32 roundings
should a Keras release reorder CosineDecay's arithmetic).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_nvp import WarmupCosineDecay

# (peak, warmup_fraction, final_fraction, total steps): the default, other warmups (none, half, almost all),
# final fractions 0 and 1 (flat), and cycles of 1 and 2 steps where the warmup rounds down to nothing.
CONFIGS = [
    (5e-3, 0.05, 0.01, 20), (5e-3, 0.05, 0.01, 1000), (1.0, 0.1, 0.01, 100), (5e-3, 0.05, 0.0, 37),
    (2e-3, 0.0, 0.5, 10), (1e-2, 0.5, 0.0, 7), (3e-4, 0.3, 1.0, 13), (1.0, 0.05, 0.01, 1), (1.0, 0.05, 0.01, 2),
    (1.0, 0.99, 0.2, 50), (1.0, 0.0, 0.0, 100_000),
]


def _reference(step, peak_learning_rate, warmup_fraction, final_fraction, start, length):
    """The schedule before it was rebuilt on CosineDecay (its `__call__`, with the cycle as arguments)."""
    dtype = tf.float32
    peak = tf.constant(peak_learning_rate, dtype)
    length = tf.cast(length, dtype)
    t = tf.clip_by_value(tf.cast(step, dtype) - tf.cast(start, dtype), 0.0, tf.maximum(length, 1.0))
    warmup = tf.floor(warmup_fraction * length)
    rising = peak * (t + 1.0) / tf.maximum(warmup, 1.0)
    progress = (t - warmup) / tf.maximum(length - warmup - 1.0, 1.0)
    falling = peak * (final_fraction + (1.0 - final_fraction) * 0.5
                      * (1.0 + tf.cos(math.pi * tf.minimum(progress, 1.0))))
    rate = tf.where(t < warmup, rising, falling)
    return tf.where(length > 0, rate, peak)


def _steps(start, total):
    """Every step of the cycle and a few around it, and steps long after it."""
    last = start + total
    return np.array(sorted({*range(0, min(last + 5, 3000)), last - 1, last, last + 10**6, 2**40}), np.int64)


def _compare(schedule, start, total, steps):
    config = schedule.get_config()
    # Both take a vector of steps (elementwise ops): one call instead of thousands of eager scalar calls.
    steps = tf.constant(steps)
    want = _reference(steps, config["peak_learning_rate"], config["warmup_fraction"], config["final_fraction"],
                      start, total).numpy()
    got = schedule(steps).numpy()
    assert got.shape == want.shape == steps.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    return got


@pytest.mark.parametrize("peak, warmup, final, total", CONFIGS)
@pytest.mark.parametrize("start", [0, 17])
def test_sized_by_fit_equals_the_old_formula(peak, warmup, final, total, start):
    schedule = WarmupCosineDecay(peak, warmup_fraction=warmup, final_fraction=final)
    schedule.set_cycle(start, total)
    got = _compare(schedule, start, total, _steps(start, total))
    assert max(got) == pytest.approx(peak, rel=1e-6)


@pytest.mark.parametrize("peak, warmup, final, total", CONFIGS[:5])
def test_fixed_total_steps_equals_the_old_formula(peak, warmup, final, total):
    schedule = WarmupCosineDecay(peak, warmup_fraction=warmup, final_fraction=final, total_steps=total)
    _compare(schedule, 0, total, _steps(0, total))


def test_unsized_is_the_constant_peak_as_before():
    schedule = WarmupCosineDecay(0.7)
    _compare(schedule, 0, 0, np.array([0, 5, 10**6]))
    assert float(schedule(5)) == pytest.approx(0.7)


def test_the_decay_is_keras_cosine_decay():
    # After the warmup the rate is CosineDecay(peak, decay_steps=n, alpha=final_fraction) at the steps since it.
    peak, final, total = 2e-3, 0.1, 200
    schedule = WarmupCosineDecay(peak, warmup_fraction=0.0, final_fraction=final, total_steps=total)
    keras_decay = keras.optimizers.schedules.CosineDecay(peak, decay_steps=total - 1, alpha=final)
    steps = np.arange(total + 3)
    np.testing.assert_allclose([float(schedule(s)) for s in steps], [float(keras_decay(s)) for s in steps],
                               rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_traced_step_follows_a_later_resize(jit_compile):
    # fit resizes the cycle after Keras traced the training step: the trace must read the new cycle.
    schedule = WarmupCosineDecay(1e-2)
    rate = tf.function(lambda step: schedule(step), jit_compile=jit_compile)
    steps = np.arange(0, 60, 3)
    for start, total in ((0, 0), (0, 40), (25, 12)):
        if total:
            schedule.set_cycle(start, total)
        want = [float(_reference(s, 1e-2, 0.05, 0.01, start, total)) for s in steps]
        np.testing.assert_allclose([float(rate(tf.constant(s, tf.int64))) for s in steps], want, rtol=1e-6)


def test_serialization_keeps_the_sized_cycle():
    schedule = WarmupCosineDecay(3e-3, warmup_fraction=0.2, final_fraction=0.05)
    schedule.set_cycle(4, 30)
    config = keras.optimizers.schedules.serialize(schedule)
    restored = keras.optimizers.schedules.deserialize(config)
    assert type(restored) is WarmupCosineDecay
    assert restored.get_config() == schedule.get_config() == dict(
        peak_learning_rate=3e-3, warmup_fraction=0.2, final_fraction=0.05, total_steps=None,
        name="warmup_cosine_decay", cycle=(4, 30))
    steps = np.arange(40)
    np.testing.assert_array_equal([float(restored(s)) for s in steps], [float(schedule(s)) for s in steps])
