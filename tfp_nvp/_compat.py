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
    "UPSTREAM", "BijectorCache", "BijectorCacheWithGreedyAttrs", "Chain", "TransformedDistribution",
    "flat_part_names", "in_xla_context", "is_injective", "recording_gradients", "split_distribution_kwargs",
    "set_distribution_kwargs_split", "stop_recording",
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
    "knowing, while tracing, that XLA will compile the function: the spline coupling writes its ops inline "
    "there instead of calling a shared tf.function, and DenseNetwork picks its tower layout. No public API says "
    "whether a trace is jit-compiled; this is the test TensorFlow's own control flow uses"))
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
BijectorCache = _private("tensorflow_probability.python.internal.cache_util.BijectorCache", (
    "restricting TFP's bijector cache to traced calls and single eager scoring calls (tfp_nvp.bijectors._reuse). "
    "TFP has no public switch for its cache, which returns results computed before a weight update to eager code"))
BijectorCacheWithGreedyAttrs = _private(
    "tensorflow_probability.python.internal.cache_util.BijectorCacheWithGreedyAttrs",
    "the same restriction for bijectors that compute their log-det with their output (FFJORD, autoregressive)")

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


def flat_part_names(joint_distribution) -> list[str]:
    """The names of a JointDistribution's parts in flattening order."""
    return list(joint_distribution._flat_resolve_names())  # noqa: SLF001 - see UPSTREAM


# ------------------------------------------------------------------------------------------ Keras
UPSTREAM["keras.src.trainers.compile_utils.MetricsList"] = (
    "the metric container Keras' callbacks look into for a metric's direction: with FlowModel's `nll` inside one, "
    "EarlyStopping('val_nll') and ModelCheckpoint work without mode='min'. Keras reads directions only from "
    "its own containers; a public Metric has no direction")
try:
    from keras.src.trainers.compile_utils import MetricsList
except ImportError:  # pragma: no cover - without it, callbacks on `nll` need mode="min"
    MetricsList = None

UPSTREAM["keras.Metric._direction"] = "the direction of FlowModel's `nll` metrics: lower is better"


def mark_lower_is_better(metric) -> None:
    """Tells Keras' callbacks that a lower value of `metric` is better."""
    metric._direction = "down"  # noqa: SLF001 - see UPSTREAM


UPSTREAM["keras.src.utils.rng_utils.get_random_seed"] = (
    "the seed `keras.utils.set_random_seed` recorded, so FlowModel.fit's shuffling follows it as Keras' own "
    "does; Keras exports only the setter")


def keras_global_seed():
    """The seed of the last `keras.utils.set_random_seed` call, or None."""
    try:
        from keras.src.utils.rng_utils import get_random_seed
    except ImportError:  # pragma: no cover - shuffling then draws fresh entropy
        return None
    return get_random_seed()


UPSTREAM["keras.optimizers.Adam._momentums"] = "FusedAdam's first-moment slots, updated by one fused op a weight"
UPSTREAM["keras.optimizers.Adam._velocities"] = "FusedAdam's second-moment slots"
UPSTREAM["keras.optimizers.Optimizer._get_variable_index"] = "which slot belongs to a weight (FusedAdam)"


def adam_slots(optimizer, variable):
    """The `(first moment, second moment)` slot variables a built Keras Adam keeps for `variable`."""
    index = optimizer._get_variable_index(variable)  # noqa: SLF001 - see UPSTREAM
    return optimizer._momentums[index], optimizer._velocities[index]  # noqa: SLF001
