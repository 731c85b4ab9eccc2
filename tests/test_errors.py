"""Bad input gets an error that names the argument and what was expected, and nothing is lost on the way.

One test per kind of mistake at every public entry point (builders, bijectors, flows, FlowModel, load_weights),
each asserting the exception type and the message; plus what a density model owes data outside its support
(glow's logit side: log-density -inf, finite gradients for the rest, or an error with `validate_args=True`).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import ActNorm, AffineCoupling, FactorOut, FlowModel, Invertible1x1Conv, OnChannels, Squeeze
from tfp_nvp.bijectors.logit import LogitTransform

tfb, tfd = tfp.bijectors, tfp.distributions

ALPHA = 0.05
LOW, HIGH = -ALPHA / (1 - 2 * ALPHA), (1 - ALPHA) / (1 - 2 * ALPHA)


def _vector(**kwargs):
    return tfp_nvp.real_nvp([2], **{"num_coupling_layers": 2, "hidden_units": (4,), "seed": 0, **kwargs})


def _glow(**kwargs):
    return tfp_nvp.glow([8, 8, 1], **{"num_levels": 2, "num_steps_per_level": 1, "hidden_channels": 4, "seed": 0,
                                      **kwargs})


@pytest.fixture(scope="module")
def vector_flow():
    return _vector()


@pytest.fixture(scope="module")
def glow_flow():
    return _glow()


@pytest.fixture(scope="module")
def conditional_flow():
    return _vector(conditional_shape=[3])


# ---------------------------------------------------------------------------------------------- event shapes
@pytest.mark.parametrize("shape", [(5, 3), (5, 1), (), (5, 2, 1)], ids=["size", "too-small", "scalar", "rank"])
def test_vector_flow_rejects_wrong_event_shape(vector_flow, shape):
    got = ", ".join(map(str, shape))
    with pytest.raises(ValueError, match=rf"`x` must have shape \[\.\.\., 2\] for real_nvp; got \({got}"):
        vector_flow.log_prob(tf.zeros(shape))


@pytest.mark.parametrize("shape", [(5, 8, 8), (5, 8, 8, 2), (5, 64), ()], ids=["no-channel", "channels", "flat",
                                                                                 "scalar"])
def test_glow_rejects_wrong_event_shape(glow_flow, shape):
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 8, 8, 1\] for glow"):
        glow_flow.log_prob(tf.fill(shape, 0.5))


def test_flow_model_rejects_wrong_event_shape(vector_flow):
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 2\] for real_nvp; got \(4, 3\)"):
        FlowModel(vector_flow).log_prob(np.zeros([4, 3], np.float32))


BIJECTORS = {
    "coupling": (lambda: AffineCoupling([4], hidden_units=(4,), name="c"), (4,), (4,)),
    "conv1x1": (lambda: Invertible1x1Conv([4, 4, 3], name="w"), (4, 4, 3), (4, 4, 3)),
    "actnorm": (lambda: ActNorm([4, 4, 3], name="a"), (4, 4, 3), (4, 4, 3)),
    "squeeze": (lambda: Squeeze([4, 4, 1], name="s"), (4, 4, 1), (2, 2, 4)),
    "factor_out": (lambda: FactorOut([4, 4, 4], name="f"), (4, 4, 4), (4, 4, 4)),
    "on_channels": (lambda: OnChannels(tfb.Identity(), 2, [4, 4, 4], name="o"), (4, 4, 4), (4, 4, 4)),
}


def test_fit_before_compile_says_to_compile():
    model = FlowModel(_vector())  # a flow of its own: the module's shared one must stay untrained
    with pytest.raises(RuntimeError, match=r"Call `model.compile\(\)` before `fit`"):
        model.fit(np.zeros((8, 2), np.float32), epochs=1, verbose=0)
    model.compile()
    model.fit(np.zeros((8, 2), np.float32), epochs=1, verbose=0)  # and the same call works once compiled


@pytest.mark.parametrize("method", ["forward", "inverse", "forward_log_det_jacobian", "inverse_log_det_jacobian"])
@pytest.mark.parametrize("kind", list(BIJECTORS))
def test_bijectors_reject_wrong_event_shape(kind, method):
    make, x_shape, y_shape = BIJECTORS[kind]
    bij = make()
    arg, shape = ("x", x_shape) if method.startswith("forward") else ("y", y_shape)
    bad = (3, *shape[:-1], shape[-1] + 1)
    kwargs = {"event_ndims": len(shape)} if method.endswith("jacobian") else {}
    expected = rf"`{arg}` must have shape \[\.\.\., {', '.join(map(str, shape))}\] for {bij.name}; got"
    with pytest.raises(ValueError, match=expected):
        getattr(bij, method)(tf.zeros(bad), **kwargs)
    if not method.endswith("jacobian"):  # (a scalar log-det request is refused by TFP itself, before any bijector)
        with pytest.raises(ValueError, match=expected):  # a scalar: too few dimensions for the event
            getattr(bij, method)(tf.constant(0.0))


# ---------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("make, message", [
    (lambda: AffineCoupling([4, 4, 1], mask="channel"), r"`mask` leaves nothing to condition on .*\(4, 4, 1\)"),
    (lambda: tfp_nvp.real_nvp([4, 4, 1], mask="channel"), r"`mask` leaves nothing to condition on"),
    (lambda: Squeeze([5, 4, 1]), r"`event_shape` \[5, 4, 1\]: height and width must be divisible by `factor`=2"),
    (lambda: Squeeze([4, 4, 1], factor=1), r"`factor` must be an integer >= 2"),
    (lambda: FactorOut([4, 4, 4], num_exit_channels=4), r"`num_exit_channels` must be an integer between 1 and 3"),
    (lambda: FactorOut([4, 4, 1]), r"`event_shape` \[4, 4, 1\] has 1 channel: factoring out needs at least 2"),
    (lambda: FactorOut([4, 4, 3], exit_fraction=0.5), r"`exit_fraction`=0.5 of 3 channels is 1.5"),
    (lambda: OnChannels(tfb.Identity(), 5, [4, 4, 4]), r"`num_channels` must be an integer between 1 and 4"),
    (lambda: _glow(num_levels=4), r"`image_shape` \[8, 8, 1\]: H and W must be divisible by 2 \*\* num_levels = 16"),
    (lambda: tfp_nvp.glow([6, 8, 1], num_levels=2), r"`image_shape` \[6, 8, 1\].*2 \*\* num_levels = 4"),
    (lambda: _glow(exit_fraction=1 / 3), r"`exit_fraction` must leave a whole number of channels"),
    (lambda: _glow(logit_alpha=0.5), r"`logit_alpha` must be in \[0, 0.5\) or None; got 0.5"),
    (lambda: _glow(logit_alpha=True), r"`logit_alpha` must be in \[0, 0.5\) or None; got True"),
    (lambda: LogitTransform(-0.1), r"`alpha` must be a float in \[0, 0.5\); got -0.1"),
    (lambda: tfp_nvp.real_nvp([2, 2]), r"`event_shape` must have rank 1 or 3"),
], ids=["coupling-channel-C1", "real_nvp-channel-C1", "squeeze-odd", "squeeze-factor", "factor_out-all",
        "factor_out-C1", "factor_out-fraction", "on_channels", "glow-levels", "glow-odd", "glow-fraction",
        "glow-alpha", "glow-alpha-bool", "logit-alpha", "real_nvp-rank"])
def test_construction_rejects_shapes_that_do_not_divide(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_network_returning_the_wrong_shape_is_named_at_construction():
    with pytest.raises(ValueError, match=r"`network` must return \(shift, log_scale\) each of shape \[batch, \*\[2\]\]"
                                         r".*its shift has shape \[2, 1\]"):
        AffineCoupling([4], network=lambda x_a: (x_a[..., :1], x_a[..., :1]))
    # FactorOut keeps 3 of 4 channels: a network echoing its input gives 3 channels where 1 exits.
    with pytest.raises(ValueError, match=r"`network` must return \(mu, log_sigma\) each of shape "
                                         r"\[batch, \*\[4, 4, 1\]\].*its mu has shape \[2, 4, 4, 3\]"):
        FactorOut([4, 4, 4], num_exit_channels=1, network=lambda x: (x, x))


# ---------------------------------------------------------------------------------------------- conditioning
def test_missing_condition(conditional_flow):
    x = tf.zeros([4, 2])
    with pytest.raises(ValueError, match=r"built with conditional_shape=\[3\]: pass bijector_kwargs=.*"
                                         r"conditional_kwargs"):
        conditional_flow.log_prob(x)
    with pytest.raises(ValueError, match=r"built with conditional_shape=\[3\]"):
        conditional_flow.sample(2, seed=1)
    model = FlowModel(conditional_flow)
    with pytest.raises(ValueError, match=r"`conditional_input` is required: this FlowModel's flow is conditional"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"`conditional_input` is required"):
        model(x)


def test_condition_given_to_an_unconditional_flow(vector_flow):
    x, c = tf.zeros([4, 2]), tf.zeros([4, 3])
    message = r"`conditional_input` was given but `flow` has no conditional bijectors"
    with pytest.raises(ValueError, match=message):
        tfp_nvp.conditional_kwargs(vector_flow, c)
    model = FlowModel(vector_flow)
    with pytest.raises(ValueError, match=message):
        model.log_prob(x, conditional_input=c)
    with pytest.raises(ValueError, match=message):
        model({"x": x, "conditional_input": c})


@pytest.mark.parametrize("c_shape, message", [
    ((4, 2), r"`conditional_input` must have shape \[\.\.\., 3\]; got \(4, 2\)"),
    ((), r"`conditional_input` must have shape \[\.\.\., 3\]; got \(\)"),
    ((3, 3), r"`conditional_input` of shape \(3, 3\) must broadcast with the data's batch shape \(4,\)"),
], ids=["last-dim", "scalar", "batch"])
def test_wrong_condition_shape(conditional_flow, c_shape, message):
    x = tf.zeros([4, 2])
    with pytest.raises(ValueError, match=message):
        conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, tf.zeros(c_shape)))
    with pytest.raises(ValueError, match=message):
        FlowModel(conditional_flow).log_prob(x, conditional_input=np.zeros(c_shape, np.float32))


def test_broadcastable_condition_still_works(conditional_flow):
    """One condition for the whole batch broadcasts, as before: only incompatible shapes are refused."""
    x = tf.random.stateless_normal([4, 2], seed=[1, 2])
    c = tf.constant([[0.5, -1.0, 2.0]])
    one = conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, c))
    tiled = conditional_flow.log_prob(x, bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow,
                                                                                    tf.tile(c, [4, 1])))
    np.testing.assert_array_equal(one.numpy(), tiled.numpy())


# ---------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [tf.float64, tf.float16])
def test_flow_rejects_float_tensor_of_another_precision(vector_flow, dtype):
    with pytest.raises(TypeError, match=rf"`x` has dtype {dtype.name} but real_nvp.log_prob computes in float32: "
                                        rf"cast it with tf.cast\(x, tf.float32\)"):
        vector_flow.log_prob(tf.zeros([3, 2], dtype))


def test_flow_rejects_integer_tensor(vector_flow):
    with pytest.raises(TypeError, match=r"`x` must be a floating tensor of dtype float32 for real_nvp.log_prob; "
                                        r"got int32"):
        vector_flow.log_prob(tf.zeros([3, 2], tf.int32))


def test_condition_of_another_precision_is_named(conditional_flow):
    c = tf.zeros([4, 3], tf.float64)
    with pytest.raises(TypeError, match=r"`conditional_input` has dtype float64 but real_nvp_coupling_\d "
                                        r"computes in float32"):
        conditional_flow.log_prob(tf.zeros([4, 2]), bijector_kwargs=tfp_nvp.conditional_kwargs(conditional_flow, c))


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_flow_model_casts_floating_data_to_the_flow_dtype(conditional_flow, dtype):
    """The Keras door casts floating inputs (data and condition) to the flow's dtype, as Keras layers do."""
    model = FlowModel(conditional_flow)
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(5, 2)).astype(dtype), rng.normal(size=(5, 3)).astype(dtype)
    expected = model.log_prob(x.astype(np.float32), conditional_input=c.astype(np.float32)).numpy()
    got = model.log_prob(tf.constant(x), conditional_input=tf.constant(c))
    assert got.dtype == tf.float32
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(model({"x": tf.constant(x), "conditional_input": tf.constant(c)}).numpy(), expected)


