"""Training under tf.distribute: MirroredStrategy on two logical CPUs and a real two-process MultiWorker job.

What is checked is equivalence: the same initial weights, the same global batches in the same order
(`shuffle=False`), a few optimizer steps, then the weights and the reported `loss` / `nll` must equal those of
a single-device run. Replicas see half a global batch each and the optimizer sums their gradients, so any
missing or doubled scaling of the loss, a per-replica ActNorm initialisation, or an optimizer slot living on the
wrong device shows up as a difference of order the learning rate, while a correct run differs only by float32
rounding.

Tolerance. The only legitimate difference is the order of float32 additions: two half-batch sums all-reduced
instead of one full-batch sum (and ActNorm's float64 moment sums instead of float32 moments), which moves a
result by a few ulps per step. Measured over these runs it stays below 4e-7 for weights of size ~1;
`WEIGHT_ATOL = 1e-5` (about 80 ulps at 1) leaves room for that and is still ~1000x below the 1e-2 drift of a
wrong loss scaling. Plain SGD is used wherever an ActNorm is trained: right after the data-dependent
initialisation the gradient of its parameters is zero up to rounding, and Adam's first steps move each weight by
about `learning_rate * sign(gradient)`, turning that rounding noise into differences of order the learning rate
(measured on the model of tests/multi_worker_job.py, 3 steps at lr 1e-2: 1.1e-3 with Adam, 2.4e-7 with SGD).

The two logical CPUs come from tests/conftest.py (TF's devices must be configured before first use).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_nvp
from tfp_nvp import ActNorm, FlowModel

import multi_worker_job as job  # tests/multi_worker_job.py: the worker script, also the single-process reference

WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5
GLOBAL_BATCH = 32
WORKER_TIMEOUT = 180  # seconds; measured: the whole test took 60 s on 2 cores shared with other jobs (load 6)


@pytest.fixture(scope="module")
def mirrored():
    cpus = tf.config.list_logical_devices("CPU")
    assert len(cpus) >= 2, "tests/conftest.py should have split the CPU into two logical devices"
    return tf.distribute.MirroredStrategy([cpus[0].name, cpus[1].name])


def _replica_values(strategy, weight):
    """Every replica's copy of a Keras weight (a MirroredVariable under the strategy)."""
    return [np.asarray(v) for v in strategy.experimental_local_results(weight.value)]


def _assert_replicas_identical(strategy, model):
    for w in model.weights:
        copies = _replica_values(strategy, w)
        assert len(copies) == strategy.num_replicas_in_sync, f"{w.path} is not mirrored"
        for c in copies[1:]:
            np.testing.assert_array_equal(c, copies[0], err_msg=w.path)


def _fit(strategy, build, x, optimizer, epochs=2, fit_inside_scope=False, **fit_kwargs):
    """Builds and compiles under `strategy` (None: no strategy); fits inside or outside its scope."""
    scope = (strategy or tf.distribute.get_strategy()).scope()
    with scope:
        model = build()
        model.compile(optimizer=optimizer())
        if fit_inside_scope:
            history = model.fit(x, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0, **fit_kwargs)
    if not fit_inside_scope:
        history = model.fit(x, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0, **fit_kwargs)
    return model, history.history


def _assert_same_training(single, mirrored_run):
    (m0, h0), (m1, h1) = single, mirrored_run
    # Same builder and seed: the weights pair up in order (their auto-numbered names differ).
    assert [tuple(w.shape) for w in m0.weights] == [tuple(w.shape) for w in m1.weights]
    for a, b in zip(m0.weights, m1.weights):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=WEIGHT_ATOL, err_msg=b.path)
    assert set(h0) == set(h1)
    for key in h0:
        np.testing.assert_allclose(h1[key], h0[key], rtol=LOSS_RTOL, err_msg=key)


def _vectors(n, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, dim)) @ (np.eye(dim) + 0.5 * rng.normal(size=(dim, dim))) + 1.0).astype(np.float32)


STEPS = 3  # for the tests/multi_worker_job.py model: three global batches of GLOBAL_BATCH, one epoch


@pytest.fixture(scope="module")
def reference():
    """tests/multi_worker_job.py's training (ActNorm + RealNVP with weight penalties, SGD) on one device."""
    model, loss, _ = job.train(tf.distribute.get_strategy(), STEPS, GLOBAL_BATCH, "sgd")
    return [np.asarray(w) for w in model.weights], loss


