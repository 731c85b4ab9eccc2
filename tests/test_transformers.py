"""One `Coupling`, many transformers: the affine and spline transformers and a transformer written here.

Every transformer goes through the same checks on every kind of mask: round trips both ways, both log-dets
against autodiff of the flattened map (float64, random non-identity weights), `fldj(z) == -ildj(forward(z))`,
conditioning entries passed through exactly, gradients reaching every weight, and the two doors to the
parameters listing the same variables. The additive transformer below is written only in this file: that it
passes the same checks through `Coupling`, with no other code, is what "a new family is a transformer" means.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tfp_nvp
from tfp_nvp import AffineCoupling, FlowModel, SplineCoupling
from tfp_nvp.bijectors import AffineTransformer, Coupling, SplineTransformer, Transformer
from tfp_nvp.networks import ConvResNet, DenseNetwork

tfb, tfd = tfp.bijectors, tfp.distributions


class Shift(Transformer):
    """NICE's additive coupling: `y = x + t`, volume preserving (zero log-det)."""

    labels = ("shift", "unused")

    def output_widths(self):
        return (1, 1)

    def params(self, shift, unused, layer):
        return shift

    def forward(self, x, shift):
        y = x + shift
        return y, tf.zeros_like(y)

    def inverse(self, y, shift):
        x = y - shift
        return x, tf.zeros_like(x)


class ScaledShift(Transformer):
    """`y = x * exp(w) + t` with a learnable log-scale `w` per position of the last axis (a weight of its own)
    and a shift `t` from the network: exercises `add_weights` and a wider second output."""

    labels = ("shift", "ignored")

    def output_widths(self):
        return (1, 2)

    def add_weights(self, layer, param_shape):
        layer.add("log_scale", param_shape[-1:], "zeros")

    def params(self, shift, ignored, layer):
        return shift, tf.cast(layer.log_scale.value, shift.dtype)

    def forward(self, x, params):
        shift, w = params
        y = x * tf.exp(w) + shift
        return y, tf.broadcast_to(w, tf.shape(y))

    def inverse(self, y, params):
        shift, w = params
        x = (y - shift) * tf.exp(-w)
        return x, tf.broadcast_to(-w, tf.shape(x))


TRANSFORMERS = {
    "affine_tanh": lambda: AffineTransformer("tanh"),
    "affine_sigmoid": lambda: AffineTransformer("sigmoid"),
    "spline": lambda: SplineTransformer(num_bins=4, bound=2.0),
    "shift": Shift,
    "scaled_shift": ScaledShift,
}
# Small events keep the autodiff Jacobian cheap (at most 16 entries: no pfor tracing through the spline).
EVENTS = [((5,), "half", False), ((5,), "alternate", True), ((2, 3, 2), "checkerboard", False),
          ((2, 2, 3), "channel", True)]


def make(transformer, event_shape, mask="half", flip=False, dtype=tf.float64, **kwargs):
    name = tf.as_dtype(dtype).name
    if len(event_shape) == 1:
        net = DenseNetwork((8,), activation="tanh", dtype=name)
    else:
        net = ConvResNet(hidden_channels=4, num_blocks=1, dtype=name)
    return Coupling(list(event_shape), transformer, network=net, mask=mask, flip=flip, dtype=dtype, **kwargs)




def data(event_shape, seed=0):
    # Inside and outside the spline's [-2, 2], so both the splines and their linear tails are exercised.
    return tf.random.stateless_normal([6, *event_shape], seed=[seed, 3], stddev=1.5, dtype=tf.float64)


