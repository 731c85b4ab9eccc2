"""Keras 3 networks that produce the `(shift, log_scale)` of an affine coupling.

Both networks end in a zero-initialised layer, so a fresh coupling is exactly the identity (DESIGN.md §4),
and both accept an optional `conditional_input` (a vector per example) concatenated to their input.
Their `output_units` / `output_channels` may be left as `None`: `tfp_nvp.AffineCoupling` fills them in
from the event shape and mask it is given. A pair `(m, n)` instead of one size gives two outputs of different
widths (`tfp_nvp.SplineCoupling` needs `2 * num_bins` bin parameters and `num_bins - 1` knot slopes).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
from keras import layers, ops

from tfp_nvp._compat import in_xla_context, recording_gradients
from tfp_nvp.nn.made import l2_penalty

__all__ = ["DenseNetwork", "ConvResNet"]


def _regularizer(l2: float):
    if l2 < 0:
        raise ValueError(f"`l2` must be >= 0; got {l2}.")
    return keras.regularizers.L2(l2) if l2 > 0 else None


def _seeded(initializer: str, seed, offset: int):
    init = keras.initializers.get(initializer)
    if seed is not None:
        init = init.__class__.from_config({**init.get_config(), "seed": int(seed) + offset})
    return init


def _positive_int(value, name: str, allow_zero: bool = False) -> int:
    try:
        ok = not isinstance(value, bool) and int(value) == value and int(value) >= (0 if allow_zero else 1)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be a {kind} integer; got {value!r}.")
    return int(value)


def _square_kernel(value) -> int:
    # Keras spells a square window (3, 3); these networks use square windows only.
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    elif isinstance(value, (tuple, list)):
        raise ValueError(f"`kernel_size` must be a positive integer or a square pair such as (3, 3); got {value!r}.")
    return _positive_int(value, "kernel_size")


def _output_widths(value, name: str):
    """`None`, a positive int (both outputs that wide) or a pair of positive ints (one width per output)."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"`{name}` must be a positive integer or a pair of them; got {value!r}.")
        return tuple(_positive_int(v, name) for v in value)
    return _positive_int(value, name)


def _pair(widths) -> tuple[int, int]:
    return tuple(widths) if isinstance(widths, tuple) else (widths, widths)


def _split_last(out, widths):
    # tf.split with static sizes is one op (its gradient one concat); keras.ops.split with indices and
    # slicing both build about a dozen shape ops per call, paid again in every coupling's gradient.
    return tuple(tf.split(out, list(_pair(widths)), axis=-1))


class _StackedInitializer:
    """Draws `[2, *shape]` as two independent draws of `shape`, one per tower (see `DenseNetwork`)."""

    def __init__(self, initializers, shape):
        self.initializers = [keras.initializers.get(i) for i in initializers]
        self.shape = tuple(shape)

    def __call__(self, shape, dtype=None):
        return ops.stack([init(self.shape, dtype=dtype) for init in self.initializers])