def test_mirrored_fit_outside_scope_matches_single_device(mirrored, reference):
    # Built and compiled in the scope, `fit` outside it; a tf.data input of global batches; ActNorm initialised
    # inside the first distributed step.
    model, loss, _ = job.train(mirrored, STEPS, GLOBAL_BATCH, "sgd")
    assert model.distribute_strategy is mirrored
    weights, want_loss = reference
    assert [w.shape for w in weights] == [tuple(w.shape) for w in model.weights]
    for w, want in zip(model.weights, weights):
        np.testing.assert_allclose(np.asarray(w), want, rtol=0, atol=WEIGHT_ATOL, err_msg=w.path)
    np.testing.assert_allclose(loss, want_loss, rtol=LOSS_RTOL)
    _assert_replicas_identical(mirrored, model)
    actnorm = next(b for b in tfp_nvp.flow_bijectors(model.distribution) if isinstance(b, ActNorm))
    assert bool(actnorm.initialized)


def test_mirrored_fit_inside_scope_matches_single_device(mirrored):
    # Everything inside the scope, array inputs (FlowModel's own pipeline), Adam, two epochs; l2 > 0 so the
    # weight penalties go through the same replica scaling as the NLL.
    def build():
        return FlowModel(tfp_nvp.real_nvp([4], num_coupling_layers=2, hidden_units=(16,), l2=1e-3, seed=5))

    def adam():
        return keras.optimizers.Adam(1e-2)

    x = _vectors(64)
    single = _fit(None, build, x, adam)
    distributed = _fit(mirrored, build, x, adam, fit_inside_scope=True)
    _assert_same_training(single, distributed)
    model, history = distributed
    _assert_replicas_identical(mirrored, model)
    # The penalty is really there (loss > nll), and the reported nll is the true mean over the global batch.
    assert all(loss > nll for loss, nll in zip(history["loss"], history["nll"]))
    evaluated = model.evaluate(x, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
    np.testing.assert_allclose(evaluated["nll"], -np.mean(model.log_prob(x).numpy()), rtol=LOSS_RTOL)


def test_mirrored_conditional_flow_matches_single_device(mirrored):
    rng = np.random.default_rng(1)
    c = rng.normal(size=(64, 3)).astype(np.float32)
    x = (c[:, :2] * 2.0 + 0.3 * rng.normal(size=(64, 2))).astype(np.float32)
    inputs = {"x": x, "conditional_input": c}

    def build():
        return FlowModel(tfp_nvp.real_nvp([2], num_coupling_layers=2, hidden_units=(16,), conditional_shape=[3],
                                          seed=2))

    def adam():
        return keras.optimizers.Adam(1e-2)

    single = _fit(None, build, inputs, adam, epochs=1)
    distributed = _fit(mirrored, build, inputs, adam, epochs=1)
    _assert_same_training(single, distributed)
    _assert_replicas_identical(mirrored, distributed[0])


def _two_populations(n, shape, seed=0):
    """A batch whose halves (one per replica) have very different per-channel statistics."""
    rng = np.random.default_rng(seed)
    c = shape[-1]
    first = rng.normal(size=(n // 2, *shape)) * 0.5 - np.arange(c)
    second = rng.normal(size=(n // 2, *shape)) * 3.0 + 2.0 * np.arange(c) + 5.0
    return np.concatenate([first, second]).astype(np.float32)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf_function"])
def test_actnorm_initialises_from_the_global_batch_on_every_replica(mirrored, traced):
    shape = (3, 3, 2)
    y = _two_populations(16, shape)
    reference = ActNorm(shape)
    z_single = reference.inverse(tf.constant(y)).numpy()
    with mirrored.scope():
        act = ActNorm(shape)
    halves = mirrored.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(y[8 * ctx.replica_id_in_sync_group: 8 * (ctx.replica_id_in_sync_group + 1)])
    )

    def step(part):
        return act.inverse(part), act.inverse_log_det_jacobian(part, event_ndims=3)

    run = tf.function(lambda v: mirrored.run(step, args=(v,))) if traced else (lambda v: mirrored.run(step, (v,)))
    z, ildj = run(halves)
    holder = act.keras_layers[0]
    for name in ("log_scale", "shift", "initialized"):
        copies = _replica_values(mirrored, getattr(holder, name))
        np.testing.assert_array_equal(copies[1], copies[0], err_msg=name)
        # float32 moments on one device vs float64 sums across replicas: equal to float32 rounding.
        np.testing.assert_allclose(copies[0], np.asarray(getattr(reference.keras_layers[0], name)), rtol=1e-5,
                                   err_msg=name)
    z = np.concatenate([np.asarray(t) for t in mirrored.experimental_local_results(z)])
    np.testing.assert_allclose(z, z_single, rtol=1e-4, atol=1e-5)
    # Normalised over the global batch, not per replica: each half alone is far from zero mean.
    np.testing.assert_allclose(z.reshape(-1, 2).mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(-1, 2).std(axis=0), 1.0, atol=1e-4)
    assert np.all(np.abs(z[:8].reshape(-1, 2).mean(axis=0)) > 0.5)
    for part in mirrored.experimental_local_results(ildj):
        np.testing.assert_allclose(np.asarray(part), -9 * np.asarray(reference.log_scale).sum(), rtol=1e-5)
    # Initialised once: a second call leaves the parameters alone.
    before = _replica_values(mirrored, holder.shift)
    run(halves)
    np.testing.assert_array_equal(_replica_values(mirrored, holder.shift), before)


def test_mirrored_discrete_glow_trains(mirrored):
    # levels=: every replica draws its own dequantization noise, so the runs cannot match a single device
    # number for number; what must hold is that training works, replicas agree, and the metrics are consistent.
    rng = np.random.default_rng(3)
    levels = 17
    proto = rng.integers(0, levels, size=(1, 8, 8, 1))
    x = np.clip(proto + rng.integers(-2, 3, size=(64, 8, 8, 1)), 0, levels - 1).astype(np.int32)

    def build():
        flow = tfp_nvp.glow([8, 8, 1], num_levels=1, num_steps_per_level=1, hidden_channels=4, seed=4)
        return FlowModel(flow, levels=levels)

    model, history = _fit(mirrored, build, x, lambda: keras.optimizers.Adam(3e-3), epochs=2)
    _assert_replicas_identical(mirrored, model)
    assert all(bool(a.initialized) for a in tfp_nvp.flow_bijectors(model.distribution) if isinstance(a, ActNorm))
    assert np.all(np.isfinite(history["loss"])) and history["nll"][-1] < history["nll"][0]
    np.testing.assert_allclose(
        history["bits_per_dim"],
        [tfp_nvp.images.bits_per_dim(n, 64, levels) for n in history["nll"]], rtol=1e-5,
    )


# --------------------------------------------------------------------------------------------- multi-worker
@pytest.mark.parametrize("invertible_backprop", [False, True], ids=["standard", "invertible_backprop"])
def test_two_worker_job_matches_single_process(tmp_path, reference, invertible_backprop):
    """Two worker processes on localhost end at the single-process weights (standard backprop); with invertible
    backprop too, so the rebuilt-activation gradient is all-reduced like any other."""
    ports = job.free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    script = Path(__file__).with_name("multi_worker_job.py")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    procs, logs = [], []
    try:
        for index in range(2):
            log = open(tmp_path / f"worker{index}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(script), "--out", str(tmp_path / f"worker{index}.npz"), "--steps", str(STEPS),
                 "--global-batch", str(GLOBAL_BATCH), "--optimizer", "sgd"]
                + (["--invertible-backprop"] if invertible_backprop else []),
                env={**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})},
                stdout=log, stderr=subprocess.STDOUT,
            ))
        for index, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=WORKER_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {index} did not finish within {WORKER_TIMEOUT} s")
            assert code == 0, f"worker {index} exited with {code}:\n" + (tmp_path / f"worker{index}.log").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for log in logs:
            log.close()

    weights, loss = reference
    results = [np.load(tmp_path / f"worker{index}.npz") for index in range(2)]
    for r in results:
        assert int(r["num_replicas"]) == 2  # really one job of two workers, not two single-worker runs
        assert int(r["invertible_chains"]) == (2 if invertible_backprop else 0)  # the flag reached the workers
        assert sorted(k for k in r.files if k.startswith("arr_")) == sorted(f"arr_{i}" for i in range(len(weights)))
        np.testing.assert_allclose(r["loss"], loss, rtol=LOSS_RTOL)
        for i, want in enumerate(weights):
            np.testing.assert_allclose(r[f"arr_{i}"], want, rtol=0, atol=WEIGHT_ATOL, err_msg=f"weight {i}")
    for i in range(len(weights)):
        np.testing.assert_array_equal(results[0][f"arr_{i}"], results[1][f"arr_{i}"])
