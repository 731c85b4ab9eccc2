"""Coupling networks: zero-initialised heads, shapes, conditioning, seeds, config round trip, penalties."""

from __future__ import annotations

import contextlib

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
    # A kernel and a bias per layer; fused towers keep both towers' layer in one weight.
    assert len(net.trainable_weights) == 2 * 3
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


@pytest.mark.parametrize("make,x_shape,widths", [
    (lambda: DenseNetwork((8,), output_units=(3, 2)), [None, 3], (3, 2)),
    (lambda: ConvResNet(hidden_channels=4, num_blocks=1, output_channels=(3, 2)), [None, 4, 4, 2], (3, 2)),
])
def test_outputs_are_one_split_of_the_head(make, x_shape, widths):
    # The pair is the head's output cut once along its last axis: one SplitV and no shape arithmetic, which
    # every coupling (and its gradient) would otherwise pay for at every step and at every trace.
    net = make()
    net.build(tuple(x_shape))
    randomize_layer(net, 3)
    graph = tf.function(net).get_concrete_function(tf.TensorSpec(x_shape)).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("SplitV") == 1
    assert not {"StridedSlice", "Shape", "Slice"} & set(types), sorted(set(types))
    x = tf.random.stateless_normal([2, *x_shape[1:]], seed=[0, 4])
    first, second = net(x)
    assert (first.shape[-1], second.shape[-1]) == widths
    # The halves are the head's channels in order: moving the head's bias of channel 0 moves only the first
    # output's channel 0, and of channel 3 only the second output's channel 0.
    (bias,) = [w for w in net.trainable_weights if tuple(w.shape) == (sum(widths),)]
    bias.assign(bias + np.eye(sum(widths))[0] + 2 * np.eye(sum(widths))[3])
    moved_first, moved_second = net(x)
    np.testing.assert_allclose(moved_first - first, np.broadcast_to([1.0, 0, 0], first.shape), atol=1e-5)
    np.testing.assert_allclose(moved_second - second, np.broadcast_to([2.0, 0], second.shape), atol=1e-5)


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


@pytest.mark.parametrize("separate_towers", [False, True])
def test_l2_penalty_reaches_losses(separate_towers):
    net = DenseNetwork((8, 8), output_units=2, l2=0.5, seed=0, separate_towers=separate_towers)
    net(tf.zeros([1, 3]))
    randomize_layer(net, 4)
    net(tf.zeros([1, 3]))
    kernels = [w for w in net.weights if "kernel" in w.path]
    assert len(kernels) == 3
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
    (dict(hidden_units=(8, None)), "hidden_units"),
    (dict(output_units=0), "output_units"),
    (dict(l2=-1.0), "l2"),
    (dict(l2=None), "l2"),
    (dict(l2=float("nan")), "l2"),
])
def test_dense_network_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        DenseNetwork(**kwargs)


def test_fused_towers_name_a_wrong_input_width():
    net = DenseNetwork((8,), output_units=2, separate_towers=True, seed=0)
    net(tf.zeros([4, 3]))
    with pytest.raises(ValueError, match=r"built for 3 input features .* got 5"):
        net(tf.zeros([4, 3]), conditional_input=tf.zeros([4, 2]))


@pytest.mark.parametrize("kwargs,arg", [
    (dict(hidden_channels=0), "hidden_channels"),
    (dict(num_blocks=-1), "num_blocks"),
    (dict(output_channels=-2), "output_channels"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3, 5)), "kernel_size"),
    (dict(hidden_channels=None), "hidden_channels"),
    (dict(l2=-0.1), "l2"),
    (dict(l2=None), "l2"),
])
def test_conv_resnet_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        ConvResNet(**kwargs)


def test_conv_resnet_takes_a_square_window_as_keras_spells_it():
    assert ConvResNet(hidden_channels=4, kernel_size=(3, 3)).kernel_size == 3


def test_unsized_network_cannot_be_built_alone():
    with pytest.raises(ValueError, match="`output_units`"):
        DenseNetwork((8,))(tf.zeros([1, 2]))
    with pytest.raises(ValueError, match="`output_channels`"):
        ConvResNet(hidden_channels=4)(tf.zeros([1, 2, 2, 1]))


# ----------------------------------------------------------------------------------- fused separate towers
def tower_weights(net):
    """The two towers' (kernel, bias) lists, read out of the stacked weights of a `separate_towers` network."""
    towers = [[], []]
    for k, b in zip(net._kernels, net._biases):
        for t in range(2):
            towers[t].append((k.numpy()[t], b.numpy()[t, 0]))
    for t in range(2):
        if len(net._heads) == 1:
            towers[t].append((net._heads[0].numpy()[t], net._head_biases[0].numpy()[t, 0]))
        else:
            towers[t].append((net._heads[t].numpy(), net._head_biases[t].numpy()))
    return towers


