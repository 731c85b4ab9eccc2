"""Whether the graph being traced will be compiled by XLA (a few code paths differ for speed only)."""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # GraphOrParentsInXlaContext

__all__ = ["in_xla_context"]


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (`jit_compile=True`, or inside one).

    TensorFlow has no public test for "this trace will be XLA-compiled"; this is the one its own control flow
    uses. Eager code and plain graphs get False.
    """
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
