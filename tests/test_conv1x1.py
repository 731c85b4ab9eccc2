"""Invertible 1x1 convolution, LU and plain: exact log-dets, the LU structure, agreement with a real 1x1 conv."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfp_nvp.bijectors.conv1x1 import Invertible1x1Conv, random_rotation


def _x(shape, seed):
    return tf.constant(np.random.default_rng(seed).normal(size=shape))


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
@pytest.mark.parametrize("event_shape", [(2, 3, 3), (4,)], ids=["image", "vector"])
def test_round_trip_and_log_det_match_autodiff(lu, event_shape, randomize, autodiff_log_det):
    conv = Invertible1x1Conv(event_shape, lu_decomposed=lu, seed=0, dtype=tf.float64)
    before = conv.matrix().numpy()
    randomize(conv, seed=3, scale=1.0)
    assert not np.allclose(conv.matrix().numpy(), before)
    rank = len(event_shape)
    x = _x((5, *event_shape), seed=1)
    y = conv.forward(x)
    y_fresh = tf.constant(y.numpy())  # a new tensor, so TFP's cache cannot return x
    np.testing.assert_allclose(conv.inverse(y_fresh).numpy(), x.numpy(), rtol=1e-9, atol=1e-10)
    fldj = conv.forward_log_det_jacobian(x, event_ndims=rank).numpy()
    ildj = conv.inverse_log_det_jacobian(y_fresh, event_ndims=rank).numpy()
    assert fldj.shape == (5,)
    np.testing.assert_allclose(fldj, autodiff_log_det(conv.forward, x, rank), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(ildj, autodiff_log_det(conv.inverse, y_fresh, rank), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(fldj, -ildj, rtol=1e-12)
    assert abs(fldj[0]) > 1e-3  # random weights: a genuinely volume-changing map


def test_lu_factors_have_their_structure_and_log_det_is_slogdet(randomize):
    conv = Invertible1x1Conv((2, 2, 4), seed=5, dtype=tf.float64)
    randomize(conv, seed=6)
    perm, lower, upper = (t.numpy() for t in conv._factors())
    np.testing.assert_array_equal(np.sort(perm, axis=0), np.vstack([np.zeros((3, 4)), np.ones((1, 4))]))
    np.testing.assert_array_equal(np.triu(lower, 1), 0.0)
    np.testing.assert_array_equal(np.diag(lower), 1.0)
    np.testing.assert_array_equal(np.tril(upper, -1), 0.0)
    w = conv.matrix().numpy()
    np.testing.assert_allclose(w, perm @ lower @ upper, rtol=1e-12)
    sign, logdet = np.linalg.slogdet(w)
    np.testing.assert_allclose(conv.log_abs_det().numpy(), logdet, rtol=1e-10)
    np.testing.assert_allclose(np.prod(np.sign(np.diag(upper))) * np.linalg.det(perm), sign)
    np.testing.assert_allclose(conv.inverse_matrix().numpy() @ w, np.eye(4), atol=1e-10)


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_starts_as_a_seeded_rotation(lu):
    a = Invertible1x1Conv((2, 2, 3), lu_decomposed=lu, seed=7, dtype=tf.float64)
    b = Invertible1x1Conv((2, 2, 3), lu_decomposed=lu, seed=7, dtype=tf.float64)
    c = Invertible1x1Conv((2, 2, 3), lu_decomposed=lu, seed=8, dtype=tf.float64)
    w = a.matrix().numpy()
    np.testing.assert_allclose(w @ w.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(w, random_rotation(3, 7), atol=1e-12)
    np.testing.assert_allclose(a.log_abs_det().numpy(), 0.0, atol=1e-12)
    np.testing.assert_array_equal(b.matrix().numpy(), w)
    assert not np.allclose(c.matrix().numpy(), w)
    assert not np.allclose(w, np.eye(3))  # it mixes channels from the start


def test_forward_is_a_1x1_convolution(randomize):
    conv = Invertible1x1Conv((3, 4, 3), seed=1, dtype=tf.float64)
    randomize(conv, seed=2)
    x = _x((2, 3, 4, 3), seed=3)
    kernel = conv.matrix()[None, None]  # [1, 1, C_in, C_out]
    expected = tf.nn.conv2d(x, kernel, strides=1, padding="VALID")
    np.testing.assert_allclose(conv.forward(x).numpy(), expected.numpy(), rtol=1e-12)


def test_weights_trainability_and_both_doors():
    lu = Invertible1x1Conv((2, 2, 3), seed=0)
    plain = Invertible1x1Conv((2, 2, 3), lu_decomposed=False, seed=0)
    short = lambda vs: sorted(v.name.split("/")[-1].split(":")[0] for v in vs)  # noqa: E731
    assert short(lu.trainable_variables) == ["log_s", "lower", "upper"]
    assert short(v for v in lu.variables if not v.trainable) == ["permutation", "sign_s"]
    assert short(plain.trainable_variables) == ["kernel"]
    for conv in (lu, plain):
        layer = conv.keras_layers[0]
        assert {id(w.value) for w in layer.weights} == {id(v) for v in conv.variables}


@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_gradients_reach_every_trainable_weight(lu, randomize):
    conv = Invertible1x1Conv((2, 2, 3), lu_decomposed=lu, seed=0, dtype=tf.float64)
    randomize(conv, seed=4)
    y = _x((4, 2, 2, 3), seed=5)
    with tf.GradientTape() as tape:
        z = conv.inverse(y)
        loss = tf.reduce_sum(z ** 2) - tf.reduce_sum(conv.inverse_log_det_jacobian(y, event_ndims=3))
    grads = tape.gradient(loss, conv.trainable_variables)
    assert all(g is not None and np.any(g.numpy() != 0) for g in grads)


def test_xla_matches_eager(randomize):
    conv = Invertible1x1Conv((2, 2, 3), seed=0, dtype=tf.float64)
    randomize(conv, seed=1)
    y = _x((4, 2, 2, 3), seed=2)
    run = tf.function(lambda t: (conv.inverse(t), conv.inverse_log_det_jacobian(t, event_ndims=3)),
                      jit_compile=True)
    z, ildj = run(y)
    np.testing.assert_allclose(z.numpy(), conv.inverse(tf.identity(y)).numpy(), rtol=1e-10)
    np.testing.assert_allclose(ildj.numpy(), conv.inverse_log_det_jacobian(tf.identity(y), event_ndims=3).numpy(),
                               rtol=1e-10)


def test_equal_configs_do_not_share_the_cache():
    a = Invertible1x1Conv((2, 2, 3), seed=0, name="twin")
    b = Invertible1x1Conv((2, 2, 3), seed=0, name="twin")
    b.keras_layers[0].log_s.assign(np.full(3, 0.3, np.float32))
    x = tf.ones((2, 2, 2, 3))
    assert not np.allclose(a.forward(x).numpy(), b.forward(x).numpy())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="event_shape"):
        Invertible1x1Conv((2, 3))
    with pytest.raises(ValueError, match="seed"):
        Invertible1x1Conv((3,), seed=-1)
    with pytest.raises(ValueError, match="dtype"):
        Invertible1x1Conv((3,), dtype="int32")
    conv = Invertible1x1Conv((2, 2, 3), seed=0)
    with pytest.raises(ValueError, match=r"`x` must have shape \[\.\.\., 2, 2, 3\]"):
        conv.forward(tf.zeros((1, 2, 2, 2)))
