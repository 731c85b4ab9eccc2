"""The Keras seam: `FlowModel` trains a flow with `compile` / `fit` and saves it like any Keras model."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp import flows, images
from tfp_nvp._compat import MetricsList, keras_global_seed, learning_rate_schedule, mark_lower_is_better
from tfp_nvp.flows import flow_layers
from tfp_nvp.models.export import export_flow
from tfp_nvp.models.schedules import SizeScheduleToFit, WarmupCosineDecay

if MetricsList is not None:  # Keras' callbacks read a metric's direction only inside its own metric containers.
    class _MetricsList(MetricsList):
        """The container Keras' callbacks look into, usable at the top level of `model.metrics`."""

        def result(self):
            return self.get_result()
else:  # pragma: no cover - callbacks then need mode="min"
    _MetricsList = None

tfd = tfp.distributions

__all__ = ["FlowModel"]

# `fit`'s batch size for array inputs when none is given. A step of a small flow costs about the same for 32
# or 256 examples (per-op overhead dominates on CPU), and 256 gives far less noisy likelihood gradients.
DEFAULT_BATCH_SIZE = 256


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


# `fit`'s own pipelines run without tf.data autotuning: they have nothing to tune (a fixed prefetch, no parallel
# maps), and the autotuner's background thread held the iterator's destruction when `fit` returned for up to its
# optimization period (measured: 15-18 s after a 25 s two-moons run, in about one run in five).
_NO_AUTOTUNE = tf.data.Options()
_NO_AUTOTUNE.autotune.enabled = False


class _RecordStartStep(keras.callbacks.Callback):
    """Writes the optimizer's step count into `variable` at the start of `fit`, after every other callback's
    `on_train_begin` (it is appended last), so a step count restored there is the one recorded."""

    def __init__(self, variable):
        super().__init__()
        self._variable = variable

    def on_train_begin(self, logs=None):
        optimizer = getattr(self.model, "optimizer", None)
        self._variable.assign(0 if optimizer is None else int(optimizer.iterations.numpy()))


def _placeholder_targets(x, y, sample_weight, name="x"):
    """Targets for weighted data: Keras packs `(x, None, w)` as `(x,)` and so drops the weights of data with
    no targets, which is every flow's. A zero per example (ignored by the loss) keeps them."""
    if sample_weight is None or y is not None:
        return y
    if not _is_array_input(x):
        raise ValueError(f"`sample_weight` needs `{name}` as arrays or tensors (a dict of them for conditional "
                         f"flows); for a tf.data.Dataset, yield (x, targets, weights) with any targets.")
    return np.zeros(_num_examples(x), np.float32)


def _with_callback(callbacks, callback):
    if callbacks is None:
        return [callback]
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.append(callback)
        return callbacks
    return [*callbacks, callback]


def _flow_validation_data(validation_data):
    """`validation_data` as `fit` passes it on: `(x_val,)` and `(x_val, None)` become `x_val` (a flow has no
    targets), `(x_val, None, w_val)` gets zero targets that keep the weights (see `_placeholder_targets`)."""
    if isinstance(validation_data, tuple) and (len(validation_data) == 1 or (
            len(validation_data) == 2 and validation_data[1] is None)):
        return validation_data[0]
    if isinstance(validation_data, tuple) and len(validation_data) == 3 and validation_data[1] is None:
        x_val, _, w_val = validation_data
        return x_val, _placeholder_targets(x_val, None, w_val, "validation_data[0]"), w_val
    return validation_data


def _check_batch_size(arg, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0):
        raise ValueError(f"`{arg}` must be a positive integer or None; got {value!r}.")


def _shuffle_seed(shuffle_seed):
    """The seed of `fit`'s shuffling, as an int64 tensor: `shuffle_seed`, else the one given to
    `keras.utils.set_random_seed`, else fresh entropy (a different order every run)."""
    if shuffle_seed is None:
        shuffle_seed = keras_global_seed()
    if shuffle_seed is None:
        shuffle_seed = int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, (int, np.integer)):
        raise TypeError(f"`shuffle_seed` must be an integer or None; got {shuffle_seed!r}.")
    return tf.constant(int(shuffle_seed) % 2**63, tf.int64)


