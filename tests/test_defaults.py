"""The training defaults are what the docs say: real_nvp's vector network, FlowModel.compile()'s optimizer and
schedule, fit's batch size, and WarmupCosineDecay's shape, sizing by fit, resumption and errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp
from tfp_nvp import WarmupCosineDecay
from tfp_nvp._compat import learning_rate_schedule
from tfp_nvp.bijectors import AffineCoupling
from tfp_nvp.models.flow_model import DEFAULT_BATCH_SIZE


def _couplings(flow):
    return [b for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, AffineCoupling)]


def _dense_units(coupling):
    """Output widths of the coupling network's dense kernels, in order."""
    return [int(w.shape[-1]) for w in coupling.network.weights if len(w.shape) == 2]


def _expected(step, peak, warmup_fraction, final_fraction, total):
    """The documented schedule, written out in numpy."""
    warmup = math.floor(warmup_fraction * total)
    t = min(max(step, 0), total)
    if t < warmup:
        return peak * (t + 1) / warmup
    progress = min((t - warmup) / max(total - warmup - 1, 1), 1.0)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def _small_model(seed=0):
    return tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(8,), seed=seed))


class _RecordRates(keras.callbacks.Callback):
    """The learning rate each training step uses (the schedule at the step count before the step)."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))


def test_real_nvp_vector_default_is_16_couplings_of_64_64():
    flow = tfp_nvp.real_nvp([2], seed=0)
    couplings = _couplings(flow)
    assert len(couplings) == 16
    # two hidden layers of 64, then the zero-initialised head
    assert all(_dense_units(c)[:2] == [64, 64] for c in couplings)
    assert flow._tfp_nvp_spec["config"]["num_coupling_layers"] == 16
    assert flow._tfp_nvp_spec["config"]["hidden_units"] == [64, 64]


def test_real_nvp_explicit_arguments_override_the_defaults():
    flow = tfp_nvp.real_nvp([2], num_coupling_layers=3, hidden_units=(5, 7), seed=0)
    assert len(_couplings(flow)) == 3
    assert _dense_units(_couplings(flow)[0])[:2] == [5, 7]


def test_real_nvp_image_default_unchanged():
    flow = tfp_nvp.real_nvp([4, 4, 2], seed=0)
    assert len(_couplings(flow)) == 8
    assert flow._tfp_nvp_spec["config"]["hidden_units"] == [128]


def test_compile_without_optimizer_is_keras_adam_with_the_documented_schedule():
    model = _small_model()
    model.compile()
    # Keras' own Adam (public API only); FusedAdam is opt-in.
    assert type(model.optimizer) is keras.optimizers.Adam
    assert model.optimizer.get_config()["clipnorm"] is None
    schedule = learning_rate_schedule(model.optimizer)
    assert isinstance(schedule, WarmupCosineDecay)
    assert schedule.get_config() == dict(peak_learning_rate=5e-3, warmup_fraction=0.05, final_fraction=0.01,
                                         total_steps=None, name="warmup_cosine_decay")
    assert schedule.sized_by_fit
    # until a fit sizes it, the rate is the constant peak
    assert float(schedule(0)) == pytest.approx(5e-3)
    assert float(schedule(10_000)) == pytest.approx(5e-3)


def test_compile_with_an_optimizer_uses_it():
    model = _small_model()
    optimizer = keras.optimizers.SGD(0.1)
    model.compile(optimizer=optimizer)
    assert model.optimizer is optimizer


def test_fit_default_batch_size():
    assert DEFAULT_BATCH_SIZE == 256
    model = _small_model()
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    model.fit(np.zeros((600, 2), "float32"), epochs=2, verbose=0, shuffle_seed=0)
    assert int(model.optimizer.iterations) == 2 * math.ceil(600 / 256)


def test_fixed_schedule_matches_formula():
    for peak, warmup, final, total in ((1.0, 0.1, 0.01, 100), (5e-3, 0.05, 0.0, 37), (2e-3, 0.0, 0.5, 10)):
        schedule = WarmupCosineDecay(peak, warmup_fraction=warmup, final_fraction=final, total_steps=total)
        got = [float(schedule(s)) for s in range(total + 5)]
        want = [_expected(s, peak, warmup, final, total) for s in range(total + 5)]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert max(got) == pytest.approx(peak, rel=1e-6)
        assert got[total - 1] == pytest.approx(final * peak, rel=1e-5, abs=1e-9)
        assert got[-1] == got[total - 1]  # held after the cycle


def test_fit_sizes_the_default_schedule_to_its_epochs():
    model = _small_model()
    model.compile()
    record = _RecordRates()
    x = tfp_nvp.data.two_moons(512, seed=0)
    model.fit(x, epochs=10, verbose=0, shuffle_seed=0, callbacks=[record])  # 2 steps per epoch, 20 steps
    want = [_expected(s, 5e-3, 0.05, 0.01, 20) for s in range(20)]
    np.testing.assert_allclose(record.rates, want, rtol=1e-5)
    assert record.rates[-1] == pytest.approx(5e-5, rel=1e-5)
    # a later fit runs a new cycle over its own epochs
    again = _RecordRates()
    model.fit(x, epochs=3, verbose=0, shuffle_seed=0, callbacks=[again])
    np.testing.assert_allclose(again.rates, [_expected(s, 5e-3, 0.05, 0.01, 6) for s in range(6)], rtol=1e-5)


def test_resumed_fit_follows_the_uninterrupted_schedule():
    x = tfp_nvp.data.two_moons(512, seed=1)
    whole = _small_model(seed=3)
    whole.compile()
    record = _RecordRates()
    whole.fit(x, epochs=6, verbose=0, shuffle_seed=0, callbacks=[record])

    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                self.model.stop_training = True

    resumed = _small_model(seed=3)
    resumed.compile()
    first, second = _RecordRates(), _RecordRates()
    resumed.fit(x, epochs=6, verbose=0, shuffle_seed=0, callbacks=[first, StopAfter()])
    resumed.fit(x, epochs=6, initial_epoch=3, verbose=0, shuffle_seed=0, callbacks=[second])
    np.testing.assert_allclose(first.rates + second.rates, record.rates, rtol=1e-6)
    for a, b in zip(whole.trainable_weights, resumed.trainable_weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fit_leaves_a_fixed_schedule_alone():
    model = _small_model()
    schedule = WarmupCosineDecay(1e-2, total_steps=50)
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    record = _RecordRates()
    model.fit(tfp_nvp.data.two_moons(512, seed=0), epochs=2, verbose=0, shuffle_seed=0, callbacks=[record])
    np.testing.assert_allclose(record.rates, [_expected(s, 1e-2, 0.05, 0.01, 50) for s in range(4)], rtol=1e-5)


def test_unknown_length_input_with_the_default_schedule_is_a_clear_error():
    model = _small_model()
    model.compile()
    x = tfp_nvp.data.two_moons(64, seed=0)
    ds = tf.data.Dataset.from_tensor_slices(x).filter(lambda t: t[0] < 100.0).batch(16)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(ds, epochs=1, verbose=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(peak_learning_rate=0.0), "peak_learning_rate"),
    (dict(peak_learning_rate=-1e-3), "peak_learning_rate"),
    (dict(warmup_fraction=1.0), "warmup_fraction"),
    (dict(final_fraction=1.5), "final_fraction"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=2.5), "total_steps"),
    (dict(total_steps=10, cycle=(0, 10)), "`cycle` is for schedules sized by `fit`"),
    (dict(cycle=(0, 0)), "total_steps"),
])
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosineDecay(**kwargs)


def test_keras_file_keeps_the_default_optimizer(tmp_path):
    model = _small_model()
    model.compile()
    x = tfp_nvp.data.two_moons(256, seed=0)
    model.fit(x, epochs=1, verbose=0, shuffle_seed=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is keras.optimizers.Adam
    schedule = learning_rate_schedule(loaded.optimizer)
    assert isinstance(schedule, WarmupCosineDecay)
    assert schedule.get_config() == learning_rate_schedule(model.optimizer).get_config()
    np.testing.assert_array_equal(loaded.log_prob(x).numpy(), model.log_prob(x).numpy())
