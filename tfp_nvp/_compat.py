"""The one place tfp_nvp reaches into TensorFlow, TensorFlow Probability and Keras internals.

Every private module, class, function or attribute of those libraries the package uses is named here, with why
it is needed and which public API was tried first. The rest of the package imports these names from here and
never from `tensorflow.python`, `tensorflow_probability.python` or `keras.src`, nor reads their private
attributes. `UPSTREAM` lists each use; tests/test_compat.py checks every one against the installed releases, so
a release that moves one fails with the upstream name in the message instead of somewhere deep in a flow.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "UPSTREAM", "Chain", "TransformedDistribution", "drop_eager_entries", "flat_part_names", "gated_cache_types", "in_xla_context", "is_injective", "recording_gradients", "split_distribution_kwargs",
    "set_distribution_kwargs_split", "set_distribution_parameters", "stop_recording", "use_gated_cache",
]

# upstream symbol -> what tfp_nvp uses it for. Private attributes are written `Class._attribute`.
UPSTREAM: dict[str, str] = {}


def _moved(symbol: str, error: Exception) -> ImportError:
    return ImportError(
        f"tfp_nvp needs {symbol} ({UPSTREAM[symbol]}), which the installed release does not have ({error}). "
        "Install a release inside the ranges tfp_nvp declares (setup.cfg), or report this to tfp_nvp."
    )


def _private(symbol: str, why: str):
    """The upstream object `symbol` ("package.module.name"), recorded in `UPSTREAM` with `why`."""
    UPSTREAM[symbol] = why
    module, _, name = symbol.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as error:
        raise _moved(symbol, error) from error


# ------------------------------------------------------------------------------------------ TensorFlow
_in_xla = _private("tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext", (
    "knowing, while tracing, that XLA will compile the function: DenseNetwork picks its tower layout and "
    "ConvResNet its small-image convolution path by it. No public API says whether a trace is jit-compiled; "
    "this is the test TensorFlow's own control flow uses"))
_could_possibly_record = _private("tensorflow.python.eager.record.could_possibly_record", (
    "knowing whether a gradient tape may record the ops being created (DenseNetwork runs its towers one after "
    "the other only when none does). Public tapes answer only for themselves (`tape.stop_recording` is per tape); "
    "this is the test `tf.recompute_grad` uses"))
stop_recording = _private("tensorflow.python.eager.record.stop_recording", (
    "running InvertibleChain's density pass and reconstructions unrecorded by every tape at once, as "
    "`tf.recompute_grad` does; `GradientTape.stop_recording` pauses one tape the caller does not give us"))


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (`jit_compile=True`, or inside one)."""
    return _in_xla(tf.compat.v1.get_default_graph())


def recording_gradients() -> bool:
    """True while a gradient tape (or forward accumulator) may record the ops being created, eager or traced.

    False for inference (`log_prob` or `sample` outside any tape) and inside `stop_recording` blocks.
    """
    return _could_possibly_record()


# ------------------------------------------------------------------------------------------ TensorFlow Probability
Chain = _private("tensorflow_probability.python.bijectors.chain._Chain", (
    "the base of InvertibleChain. `tfb.Chain` is the auto-composite-tensor subclass of it: subclassing the public "
    "name makes every InvertibleChain a CompositeTensor, whose type spec cannot hold Keras networks"))
TransformedDistribution = _private(
    "tensorflow_probability.python.distributions.transformed_distribution._TransformedDistribution", (
    "the base of the builders' flows and the surrogate posteriors: it is the class `tfd.TransformedDistribution(...)` "
    "returns for bijectors that are not CompositeTensors (ours are not); subclassing the public name makes the flow "
    "a CompositeTensor that cannot build its type spec"))
_BijectorCache = _private("tensorflow_probability.python.internal.cache_util.BijectorCache", (
    "restricting TFP's bijector cache to traced calls and single eager scoring calls (tfp_nvp.bijectors._reuse). "
    "TFP has no public switch for its cache, which returns results computed before a weight update to eager code"))
_GreedyBijectorCache = _private(
    "tensorflow_probability.python.internal.cache_util.BijectorCacheWithGreedyAttrs",
    "the same restriction for bijectors that compute their log-det with their output (FFJORD, autoregressive)")