def run_mlp(layers_, x, activation):
    h = x
    for i, (k, b) in enumerate(layers_):
        h = h @ k.astype(np.float64) + b
        if i < len(layers_) - 1:
            h = activation(h)
    return h


@pytest.mark.parametrize("output_units", [3, (2, 5)])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_fused_towers_equal_two_independent_mlps(output_units, conditional, batched):
    net = DenseNetwork((16, 8, 8), output_units=output_units, activation="tanh", separate_towers=True, seed=0)
    # Small batches take the batched layout while a gradient is recorded (test_tower_layout_follows_use); large
    # ones, one tower after the other on the stacked weights.
    if not batched:
        net._batched_max = 0
    with tf.GradientTape() if batched else contextlib.nullcontext():
        x = tf.random.stateless_normal([6, 2], seed=[3, 0])
        c = tf.random.stateless_normal([6, 3], seed=[3, 1]) if conditional else None
        net(x, conditional_input=c)
        randomize_layer(net, 5)
        shift, log_scale = net(x, conditional_input=c)
        inputs = x.numpy() if c is None else np.concatenate([x.numpy(), c.numpy()], axis=-1)
        towers = tower_weights(net)
        widths = output_units if isinstance(output_units, tuple) else (output_units, output_units)
        for out, tower, width in zip((shift, log_scale), towers, widths):
            assert out.shape == (6, width)
            np.testing.assert_allclose(out, run_mlp(tower, inputs.astype(np.float64), np.tanh), rtol=1e-4, atol=1e-5)
        # The towers are independent: changing one tower's weights leaves the other output unchanged.
        net._kernels[1].assign(net._kernels[1] * tf.constant([1.0, 0.5])[:, None, None])
        new_shift, new_log_scale = net(x, conditional_input=c)
        np.testing.assert_array_equal(new_shift, shift)
        assert np.abs(new_log_scale.numpy() - log_scale.numpy()).max() > 1e-3
        # Batch dimensions of any rank.
        x3 = tf.reshape(x, [2, 3, 2])
        c3 = None if c is None else tf.reshape(c, [2, 3, 3])
        s3, l3 = net(x3, conditional_input=c3)
        np.testing.assert_allclose(tf.reshape(s3, new_shift.shape), new_shift, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(tf.reshape(l3, new_log_scale.shape), new_log_scale, rtol=1e-6, atol=1e-6)


def _traced_matmul_types(net, x, jit_compile=False, tape=False, signature=None):
    def call(x):
        if not tape:
            return net(x)
        with tf.GradientTape() as t:
            t.watch(x)
            return net(x)

    fn = tf.function(call, jit_compile=jit_compile, input_signature=signature)
    graph = fn.get_concrete_function(*([] if signature else [x])).graph
    return {op.type for op in graph.get_operations() if "MatMul" in op.type}


def test_tower_layout_follows_use():
    """Small batches run the towers as one batched matmul per layer where that is faster on CPU (under XLA, and
    when a gradient follows: training), one tower after the other for a plain forward pass (`log_prob`, `sample`
    without XLA) and for large batches; both layouts compute the same function (test above)."""
    net = DenseNetwork((16, 8), output_units=2, separate_towers=True, seed=0)
    x = tf.random.stateless_normal([64, 3], seed=[1, 2])
    net(x)
    assert _traced_matmul_types(net, x) == {"MatMul"}
    assert _traced_matmul_types(net, x, tape=True) == {"BatchMatMulV2"}
    assert _traced_matmul_types(net, x, jit_compile=True) == {"BatchMatMulV2"}
    # Unknown batch sizes (fit's and evaluate's batches) take the training layout.
    assert _traced_matmul_types(net, x, signature=[tf.TensorSpec([None, 3])]) == {"BatchMatMulV2"}
    big = tf.zeros([DenseNetwork._batched_max + 1, 3])
    assert _traced_matmul_types(net, big, tape=True) == {"MatMul"}
    assert _traced_matmul_types(net, big, jit_compile=True) == {"MatMul"}


def test_fused_towers_start_from_independently_seeded_towers():
    """Each tower's kernels are those its own seeded Glorot layer would draw; the heads start at zero."""
    net = DenseNetwork((16, 8), output_units=2, separate_towers=True, seed=7)
    net(tf.zeros([1, 3]))
    towers = tower_weights(net)
    for t, offset in enumerate((0, 100)):
        for i, (kernel, bias) in enumerate(towers[t][:-1]):
            expected = keras.initializers.GlorotUniform(seed=7 + offset + i)(kernel.shape)
            np.testing.assert_array_equal(kernel, expected)
            np.testing.assert_array_equal(bias, np.zeros_like(bias))
        np.testing.assert_array_equal(towers[t][-1][0], np.zeros_like(towers[t][-1][0]))
    assert np.any(towers[0][1][0] != towers[1][1][0])


@pytest.mark.parametrize("output_units", [2, (1, 3)])
def test_fused_towers_every_weight_gets_a_gradient(output_units):
    net = DenseNetwork((8, 8), output_units=output_units, separate_towers=True, l2=0.01, seed=0)
    x = tf.random.stateless_normal([5, 2], seed=[4, 0])
    net(x)
    randomize_layer(net, 6)
    with tf.GradientTape() as tape:
        shift, log_scale = net(x)
        loss = tf.reduce_sum(tf.sin(shift)) + tf.reduce_sum(log_scale ** 2) + tf.add_n(net.losses)
    grads = tape.gradient(loss, net.trainable_weights)
    assert len(grads) == len(net.trainable_weights) == 6 + (2 if isinstance(output_units, tuple) else 0)
    for w, g in zip(net.trainable_weights, grads):
        assert g is not None and np.abs(g.numpy()).max() > 0, w.path
        # Both towers' slices of a stacked weight learn.
        if len(w.shape) == 3:
            assert np.abs(g.numpy()[0]).max() > 0 and np.abs(g.numpy()[1]).max() > 0, w.path


def test_fused_towers_keras_file_round_trip(tmp_path):
    from tfp_nvp import FlowModel, real_nvp

    model = FlowModel(real_nvp([2], num_coupling_layers=2, hidden_units=(8, 8), separate_towers=True, l2=0.01,
                               seed=0))
    for layer in model.flow_layers:
        randomize_layer(layer, 8)
    x = tf.random.stateless_normal([7, 2], seed=[5, 0])
    path = tmp_path / "towers.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded.log_prob(x), model.log_prob(x))
    # Both doors of the reloaded flow see every fused weight.
    tfp_side = {id(v) for v in loaded.distribution.trainable_variables}
    assert tfp_side == {id(w.value) for w in loaded.trainable_weights}


# ------------------------------------------------------------------------------------ small images under XLA
def _conv_ops(fn, *args):
    return sum(op.type == "Conv2D" for op in fn.get_concrete_function(*args).graph.get_operations())


@pytest.mark.parametrize("dtype,kernel_size,side", [("float32", 3, 2), ("float64", 3, 2), ("float64", 4, 3)])
def test_small_image_convolutions_under_xla_equal_the_conv_layers(dtype, kernel_size, side, randomize):
    """On images smaller than the kernel window the residual blocks' convolutions run as a matmul under XLA only,
    with the values and gradients of the Conv2D layers they replace (an even kernel is padded as 'same' pads)."""
    net = ConvResNet(hidden_channels=6, num_blocks=2, output_channels=3, kernel_size=kernel_size, seed=0, dtype=dtype)
    x = tf.random.stateless_normal([5, side, side, 4], seed=[3, 4], dtype=dtype)
    c = tf.random.stateless_normal([5, 2], seed=[5, 6], dtype=dtype)
    net(x, conditional_input=c)
    randomize(net, seed=0)  # the head is zero-initialised: give every weight a value

    def value_and_grads(x, c):
        with tf.GradientTape() as tape:
            tape.watch(x)
            shift, log_scale = net(x, conditional_input=c)
            loss = tf.reduce_sum(tf.tanh(shift) * log_scale)
        return (shift, log_scale), tape.gradient(loss, [x, *net.trainable_weights])

    plain, xla = tf.function(value_and_grads), tf.function(value_and_grads, jit_compile=True)
    # stem + head + two blocks of (k x k, 1x1) = 6 convolutions; under XLA the blocks' k x k ones become matmuls.
    assert _conv_ops(plain, x, c) == 6 and _conv_ops(xla, x, c) == 4
    big = tf.zeros([5, kernel_size + 1, kernel_size + 1, 4], dtype)
    assert _conv_ops(xla, big, tf.zeros([5, 2], dtype)) == 6  # images as large as the window keep XLA's convolution
    eager_out, eager_grads = value_and_grads(x, c)
    xla_out, xla_grads = xla(x, c)
    tol = 1e-10 if dtype == "float64" else 1e-4
    for got, want in zip([*xla_out, *xla_grads], [*eager_out, *eager_grads]):
        assert np.abs(want.numpy()).max() > 0
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
