"""Training interrupted after k epochs and resumed ends with exactly the weights of uninterrupted training.

Both doors: Keras (`BackupAndRestore`, `ModelCheckpoint` + `load_weights` + `fit(initial_epoch=k)`) and TFP
(`tf.train.Checkpoint(flow=..., optimizer=...)` + `fit(initial_epoch=k)`). The interruption is real: a callback
raises at the start of epoch k, and a freshly built model resumes. A glow model shows that its ActNorm layers are
restored, not re-initialised from the data the resumed run sees first.

The scenarios run in one subprocess (this file run as a script) because `tf.config.experimental.
enable_op_determinism()` is process-wide and cannot be turned off again; the tests compare what it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EPOCHS, INTERRUPT_AT = 4, 2


# ------------------------------------------------------------------------------------------------ worker side
def _worker(out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    import tfp_nvp
    from tfp_nvp.data import two_moons

    arrays, facts = {}, {}
    x_moons = two_moons(512, seed=0)
    # Continuous images, no `levels`: a levels model draws its dequantization noise from a stateful op whose
    # stream starts over in a resumed run, so only its order of batches, not its noise, would match.
    x_images = np.random.default_rng(0).uniform(size=(256, 4, 4, 1)).astype("float32")

    def moons_model():
        model = tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(16,), seed=0))
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        return model

    def glow_model():
        flow = tfp_nvp.glow([4, 4, 1], num_levels=1, num_steps_per_level=2, hidden_channels=8, seed=0)
        model = tfp_nvp.FlowModel(flow)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        return model

    def state(model):
        """Every model weight (ActNorm flags included) and every optimizer variable, as arrays."""
        return [w.numpy() for w in model.weights] + [v.numpy() for v in model.optimizer.variables]

    def save(name, model):
        for i, a in enumerate(state(model)):
            arrays[f"{name}/{i}"] = a

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == INTERRUPT_AT:
                raise RuntimeError("interrupted")

    class Epochs(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_epoch_begin(self, epoch, logs=None):
            self.seen.append(epoch)

    def interrupted_fit(model, x, callbacks, **kw):
        try:
            model.fit(x, epochs=EPOCHS, batch_size=64, verbose=0, callbacks=[*callbacks, Interrupt()], **kw)
        except RuntimeError as e:
            return str(e) == "interrupted"
        return False

    # Without any seed the order is drawn afresh: two equal models trained one epoch each end apart.
    a, b = (tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), seed=0))
            for _ in range(2))
    for m in (a, b):
        m.compile(optimizer=keras.optimizers.Adam(1e-2))
        m.fit(x_moons, epochs=1, batch_size=64, verbose=0)
    facts["unseeded_runs_differ"] = any(not np.array_equal(u, v) for u, v in zip(state(a), state(b)))

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)

    class WriteCheckpoint(keras.callbacks.Callback):
        """The TFP door's checkpoint, written at every epoch end: the flow's variables and the optimizer's."""

        def __init__(self, directory):
            super().__init__()
            self.directory = directory

        def on_train_begin(self, logs=None):
            checkpoint = tf.train.Checkpoint(flow=self.model.distribution, optimizer=self.model.optimizer)
            self.manager = tf.train.CheckpointManager(checkpoint, self.directory, max_to_keep=1)

        def on_epoch_end(self, epoch, logs=None):
            self.manager.save()

    for name, build, x, kw in (("moons", moons_model, x_moons, dict(validation_split=0.25)),
                               ("glow", glow_model, x_images, {})):
        reference = build()
        reference.fit(x, epochs=EPOCHS, batch_size=64, verbose=0, **kw)
        save(f"{name}_reference", reference)

        # One interrupted run leaves all three kinds of checkpoint behind.
        backup = keras.callbacks.BackupAndRestore(str(out / f"backup_{name}"))
        weights_path = str(out / f"{name}.weights.h5")
        checkpoints = str(out / f"ckpt_{name}")
        first = build()
        facts[f"{name}_interrupted"] = interrupted_fit(
            first, x, [backup, keras.callbacks.ModelCheckpoint(weights_path, save_weights_only=True),
                       WriteCheckpoint(checkpoints)], **kw)
        save(f"{name}_at_interrupt", first)

        # Keras door 1: a fresh model and the same BackupAndRestore pick up where the backup ended.
        resumed, epochs = build(), Epochs()
        resumed.fit(x, epochs=EPOCHS, batch_size=64, verbose=0, callbacks=[backup, epochs], **kw)
        facts[f"{name}_backup_resumed_epochs"] = epochs.seen
        save(f"{name}_backup_resumed", resumed)

        # Keras door 2: ModelCheckpoint's weights file (optimizer included), load_weights, fit(initial_epoch=k).
        if name == "moons":
            resumed = build()
            resumed.optimizer.build(resumed.trainable_weights)  # so the file's optimizer slots have a place
            resumed.load_weights(weights_path)
            resumed.fit(x, epochs=EPOCHS, initial_epoch=INTERRUPT_AT, batch_size=64, verbose=0, **kw)
            save(f"{name}_modelcheckpoint_resumed", resumed)

        # TFP door: tf.train.Checkpoint(flow=..., optimizer=...) restored into a fresh model, fit(initial_epoch=k).
        resumed = build()
        resumed.optimizer.build(resumed.trainable_weights)  # restore fills existing slots; assert_consumed checks
        tf.train.Checkpoint(flow=resumed.distribution, optimizer=resumed.optimizer).restore(
            tf.train.latest_checkpoint(checkpoints)).assert_consumed()
        save(f"{name}_checkpoint_restored", resumed)
        if name == "glow":
            # The first data the restored model sees would initialise ActNorm afresh if the flag were lost.
            resumed.log_prob(x[:64])
            save("glow_checkpoint_after_data", resumed)
            fresh = build()
            fresh.log_prob(x[:64])
            save("glow_fresh_data_init", fresh)
            facts["glow_weight_names"] = [w.path for w in resumed.weights]
        resumed.fit(x, epochs=EPOCHS, initial_epoch=INTERRUPT_AT, batch_size=64, verbose=0, **kw)
        save(f"{name}_checkpoint_resumed", resumed)

    np.savez(out / "arrays.npz", **arrays)
    (out / "facts.json").write_text(json.dumps(facts))