def test_flow_model_refuses_integer_data_without_levels(vector_flow):
    model = FlowModel(vector_flow)
    x = np.zeros([8, 2], np.int32)
    message = r"`x` must hold floating-point data here; got dtype int32 \(build FlowModel\(flow, levels=L\)"
    with pytest.raises(TypeError, match=message):
        model.log_prob(x)
    with pytest.raises(TypeError, match=message):
        model(x)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    with pytest.raises(TypeError, match=message):
        model.fit(x, epochs=1, batch_size=8, verbose=0)


def test_levels_model_takes_integers_in_call_but_not_in_log_prob():
    model = FlowModel(tfp_nvp.real_nvp([2, 2, 1], num_coupling_layers=1, hidden_units=(4,), num_blocks=0), levels=4)
    x = np.ones([3, 2, 2, 1], np.int64)
    assert np.all(np.isfinite(model(x).numpy()))
    with pytest.raises(TypeError, match=r"`x` must hold floating-point data here; got dtype int64 \(dequantize"):
        model.log_prob(x)


# ---------------------------------------------------------------------------------------------- FlowModel inputs
@pytest.mark.parametrize("inputs, error, message", [
    ({"data": np.zeros([3, 2], np.float32)}, ValueError, r"dict inputs need an 'x' entry; got keys \['data'\]"),
    ({"x": np.zeros([3, 2], np.float32), "condition": np.zeros([3, 3], np.float32)}, ValueError,
     r"dict inputs take only the keys 'x' and 'conditional_input'; got also \['condition'\]"),
    ([np.zeros([3, 2], np.float32)], TypeError,
     r"FlowModel inputs must be a data batch `x` or a dict \{'x': x, 'conditional_input': c\}; got a list"),
], ids=["missing-x", "unknown-key", "list"])
def test_flow_model_rejects_malformed_inputs(vector_flow, inputs, error, message):
    with pytest.raises(error, match=message):
        FlowModel(vector_flow)(inputs)


