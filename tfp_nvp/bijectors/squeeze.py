"""GLOW's squeeze (space-to-depth) built from TFP's Reshape and Transpose bijectors."""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf
from tensorflow_probability import bijectors as tfb

from tfp_nvp.bijectors._base import as_shape, check_event

__all__ = ["Squeeze"]


class Squeeze(tfb.Bijector):
    r"""Space-to-depth: `forward` maps an image event `[H, W, C]` to `[H/f, W/f, f*f*C]`; `log|det| = 0`.

    Each non-overlapping `f x f` block of pixels becomes one pixel with `f*f*C` channels, ordered
    `(row in block, column in block, channel)` exactly like `tf.nn.space_to_depth`:

        y[i, j, (a*f + b)*C + c] = x[i*f + a, j*f + b, c].

    It is the chain `Reshape([H, W, C] -> [H/f, f, W/f, f, C])`, `Transpose` of the two middle axes,
    `Reshape(-> [H/f, W/f, f*f*C])` of TFP bijectors; the inverse (depth-to-space) is that chain's inverse.

    Direction in a flow. TFP's `forward` is latent -> data, while GLOW squeezes on the way from data to
    latent. In a `tfb.Chain` list (whose inverse runs left to right, data first), GLOW's squeeze of the data is
    therefore `tfb.Invert(Squeeze(data_shape))` and the matching unsqueeze is `Squeeze(data_shape)`:

      >>> level = tfb.Chain([tfb.Invert(Squeeze([8, 8, 1])), *steps_on_4x4x4, Squeeze([8, 8, 1])])

    maps `[8, 8, 1]` to itself with the steps acting on `[4, 4, 4]`.

    Example:
      >>> Squeeze([4, 4, 1]).forward(tf.zeros([3, 4, 4, 1])).shape
      TensorShape([3, 2, 2, 4])
    """

    def __init__(self, event_shape: Sequence[int], factor: int = 2, validate_args: bool = False,
                 name: str = "squeeze"):
        parameters = dict(locals())
        height, width, channels = as_shape(event_shape, "event_shape", rank=3)
        if isinstance(factor, bool) or int(factor) != factor or factor < 2:
            raise ValueError(f"`factor` must be an integer >= 2; got {factor!r}.")
        f = int(factor)
        if height % f or width % f:
            raise ValueError(
                f"`event_shape` {[height, width, channels]}: height and width must be divisible by "
                f"`factor`={f} to squeeze."
            )
        self._event_shape_in = (height, width, channels)
        self._event_shape_out = (height // f, width // f, f * f * channels)
        self._factor = f
        blocks = (height // f, f, width // f, f, channels)
        with tf.name_scope(name) as name:
            # tfb.Chain applies its list right to left in forward: split into blocks, move the block column
            # next to the block row, then merge the block into the channel axis.
            self._chain = tfb.Chain(
                [
                    tfb.Reshape(event_shape_out=self._event_shape_out,
                                event_shape_in=(height // f, width // f, f, f, channels), validate_args=validate_args),
                    tfb.Transpose(perm=[0, 2, 1, 3, 4], validate_args=validate_args),
                    tfb.Reshape(event_shape_out=blocks, event_shape_in=self._event_shape_in,
                                validate_args=validate_args),
                ],
                validate_args=validate_args,
                name="space_to_depth",
            )
            super().__init__(
                forward_min_event_ndims=3,
                inverse_min_event_ndims=3,
                is_constant_jacobian=True,
                validate_args=validate_args,
                parameters=parameters,
                name=name,
            )

    @property
    def factor(self) -> int:
        return self._factor

    @property
    def event_shape_in(self) -> tuple[int, ...]:
        """The image shape `forward` takes, `[H, W, C]`."""
        return self._event_shape_in

    @property
    def event_shape_out(self) -> tuple[int, ...]:
        """The shape `forward` returns, `[H/f, W/f, f*f*C]`."""
        return self._event_shape_out

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        return dict()

    def _check(self, x, arg, shape):
        return check_event(self, x, arg, shape)

    def _forward(self, x):
        x = self._check(x, "x", self._event_shape_in)
        return self._chain.forward(x)

    def _inverse(self, y):
        y = self._check(y, "y", self._event_shape_out)
        return self._chain.inverse(y)

    def _forward_log_det_jacobian(self, x):
        x = self._check(x, "x", self._event_shape_in)
        return self._chain.forward_log_det_jacobian(x, event_ndims=3)

    def _inverse_log_det_jacobian(self, y):
        y = self._check(y, "y", self._event_shape_out)
        return self._chain.inverse_log_det_jacobian(y, event_ndims=3)

    def _forward_event_shape(self, input_shape):
        return self._chain.forward_event_shape(input_shape)

    def _forward_event_shape_tensor(self, input_shape):
        return self._chain.forward_event_shape_tensor(input_shape)

    def _inverse_event_shape(self, output_shape):
        return self._chain.inverse_event_shape(output_shape)

    def _inverse_event_shape_tensor(self, output_shape):
        return self._chain.inverse_event_shape_tensor(output_shape)