@dataclasses.dataclass(frozen=True)
class _ArrayFit:
    """`fit` on arrays as one repeated pipeline: its training data, validation data and steps per epoch."""

    x: object
    val: object
    n: int
    batch_size: int
    val_batch: int
    train_steps: int
    val_steps: int | None

    @classmethod
    def plan(cls, x, validation_data, validation_split, batch_size, validation_batch_size, steps_per_execution):
        """The plan for array inputs, or None where Keras' own `fit` must run: no examples left to train on, or
        steps per epoch (training or validation) that `steps_per_execution` does not divide."""
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        n = _num_examples(x)
        val = validation_data
        if val is None and validation_split:
            if not 0.0 < validation_split < 1.0:
                raise ValueError(f"`validation_split` must be in [0, 1); got {validation_split}.")
            # Keras takes the last fraction, unshuffled; so does this path.
            split = int(math.floor(n * (1.0 - validation_split)))
            x, val = _take(x, slice(0, split)), _take(x, slice(split, n))
            n = split
        train_steps = math.ceil(n / batch_size)
        val_batch = validation_batch_size or batch_size
        val_steps = None if val is None else math.ceil(_num_examples(val) / val_batch)
        # Keras runs `steps_per_execution` steps per call; on a repeated dataset a call that crossed an epoch
        # boundary would eat the next epoch's batches, so only whole divisions take this path.
        spe = steps_per_execution
        if n == 0 or train_steps % spe or (val_steps is not None and val_steps % spe):
            return None
        return cls(x, val, n, batch_size, val_batch, train_steps, val_steps)

    def validation_batches(self):
        if self.val is None:
            return None
        return tf.data.Dataset.from_tensor_slices(self.val).batch(self.val_batch).repeat().with_options(_NO_AUTOTUNE)


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

    Noise regularization: with `training_noise=s` every training batch of continuous data is jittered with
    fresh Gaussian noise of standard deviation `s` (a scalar, or one value per event entry), so the flow fits
    the data smoothed by a small kernel instead of the sample's exact points, which counters the overfitting of
    a flow trained on a few thousand points (Rothfuss et al., 2019, "Noise regularization for conditional
    density estimation"; only `x` is jittered here, never `conditional_input`). Evaluation, validation,
    `log_prob` and `sample` see the data as given, and the reported training `nll` is that of the jittered
    batches. The price is a bias: the flow models `p` convolved with the noise. Keep `s` a fraction of the
    finest scale in the data: on two moons, noise of 40% of the arcs' own width adds a bias of about 0.005
    nats and lowered the held-out NLL of 3000-point fits by more. The noise comes from TensorFlow's global
    generator, like `levels`' dequantization noise, so a resumed run does not repeat an uninterrupted one's
    jitter. `training_noise` is fixed at construction.

    Speed: for array inputs `fit` feeds Keras one shuffled, repeated `tf.data` pipeline with `steps_per_epoch`
    set, so the input iterator is built once per `fit` instead of twice per epoch (for training and again for
    validation), which dominates small-data epochs; each epoch is still one shuffled pass over the data. The
    optimizer is built before the first step so the step is traced once, not twice. On CPU, Keras' default
    `jit_compile="auto"` means no XLA. `compile(jit_compile=True)` pays for wide networks (1.3x steps/s for
    6 couplings of 4 x 256 towers) after seconds of compilation per input shape; for small ones (16 couplings of
    (64, 64)) the plain graph was faster and compiles in a third of the time.

    Example:
      >>> model = FlowModel(tfp_nvp.real_nvp([2]))
      >>> model.compile()                    # Adam, warmup + cosine decay sized by fit's epochs
      >>> model.fit(x, epochs=60)            # batches of 256
      >>> model.log_prob(x), model.sample(100, seed=0)
    """

    def __init__(self, distribution: tfd.Distribution, levels: int | None = None, training_noise=None, **kwargs):
        if isinstance(distribution, dict):  # from_config
            spec = distribution
            distribution = flows.from_spec(spec)
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
        # Fixed at construction: the training step is traced with it, so a later change could not take effect.
        self._training_noise = self._check_training_noise(training_noise, distribution)
        self._num_dims = int(np.prod(distribution.event_shape.as_list()))
        self.nll_tracker = keras.metrics.Mean(name="nll")
        trackers = [self.nll_tracker]
        if self.levels is not None:
            self.bits_per_dim_tracker = keras.metrics.Mean(name="bits_per_dim")
            trackers.append(self.bits_per_dim_tracker)
        for tracker in trackers:
            mark_lower_is_better(tracker)  # EarlyStopping("val_nll") etc. then work without mode="min"
        self._flow_metrics = _MetricsList(trackers, name="flow_metrics") if _MetricsList else trackers
        self.built = True

    @property
    def training_noise(self):
        """The standard deviation of the training batches' jitter (float or per-entry list), or None."""
        return self._training_noise

    def _check_training_noise(self, training_noise, distribution):
        """`training_noise` as None, a float or a list of floats broadcastable to the event shape."""
        if training_noise is None:
            return None
        if self.levels is not None:
            raise ValueError("`training_noise` is for continuous data; with `levels` the dequantization noise "
                             "already jitters every batch. Leave one of them unset.")
        try:
            raw = np.asarray(training_noise)
        except (TypeError, ValueError):
            raw = np.asarray(None)  # a ragged nest: refused below with the other non-numbers
        # Strings, booleans and ragged nests are not standard deviations.
        if raw.dtype.kind not in "iuf":
            raise ValueError(f"`training_noise` must be a number or an array of numbers; got {training_noise!r}.")
        noise = raw.astype(np.float64)
        if not np.all(np.isfinite(noise)) or np.any(noise < 0):
            raise ValueError(
                f"`training_noise` must be finite and >= 0 (a standard deviation); got {training_noise!r}.")
        event_shape = distribution.event_shape.as_list()
        try:
            np.broadcast_to(noise, event_shape)
        except ValueError:
            raise ValueError(f"`training_noise` must be a scalar or broadcast to the event shape {event_shape}; "
                             f"got shape {list(noise.shape)}.") from None
        return float(noise) if noise.ndim == 0 else noise.tolist()

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
            unknown = sorted(set(inputs) - {"x", "conditional_input"})
            if unknown:  # a misspelt condition would otherwise be dropped without a word
                raise ValueError(f"dict inputs take only the keys 'x' and 'conditional_input'; got also {unknown}.")
            return inputs["x"], inputs.get("conditional_input")
        if isinstance(inputs, (list, tuple)):
            raise TypeError(
                f"FlowModel inputs must be a data batch `x` or a dict {{'x': x, 'conditional_input': c}}; got a "
                f"{type(inputs).__name__} of {len(inputs)} items."
            )
        return inputs, None

    def _as_data(self, x, arg: str, continuous: bool):
        """`x` as a tensor of the flow's dtype; floating data of another precision is cast (as Keras layers do)."""
        try:
            x = tf.convert_to_tensor(x)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`{arg}` must be an array or tensor; got {type(x).__name__}.") from e
        if x.dtype.is_floating:
            return tf.cast(x, self._distribution.dtype)
        if continuous or not x.dtype.is_integer:
            hint = ("build FlowModel(flow, levels=L) to dequantize integer images in [0, L)" if self.levels is None
                    else "dequantize integer images first, e.g. tfp_nvp.images.dequantize(x, levels)")
            raise TypeError(f"`{arg}` must hold floating-point data here; got dtype {x.dtype.name} ({hint}).")
        return x

    def _check_condition(self, conditional_input):
        if conditional_input is None and flows.is_conditional(self._distribution):
            raise ValueError(
                "`conditional_input` is required: this FlowModel's flow is conditional. Pass "
                "log_prob(x, conditional_input=c) / sample(n, conditional_input=c), or dict inputs "
                "{'x': x, 'conditional_input': c} to fit, evaluate and call."
            )
        if conditional_input is None:
            return None
        c = tf.convert_to_tensor(conditional_input)
        return tf.cast(c, self._distribution.dtype) if c.dtype.is_floating else c

    def _bijector_kwargs(self, conditional_input):
        if conditional_input is None:
            return {}
        return {"bijector_kwargs": flows.conditional_kwargs(self._distribution, conditional_input)}

    def call(self, inputs, training=False):
        x, c = self._unpack(inputs)
        x, c = self._as_data(x, "x", continuous=self.levels is None), self._check_condition(c)
        if self.levels is not None:
            # Fresh uniform noise every batch: the flow never sees the same continuous point twice, which is
            # what keeps a flow on a small discrete dataset from overfitting the dequantization.
            x = images.dequantize(x, self.levels, dtype=self._distribution.dtype)
        elif training and self.training_noise is not None:
            scale = tf.constant(self.training_noise, self._distribution.dtype)
            x = x + scale * tf.random.normal(tf.shape(x), dtype=self._distribution.dtype)
        return self._distribution.log_prob(x, **self._bijector_kwargs(c))

    def log_prob(self, x, conditional_input=None):
        """Log-density of `x` in nats under the flow (for `levels` models: of dequantized data in `[0, 1)`).

        Floating `x` and `conditional_input` are cast to the flow's dtype; integer `x` is refused.
        """
        x, conditional_input = self._as_data(x, "x", continuous=True), self._check_condition(conditional_input)
        return self._distribution.log_prob(x, **self._bijector_kwargs(conditional_input))

    def sample(self, n: int, seed=None, conditional_input=None):
        """`n` samples drawn by pushing base samples forward through the flow."""
        if not tf.is_tensor(n) and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
            raise ValueError(f"`n` must be a non-negative integer (the number of samples); got {n!r}.")
        kwargs = self._bijector_kwargs(self._check_condition(conditional_input))
        return self._distribution.sample(n, seed=seed, **kwargs)

    # ---------------------------------------------------------------------------------------------- training
    def compile(self, optimizer=None, **kwargs):
        """Keras `compile`; without an optimizer, Adam with a warmup-and-cosine schedule sized by `fit`.

        `optimizer=None` means `keras.optimizers.Adam(tfp_nvp.WarmupCosineDecay())`: Keras' Adam whose rate
        rises linearly to 5e-3 over the first 5% of each `fit` call's `epochs` x steps per epoch, then decays
        along half a cosine to 1% of that at the last step. So the number of epochs given to `fit` is the
        training budget, and the run ends at a small rate without a validation split to watch. Any Keras
        optimizer can be given instead, e.g. `tfp_nvp.FusedAdam(tfp_nvp.WarmupCosineDecay(), clipnorm=1.0)` (the
        same update rule, a third less CPU per step on the README quick start; opt-in because it leans on a
        private Keras method); other arguments are Keras'.

        Mixed precision: the model keeps the flow's dtype (the loss is float32), so Keras' own test for a
        `"mixed_float16"` model does not fire; instead, when any of the flow's layers computes in float16 (and
        `auto_scale_loss` is left True), the optimizer is wrapped in `keras.optimizers.LossScaleOptimizer` here
        unless it already is one, and Keras' train step scales the loss and unscales the gradients through it.
        """
        if optimizer is None:
            optimizer = keras.optimizers.Adam(WarmupCosineDecay())
        super().compile(optimizer=optimizer, **kwargs)
        if kwargs.get("auto_scale_loss", True) and not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer) \
                and any(layer.compute_dtype == "float16" for layer in self.flow_layers):
            self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)

    def compile_from_config(self, config):
        # Keras skips compiling on load when `compile` is overridden; this one keeps Keras' signature.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None:
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None, validation_split=0.0,
            validation_data=None, shuffle=True, sample_weight=None, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, shuffle_seed=None, **kwargs):
        """Keras `fit`; array inputs without `y`/`sample_weight` take the single-iterator fast path.

        `batch_size` defaults to 256 for array inputs (`DEFAULT_BATCH_SIZE`). With the default optimizer of
        `compile()` (or any `WarmupCosineDecay(total_steps=None)`), `epochs` also sets the length of the
        learning-rate schedule: one warmup-and-cosine cycle over this call's `epochs` x steps per epoch.

        On that path the order of every epoch is a function of a seed and of the optimizer's step count where
        the epoch starts, so training resumed with its optimizer state (`keras.callbacks.BackupAndRestore`, or
        a restored checkpoint and `fit(initial_epoch=k)`) draws the same batches as a run that was never
        interrupted. The seed is `shuffle_seed`, else the one given to `keras.utils.set_random_seed`, else
        drawn afresh (a different order every run).

        `sample_weight` (and `validation_data=(x_val, None, w_val)`) weight the examples: each batch's loss is
        its weighted mean `sum(w * nll) / sum(w)` (0 for a batch of zero weights), and the reported `nll`
        (`bits_per_dim`) is that mean over all the data; `loss` is, as in Keras, the average of the batches'
        losses.
        """
        if not self.compiled:
            # Keras would fail later on the missing `optimizer` attribute, naming neither the cause nor the fix.
            raise RuntimeError("Call `model.compile()` before `fit`: FlowModel.compile() with no arguments uses Adam "
                               "with a warmup-and-cosine schedule sized by fit (tfp_nvp.WarmupCosineDecay).")
        self._build_optimizer_before_the_first_step()
        callbacks = self._with_schedule_sizing(callbacks)
        validation_data = _flow_validation_data(validation_data)
        y = _placeholder_targets(x, y, sample_weight)
        for arg, value in (("batch_size", batch_size), ("validation_batch_size", validation_batch_size)):
            _check_batch_size(arg, value)
        array_path = (y is None and sample_weight is None and steps_per_epoch is None and validation_steps is None
                      and not kwargs.get("class_weight") and shuffle in (True, False) and _is_array_input(x)
                      and (validation_data is None or _is_array_input(validation_data)))
        plan = None
        if array_path:
            plan = _ArrayFit.plan(x, validation_data, validation_split, batch_size, validation_batch_size,
                                  self.steps_per_execution)
        if plan is None:  # Keras' own fit
            if batch_size is None and _is_array_input(x):
                batch_size = DEFAULT_BATCH_SIZE
            return super().fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
                               validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
                               sample_weight=sample_weight, steps_per_epoch=steps_per_epoch,
                               validation_steps=validation_steps, validation_batch_size=validation_batch_size,
                               **kwargs)
        if shuffle:
            ds, callbacks = self._shuffled_batches(plan, _shuffle_seed(shuffle_seed), callbacks)
        else:
            # batch before repeat: every epoch is one pass, ending in the same short batch Keras would give.
            ds = tf.data.Dataset.from_tensor_slices(plan.x).batch(plan.batch_size).repeat()
        return super().fit(ds.prefetch(1).with_options(_NO_AUTOTUNE), epochs=epochs, verbose=verbose,
                           callbacks=callbacks, validation_data=plan.validation_batches(), shuffle=False,
                           steps_per_epoch=plan.train_steps, validation_steps=plan.val_steps, **kwargs)

    def _build_optimizer_before_the_first_step(self):
        """Builds the optimizer's slots ahead of `fit`'s first step.

        Built lazily, the optimizer creates its slots inside the first traced step, and tf.function then traces
        the whole step a second time (measured: every network evaluated twice as often during tracing); built
        here, the first epoch traces once. The slots must live where the weights do (mirrored under a
        tf.distribute strategy), whether or not `fit` runs in the strategy's scope.
        """
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_weights)

    def _with_schedule_sizing(self, callbacks):
        """`callbacks` and, for a `WarmupCosineDecay(total_steps=None)`, the callback that sizes it to this fit."""
        schedule = learning_rate_schedule(self.optimizer)
        if isinstance(schedule, WarmupCosineDecay) and schedule.sized_by_fit:
            return _with_callback(callbacks, SizeScheduleToFit(schedule))
        return callbacks

    def _shuffled_batches(self, plan, seed, callbacks):
        """The training batches of `plan`, each epoch in an order drawn from `seed` and the epoch's first step.

        Each epoch's order is a pure function of the seed and the optimizer step the epoch starts at, so a run
        resumed with its optimizer state (BackupAndRestore, or a checkpoint restore and fit(initial_epoch=k))
        sees the batches the uninterrupted run saw, and repeated fit calls see new orders. Returns the dataset
        and `callbacks` with the one that records the starting step.
        """
        # The step this fit starts at, written once callbacks have run `on_train_begin` (where BackupAndRestore
        # restores the optimizer) and read by the pipeline. Reading `optimizer.iterations` in the pipeline itself
        # races with the first step: nothing orders the iterator's first read after the step's increment, and a
        # run that read 1 instead of 0 drew other batches.
        with self.distribute_strategy.scope():
            start_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="fit_start_step")
        callbacks = _with_callback(callbacks, _RecordStartStep(start_step))
        data = tf.nest.map_structure(tf.convert_to_tensor, plan.x)
        n, train_steps, batch_size = plan.n, plan.train_steps, plan.batch_size

        def first_step(_):
            return start_step.read_value()

        def epoch_starts(first):
            return tf.data.Dataset.range(2**62).map(lambda epoch: first + epoch * train_steps)

        def epoch_batches(start):
            order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                             seed=tf.stack([seed, start]))
            return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

        ds = (tf.data.Dataset.range(1).map(first_step).flat_map(epoch_starts).flat_map(epoch_batches)
              .map(lambda index: tf.nest.map_structure(lambda t: tf.gather(t, index), data)))
        return ds, callbacks

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, **kwargs):
        """Keras `evaluate`; with `sample_weight`, `nll` is the weighted mean `sum(w * nll) / sum(w)` (see `fit`)."""
        y = _placeholder_targets(x, y, sample_weight)
        return super().evaluate(x, y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight, **kwargs)

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        nll = -y_pred
        if sample_weight is not None:
            sample_weight = tf.cast(sample_weight, nll.dtype)
            # A batch whose weights are all zero has nothing to fit: loss 0, no gradient (not 0 / 0).
            mean_nll = tf.math.divide_no_nan(tf.reduce_sum(nll * sample_weight), tf.reduce_sum(sample_weight))
        else:
            mean_nll = tf.reduce_mean(nll)
        self.nll_tracker.update_state(nll, sample_weight=sample_weight)
        if self.levels is not None:
            bpd = images.bits_per_dim(nll, self._num_dims, self.levels)
            self.bits_per_dim_tracker.update_state(bpd, sample_weight=sample_weight)
        penalties = self.losses
        total = mean_nll + tf.cast(tf.add_n(penalties), nll.dtype) if penalties else mean_nll
        # Under tf.distribute each replica returns the loss of its share of the global batch and the optimizer
        # sums the replicas' gradients, so the mean over the global batch is the per-replica mean over the
        # number of replicas (Keras scales its own losses the same way and multiplies back when reporting
        # `loss`). The metrics above take the unscaled per-example values and are summed across replicas.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return total / tf.cast(replicas, total.dtype) if replicas > 1 else total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        strategy = tf.distribute.get_strategy()
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
                strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)):
            # Several workers: Keras 3 averages each step's logs with `strategy.reduce("MEAN", v, axis=0)`,
            # which fails on scalars ("Invalid reduction dimension 0"); one-element vectors average to the
            # same scalar. Epoch logs and `history` are read from the metrics themselves, summed over workers.
            logs = {k: tf.reshape(v, [1]) if tf.is_tensor(v) and v.shape.rank == 0 else v for k, v in logs.items()}
        return logs

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
        return {**super().get_config(), "distribution": spec, "levels": self.levels,
                "training_noise": self.training_noise}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(config.pop("distribution"), **config)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras `load_weights`, all or nothing.

        A `.weights.h5` or `.keras` file written by a differently configured model (another depth, width or
        event shape) is refused with a `ValueError` naming the file and the first weights that differ, before
        anything is read into the model; Keras alone would load the matching part of such a file, or fail half
        way through. If loading fails for any other reason, every weight is restored to its value before the
        call. `skip_mismatch=True` keeps Keras' own partial loading.
        """
        path = str(filepath)
        if not skip_mismatch and (path.endswith(".weights.h5") or path.endswith(".keras")):
            mismatch = self._weights_file_mismatch(path)
            if mismatch:
                raise ValueError(f"Cannot load weights from {path!r} into this FlowModel: {mismatch}.")
        variables = [w.value for w in self.weights]
        optimizer = getattr(self, "optimizer", None)  # absent before `compile`
        if optimizer is not None:
            variables += [v.value for v in optimizer.variables]
        snapshot = [tf.identity(v) for v in variables]
        try:
            return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
        except Exception as e:
            for variable, value in zip(variables, snapshot):
                variable.assign(value)
            raise ValueError(f"Cannot load weights from {path!r} into this FlowModel (weights left unchanged): "
                             f"{e}") from e

    def _weights_file_mismatch(self, path: str) -> str | None:
        """How the model weights stored in `path` differ from what this model would write, or None."""
        import tempfile
        import zipfile

        import h5py

        def layout(source) -> dict:
            found = {}

            def visit(name, obj):
                # Optimizer slots are Keras' business: it skips a mismatched optimizer with a warning.
                if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer/"):
                    found[name] = (tuple(obj.shape), obj.dtype.name)

            with h5py.File(source, "r") as f:
                f.visititems(visit)
            return found

        try:
            if path.endswith(".keras"):
                import io

                with zipfile.ZipFile(path) as archive:
                    theirs = layout(io.BytesIO(archive.read("model.weights.h5")))
            else:
                theirs = layout(path)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"Cannot read weights from {path!r}: {type(e).__name__}: {e}") from e
        with tempfile.TemporaryDirectory() as tmp:
            mine_path = f"{tmp}/own.weights.h5"
            keras.Model.save_weights(self, mine_path)
            mine = layout(mine_path)
        if theirs == mine:
            return None
        missing = [k for k in mine if k not in theirs]
        extra = [k for k in theirs if k not in mine]
        changed = [k for k in mine if k in theirs and mine[k] != theirs[k]]
        parts = [f"the file holds {len(theirs)} model weights, this model has {len(mine)}"]
        if missing:
            parts.append(f"{len(missing)} of this model's are not in the file (e.g. {missing[0]} of shape "
                         f"{mine[missing[0]][0]})")
        if extra:
            parts.append(f"{len(extra)} in the file have no place in this model (e.g. {extra[0]} of shape "
                         f"{theirs[extra[0]][0]})")
        if changed:
            k = changed[0]
            parts.append(f"{len(changed)} differ in shape or dtype (e.g. {k}: file {theirs[k][0]} {theirs[k][1]}, "
                         f"model {mine[k][0]} {mine[k][1]})")
        return "; ".join(parts) + " - it was saved from a differently configured model (depth, width, event shape)"

    # ---------------------------------------------------------------------------------------------- serving
    def export(self, filepath, format="tf_saved_model", verbose=True, input_signature=None, **kwargs):
        """Writes a SavedModel with `serve` (log-density) and `sample` endpoints; see `tfp_nvp.export_flow`.

        Keras' own `export` would trace `call`, which dequantizes `levels` inputs with random noise; the
        endpoints here are deterministic and load with `tf.saved_model.load` alone. Only
        `format="tf_saved_model"` is supported; `kwargs` go to `export_flow`.
        """
        if format != "tf_saved_model":
            raise ValueError(f"`format` must be 'tf_saved_model' for a FlowModel; got format={format!r}.")

        return export_flow(self, filepath, input_signature=input_signature, verbose=verbose, **kwargs)