def test_flow_model_rejects_non_array_data(vector_flow):
    with pytest.raises(TypeError, match=r"`x` must be an array or tensor; got object"):
        FlowModel(vector_flow).log_prob(object())


# ---------------------------------------------------------------------------------------------- validate_args
def test_validate_args_is_stored_and_reaches_every_bijector(tmp_path):
    for flow in (_vector(validate_args=True), _glow(validate_args=True)):
        assert flow.validate_args and flow.bijector.validate_args
        assert all(b.validate_args for b in tfp_nvp.flow_bijectors(flow))
        model = FlowModel(flow)
        path = tmp_path / f"{flow.name}.keras"
        model.save(path)
        reloaded = keras.models.load_model(path).distribution
        assert reloaded.validate_args and all(b.validate_args for b in tfp_nvp.flow_bijectors(reloaded))
    assert not any(b.validate_args for b in tfp_nvp.flow_bijectors(_glow()))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_args_rejects_non_finite_data(bad):
    x = np.zeros([3, 2], np.float32)
    x[1, 0] = bad
    unchecked = _vector().log_prob(x).numpy()  # the default runs no check: the bad row is simply not finite
    assert not np.isfinite(unchecked[1]) and np.all(np.isfinite(unchecked[[0, 2]]))
    flow = _vector(validate_args=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)`x` passed to real_nvp must be finite \(no NaN "
                                                             r"or Inf\); number of non-finite entries:.*1"):
        flow.log_prob(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`x` passed to real_nvp must be finite"):
        tf.function(flow.log_prob)(x)  # traced: the assertion is a stateful op and still runs


def test_validate_args_rejects_non_finite_data_in_glow_and_bijectors():
    x = np.full([2, 8, 8, 1], 0.5, np.float32)
    x[0, 3, 3, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`x` passed to glow must be finite"):
        _glow(validate_args=True).log_prob(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`x` passed to glow must be finite"):
        _glow(validate_args=True, logit_alpha=None).log_prob(x)
    bad = tf.constant([[0.0, np.inf, 1.0, 2.0]])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`y` passed to c must be finite"):
        AffineCoupling([4], hidden_units=(4,), validate_args=True, name="c").inverse(bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`x` passed to w must be finite"):
        Invertible1x1Conv([4], validate_args=True, name="w").forward(bad)
    cond = AffineCoupling([2], hidden_units=(4,), conditional_shape=[3], validate_args=True, name="k")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`conditional_input` passed to k must be finite"):
        cond.forward(tf.zeros([1, 2]), conditional_input=tf.constant([[0.0, np.nan, 0.0]]))


def test_non_finite_data_never_reaches_actnorm_initialisation():
    """With validate_args the check runs before the data-dependent initialisation, which therefore stays pending."""
    act = ActNorm([3], validate_args=True, name="a")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`y` passed to a must be finite"):
        act.inverse(tf.constant([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]]))
    assert not bool(act.initialized)
    np.testing.assert_array_equal(act.log_scale.numpy(), 0.0)
    np.testing.assert_array_equal(act.shift.numpy(), 0.0)
    flow = _glow(validate_args=True, num_levels=1)
    x = np.full([2, 8, 8, 1], 0.5, np.float32)
    x[0, 0, 0, 0] = np.nan  # NaN is not outside the support: only the finiteness check stops it
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`x` passed to glow must be finite"):
        tf.function(flow.log_prob)(x)
    assert not any(bool(b.initialized) for b in tfp_nvp.flow_bijectors(flow) if isinstance(b, ActNorm))


def test_default_path_has_no_assertions_and_validate_args_adds_them():
    def assert_ops(flow):
        graph = tf.function(flow.log_prob).get_concrete_function(tf.TensorSpec([None, 2], tf.float32)).graph
        return sum(op.type == "Assert" for op in graph.get_operations())

    assert assert_ops(_vector()) == 0
    assert assert_ops(_vector(validate_args=True)) > 0


# ---------------------------------------------------------------------------------------------- glow's support
def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=(n, 8, 8, 1))


@pytest.fixture(scope="module")
def glow64(randomize):
    flow = _glow(dtype="float64", hidden_channels=8)
    tfp_nvp.initialize(flow, _images(32))
    randomize(flow, seed=3, scale=0.5)
    return flow


def test_glow_log_prob_is_minus_inf_outside_the_support(glow64):
    """One value outside (the ends themselves, beyond them, infinities) puts an image outside the support."""
    bad = [LOW, HIGH, -0.1, 1.2, -np.inf, np.inf]
    x = _images(len(bad) + 2, seed=1)
    for row, value in enumerate(bad):
        x[row, 2, 5, 0] = value
    lp = glow64.log_prob(tf.constant(x)).numpy()
    assert np.all(lp[: len(bad)] == -np.inf)
    assert np.all(np.isfinite(lp[len(bad):]))
    # The images inside get exactly what they get on their own.
    np.testing.assert_allclose(lp[len(bad):], glow64.log_prob(tf.constant(x[len(bad):])).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(glow64.prob(tf.constant(x[: len(bad)])).numpy(), 0.0)


def test_glow_log_prob_is_finite_on_the_unit_cube_and_just_inside_the_support(glow64):
    x = _images(4, seed=2)
    x[0] = 0.0
    x[1] = np.nextafter(1.0, 0.0)
    x[2, 0, 0, 0] = np.nextafter(LOW, 1.0) + 1e-9
    x[3, 0, 0, 0] = np.nextafter(HIGH, 0.0) - 1e-9
    assert np.all(np.isfinite(glow64.log_prob(tf.constant(x)).numpy()))


def test_glow_gradients_stay_finite_next_to_points_outside_the_support(glow64):
    x = tf.constant(np.concatenate([_images(2, seed=4), np.full([1, 8, 8, 1], 1.5)]))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        lp = glow64.log_prob(x)
        inside = tf.reduce_sum(lp[:2])
    assert lp.numpy()[2] == -np.inf
    dx = tape.gradient(lp, x).numpy()
    assert np.all(np.isfinite(dx)) and np.all(dx[2] == 0.0) and np.any(dx[:2] != 0.0)
    grads = tape.gradient(inside, glow64.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    # The gradient of the in-support points is the one they have on their own.
    with tf.GradientTape() as alone_tape:
        alone = tf.reduce_sum(glow64.log_prob(tf.constant(x.numpy()[:2])))
    for g, a in zip(grads, alone_tape.gradient(alone, glow64.trainable_variables)):
        np.testing.assert_allclose(g.numpy(), a.numpy(), rtol=1e-9, atol=1e-12)


def test_glow_alpha_zero_support_is_the_open_unit_interval():
    flow = _glow(logit_alpha=0.0, dtype="float64")
    x = np.full([3, 8, 8, 1], 0.5)
    x[1, 0, 0, 0], x[2, 0, 0, 0] = 0.0, 1.0
    lp = flow.log_prob(tf.constant(x)).numpy()
    assert np.isfinite(lp[0]) and lp[1] == lp[2] == -np.inf


def test_glow_validate_args_names_x_and_the_support():
    x = np.full([2, 8, 8, 1], 0.5, np.float32)
    x[1, 0, 0, 0] = 1.2
    interval = rf"\({LOW:.6g}, {HIGH:.6g}\)"
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"`x` passed to glow.log_prob must lie in the open "
                                                             rf"interval {interval}"):
        _glow(validate_args=True).log_prob(x)
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"`y` passed to t must lie in the open interval "
                                                             rf"{interval}"):
        LogitTransform(ALPHA, validate_args=True, name="t").inverse(tf.constant([0.5, -0.2]))


def test_glow_reload_keeps_the_support(tmp_path):
    model = FlowModel(_glow())
    model.save(tmp_path / "g.keras")
    reloaded = keras.models.load_model(tmp_path / "g.keras")
    x = np.full([2, 8, 8, 1], 0.5, np.float32)
    x[1, 0, 0, 0] = -0.5
    lp = reloaded.log_prob(x).numpy()
    assert np.isfinite(lp[0]) and lp[1] == -np.inf
    np.testing.assert_array_equal(lp, model.log_prob(x).numpy())


@pytest.mark.parametrize("alpha", [ALPHA, 0.0, 0.2, np.float64(0.3)])  # NumPy floats are numbers too
def test_logit_transform_log_dets_match_autodiff(alpha, autodiff_log_det):
    bij = LogitTransform(alpha, dtype=tf.float64)
    u = tf.constant(np.random.default_rng(5).normal(scale=3.0, size=(6, 5)))
    x = bij.forward(u)
    assert np.all(x.numpy() > bij.low) and np.all(x.numpy() < bij.high)
    x_fresh = tf.constant(x.numpy())
    np.testing.assert_allclose(bij.inverse(x_fresh).numpy(), u.numpy(), rtol=1e-9, atol=1e-9)
    fldj = bij.forward_log_det_jacobian(u, event_ndims=1).numpy()
    ildj = bij.inverse_log_det_jacobian(x_fresh, event_ndims=1).numpy()
    np.testing.assert_allclose(fldj, autodiff_log_det(bij.forward, u, 1), rtol=1e-10)
    np.testing.assert_allclose(ildj, autodiff_log_det(bij.inverse, x_fresh, 1), rtol=1e-10)
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-10)
    s = alpha + (1 - 2 * alpha) * x.numpy()
    np.testing.assert_allclose(bij.inverse(x_fresh).numpy(), np.log(s) - np.log1p(-s), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- load_weights
def _model(**kwargs):
    return FlowModel(tfp_nvp.real_nvp(**{"event_shape": [2], "num_coupling_layers": 2, "hidden_units": (4,),
                                         "seed": 0, **kwargs}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, randomize):
    model = _model()
    randomize(model.distribution, seed=11)
    directory = tmp_path_factory.mktemp("weights")
    model.save_weights(directory / "flow.weights.h5")
    model.save(directory / "flow.keras")
    return directory


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_coupling_layers=3), r"the file holds 10 model weights, this model has 15; 5 of this model's are not"),
    (dict(num_coupling_layers=1), r"the file holds 10 model weights, this model has 5; 5 in the file have no place"),
    (dict(hidden_units=(8,)), r"differ in shape or dtype \(e\.g\. .*: file \(1, 4\) float32, model \(1, 8\)"),
    (dict(event_shape=[3]), r"differ in shape or dtype"),
], ids=["deeper", "shallower", "wider", "event-shape"])
@pytest.mark.parametrize("file", ["flow.weights.h5", "flow.keras"])
def test_load_weights_of_another_configuration_changes_nothing(saved, kwargs, message, file, randomize):
    model = _model(seed=1, **kwargs)
    randomize(model.distribution, seed=12)
    before = [w.numpy().copy() for w in model.weights]
    path = str(saved / file)
    with pytest.raises(ValueError, match=rf"Cannot load weights from '{path}' into this FlowModel: .*{message}"):
        model.load_weights(path)
    after = [w.numpy() for w in model.weights]
    assert len(before) == len(after) and all(np.array_equal(b, a) for b, a in zip(before, after))


def test_load_weights_of_the_same_configuration_still_loads(saved):
    model = _model(seed=1)
    model.load_weights(saved / "flow.weights.h5")
    reference = _model(seed=2)
    reference.load_weights(saved / "flow.keras")
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    expected = keras.models.load_model(saved / "flow.keras").log_prob(x).numpy()
    np.testing.assert_array_equal(model.log_prob(x).numpy(), expected)
    np.testing.assert_array_equal(reference.log_prob(x).numpy(), expected)


def test_load_weights_of_an_unreadable_file_changes_nothing(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not an HDF5 file")
    model = _model()
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=rf"Cannot read weights from '{path}'"):
        model.load_weights(path)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))
