"""The Keras seam: `FlowModel` trains a flow with `compile` / `fit` and saves it like any Keras model."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

try:  # Keras' callbacks read a metric's direction only inside its own metric containers.
    from keras.src.trainers.compile_utils import MetricsList as _KerasMetricsList

    class _MetricsList(_KerasMetricsList):
        """The container Keras' callbacks look into, usable at the top level of `model.metrics`."""

        def result(self):
            return self.get_result()

except ImportError:  # pragma: no cover - a Keras without it: callbacks then need mode="min"
    _MetricsList = None

from tfp_nvp import flows, images
from tfp_nvp.bijectors._base import KerasParameterizedBijector

tfd = tfp.distributions

__all__ = ["FlowModel", "flow_layers"]


def flow_layers(distribution) -> list:
    """The Keras layers holding the parameters of every tfp_nvp bijector inside `distribution`."""
    found, seen = [], set()
    for bij in flows.flow_bijectors(distribution):
        if isinstance(bij, KerasParameterizedBijector):
            for layer in bij.keras_layers:
                if id(layer) not in seen:
                    seen.add(id(layer))
                    found.append(layer)
    return found


def _is_array_input(x) -> bool:
    if isinstance(x, dict):
        return bool(x) and all(_is_array_input(v) for v in x.values())
    return isinstance(x, (np.ndarray, tf.Tensor)) and len(x.shape) > 0


def _num_examples(x) -> int:
    sizes = {int(v.shape[0]) for v in (x.values() if isinstance(x, dict) else [x])}
    if len(sizes) != 1:
        raise ValueError(f"every input must have the same number of examples; got sizes {sorted(sizes)}.")
    return sizes.pop()


def _take(x, index):
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