@keras.saving.register_keras_serializable(package="tfp_nvp")
class DenseNetwork(keras.layers.Layer):
    """MLP mapping the conditioning half `x_a` to `(shift, log_scale)` for the transformed half.

    Args:
      hidden_units: widths of the hidden layers, e.g. `(256, 256, 256, 256)` for the book's towers.
      output_units: size of `shift` and of `log_scale`, or a pair `(m, n)` of different sizes; `None` lets
        the coupling that receives the network set it.
      activation: hidden activation.
      separate_towers: `True` gives the book's layout (independent shift and log-scale MLPs); `False` one
        shared trunk with a `2 * output_units` head (half the cost for the same width). The two towers run as
        batched matmuls over stacked weights: each layer's kernel is `[2, in, out]` and its bias `[2, 1, out]`
        (tower 0 = shift), heads of different widths are one weight each. Each tower's slice is initialised
        and penalised as a tower of its own would be. Large static batches (over 2048), and static batches
        of any size in plain graphs and eager code when no gradient is being recorded (`log_prob`, `sample`),
        run the towers one after the other on the same weights, which is faster there on CPU.
      l2: L2 weight penalty on every kernel; it reaches `FlowModel`'s loss through `model.losses`.
      seed: seed for the kernel initialisers (reproducible construction).

    Example:
      >>> net = DenseNetwork(hidden_units=(64, 64), output_units=1)
      >>> shift, log_scale = net(keras.ops.zeros((5, 1)))
    """

    def __init__(
        self,
        hidden_units: Sequence[int] = (128, 128),
        output_units: int | None = None,
        activation: str = "relu",
        separate_towers: bool = False,
        l2: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        hidden_units = (hidden_units,) if isinstance(hidden_units, int) else tuple(hidden_units)
        if not hidden_units:
            raise ValueError("`hidden_units` must name at least one hidden layer, e.g. (128, 128).")
        self.hidden_units = tuple(_positive_int(h, "hidden_units") for h in hidden_units)
        self.output_units = _output_widths(output_units, "output_units")
        self.activation = activation
        self.separate_towers = bool(separate_towers)
        self.l2 = l2_penalty(l2)
        self.seed = seed
        self._regularizer = _regularizer(self.l2)
        self._towers = None

    def _make_tower(self, out_units: int, offset: int):
        tower = []
        for i, units in enumerate(self.hidden_units):
            tower.append(
                layers.Dense(
                    units,
                    activation=self.activation,
                    kernel_initializer=_seeded("glorot_uniform", self.seed, offset + i),
                    kernel_regularizer=self._regularizer,
                    dtype=self.dtype_policy,
                )
            )
        # Zero-initialised head: the coupling starts as the identity.
        tower.append(
            layers.Dense(out_units, kernel_initializer="zeros", kernel_regularizer=self._regularizer,
                         dtype=self.dtype_policy)
        )
        return tower

    def _tower_kernel(self, name, shape, layer, zero=False):
        """One `[2, *shape]` weight holding both towers' kernels of `shape`, each drawn as its own tower would.

        Tower 0's layer `i` is seeded with `seed + i` and tower 1's with `seed + 100 + i` (the offsets two
        separate stacks of Dense layers would use), and each half is Glorot-scaled by its own `shape`, not by the
        stacked one: the fused network starts from the weights the two independent towers would have.
        """
        if zero:
            inits = ("zeros", "zeros")
        else:
            inits = tuple(_seeded("glorot_uniform", self.seed, offset + layer) for offset in (0, 100))
        return self.add_weight(name=name, shape=(2, *shape), initializer=_StackedInitializer(inits, shape),
                               regularizer=self._regularizer)

    def build(self, inputs_shape, conditional_input_shape=None):
        if self.output_units is None:
            raise ValueError("`output_units` is not set: give it, or let AffineCoupling set it.")
        first, second = _pair(self.output_units)
        if not self.separate_towers:
            self._towers = [self._make_tower(first + second, 0)]
            self.built = True
            return
        # Both towers' layers are stacked on a leading tower axis, so the towers can run as one batched matmul
        # per layer (see `_run_fused`); each tower's slice is drawn and penalised as its own layer would be.
        in_units = int(inputs_shape[-1]) + (0 if conditional_input_shape is None else int(conditional_input_shape[-1]))
        self._in_units = in_units
        units = self.hidden_units
        self._kernels, self._biases = [], []
        for i in range(len(units)):
            fan_in = in_units if i == 0 else units[i - 1]
            self._kernels.append(self._tower_kernel(f"tower_kernel_{i}", (fan_in, units[i]), i))
            self._biases.append(self.add_weight(name=f"tower_bias_{i}", shape=(2, 1, units[i]), initializer="zeros"))
        # Zero-initialised heads (the coupling starts as the identity); outputs of different widths keep one
        # head each, equal widths share a batched one.
        if first == second:
            self._heads = [self._tower_kernel("head_kernel", (units[-1], first), 0, zero=True)]
            self._head_biases = [self.add_weight(name="head_bias", shape=(2, 1, first), initializer="zeros")]
        else:
            self._heads = [
                self.add_weight(name=f"head_kernel_{j}", shape=(units[-1], w), initializer="zeros",
                                regularizer=self._regularizer)
                for j, w in enumerate((first, second))
            ]
            self._head_biases = [self.add_weight(name=f"head_bias_{j}", shape=(w,), initializer="zeros")
                                 for j, w in enumerate((first, second))]
        self.built = True

    @staticmethod
    def _run(tower, h):
        for layer in tower:
            h = layer(h)
        return h

    # Largest static batch the towers run as batched matmuls. Measured with XLA on a shared 2-core x86 CPU
    # (book towers, 4 x 256; noisy): batched matmuls beat two plain ones by roughly 8% for log_prob at 256
    # examples, where per-op cost matters, and lose by about as much at 10000, where the plain matmul kernels
    # do better. Without XLA the batched layout pays only when a gradient follows (a training step ran 1.17x
    # tfb.RealNVP's XLA loop with it, 0.88x without), and costs a plain forward pass (sample at 256 points:
    # 0.67x tfb.RealNVP batched, 0.96x one tower at a time). Unknown batch sizes (fit's and evaluate's
    # batches) take the batched path.
    _batched_max = 2048

    def _run_fused(self, h):
        act = keras.activations.get(self.activation)
        n = h.shape[0]
        if n is None or (n <= self._batched_max and (in_xla_context() or recording_gradients())):
            h = h[None]  # [1, N, in]: broadcast against the tower axis of the kernels
            for kernel, bias in zip(self._kernels, self._biases):
                h = act(ops.matmul(h, kernel) + bias)  # [2, N, out]
            if len(self._heads) == 1:
                out = ops.matmul(h, self._heads[0]) + self._head_biases[0]
                return tuple(ops.unstack(out, 2, axis=0))  # one op (gradient: one stack), not two slices
            return tuple(ops.matmul(h[t], self._heads[t]) + self._head_biases[t] for t in range(2))
        outs = []
        for t in range(2):  # the same weights, one tower at a time
            g = h
            for kernel, bias in zip(self._kernels, self._biases):
                g = act(ops.matmul(g, kernel[t]) + bias[t])
            if len(self._heads) == 1:
                outs.append(ops.matmul(g, self._heads[0][t]) + self._head_biases[0][t])
            else:
                outs.append(ops.matmul(g, self._heads[t]) + self._head_biases[t])
        return outs[0], outs[1]

    def call(self, inputs, conditional_input=None):
        h = inputs if conditional_input is None else ops.concatenate([inputs, conditional_input], axis=-1)
        if self.separate_towers:
            # Dense layers check their input width; the stacked kernels would fail inside a batched matmul.
            if h.shape[-1] is not None and h.shape[-1] != self._in_units:
                raise ValueError(
                    f"{self.name} was built for {self._in_units} input features (`inputs` and `conditional_input` "
                    f"concatenated) and got {h.shape[-1]}: inputs {list(inputs.shape)}, conditional_input "
                    f"{None if conditional_input is None else list(conditional_input.shape)}.")
            if len(h.shape) == 2:
                return self._run_fused(h)
            # Batch dimensions of any rank: the towers see them flattened.
            batch = ops.shape(h)[:-1]
            first, second = self._run_fused(ops.reshape(h, (-1, h.shape[-1])))
            return (ops.reshape(first, (*batch, first.shape[-1])), ops.reshape(second, (*batch, second.shape[-1])))
        return _split_last(self._run(self._towers[0], h), self.output_units)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_units": list(self.hidden_units),
            "output_units": list(self.output_units) if isinstance(self.output_units, tuple) else self.output_units,
            "activation": self.activation,
            "separate_towers": self.separate_towers,
            "l2": self.l2,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="tfp_nvp")
