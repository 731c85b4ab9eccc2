"""Reusing a bijector's results within one computation, and never across a weight update.

A bijector's result is often asked for again in the same computation: TFP's `log_prob` runs `inverse` and then
asks for the log-det at the same tensors, sampling with log-densities does the mirror image, and a container
slices a tensor it has just assembled. Computing such results again costs a network pass and, worse, its
gradient (XLA merges repeated forward passes but not their gradients). Keeping them is only safe where they
cannot go stale: TFP's own cache keeps a result per input tensor for as long as the caller holds it, which in
eager code outlives a weight update (`flow.log_prob(x)` for one `x` before and after a training step returned
the old log-det; TFP's own bijectors over `tf.Variable`s behave the same).

Everything here follows one rule. A result may be reused

* while tracing (`tf.function`, Keras' compiled steps): every traced call builds fresh tensors that read the
  weights when the function runs, so a reused tensor is recomputed on every run of the graph;
* eagerly inside one `one_call` scope (one `log_prob` or `sample_and_log_prob` call of a flow); leaving the
  outermost scope forgets everything kept eagerly, so no later eager call can meet a value computed before a
  weight update.

Two things follow the rule: `remember` / `recall`, the one memo the package's bijectors use (each keeps what
it computed with the very tensors it saw and returned), and the restricted TFP cache
(`traced_only_cache`, `cache_in_traces_only`) for TFP's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import tensorflow as tf
from tensorflow_probability import bijectors as tfb

from tfp_nvp._compat import drop_eager_entries, gated_cache_types, use_gated_cache

__all__ = ["cache_in_traces_only", "one_call", "recall", "remember", "reuse_allowed", "traced_only_cache"]

_scope = threading.local()

# Entries remembered per owner: a coupling keeps two per call (its input and its output), and a nested chain
# may be asked about a few passes back (its own and its parent's).
_ENTRIES_PER_OWNER = 8


def reuse_allowed() -> bool:
    """Whether a result computed now may be read back later: while tracing, or eagerly inside `one_call`."""
    return not tf.executing_eagerly() or getattr(_scope, "depth", 0) > 0


@contextlib.contextmanager
def one_call():
    """Eager calls inside share results as traced ones do; leaving the outermost scope forgets them all.

    Example:
      >>> with one_call():
      ...     z = bijector.inverse(x)
      ...     ildj = bijector.inverse_log_det_jacobian(x, event_ndims=1)   # no second network pass
    """
    depth = getattr(_scope, "depth", 0)
    if depth == 0:
        _scope.forget = {}
        _scope.entries = {}
    _scope.depth = depth + 1
    try:
        yield
    finally:
        _scope.depth = depth
        if depth == 0:
            forget, _scope.forget = _scope.forget, {}
            _scope.entries = {}
            for drop in forget.values():
                drop()


def _forget_after_call(key, drop) -> None:
    """Registers `drop()` to run when the current eager `one_call` ends (nothing to do while tracing)."""
    if tf.executing_eagerly() and getattr(_scope, "depth", 0) > 0:
        _scope.forget.setdefault(key, drop)


# ------------------------------------------------------------------------------------------------ the memo
# Traced entries live with their owner (dropped when it is collected) and hold their graph's tensors weakly: a
# graph's tensors live exactly as long as the graph, so an entry dies with the trace that made it and keeps
# nothing of it alive. Eager entries live in the `one_call` scope and hold their values strongly (nothing else
# keeps an intermediate result alive between two calls of one scoring call); they go when the scope ends.
# Tensors in keys are always held weakly: they match by identity, so only a tensor still alive can match.
_traced_entries: dict[int, list] = {}


class _Weak:
    """A tensor held weakly inside a remembered structure."""

    __slots__ = ("ref",)

    def __init__(self, tensor):
        self.ref = weakref.ref(tensor)


def _hold(structure, symbolic_only: bool):
    def hold(leaf):
        weak = tf.is_tensor(leaf) and (tf.is_symbolic_tensor(leaf) or not symbolic_only)
        return _Weak(leaf) if weak else leaf

    return tf.nest.map_structure(hold, structure)


def _release(structure):
    """The structure with its weakly held tensors back, or None if one of them is gone."""
    leaves = []
    for leaf in tf.nest.flatten(structure):
        if isinstance(leaf, _Weak):
            leaf = leaf.ref()
            if leaf is None:
                return None
        leaves.append(leaf)
    return tf.nest.pack_sequence_as(structure, leaves)


def _same_leaf(a, b) -> bool:
    if isinstance(a, _Weak):
        a = a.ref()
        return a is not None and a is b
    if a is b:
        return True
    if tf.is_tensor(a) or tf.is_tensor(b):
        return False  # tensors match by identity only: equal values computed elsewhere may differ next run
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays and other values without a plain truth value
        return False


def _same_key(stored, key) -> bool:
    """Whether `key` has the structure of the `stored` key (dict keys included) and the same leaves."""
    if isinstance(stored, dict):
        return (isinstance(key, dict) and stored.keys() == key.keys()
                and all(_same_key(stored[name], key[name]) for name in stored))
    if isinstance(stored, (list, tuple)):
        return isinstance(key, (list, tuple)) and len(stored) == len(key) and all(map(_same_key, stored, key))
    return _same_leaf(stored, key)


def _current_graph():
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def _graph_ref(graph):
    return None if graph is None else weakref.ref(graph)


def _entries_of(owner, create: bool):
    """The list of `owner`'s entries for the current context (eager scope or traces), made if `create`."""
    if not tf.executing_eagerly():
        if create and id(owner) not in _traced_entries:
            weakref.finalize(owner, _traced_entries.pop, id(owner), None)
        return _traced_entries.setdefault(id(owner), []) if create else _traced_entries.get(id(owner))
    store = getattr(_scope, "entries", None)
    if store is None:
        return None
    # The scope holds the owner too, so its id cannot pass to another object while the entries last.
    owner_and_entries = store.setdefault(id(owner), (owner, [])) if create else store.get(id(owner))
    return None if owner_and_entries is None else owner_and_entries[1]