@pytest.mark.parametrize("event_shape,mask,flip", EVENTS, ids=[m for _, m, _ in EVENTS])
@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_round_trips_and_log_dets_match_autodiff(kind, event_shape, mask, flip, randomize, autodiff_log_det,
                                                 conditioning_mask):
    bij = make(TRANSFORMERS[kind](), event_shape, mask, flip)
    randomize(bij, seed=len(event_shape) + 7 * flip, scale=0.5)
    rank = len(event_shape)
    x = data(event_shape)
    y = bij.forward(x)
    np.testing.assert_allclose(bij.inverse(y), x, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(bij.forward(bij.inverse(x)), x, rtol=1e-9, atol=1e-9)
    fldj = bij.forward_log_det_jacobian(x, event_ndims=rank)
    ildj_y = bij.inverse_log_det_jacobian(y, event_ndims=rank)
    ildj_x = bij.inverse_log_det_jacobian(x, event_ndims=rank)
    for t in (fldj, ildj_y, ildj_x):
        assert t.shape == [6] and np.all(np.isfinite(t.numpy()))
    np.testing.assert_allclose(fldj, -ildj_y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fldj, autodiff_log_det(bij.forward, x, rank), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ildj_x, autodiff_log_det(bij.inverse, x, rank), rtol=1e-8, atol=1e-8)
    # Fresh tensors: the log-dets above may have been answered from what forward / inverse computed.
    np.testing.assert_allclose(bij.forward_log_det_jacobian(tf.identity(x), event_ndims=rank), fldj, rtol=1e-12)
    keep = conditioning_mask(event_shape, mask, flip)
    np.testing.assert_array_equal(y.numpy()[:, keep], x.numpy()[:, keep])
    assert np.abs(y.numpy()[:, ~keep] - x.numpy()[:, ~keep]).max() > 0.05
    if kind == "shift":
        np.testing.assert_array_equal(fldj, np.zeros(6))
    else:
        assert np.abs(fldj.numpy()).max() > 0.01


def one_tensor_network(transformer, rank, n, dtype="float64"):
    """A plain Keras model returning both outputs in one tensor for `n` transformed entries on the last axis:
    every weight then feeds an output the transformer uses (the custom transformers above ignore their second
    output)."""
    units = n * sum(transformer.output_widths())
    if rank == 1:
        return keras.Sequential([keras.layers.Dense(8, activation="tanh", dtype=dtype),
                                 keras.layers.Dense(units, dtype=dtype)])
    return keras.Sequential([keras.layers.Conv2D(4, 3, padding="same", activation="tanh", dtype=dtype),
                             keras.layers.Conv2D(units, 3, padding="same", dtype=dtype)])


@pytest.mark.parametrize("event_shape,mask", [((4,), "half"), ((2, 2, 2), "checkerboard")])
@pytest.mark.parametrize("kind", sorted(TRANSFORMERS))
def test_gradients_reach_every_weight_and_both_doors_agree(kind, event_shape, mask, randomize, same_variable_set):
    transformer = TRANSFORMERS[kind]()
    network = one_tensor_network(transformer, len(event_shape), n=2)
    bij = Coupling(list(event_shape), transformer, network=network,
                   mask=mask, dtype=tf.float64)
    keras_door = [w.value for layer in bij.keras_layers for w in layer.trainable_weights]
    assert same_variable_set(bij.trainable_variables, keras_door)
    # The chain and the distribution find them by walking attributes, as tfp.vi and checkpoints do.
    flow = tfd.TransformedDistribution(tfp_nvp.standard_normal(list(event_shape), tf.float64), tfb.Chain([bij]))
    assert same_variable_set(flow.trainable_variables, keras_door)
    randomize(bij, seed=5, scale=0.5)
    x = data(event_shape, seed=1)
    with tf.GradientTape() as tape:
        loss = -tf.reduce_sum(flow.log_prob(x)) + tf.reduce_sum(bij.forward(x) ** 2)
    grads = tape.gradient(loss, bij.trainable_variables)
    names = [v.name for v in bij.trainable_variables]
    missing = [n for n, g in zip(names, grads) if g is None or not np.any(tf.convert_to_tensor(g).numpy() != 0)]
    assert not missing, missing


def custom_flow(kind):
    couplings = []
    for i in range(2):
        transformer = TRANSFORMERS[kind]()
        network = one_tensor_network(transformer, 1, n=1, dtype="float32")
        couplings.append(Coupling([2], transformer, network=network, mask="half", flip=bool(i % 2),
                                  name=f"{kind}_{i}"))
    return tfd.TransformedDistribution(tfp_nvp.standard_normal([2]), tfb.Chain(couplings[::-1]))


@pytest.mark.parametrize("kind", ["shift", "scaled_shift"])
def test_a_transformer_written_elsewhere_trains_and_saves_through_flow_model(kind, tmp_path, same_variable_set):
    """A family the package does not know: `Coupling` plus the transformer above is a flow `fit` trains."""
    keras.utils.set_random_seed(1)
    flow = custom_flow(kind)
    model = FlowModel(flow)
    assert same_variable_set(flow.trainable_variables, [w.value for w in model.trainable_weights])
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(tfp_nvp.data.two_moons(256, seed=0).astype("float32"), epochs=3, batch_size=64,
                        verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.any(b != w.numpy()) for b, w in zip(before, model.trainable_weights))
    x = tf.random.stateless_normal([5, 2], seed=[2, 2])
    np.testing.assert_allclose(flow.bijector.inverse(flow.bijector.forward(x)), x, atol=1e-5)
    weights = tmp_path / "custom.weights.h5"
    model.save_weights(weights)
    keras.utils.set_random_seed(2)
    fresh = FlowModel(custom_flow(kind))
    assert np.any(fresh.log_prob(x).numpy() != model.log_prob(x).numpy())
    fresh.load_weights(weights)
    np.testing.assert_array_equal(fresh.log_prob(x), model.log_prob(x))


def test_additive_coupling_is_volume_preserving_and_starts_at_the_identity():
    bij = Coupling([4, 4, 2], Shift(), mask="checkerboard", hidden_units=(4,), dtype=tf.float64)
    x = data((4, 4, 2))
    np.testing.assert_array_equal(bij.forward(x), x)  # the default network's head is zero-initialised
    np.testing.assert_array_equal(bij.inverse_log_det_jacobian(x, event_ndims=3), np.zeros(6))


def test_named_defaults_and_the_public_couplings_are_couplings_of_a_transformer():
    affine = Coupling([4], "affine", hidden_units=(4,))
    spline = Coupling([4], "spline", hidden_units=(4,))
    assert isinstance(affine.transformer, AffineTransformer) and affine.transformer.log_scale_bound == "tanh"
    assert [w.name for w in affine.keras_layers[1].weights] == ["scale"]
    assert isinstance(spline.transformer, SplineTransformer)
    assert (spline.transformer.num_bins, spline.transformer.bound) == (8, 4.0)
    assert affine.name == "coupling" and spline.keras_layers[1].name == "coupling_params"
    assert isinstance(AffineCoupling([4], hidden_units=(4,)), Coupling)
    assert isinstance(SplineCoupling([4], hidden_units=(4,)), Coupling)
    spline_coupling = SplineCoupling([4], num_bins=5, bound=3.0, hidden_units=(4,))
    assert (spline_coupling.num_bins, spline_coupling.bound) == (5, 3.0)
    assert spline_coupling.transformer.num_bins == 5
    with pytest.raises(ValueError, match="`transformer` must be"):
        Coupling([4], "quadratic")
    with pytest.raises(ValueError, match="`transformer` must be"):
        Coupling([4], lambda x: x)
    with pytest.raises(ValueError, match="`log_scale_bound`"):
        AffineTransformer("relu")
    with pytest.raises(ValueError, match="`num_bins`"):
        SplineTransformer(num_bins=1)


@pytest.mark.parametrize("event_shape,mask", [((5,), "alternate"), ((2, 2, 4), "checkerboard")])
def test_affine_coupling_equals_coupling_with_the_affine_transformer(event_shape, mask, randomize):
    net_a = DenseNetwork((8,), dtype="float64") if len(event_shape) == 1 else ConvResNet(4, num_blocks=1,
                                                                                          dtype="float64")
    net_b = net_a.from_config(net_a.get_config())
    a = AffineCoupling(list(event_shape), network=net_a, mask=mask, log_scale_bound="sigmoid", dtype=tf.float64)
    b = Coupling(list(event_shape), AffineTransformer("sigmoid"), network=net_b, mask=mask, dtype=tf.float64)
    randomize(a, seed=3)
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        vb.assign(va)
    x = data(event_shape, seed=4)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))
    np.testing.assert_array_equal(a.inverse_log_det_jacobian(x, event_ndims=len(event_shape)),
                                  b.inverse_log_det_jacobian(x, event_ndims=len(event_shape)))


