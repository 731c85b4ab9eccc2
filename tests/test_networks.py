"""Coupling networks: zero-initialised heads, shapes, conditioning, seeds, config round trip, penalties."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_nvp import AffineCoupling
from tfp_nvp.networks import ConvResNet, DenseNetwork


def randomize_layer(layer, seed):
    rng = np.random.default_rng(seed)
    for w in layer.trainable_weights:
        w.assign(rng.normal(0.0, 0.3, size=w.shape).astype(w.dtype))


@pytest.mark.parametrize("separate_towers", [False, True])
def test_dense_network_shapes_and_zero_head(separate_towers):
    net = DenseNetwork((16, 8), output_units=3, separate_towers=separate_towers)
    x = tf.random.stateless_normal([5, 2], seed=[0, 0])
    shift, log_scale = net(x)
    assert shift.shape == (5, 3) and log_scale.shape == (5, 3)
    # The zero-initialised head makes a fresh coupling the identity.
    np.testing.assert_array_equal(shift, np.zeros((5, 3)))
    np.testing.assert_array_equal(log_scale, np.zeros((5, 3)))
    n_dense = 2 * 3 if separate_towers else 3
    assert len(net.trainable_weights) == 2 * n_dense
    randomize_layer(net, 1)
    shift, log_scale = net(x)
    assert np.abs(shift.numpy()).max() > 0.01 and np.abs(log_scale.numpy()).max() > 0.01
    assert np.abs(shift.numpy() - log_scale.numpy()).max() > 0.01


def test_conv_resnet_shapes_and_zero_head():
    net = ConvResNet(hidden_channels=8, num_blocks=2, output_channels=3)
    x = tf.random.stateless_normal([2, 4, 6, 2], seed=[0, 1])
    shift, log_scale = net(x)
    assert shift.shape == (2, 4, 6, 3) and log_scale.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(shift, np.zeros((2, 4, 6, 3)))
    np.testing.assert_array_equal(log_scale, np.zeros((2, 4, 6, 3)))
    # stem + 2 blocks of 2 convs + head, each with kernel and bias
    assert len(net.trainable_weights) == 2 * (1 + 2 * 2 + 1)
    randomize_layer(net, 2)
    shift, log_scale = net(x)
    assert np.abs(shift.numpy()).max() > 0.01 and np.abs(log_scale.numpy()).max() > 0.01


@pytest.mark.parametrize("make,x_shape", [
    (lambda: DenseNetwork((8,), output_units=2), [4, 3]),
    (lambda: ConvResNet(hidden_channels=4, num_blocks=1, output_channels=2), [4, 3, 3, 1]),
])
def test_conditional_input_changes_the_output(make, x_shape):
    net = make()
    x = tf.random.stateless_normal(x_shape, seed=[1, 1])
    c = tf.random.stateless_normal([4, 5], seed=[1, 2])
    net(x, conditional_input=c)
    randomize_layer(net, 3)
    a = net(x, conditional_input=c)[0].numpy()
    b = net(x, conditional_input=c + 1.0)[0].numpy()
    assert np.abs(a - b).max() > 0.01


def test_seed_makes_construction_reproducible():
    x = tf.zeros([1, 4])

    def weights(seed):
        net = DenseNetwork((8, 8), output_units=2, seed=seed)
        net(x)
        return [w.numpy() for w in net.weights]

    for a, b in zip(weights(3), weights(3)):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(a != b) for a, b in zip(weights(3), weights(4)))


@pytest.mark.parametrize("net", [
    DenseNetwork((8, 4), output_units=2, activation="tanh", separate_towers=True, l2=0.1, seed=1, name="d"),
    ConvResNet(hidden_channels=4, num_blocks=1, output_channels=2, kernel_size=5, l2=0.2, seed=2, name="c"),
])
def test_config_round_trip(net):
    clone = net.__class__.from_config(net.get_config())
    assert clone.get_config() == net.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(net))
    assert type(restored) is type(net) and restored.get_config() == net.get_config()


def test_l2_penalty_reaches_losses():
    net = DenseNetwork((8,), output_units=2, l2=0.5, seed=0)
    net(tf.zeros([1, 3]))
    randomize_layer(net, 4)
    net(tf.zeros([1, 3]))
    kernels = [w for w in net.weights if "kernel" in w.path]
    expected = sum(0.5 * float(tf.reduce_sum(tf.square(k))) for k in kernels)
    np.testing.assert_allclose(float(tf.add_n(net.losses)), expected, rtol=1e-5)
    plain = DenseNetwork((8,), output_units=2)
    plain(tf.zeros([1, 3]))
    assert plain.losses == []


def test_float64_network():
    net = DenseNetwork((8,), output_units=2, dtype="float64")
    out = net(tf.zeros([2, 3], tf.float64))
    assert out[0].dtype == tf.float64
    assert all(w.dtype == "float64" for w in net.weights)


def test_coupling_sizes_networks_left_unsized():
    dense = DenseNetwork((8,))
    AffineCoupling([5], network=dense, mask="half")
    assert dense.output_units == 3
    conv = ConvResNet(hidden_channels=4, num_blocks=1)
    AffineCoupling([4, 4, 3], network=conv, mask="channel")
    assert conv.output_channels == 2
    # A network sized for another event is rejected when the coupling is built.
    with pytest.raises(ValueError, match="`network`"):
        AffineCoupling([5], network=DenseNetwork((8,), output_units=4), mask="half")


@pytest.mark.parametrize("kwargs,arg", [
    (dict(hidden_units=(8, 0)), "hidden_units"),
    (dict(hidden_units=()), "hidden_units"),
    (dict(hidden_units=(2.5,)), "hidden_units"),
    (dict(output_units=0), "output_units"),
    (dict(l2=-1.0), "l2"),
])
def test_dense_network_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        DenseNetwork(**kwargs)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(hidden_channels=0), "hidden_channels"),
    (dict(num_blocks=-1), "num_blocks"),
    (dict(output_channels=-2), "output_channels"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(l2=-0.1), "l2"),
])
def test_conv_resnet_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        ConvResNet(**kwargs)


def test_unsized_network_cannot_be_built_alone():
    with pytest.raises(ValueError, match="`output_units`"):
        DenseNetwork((8,))(tf.zeros([1, 2]))
    with pytest.raises(ValueError, match="`output_channels`"):
        ConvResNet(hidden_channels=4)(tf.zeros([1, 2, 2, 1]))
