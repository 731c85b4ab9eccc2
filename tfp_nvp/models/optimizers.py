"""`FusedAdam`: Keras' Adam with each weight's update as one fused TensorFlow op (opt-in).

A flow is deep and its networks are small, so a training step has many small weights: 16 affine couplings
of (64, 64) hold 112. Keras 3's Adam builds about 39 graph ops per weight on TensorFlow (it recomputes the
bias corrections for every weight), which made the optimizer 44% of the ops in the two-moons training step:
a cost paid in Python when the step is traced, in Grappler when it first runs, and in per-op overhead at
every step on CPU. `FusedAdam` computes the bias corrections once per step and updates each weight with
TensorFlow's `ResourceApplyAdam` kernel (also compiled by XLA), with the same arithmetic as Keras' Adam.
`clipnorm` is fused the same way: Keras clips each weight's gradient with its own ~17 ops (a third of the
two-moons step when set); here all the norms come from one `L2Loss` per weight and one vector computation.

It is opt-in: `FlowModel.compile()` defaults to Keras' own Adam, public Keras API only, while `FusedAdam`
replaces a private method of Keras' optimizers (see `FusedAdam` and `tfp_nvp._compat.UPSTREAM`). Measured gain:
a third less CPU per training step on the README quick start.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tfp_nvp")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose per-weight update is one `ResourceApplyAdam` op (opt-in).

    Same arguments, state, checkpoints and update rule as Keras' Adam (Kingma & Ba, 2015, with epsilon
    added to the square root of the second moment as Keras does):

        m <- m + (1 - beta_1) (g - m),   v <- v + (1 - beta_2) (g^2 - v),
        w <- w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon).

    Everything `Adam` does around the update (learning-rate schedules, `weight_decay`, EMA, gradient
    accumulation, distribution strategies) is Keras' own code; `clipnorm` (each gradient scaled to norm at most
    `clipnorm`, as in Keras) is computed for all weights at once. `amsgrad=True` keeps Keras' update.
    Float rounding differs from Keras' Adam in the last bits (Keras rounds `1 - beta_2` and the bias correction
    separately), which is enough for two long runs of a sensitive recipe to drift apart.

    Why opt-in: `FlowModel.compile()`'s default is `keras.optimizers.Adam`, public Keras API only. `FusedAdam`
    ran the README quick start with a third less CPU per step (and traces a deep flow's step in about two thirds
    of the time), but it leans on Keras' internals in two ways: its fused `clipnorm` replaces Keras' private
    `_clip_gradients` method (should a release rename it, Keras clips by itself: same result, Keras' cost), and
    it finds each weight's moments by watching Adam's `build` create them through the public
    `add_variable_from_reference`, which assumes Adam keeps making them that way (it has since Keras 3.0).

    Example:
      >>> model.compile(optimizer=tfp_nvp.FusedAdam(tfp_nvp.WarmupCosineDecay(), clipnorm=1.0))
    """

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        # Adam's `build` creates each weight's moments through this public hook: FusedAdam notes which is which,
        # so its update finds them without reading Adam's private slot lists.
        slot = super().add_variable_from_reference(reference_variable, name=name, initializer=initializer)
        if name in ("momentum", "velocity"):
            self._slot_table().add(reference_variable, name, slot)
        return slot

    def _slot_table(self) -> _SlotTable:
        table = getattr(self, "_fused_slots", None)
        if table is None:
            table = self._fused_slots = _SlotTable()
        return table

    def apply(self, grads, trainable_variables=None):
        # The bias corrections depend only on the step count, which Keras increments after every weight is
        # updated: they are computed once per step (per dtype, device and graph) and shared.
        self._step_constants = {}
        return super().apply(grads, trainable_variables)

    def _clip_gradients(self, grads):  # Keras' private hook: see tfp_nvp._compat.UPSTREAM
        dense = [g for g in grads if g is not None]
        if (not (self.clipnorm and self.clipnorm > 0) or keras.backend.backend() != "tensorflow" or not dense
                or any(isinstance(g, tf.IndexedSlices) for g in dense)
                or len({g.dtype for g in dense}) > 1):
            return super()._clip_gradients(grads)
        dtype = dense[0].dtype
        # L2Loss is sum(g^2) / 2 in one op; a zero gradient gives norm 0 and a scale of exactly 1.
        norms = tf.sqrt(2.0 * tf.stack([tf.nn.l2_loss(g) for g in dense]))
        clip = tf.constant(self.clipnorm, dtype)
        scales = iter(tf.unstack(clip / tf.maximum(norms, clip)))
        return [None if g is None else g * next(scales) for g in grads]

    def _constants(self, variable, learning_rate):
        graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        key = (variable.dtype, variable.device, graph)
        constants = getattr(self, "_step_constants", None)
        if constants is None:  # update_step called outside `apply`
            constants = self._step_constants = {}
        cached = constants.get(key)
        if cached is None:
            dtype = variable.dtype
            step = tf.cast(self.iterations + 1, dtype)
            # tf.constant, not tf.cast: a Python float cast by TF goes through float32 first.
            beta_1, beta_2 = tf.constant(self.beta_1, dtype), tf.constant(self.beta_2, dtype)
            cached = dict(beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                          lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                          epsilon=tf.constant(self.epsilon, dtype))
            constants[key] = cached
        return cached

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or keras.backend.backend() != "tensorflow":
            return super().update_step(gradient, variable, learning_rate)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        # Keras variables wrap tf.Variables (per replica under a strategy, where `.handle` is this replica's).
        variable = variable.value if isinstance(variable, keras.Variable) else variable
        m, v = (slot.value for slot in self._slot_table().moments(variable))
        tf.raw_ops.ResourceApplyAdam(var=variable.handle, m=m.handle, v=v.handle,
                                     grad=tf.cast(gradient, variable.dtype),
                                     **self._constants(variable, learning_rate))


class _SlotTable:
    """A weight's Adam moments, for the weight and, under a `tf.distribute` strategy, for each replica's copy
    of it (the variable Keras hands to `update_step` there).

    A plain object, not a list or dict attribute: Keras and TensorFlow would track the moments a second time
    (they are already the optimizer's variables), adding names to its checkpoints.
    """

    def __init__(self):
        self._slots = {}  # id(weight) -> (weight, {"momentum": m, "velocity": v})
        self._by_ref = {}

    def add(self, weight, name, slot):
        self._slots.setdefault(id(weight), (weight, {}))[1][name] = slot
        self._by_ref.clear()

    def moments(self, variable):
        """The `(momentum, velocity)` of `variable`: a weight's `tf.Variable` or one replica's copy of it."""
        if variable.ref() not in self._by_ref:
            strategy = tf.distribute.get_strategy()
            for weight, slots in self._slots.values():
                value = weight.value if isinstance(weight, keras.Variable) else weight
                for copy in (value, *strategy.experimental_local_results(value)):
                    self._by_ref[copy.ref()] = (slots["momentum"], slots["velocity"])
        try:
            return self._by_ref[variable.ref()]
        except KeyError:
            raise ValueError(f"FusedAdam has no moments for {variable.name}: build the optimizer on the weights "
                             "it updates, under the same distribution strategy.") from None
