"""The learning-rate schedule `FlowModel.compile()` uses by default: linear warmup, then Keras' cosine decay.

Flows trained by maximum likelihood like a high rate early (to find the data's shape) and a small one late (to
settle thin, sharp structure); a cosine decay over the whole run gives both without a validation split to
watch. The length of the run is what `fit` is asked for, so by default `FlowModel.fit` sizes the schedule to
its `epochs` x steps per epoch.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tfp_nvp")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak_learning_rate`, then cosine decay to `final_fraction * peak_learning_rate`.

    Over a run of `T` steps, the first `warmup_fraction * T` steps rise linearly from 0 to the peak; the rest
    follow half a cosine down to `final_fraction` of the peak, reached at the last step and held afterwards. The
    decay is Keras' `keras.optimizers.schedules.CosineDecay(peak, decay_steps, alpha=final_fraction)` over the
    steps after the warmup; the warmup reaches the peak at its last step.

    `total_steps=None` (the default) lets `FlowModel.fit` size the schedule: each `fit` call runs one full
    warmup-and-decay cycle over its `epochs` x steps per epoch, counted from the step its epoch 0 would start
    at, so a run resumed with `initial_epoch=k` (or through `keras.callbacks.BackupAndRestore`) follows the
    schedule of the uninterrupted run, and a later `fit` call starts a new cycle. Until a `fit` sizes it, the
    rate is the peak (constant), e.g. when the optimizer is used outside `fit`. The sized cycle is part of
    `get_config` (`cycle=(start_step, length)`), so an optimizer reloaded from a `.keras` file continues at the
    rate it was saved at. With `total_steps` given, the cycle is fixed to optimizer steps `[0, total_steps)` and
    `fit` leaves it alone.

    Example:
      >>> schedule = WarmupCosineDecay(5e-3, total_steps=1000)
      >>> model.compile(optimizer=keras.optimizers.Adam(schedule))
    """

    def __init__(self, peak_learning_rate: float = 5e-3, warmup_fraction: float = 0.05,
                 final_fraction: float = 0.01, total_steps: int | None = None, name: str = "warmup_cosine_decay",
                 cycle: tuple[int, int] | None = None):
        for arg, value, low, high in (("peak_learning_rate", peak_learning_rate, 0.0, math.inf),
                                      ("warmup_fraction", warmup_fraction, 0.0, 1.0),
                                      ("final_fraction", final_fraction, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                    or (arg == "peak_learning_rate" and value == 0) or (arg == "warmup_fraction" and value == 1):
                bounds = {"peak_learning_rate": "> 0", "warmup_fraction": "in [0, 1)",
                          "final_fraction": "in [0, 1]"}[arg]
                raise ValueError(f"`{arg}` must be a number {bounds}; got {value!r}.")
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps
                                        or total_steps <= 0):
            raise ValueError(f"`total_steps` must be a positive integer or None; got {total_steps!r}.")
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_fraction = float(warmup_fraction)
        self.final_fraction = float(final_fraction)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.name = name
        # The decay: peak to `final_fraction` of it along half a cosine, over one unit of the decay's progress
        # (`__call__` feeds it steps since the warmup / decay length), so its constants are Python numbers that
        # fit never needs to change. CosineDecay's own warmup starts at `initial_learning_rate` on the first step
        # where this one starts at peak / warmup steps, so the warmup is written out in `__call__`.
        self._cosine = keras.optimizers.schedules.CosineDecay(self.peak_learning_rate, decay_steps=1,
                                                              alpha=self.final_fraction, name=name)
        # Variables, not Python numbers: the traced training step reads them, and fit may resize the cycle
        # after that step was traced (Keras keeps the traced step across fit calls).
        self._start = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_start")
        self._length = tf.Variable(self.total_steps or 0, dtype=tf.int64, trainable=False, name=f"{name}_length")
        # `cycle` is the (start step, length) a `fit` sized, saved by `get_config` so that a reloaded optimizer
        # reports and uses the rate it was at.
        if cycle is not None:
            if self.total_steps is not None:
                raise ValueError("`cycle` is for schedules sized by `fit` (total_steps=None).")
            self.set_cycle(*cycle)

    @property
    def sized_by_fit(self) -> bool:
        """Whether `FlowModel.fit` sizes the cycle (`total_steps=None`)."""
        return self.total_steps is None

    def set_cycle(self, start_step: int, total_steps: int):
        """Runs one warmup-and-decay cycle over optimizer steps `[start_step, start_step + total_steps)`."""
        if int(total_steps) <= 0:
            raise ValueError(f"`total_steps` must be positive; got {total_steps!r}.")
        self._start.assign(int(start_step))
        self._length.assign(int(total_steps))

    def __call__(self, step):
        dtype = tf.float32
        length = tf.cast(self._length, dtype)
        t = tf.clip_by_value(tf.cast(step, dtype) - tf.cast(self._start, dtype), 0.0, tf.maximum(length, 1.0))
        warmup = tf.floor(self.warmup_fraction * length)
        rising = self.peak_learning_rate * (t + 1.0) / tf.maximum(warmup, 1.0)
        # CosineDecay clamps the progress at 1 (`decay_steps`): the final rate is held after the cycle.
        progress = (t - warmup) / tf.maximum(length - warmup - 1.0, 1.0)
        rate = tf.where(t < warmup, rising, self._cosine(progress))
        return tf.where(length > 0, rate, tf.constant(self.peak_learning_rate, dtype))  # not yet sized: the peak

    def get_config(self):
        config = dict(peak_learning_rate=self.peak_learning_rate, warmup_fraction=self.warmup_fraction,
                      final_fraction=self.final_fraction, total_steps=self.total_steps, name=self.name)
        if self.sized_by_fit and int(self._length.numpy()) > 0:
            config["cycle"] = (int(self._start.numpy()), int(self._length.numpy()))
        return config


class SizeScheduleToFit(keras.callbacks.Callback):
    """Sizes a `WarmupCosineDecay(total_steps=None)` to the `fit` it runs in (added by `FlowModel.fit`).

    At the first epoch of a `fit` (after `BackupAndRestore` restored the optimizer), the cycle is set to start
    where epoch 0 started, `iterations - epoch * steps`, and to last `epochs * steps` steps.
    """

    def __init__(self, schedule: WarmupCosineDecay):
        super().__init__()
        self._schedule = schedule
        self._sized = False

    def on_train_begin(self, logs=None):
        self._sized = False
        if not self.params.get("steps"):
            raise ValueError(
                "The default learning-rate schedule (WarmupCosineDecay) is sized by fit's epochs x steps per "
                "epoch, and this input's length is unknown: pass `steps_per_epoch=` to fit, or compile with "
                "an explicit optimizer or `WarmupCosineDecay(total_steps=...)`.")

    def on_epoch_begin(self, epoch, logs=None):
        if self._sized:
            return
        steps = int(self.params["steps"])
        iterations = int(self.model.optimizer.iterations.numpy())
        self._schedule.set_cycle(iterations - epoch * steps, int(self.params["epochs"]) * steps)
        self._sized = True