class ConvResNet(keras.layers.Layer):
    """Convolutional ResNet for image couplings: `[N, H, W, C_in] -> (shift, log_scale)`, each `[N, H, W, C_out]`.

    A 3x3 input convolution, `num_blocks` residual blocks (ReLU-3x3-ReLU-1x1, no batch norm: batch statistics
    would make `forward` and `inverse` disagree between training and inference), ReLU, then a zero-initialised
    3x3 head. A vector `conditional_input` is broadcast over H, W and concatenated to the input channels.
    Inside an XLA-compiled function, a residual block's convolution of an image smaller than its kernel window
    (GLOW's last level on 8x8 digits: 2x2) runs as a matmul over shifted copies of the image, which XLA's CPU
    backend computes about 4x faster; the weights and the result are those of the `Conv2D` layer.

    Example:
      >>> net = ConvResNet(hidden_channels=32, num_blocks=1, output_channels=2)
      >>> shift, log_scale = net(keras.ops.zeros((4, 8, 8, 2)))
    """

    def __init__(
        self,
        hidden_channels: int = 64,
        num_blocks: int = 2,
        output_channels: int | None = None,
        kernel_size: int = 3,
        l2: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_channels = _positive_int(hidden_channels, "hidden_channels")
        self.num_blocks = _positive_int(num_blocks, "num_blocks", allow_zero=True)
        self.output_channels = _output_widths(output_channels, "output_channels")
        self.kernel_size = _square_kernel(kernel_size)
        self.l2 = l2_penalty(l2)
        self.seed = seed
        self._regularizer = _regularizer(self.l2)

    def _conv(self, filters, kernel, offset, zero=False):
        return layers.Conv2D(
            filters,
            kernel,
            padding="same",
            kernel_initializer="zeros" if zero else _seeded("he_normal", self.seed, offset),
            kernel_regularizer=self._regularizer,
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        if self.output_channels is None:
            raise ValueError("`output_channels` is not set: give it, or let AffineCoupling set it.")
        k, h = self.kernel_size, self.hidden_channels
        self._stem = self._conv(h, k, 0)
        self._blocks = [(self._conv(h, k, 2 * i + 1), self._conv(h, 1, 2 * i + 2)) for i in range(self.num_blocks)]
        self._head = self._conv(sum(_pair(self.output_channels)), k, 0, zero=True)
        self.built = True

    def call(self, inputs, conditional_input=None):
        x = inputs
        if conditional_input is not None:
            c = ops.reshape(conditional_input, (-1, 1, 1, conditional_input.shape[-1]))
            c = ops.broadcast_to(c, (*ops.shape(x)[:3], conditional_input.shape[-1]))
            x = ops.concatenate([x, ops.cast(c, x.dtype)], axis=-1)
        h = self._stem(x)
        for conv_a, conv_b in self._blocks:
            h = h + conv_b(ops.relu(self._spatial_conv(conv_a, ops.relu(h))))
        return _split_last(self._head(ops.relu(h)), self.output_channels)

    def _spatial_conv(self, conv, x):
        """`conv(x)`, computed as one matmul over the k x k shifted copies of `x` when that is much faster.

        XLA's CPU convolution is slow on images smaller than the kernel window: for a 2x2 image, 64 -> 64
        channels, batch 64, a 3x3 'same' convolution's forward and backward pass took 5.9 ms under XLA against
        1.5 ms for TensorFlow's own kernel and 1.5 ms for this matmul (benchmarks/conv_xla.py), and the last
        level of a GLOW on 8x8 images runs there. Elsewhere, and outside XLA, `conv` runs as it is. Either way
        the result is the convolution of `x` with `conv`'s own weights.
        """
        height, width = x.shape[1], x.shape[2]
        k = self.kernel_size
        if height is None or width is None or not (1 < height < k and 1 < width < k) or not in_xla_context():
            return conv(x)
        if not conv.built:
            conv.build(x.shape)
        before = (k - 1) // 2  # where TensorFlow's 'same' puts it: an even k's extra row and column go after
        padded = ops.pad(x, [(0, 0), (before, k - 1 - before), (before, k - 1 - before), (0, 0)])
        shifted = [padded[:, i:i + height, j:j + width, :] for i in range(k) for j in range(k)]
        kernel = ops.reshape(conv.kernel, (k * k * x.shape[-1], conv.filters))
        return ops.matmul(ops.concatenate(shifted, axis=-1), kernel) + conv.bias

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_channels": self.hidden_channels,
            "num_blocks": self.num_blocks,
            "output_channels": (list(self.output_channels) if isinstance(self.output_channels, tuple)
                                else self.output_channels),
            "kernel_size": self.kernel_size,
            "l2": self.l2,
            "seed": self.seed,
        }