UPSTREAM["BijectorCache._lookup"] = "where the gated cache decides whether TFP may answer from its storage"
UPSTREAM["BijectorCache._attributes"] = "where the gated cache decides whether TFP may read a stored log-det"
UPSTREAM["BijectorCache._invoke"] = "how the gated cache computes a result without storing it"
UPSTREAM["BijectorCache.storage"] = "the entries the gated cache drops when an eager scoring call ends"
UPSTREAM["BijectorCache._forward_name"] = "copying a bijector's cache configuration into its gated replacement"
UPSTREAM["BijectorCache._inverse_name"] = "copying a bijector's cache configuration into its gated replacement"
UPSTREAM["tfb.Bijector._cache"] = (
    "the class attribute through which a TFP bijector picks its cache: this package's bijectors set the gated "
    "one, and the TFP containers a flow is built from get it swapped in (cache_in_traces_only)")
UPSTREAM["BijectorCacheWithGreedyAttrs._invoke"] = (
    "calls the bijector method named by the cache's `forward_name` / `inverse_name` (our `_augmented_forward` / "
    "`_augmented_inverse`) and keeps the attributes it returns with the output, so FFJORD's ODE solve and the "
    "autoregressive layers' sequential pass give the log-det with the output, computed once")
UPSTREAM["tfb.Bijector._sum_fn"] = (
    "TFP sums every log-det over the event axes beyond a bijector's own with it, even over none; skipping that "
    "empty sum removes a dozen shape ops a layer from every traced training step")


def gated_cache_types(allowed, on_use):
    """TFP's bijector cache, plain and greedy, consulted only while `allowed()`; `on_use(storage)` on each use.

    Outside `allowed()` a lookup computes its result without storing it and a log-det lookup finds nothing, so
    TFP computes afresh. Instances go into a bijector class's `_cache` attribute, or replace an instance's
    (`use_gated_cache`).
    """

    class GatedCache(_BijectorCache):
        def _lookup(self, input, forward_name, inverse_name, **kwargs):  # noqa: A002 (TFP's signature)
            if not allowed():
                return self._invoke(input, forward_name, kwargs, {})
            on_use(self.storage)
            return super()._lookup(input, forward_name, inverse_name, **kwargs)

        def _attributes(self, input, fn_name, **kwargs):  # noqa: A002
            if not allowed():
                return {}
            on_use(self.storage)
            return super()._attributes(input, fn_name, **kwargs)

    class GatedGreedyCache(GatedCache, _GreedyBijectorCache):
        """For bijectors whose `_augmented_forward`/`_augmented_inverse` give the log-det with the output."""

    return GatedCache, GatedGreedyCache


def drop_eager_entries(storage) -> None:
    """Removes the entries of a cache's `storage` that hold eager tensors."""
    for key in list(storage.keys()):
        if key.alive and any(tf.is_tensor(t) and not tf.is_symbolic_tensor(t) for t in tf.nest.flatten(key())):
            key.cancel()
            storage.pop(key, None)


def use_gated_cache(bijector, cache_types) -> None:
    """Gives `bijector` the gated cache of `cache_types` (plain, greedy) of the kind it has, unless it has one."""
    plain, greedy = cache_types
    current = bijector._cache  # noqa: SLF001 - see UPSTREAM
    if isinstance(current, plain):
        return
    cls = greedy if isinstance(current, _GreedyBijectorCache) else plain
    bijector._cache = cls(forward_name=current._forward_name, inverse_name=current._inverse_name,  # noqa: SLF001
                          bijector=bijector, bijector_class=type(bijector))

UPSTREAM["tfb.Bijector._is_injective"] = (
    "InvertibleChain refuses non-injective steps; TFP exposes injectivity only through this attribute")
UPSTREAM["tfd.TransformedDistribution._kwargs_split_fn"] = (
    "how a transformed distribution splits `log_prob`'s keyword arguments between base and bijector: "
    "ConditionedFlow binds its context through it, and the flows' overflow check routes `bijector_kwargs` like "
    "TFP's own `log_prob` does. The constructor takes `kwargs_split_fn` only for the public class, not its "
    "non-composite twin the package subclasses")
UPSTREAM["tfd.JointDistribution._flat_resolve_names"] = (
    "the part names of a JointDistributionSequential (from its lambdas' arguments), for readable messages only; "
    "failures fall back to indices")


def is_injective(bijector) -> bool:
    """Whether TFP considers `bijector` injective (one-to-one)."""
    return bool(bijector._is_injective)  # noqa: SLF001 - see UPSTREAM


def split_distribution_kwargs(distribution, kwargs: dict):
    """`(distribution_kwargs, bijector_kwargs)` as `distribution.log_prob(x, **kwargs)` splits them."""
    return distribution._kwargs_split_fn(kwargs)  # noqa: SLF001 - see UPSTREAM


def set_distribution_kwargs_split(distribution, split) -> None:
    """Makes `distribution` split its keyword arguments with `split(kwargs) -> (dist_kwargs, bijector_kwargs)`."""
    distribution._kwargs_split_fn = split  # noqa: SLF001 - see UPSTREAM