def remember(owner, tensor, value, key=None) -> None:
    """Lets `recall(owner, tensor, key)` return `value` later in this trace or eager `one_call`.

    `tensor` is a tensor `owner` saw or returned; `value` any structure of tensors and Python values computed
    with it; `key` the rest of what the value depends on (keyword arguments such as a `conditional_input`, a
    direction, an event rank): tensors in it must later be the very same objects, other values equal. Where
    reuse is not allowed (eagerly outside `one_call`) nothing is kept.
    """
    if not reuse_allowed():
        return
    entries = _entries_of(owner, create=True)
    entry = (weakref.ref(tensor), _hold(key, symbolic_only=False), _hold(value, symbolic_only=True),
             _graph_ref(_current_graph()))
    entries.insert(0, entry)
    del entries[_ENTRIES_PER_OWNER:]


def recall(owner, tensor, key=None):
    """What `owner` remembered with this very `tensor` and an equal `key` in the current graph, or None."""
    if not reuse_allowed():
        return None
    entries = _entries_of(owner, create=False)
    if not entries:
        return None
    graph = _current_graph()
    for ref, stored_key, value, graph_ref in list(entries):
        # Eager entries (no graph) live only in the eager scope's store, traced ones only in the traced store.
        if ref() is tensor and (graph_ref is None or graph_ref() is graph) and _same_key(stored_key, key):
            return _release(value)
    return None


# ------------------------------------------------------------------------------------------------ TFP's cache
def _note_eager_use(storage) -> None:
    # A cache consulted eagerly inside a scoring call forgets that call's entries when the call ends.
    _forget_after_call(("cache", id(storage)), lambda: drop_eager_entries(storage))


TracedOnlyCache, TracedOnlyGreedyCache = gated_cache_types(reuse_allowed, _note_eager_use)


def traced_only_cache(forward_name: str = "_forward", inverse_name: str = "_inverse", greedy: bool = False):
    """An unbound cache to assign as a bijector class's `_cache` (TFP binds it to each instance)."""
    cls = TracedOnlyGreedyCache if greedy else TracedOnlyCache
    return cls(forward_name=forward_name, inverse_name=inverse_name)


def cache_in_traces_only(bijector) -> None:
    """Give `bijector` and every bijector nested in it (chains, `tfb.Invert`, ...) the traced-only cache.

    This package's bijectors choose their own (traced-only) caches; the TFP containers a flow is built from
    cache too, and a chain keeps `inverse(x)` for as long as the caller holds `x` (a sample kept for a later
    plot), across a weight update. TFP bijectors that return their log-det with their output (`tfb.FFJORD`)
    keep doing so, within the same limits. The builders' flows and the surrogates of `tfp_nvp.inference` call this on
    their bijector.
    """
    for b in (bijector, *bijector.submodules):
        if isinstance(b, tfb.Bijector):
            use_gated_cache(b, (TracedOnlyCache, TracedOnlyGreedyCache))
