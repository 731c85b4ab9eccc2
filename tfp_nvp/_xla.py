"""What the code being traced will be used for: XLA compilation, gradients (a few code paths differ for speed only)."""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.eager import record  # could_possibly_record
from tensorflow.python.ops import control_flow_util  # GraphOrParentsInXlaContext

__all__ = ["in_xla_context", "recording_gradients"]


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (`jit_compile=True`, or inside one).

    TensorFlow has no public test for "this trace will be XLA-compiled"; this is the one its own control flow
    uses. Eager code and plain graphs get False.
    """
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def recording_gradients() -> bool:
    """True while a gradient tape (or forward accumulator) may record the ops being created, eager or traced.

    TensorFlow has no public test for this either; this is the one its own `tf.recompute_grad` uses. False
    for inference (`log_prob` or `sample` outside any tape) and inside `stop_recording` blocks.
    """
    return record.could_possibly_record()