# ------------------------------------------------------------------------------------------------ test side
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "arrays.npz") as f:
        arrays = dict(f)
    facts = json.loads((out / "facts.json").read_text())

    def get(name):
        keys = sorted((k for k in arrays if k.split("/")[0] == name), key=lambda k: int(k.split("/")[1]))
        assert keys, name
        return [arrays[k] for k in keys]

    return get, facts


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("name", ["moons", "glow"])
def test_backup_and_restore_resumes_to_the_uninterrupted_weights(runs, name):
    get, facts = runs
    assert facts[f"{name}_interrupted"]
    # The fresh model really started from the backup, at the epoch after the last one saved.
    assert facts[f"{name}_backup_resumed_epochs"] == list(range(INTERRUPT_AT, EPOCHS))
    assert not same(get(f"{name}_at_interrupt"), get(f"{name}_reference"))
    assert same(get(f"{name}_backup_resumed"), get(f"{name}_reference"))


def test_model_checkpoint_and_initial_epoch_resume_to_the_uninterrupted_weights(runs):
    get, facts = runs
    assert facts["moons_interrupted"]
    assert same(get("moons_modelcheckpoint_resumed"), get("moons_reference"))


@pytest.mark.parametrize("name", ["moons", "glow"])
def test_tf_train_checkpoint_of_flow_and_keras_optimizer_resumes_exactly(runs, name):
    get, _ = runs
    # Weights and optimizer slots (Adam moments, iteration count) come back exactly.
    assert same(get(f"{name}_checkpoint_restored"), get(f"{name}_at_interrupt"))
    assert same(get(f"{name}_checkpoint_resumed"), get(f"{name}_reference"))


def test_restored_actnorm_is_not_reinitialised_by_data(runs):
    get, facts = runs
    names = facts["glow_weight_names"]
    saved, after, fresh = get("glow_at_interrupt"), get("glow_checkpoint_after_data"), get("glow_fresh_data_init")
    actnorm = [i for i, n in enumerate(names) if "actnorm" in n]
    flags = [i for i in actnorm if names[i].rsplit("/", 1)[-1] == "initialized"]
    params = [i for i in actnorm if i not in flags]
    assert len(flags) == 2 and len(params) == 4  # two ActNorms: flag, log-scale and shift each
    assert all(saved[i] == 1 and after[i] == 1 for i in flags)
    for i in params:
        assert np.array_equal(after[i], saved[i])
        # A data-dependent init from that same batch gives other values.
        assert not np.allclose(after[i], fresh[i], atol=1e-3)


def test_shuffle_order_without_a_seed_is_random(runs):
    _, facts = runs
    assert facts["unseeded_runs_differ"]


def test_bad_shuffle_seed_is_refused():
    import keras

    import tfp_nvp

    model = tfp_nvp.FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=1, hidden_units=(4,), seed=0))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    with pytest.raises(TypeError, match="shuffle_seed"):
        model.fit(np.zeros((8, 2), "float32"), epochs=1, batch_size=4, verbose=0, shuffle_seed=1.5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
