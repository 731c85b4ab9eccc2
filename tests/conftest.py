"""Shared helpers for the tfp_nvp test suite.

A freshly built coupling is the identity (its last layer is zero-initialised), and the identity passes every
log-det test whatever the code computes. The `randomize` fixture therefore overwrites every trainable variable
with random values so the tests exercise genuinely non-linear, non-identity maps.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs for the whole session, so tests/test_distribute.py can run MirroredStrategy over two devices
# in-process. TF fixes its device list on first use, and conftest is imported before any test module, so this
# is the one place it reliably works. Code without a strategy still places every op on CPU:0, so the other
# tests run exactly as on one device.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)


def randomize_variables(module, seed: int, scale: float = 1.0) -> None:
    """Assigns random normal values to every trainable variable reachable through `module` (TFP door).

    Kernels are scaled by 1/sqrt(fan_in) so hidden activations stay O(scale) whatever the width; vectors
    (biases, the tanh `scale`) get standard deviation `scale / 2`. The result is a clearly non-identity map whose
    log-scales stay moderate, so float64 comparisons against autodiff remain well conditioned.
    """
    rng = np.random.default_rng(seed)
    variables = module.trainable_variables
    assert variables, f"{module!r} has no trainable variables to randomize"
    for v in variables:
        shape = tuple(v.shape)
        if len(shape) >= 2:
            std = scale / np.sqrt(np.prod(shape[:-1]))
        else:
            std = scale / 2
        dtype = getattr(v.dtype, "as_numpy_dtype", v.dtype)  # a Keras variable's dtype is a string
        v.assign(rng.normal(0.0, std, size=shape).astype(dtype))


@pytest.fixture(autouse=True)
def _same_global_random_state():
    """Every test starts from one global random state, whichever tests ran before it in its process.

    The suite runs on pytest-xdist workers (setup.cfg), which receive the test files in no fixed order; a network
    built without a seed would otherwise draw different weights from run to run.
    """
    import keras  # imported after the CPU was split into two logical devices above, as every test module is

    keras.utils.set_random_seed(20240)


@pytest.fixture(scope="session")
def randomize():
    """The `randomize_variables` helper, as a fixture so test modules need not import conftest."""
    return randomize_variables


def flat_log_det(fn, x, event_rank: int):
    """log|det J| of `fn` at every batch member of `x` ([N, *event]) by autodiff of the flattened map."""
    x = tf.convert_to_tensor(x)
    n = x.shape[0]
    event_shape = x.shape[1:]
    assert len(event_shape) == event_rank
    flat = tf.reshape(x, [n, -1])
    # pfor traces a graph on every eager call (~1 s); a plain loop of backward passes is cheaper for small D.
    use_pfor = flat.shape[1] > 16
    with tf.GradientTape(persistent=not use_pfor) as tape:
        tape.watch(flat)
        out = tf.reshape(fn(tf.reshape(flat, [n, *event_shape])), [n, -1])
    jac = tape.batch_jacobian(out, flat, experimental_use_pfor=use_pfor)
    sign, log_abs_det = tf.linalg.slogdet(jac)
    assert np.all(sign.numpy() != 0), "Jacobian is singular"
    return log_abs_det.numpy()


@pytest.fixture(scope="session")
def autodiff_log_det():
    """The `flat_log_det` helper, as a fixture."""
    return flat_log_det


def same_variables(a, b) -> bool:
    """True when two collections hold exactly the same tf.Variable objects (by identity)."""
    ids_a, ids_b = [id(v) for v in a], [id(v) for v in b]
    return len(ids_a) == len(set(ids_a)) and len(ids_b) == len(set(ids_b)) and set(ids_a) == set(ids_b)


@pytest.fixture(scope="session")
def same_variable_set():
    """The `same_variables` helper, as a fixture."""
    return same_variables


def expected_conditioning(event_shape, mask, flip):
    """The conditioning entries each coupling mask promises, computed independently of the implementation."""
    if len(event_shape) == 1:
        (d,) = event_shape
        keep = np.arange(d) < d // 2 if mask == "half" else np.arange(d) % 2 == 0
    elif mask == "channel":
        keep = np.broadcast_to(np.arange(event_shape[2]) < event_shape[2] // 2, event_shape)
    else:
        h, w, c = event_shape
        keep = np.broadcast_to(((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0)[..., None], (h, w, c))
    return ~keep if flip else keep


@pytest.fixture(scope="session")
def conditioning_mask():
    """The `expected_conditioning` helper, as a fixture."""
    return expected_conditioning


@pytest.fixture(scope="session")
def moons_entropy_coarse():
    """Exact two-moons entropy on a 0.02 grid with 400 positions per arc (5x cheaper than the defaults).

    test_data.py shows this agrees with a 0.01 grid, that 400 arc positions reproduce the default density, and
    that a Monte Carlo estimate agrees.
    """
    from tfp_nvp.data import moons_entropy

    return moons_entropy(grid_step=0.02, arc_points=400)


# --------------------------------------------------------------------------------------------- property tests
# Hypothesis profiles for tests/test_properties.py (see its docstring). "ci" is the default: few examples, and
# `derandomize=True` so every run checks the same configurations (derived from each test's source) and a
# failure in CI reproduces locally with a plain rerun. "slow" explores fresh random configurations on every
# run; select it with `pytest --hypothesis-profile=slow` or HYPOTHESIS_PROFILE=slow. Neither keeps an example
# database: a failure prints its minimal example and a `@reproduce_failure` blob instead.
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

_HYPOTHESIS_COMMON = dict(deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# "ci" skips shrinking: one shrink of a failing flow configuration costs minutes, and the derandomized failing
# example is already a concrete, reproducible configuration; "slow" shrinks to a minimal one.
settings.register_profile("ci", max_examples=6, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_HYPOTHESIS_COMMON)
settings.register_profile("slow", max_examples=40, **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class PropertyRecorder:
    """Counts the configurations each property was checked on and keeps the largest error seen.

    `check` records before it asserts, so the summary printed at the end of the run also shows a failing error.
    """

    def __init__(self):
        self.configs: dict[str, int] = {}
        self.errors: dict[tuple[str, str], tuple[int, float]] = {}
        self.tolerances: dict[str, float] = {}

    def example(self, subject: str) -> None:
        self.configs[subject] = self.configs.get(subject, 0) + 1

    def check(self, subject: str, prop: str, error: float, tolerance: float) -> None:
        error = float(error) if np.isfinite(error) else float("inf")
        count, worst = self.errors.get((subject, prop), (0, 0.0))
        self.errors[(subject, prop)] = (count + 1, max(worst, error))
        self.tolerances[prop] = max(tolerance, self.tolerances.get(prop, 0.0))
        assert error <= tolerance, f"{subject}: {prop}: error {error:.3g} > tolerance {tolerance:.3g}"

    def summary_lines(self) -> list[str]:
        """One row per subject: configurations checked and the largest error of each property (- = n/a); the
        last row gives the total number of configurations and the largest error of each property overall."""
        props = list(self.tolerances)
        width = max(len(s) for s in [*self.configs, "tolerance", "largest"]) + 2
        cell = max(12, *(len(p) + 2 for p in props))
        lines = [f"{'':<{width}}{'configs':>8}" + "".join(f"{p:>{cell}}" for p in props),
                 f"{'tolerance':<{width}}{'':>8}" + "".join(f"{self.tolerances[p]:>{cell}.0e}" for p in props)]
        for subject in sorted(self.configs):
            cells = [self.errors.get((subject, p)) for p in props]
            lines.append(f"{subject:<{width}}{self.configs[subject]:>8}"
                         + "".join(f"{c[1]:>{cell}.1e}" if c else f"{'-':>{cell}}" for c in cells))
        worst = [max((w for (_, q), (_, w) in self.errors.items() if q == p), default=0.0) for p in props]
        lines.append(f"{'largest':<{width}}{sum(self.configs.values()):>8}" + "".join(f"{w:>{cell}.1e}" for w in worst))
        return lines

    def state(self) -> dict:
        """What a pytest-xdist worker sends back to the controller (plain lists: execnet's serialisable types)."""
        return {"configs": list(self.configs.items()),
                "errors": [[subject, prop, count, worst] for (subject, prop), (count, worst) in self.errors.items()],
                "tolerances": list(self.tolerances.items())}

    def merge(self, state: dict) -> None:
        """Adds a worker's `state()` to this recorder: counts add up, the largest errors and tolerances win."""
        for subject, count in state["configs"]:
            self.configs[subject] = self.configs.get(subject, 0) + count
        for subject, prop, count, worst in state["errors"]:
            old_count, old_worst = self.errors.get((subject, prop), (0, 0.0))
            self.errors[(subject, prop)] = (old_count + count, max(old_worst, worst))
        for prop, tolerance in state["tolerances"]:
            self.tolerances[prop] = max(tolerance, self.tolerances.get(prop, 0.0))


_PROPERTY_RECORDER = PropertyRecorder()


@pytest.fixture(scope="session")
def property_recorder():
    """The session's `PropertyRecorder`; its table is printed in pytest's terminal summary."""
    return _PROPERTY_RECORDER


# The suite runs on pytest-xdist workers (setup.cfg's addopts): each worker fills its own recorder and hands it
# to the controller, which prints the one table.
def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["property_recorder"] = _PROPERTY_RECORDER.state()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    state = getattr(node, "workeroutput", {}).get("property_recorder")
    if state:
        _PROPERTY_RECORDER.merge(state)


def pytest_terminal_summary(terminalreporter):
    if not _PROPERTY_RECORDER.errors:
        return
    profile = terminalreporter.config.getoption("--hypothesis-profile", None) or os.environ.get(
        "HYPOTHESIS_PROFILE", "ci")
    terminalreporter.write_sep("-", f"property checks (hypothesis profile: {profile})")
    for line in _PROPERTY_RECORDER.summary_lines():
        terminalreporter.write_line(line)


# ------------------------------------------------------------------------------------------ markers
# One table, so what each marker selects is visible in one place (setup.cfg registers both markers).
# `slow`: tests that start processes (examples, benchmarks, multi-worker jobs, fresh-process checks) or compile
# large models; `pytest -m "not slow"` leaves them out during development. CI runs everything.
SLOW = (
    "test_examples.py", "test_benchmarks.py", "test_distribute.py", "test_determinism.py", "test_retracing.py",
    "test_mixed_precision.py",
    # files whose module fixtures train or export for 8-20 s before their first test
    "test_resume.py", "test_ffjord.py", "test_export.py::test_serve_matches_in_process_log_prob",
    "test_repo.py::test_quick_start_runs_as_written_and_trains",
    "test_ffjord.py::test_trains_as_a_tfp_vi_surrogate",
    "test_invertible_backprop.py::test_mirrored_fit_matches_single_device_standard_backprop",
    "test_invertible_backprop.py::test_xla_fit_of_multiscale_glow_matches_standard_backprop",
    "test_invertible_backprop.py::test_training_step_memory_stays_flat_in_depth_under_tf_function",
    "test_export.py::test_serving_process_had_only_tensorflow",
    "test_resume.py::test_backup_and_restore_resumes_to_the_uninterrupted_weights",
    # single tests of 6-21 s (spline graphs, ODE solves, two-level GLOWs under autodiff), measured on 2 cores
    "test_properties.py::test_spline_coupling", "test_properties.py::test_spline_flow_vector",
    "test_ffjord.py::test_fit_moves_every_weight_and_samples",
    "test_ffjord.py::test_log_prob_matches_autodiff_jacobian_of_the_ode_map",
    "test_glow_conditional.py::test_spline_glow_is_exact_and_reloads_exactly",
    "test_squeeze_factor_out.py::test_two_level_glow_is_exact",
    "test_spline.py::test_couplings_share_one_traced_spline_and_xla_gets_it_inline",
    "test_invertible_backprop.py::test_float32_gradients_equal_standard_backprop[xla]",
    # tests of 2-6 s each (float64 autodiff Jacobians of splines, ODE solves, short fits)
    "test_transformers.py::test_round_trips_and_log_dets_match_autodiff[spline",
    "test_transformers.py::test_gradients_reach_every_weight_and_both_doors_agree[spline",
    "test_spline.py::test_image_log_dets_match_autodiff", "test_spline.py::test_vector_log_dets_match_autodiff",
    "test_spline.py::test_tfp_vi_trains_every_variable",
    "test_ffjord.py::test_log_prob_matches_jacobian_of_the_map_and_round_trip",
    "test_ffjord.py::test_hutchinson_estimate_is_unbiased",
    "test_invertible_backprop.py::test_float64_gradients_and_log_prob_equal_standard_backprop[spline",
    "test_invertible_backprop.py::test_float32_gradients_equal_standard_backprop[function]",
    "test_vi.py::test_neutra_chain_moments_match_a_target_with_known_moments",
    "test_eager_reuse.py::test_eager_scores_of_held_tensors_follow_weight_updates[ffjord]",
    "test_eager_reuse.py::test_ffjord_integrates_once_per_log_prob",
    "test_eager_reuse.py::test_eager_scores_of_held_tensors_follow_weight_updates[glow",
    "test_properties.py::test_glow", "test_properties.py::test_on_channels",
    "test_glow_conditional.py::test_fit_with_dict_inputs_moves_every_weight",
    "test_optimizers.py::test_keeps_keras_features_around_the_update",
    "test_data.py::test_entropy_grid_converges",
    "test_squeeze_factor_out.py::test_glow_both_doors_and_fit_moves_every_weight",
    "test_autoregressive.py::test_iaf_surrogate_approaches_a_correlated_gaussian",
    "test_keras_model.py::test_weight_penalty_validation_split_and_callbacks",
    "test_glow.py::test_eager_equals_xla_float32",
    "test_layers.py::test_fit_with_the_added_loss_moves_every_weight_and_the_keras_file_reloads_exactly",
)
# `compat`: saving, loading, resuming, fitting, exporting, and every bijector's round trip and log-det. CI also
# runs these in a second environment with the oldest dependency versions setup.cfg declares (.ci/run).
COMPAT = (
    "test_fixtures.py", "test_compat.py", "test_properties.py", "test_keras_model.py", "test_resume.py",
    "test_export.py",
    "test_errors.py::test_load_weights_", "test_errors.py::test_glow_reload_keeps_the_support",
    "test_glow.py::test_keras_file_reloads_exactly_without_reinitialising",
    "test_spline.py::test_exact_reload_from_keras_file_and_weights",
    "test_glow_conditional.py::test_keras_file_and_weights_reload_exactly",
    "test_autoregressive.py::test_exact_reload_keras_file_and_weights",
    "test_layers.py::test_fit_with_the_added_loss_moves_every_weight_and_the_keras_file_reloads_exactly",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("/")[-1]
        for marker, prefixes in (("slow", SLOW), ("compat", COMPAT)):
            if node.startswith(prefixes):
                item.add_marker(marker)
