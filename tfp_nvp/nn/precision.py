"""Which dtype policy a network gets inside a flow: the one rule for mixed precision.

A flow computes its bijector math, log-determinants and loss in the flow's `dtype`. Its networks are the only
part that tolerates low precision (their outputs are cast back to the flow's dtype by the bijector that holds
them, before any log-det is formed), and they hold nearly all the FLOPs. So:

* a flow of dtype float32 built while the global Keras policy is a mixed one (`"mixed_bfloat16"`,
  `"mixed_float16"`: float32 variables, low-precision compute) gets networks with that global policy;
* any other combination (a float64 flow under any policy, any flow under a plain global policy) gets networks
  of the flow's dtype, as before.

Parameter layers (ActNorm, the 1x1 convolution, a coupling's `scale`, learnable LeakyReLU slopes) are math, not
networks, and always keep the flow's dtype. The policy is read when the network is constructed, so set it
before building the flow (and before loading a `.keras` file, which rebuilds the flow).
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["network_dtype"]

_MIXED_COMPUTE = ("bfloat16", "float16")


def network_dtype(dtype="float32") -> str:
    """The dtype policy name for a network in a flow of `dtype`, under the current global Keras policy.

    Example:
      >>> keras.mixed_precision.set_global_policy("mixed_bfloat16")
      >>> network_dtype("float32"), network_dtype("float64")
      ('mixed_bfloat16', 'float64')
      >>> keras.mixed_precision.set_global_policy("float32")
    """
    name = tf.as_dtype(dtype).name
    policy = keras.mixed_precision.global_policy()
    if name == "float32" and policy.variable_dtype == "float32" and policy.compute_dtype in _MIXED_COMPUTE:
        return policy.name
    return name