@keras.saving.register_keras_serializable(package="tfp_nvp")
class FlowModel(keras.Model):
    """A Keras model around a flow distribution, trained by maximum likelihood.

    `fit(x)` minimises the mean negative log-likelihood in nats plus any weight penalties the networks
    declare (`model.losses`); the penalty-free `nll` is reported next to `loss`, so callbacks can monitor
    `val_nll`. Inputs are data batches `x`, or dicts `{"x": x, "conditional_input": c}` for conditional flows.
    Every parameter of the flow is tracked as a Keras weight: `fit`, callbacks, `save_weights` and `.keras`
    files (for flows made by `tfp_nvp` builders) all work.

    Discrete images: with `levels=L` the inputs are integer images in `[0, L)`; every batch (training and
    evaluation) is dequantized with fresh uniform noise, `(x + u) / L`, and `bits_per_dim` is reported next to
    `nll` (`val_bits_per_dim` for early stopping). `log_prob` and `sample` stay in the flow's continuous space.

    Speed: for array inputs `fit` feeds Keras one shuffled, repeated `tf.data` pipeline with `steps_per_epoch`
    set, so the input iterator is built once per `fit` instead of twice per epoch (for training and again for
    validation), which dominates small-data epochs; each epoch is still one shuffled pass over the data. The
    optimizer is built before the first step so the step is traced once, not twice. On CPU, Keras' default `jit_compile="auto"` means no XLA; `compile(jit_compile=True)` roughly doubles
    steps/s for a few seconds of compilation per input shape, worth it for runs longer than a minute.

    Example:
      >>> model = FlowModel(tfp_nvp.real_nvp([2]))
      >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
      >>> model.fit(x, epochs=10, batch_size=256, validation_split=0.1)
      >>> model.log_prob(x), model.sample(100, seed=0)
    """

    def __init__(self, distribution: tfd.Distribution, levels: int | None = None, **kwargs):
        if isinstance(distribution, dict):  # from_config
            spec = distribution
            distribution = flows.BUILDERS[spec["builder"]](**spec["config"])
        if not isinstance(distribution, tfd.Distribution):
            raise ValueError(f"`distribution` must be a tfd.Distribution; got {type(distribution).__name__}.")
        kwargs.setdefault("dtype", distribution.dtype.name)
        super().__init__(**kwargs)
        self._distribution = distribution
        # A Keras 3 model only sees Keras layers assigned to it: this list is the Keras door to the flow.
        self.flow_layers = flow_layers(distribution)
        self._check_both_doors()
        if levels is not None and (isinstance(levels, bool) or int(levels) != levels or levels < 2):
            raise ValueError(f"`levels` must be an integer >= 2 (number of discrete values) or None; got {levels!r}.")
        self.levels = None if levels is None else int(levels)
        self._num_dims = int(np.prod(distribution.event_shape.as_list()))
        self.nll_tracker = keras.metrics.Mean(name="nll")
        trackers = [self.nll_tracker]
        if self.levels is not None:
            self.bits_per_dim_tracker = keras.metrics.Mean(name="bits_per_dim")
            trackers.append(self.bits_per_dim_tracker)
        for tracker in trackers:
            tracker._direction = "down"  # lets EarlyStopping("val_nll") etc. work without mode="min"
        self._flow_metrics = _MetricsList(trackers, name="flow_metrics") if _MetricsList else trackers
        self.built = True

    def _check_both_doors(self):
        keras_side = {id(w.value) for w in self.trainable_weights}
        hidden = [v.name for v in self._distribution.trainable_variables if id(v) not in keras_side]
        if hidden:
            raise ValueError(
                "`distribution` has trainable variables that Keras cannot train (raw tf.Variables or tf_keras "
                f"networks): {hidden[:5]}{'...' if len(hidden) > 5 else ''}. Keep every parameter in a Keras 3 "
                "layer (tfp_nvp networks and bijectors do), or train with tfp.math.minimize / tfp.vi instead."
            )

    @property
    def distribution(self) -> tfd.Distribution:
        return self._distribution

    # ---------------------------------------------------------------------------------------------- data
    @staticmethod
    def _unpack(inputs):
        if isinstance(inputs, dict):
            if "x" not in inputs:
                raise ValueError(f"dict inputs need an 'x' entry; got keys {sorted(inputs)}.")
            return inputs["x"], inputs.get("conditional_input")
        return inputs, None

    def _bijector_kwargs(self, conditional_input):
        if conditional_input is None:
            return {}
        return {"bijector_kwargs": flows.conditional_kwargs(self._distribution, conditional_input)}

    def call(self, inputs, training=False):
        x, c = self._unpack(inputs)
        if self.levels is not None:
            # Fresh uniform noise every batch: the flow never sees the same continuous point twice, which is
            # what keeps a flow on a small discrete dataset from overfitting the dequantization.
            x = images.dequantize(x, self.levels, dtype=self._distribution.dtype)
        return self._distribution.log_prob(x, **self._bijector_kwargs(c))

    def log_prob(self, x, conditional_input=None):
        """Log-density of `x` in nats under the flow (for `levels` models: of dequantized data in `[0, 1)`)."""
        x = tf.convert_to_tensor(x, self._distribution.dtype)
        return self._distribution.log_prob(x, **self._bijector_kwargs(conditional_input))

    def sample(self, n: int, seed=None, conditional_input=None):
        """`n` samples drawn by pushing base samples forward through the flow."""
        return self._distribution.sample(n, seed=seed, **self._bijector_kwargs(conditional_input))

    # ---------------------------------------------------------------------------------------------- training
    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, validation_split=0.0,
            validation_data=None, shuffle=True, sample_weight=None, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, **kwargs):
        """Keras `fit`; array inputs without `y`/`sample_weight` take the single-iterator fast path."""
        if self.optimizer is not None and not self.optimizer.built:
            # Built lazily, the optimizer creates its slots inside the first traced step, and tf.function
            # then traces the whole step a second time (measured: every network evaluated twice as often
            # during tracing); building it here makes the first epoch trace once.
            self.optimizer.build(self.trainable_weights)
        if isinstance(validation_data, tuple) and (len(validation_data) == 1 or (
                len(validation_data) == 2 and validation_data[1] is None)):
            validation_data = validation_data[0]  # Keras' (x_val,) form: a flow has no targets
        fast = (
            y is None and sample_weight is None and steps_per_epoch is None and validation_steps is None
            and not kwargs.get("class_weight") and shuffle in (True, False) and _is_array_input(x)
            and (validation_data is None or _is_array_input(validation_data))
        )
        if fast:
            batch_size = batch_size or 32
            n = _num_examples(x)
            val = validation_data
            if val is None and validation_split:
                if not 0.0 < validation_split < 1.0:
                    raise ValueError(f"`validation_split` must be in [0, 1); got {validation_split}.")
                # Keras takes the last fraction, unshuffled; so does this path.
                split = int(math.floor(n * (1.0 - validation_split)))
                x, val = _take(x, slice(0, split)), _take(x, slice(split, n))
                n = split
            spe = self.steps_per_execution
            train_steps = math.ceil(n / batch_size)
            val_batch = validation_batch_size or batch_size
            val_steps = None if val is None else math.ceil(_num_examples(val) / val_batch)
            # Keras runs `steps_per_execution` steps per call; on a repeated dataset a call that crossed an
            # epoch boundary would eat the next epoch's batches, so only whole divisions take this path.
            fast = n > 0 and train_steps % spe == 0 and (val_steps is None or val_steps % spe == 0)
        if not fast:
            return super().fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
                               validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
                               sample_weight=sample_weight, steps_per_epoch=steps_per_epoch,
                               validation_steps=validation_steps, validation_batch_size=validation_batch_size,
                               **kwargs)
        ds = tf.data.Dataset.from_tensor_slices(x)
        if shuffle:
            ds = ds.shuffle(n, reshuffle_each_iteration=True)
        # batch before repeat: every epoch is exactly one pass, ending in the same short batch Keras would give.
        ds = ds.batch(batch_size).repeat().prefetch(1)
        if val is not None:
            val = tf.data.Dataset.from_tensor_slices(val).batch(val_batch).repeat()
        return super().fit(ds, epochs=epochs, verbose=verbose, callbacks=callbacks, validation_data=val,
                           shuffle=False, steps_per_epoch=train_steps, validation_steps=val_steps, **kwargs)

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        nll = -y_pred
        if sample_weight is not None:
            sample_weight = tf.cast(sample_weight, nll.dtype)
            mean_nll = tf.reduce_sum(nll * sample_weight) / tf.reduce_sum(sample_weight)
        else:
            mean_nll = tf.reduce_mean(nll)
        self.nll_tracker.update_state(nll, sample_weight=sample_weight)
        if self.levels is not None:
            bpd = images.bits_per_dim(nll, self._num_dims, self.levels)
            self.bits_per_dim_tracker.update_state(bpd, sample_weight=sample_weight)
        penalties = self.losses
        return mean_nll + tf.cast(tf.add_n(penalties), nll.dtype) if penalties else mean_nll

    @property
    def metrics(self):
        extra = [self._flow_metrics] if _MetricsList else self._flow_metrics
        return [*super().metrics, *extra]

    # ---------------------------------------------------------------------------------------------- saving
    def get_config(self):
        spec = getattr(self._distribution, "_tfp_nvp_spec", None)
        if spec is None or spec["config"].get("base_distribution") == "custom":
            raise NotImplementedError(
                "Only flows made by tfp_nvp builders with their default base can be saved as `.keras` files; "
                "use `save_weights` / `load_weights` on a model built the same way instead."
            )
        return {**super().get_config(), "distribution": spec, "levels": self.levels}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(config.pop("distribution"), **config)