def test_one_transformer_serves_many_couplings_with_their_own_weights():
    transformer = ScaledShift()
    one, two = (Coupling([3], transformer, hidden_units=(4,), dtype=tf.float64) for _ in range(2))
    assert one.keras_layers[1].log_scale is not two.keras_layers[1].log_scale
    one.keras_layers[1].log_scale.assign([0.5, -0.25])
    x = data((3,))
    np.testing.assert_array_equal(two.forward(x), x)
    np.testing.assert_allclose(one.forward_log_det_jacobian(x, event_ndims=1), np.full(6, 0.25), rtol=1e-12)


def test_conditional_coupling_with_a_custom_transformer(randomize, autodiff_log_det):
    bij = Coupling([3], ScaledShift(), hidden_units=(8,), conditional_shape=[2], dtype=tf.float64)
    randomize(bij, seed=8)
    x = data((3,))
    c = tf.random.stateless_normal([6, 2], seed=[4, 4], dtype=tf.float64)
    y = bij.forward(x, conditional_input=c)
    np.testing.assert_allclose(bij.inverse(y, conditional_input=c), x, rtol=1e-9)
    fldj = bij.forward_log_det_jacobian(x, event_ndims=1, conditional_input=c)
    np.testing.assert_allclose(fldj, autodiff_log_det(lambda t: bij.forward(t, conditional_input=c), x, 1),
                               rtol=1e-8, atol=1e-8)
    assert np.abs(bij.forward(x, conditional_input=-c).numpy() - y.numpy()).max() > 1e-3
    with pytest.raises(ValueError, match="conditional_shape"):
        bij.forward(x)


def test_a_network_of_the_wrong_width_is_refused_with_the_transformer_labels():
    with pytest.raises(ValueError, match=r"\(shift then ignored\)"):
        Coupling([4], ScaledShift(), network=keras.layers.Dense(5, dtype="float64"), dtype=tf.float64)