UPSTREAM["tfd.Distribution._parameters"] = (
    "what a distribution's public `parameters` returns: ConditionedFlow reports the arguments it was built "
    "with, not those of the transformed distribution it initialises itself as")
UPSTREAM["tf.Module._no_dependency"] = "keeps that dict of arguments out of tf.Module's tracking of variables"


def set_distribution_parameters(distribution, parameters: dict) -> None:
    """Makes `distribution.parameters` return `parameters`, untracked by tf.Module."""
    distribution._parameters = distribution._no_dependency(parameters)  # noqa: SLF001 - see UPSTREAM


def flat_part_names(joint_distribution) -> list[str]:
    """The names of a JointDistribution's parts in flattening order."""
    return list(joint_distribution._flat_resolve_names())  # noqa: SLF001 - see UPSTREAM


# ------------------------------------------------------------------------------------------ Keras
UPSTREAM["keras.src.trainers.compile_utils.MetricsList"] = (
    "the metric container Keras' callbacks look into for a metric's direction: with FlowModel's `nll` inside one, "
    "EarlyStopping('val_nll') and ModelCheckpoint work without mode='min'. Public API tried: Keras' monitoring "
    "callbacks (keras/src/callbacks/monitor_callback.py, 3.15) infer mode='auto' only for `loss` and for metrics "
    "found inside a CompileMetrics or MetricsList in `model.metrics`. The public way into a CompileMetrics, "
    "compile(metrics=[...]), works with a flow's y=None but makes `nll` one of the user's compile arguments "
    "(merged with theirs, written to the saved compile config) and still needs the private direction below")
try:
    from keras.src.trainers.compile_utils import MetricsList
except ImportError:  # pragma: no cover - without it, callbacks on `nll` need mode="min"
    MetricsList = None

UPSTREAM["keras.Metric._direction"] = (
    "the direction of FlowModel's `nll` metrics: lower is better. It is the only thing Keras' callbacks read; no "
    "public Metric argument sets it (Keras sets it on its own metrics, and keras.metrics.MeanMetricWrapper only "
    "when it wraps one of Keras' built-in losses)")


def mark_lower_is_better(metric) -> None:
    """Tells Keras' callbacks that a lower value of `metric` is better."""
    metric._direction = "down"  # noqa: SLF001 - see UPSTREAM


UPSTREAM["keras.src.utils.rng_utils.get_random_seed"] = (
    "the seed `keras.utils.set_random_seed` recorded, so FlowModel.fit's shuffling follows it as Keras' own "
    "does; Keras exports only the setter. Public API tried: keras.random.SeedGenerator() without a seed draws its "
    "seed from Python's global `random`, which set_random_seed seeds, but each draw advances the user's random "
    "stream and depends on every draw before it, so two fit calls after one set_random_seed got different "
    "seeds and a run resumed in the same process (tests/test_resume.py) other batches than the uninterrupted "
    "one; tf.compat.v1.random.get_seed reads TensorFlow's global seed but cannot tell an unset one from 87654321")


def keras_global_seed():
    """The seed of the last `keras.utils.set_random_seed` call, or None."""
    try:
        from keras.src.utils.rng_utils import get_random_seed
    except ImportError:  # pragma: no cover - shuffling then draws fresh entropy
        return None
    return get_random_seed()


UPSTREAM["keras.optimizers.Optimizer._learning_rate"] = (
    "the LearningRateSchedule object an optimizer was given, so FlowModel.fit can size a "
    "WarmupCosineDecay(total_steps=None) passed to any Keras optimizer. Public API tried: `optimizer.learning_rate` "
    "is the schedule's current value, and `optimizer.get_config()['learning_rate']` a serialized copy of it, "
    "not the object fit must resize")


def learning_rate_schedule(optimizer):
    """What `optimizer` holds as its learning rate: the schedule it was given, a variable, or None.

    A `keras.optimizers.LossScaleOptimizer` (mixed float16) is looked through to the optimizer it wraps.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return getattr(optimizer, "_learning_rate", None)  # noqa: SLF001 - see UPSTREAM


UPSTREAM["keras.optimizers.Optimizer._clip_gradients"] = (
    "the method FusedAdam (opt-in) replaces to clip every gradient's norm in two ops a weight instead of Keras' "
    "~17. Keras calls it after unscaling loss-scaled gradients and averaging accumulated ones; clipping in the "
    "public `apply` instead would run before both, and Keras would clip a second time unless `clipnorm` were "
    "hidden from it. Should a release rename it, Keras clips by itself (same result, its own cost)")
