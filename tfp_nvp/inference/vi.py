"""Flow surrogate posteriors for TFP JointDistribution models, and NeuTra MCMC in the flow's Gaussianised space.

`surrogate_posterior(target)` turns any flow builder of this package (a flow over flat vectors `[D]`) into a
distribution over the latent variables of a pinned JointDistribution: samples have the model's structure and lie
in the model's support, `log_prob` is exact, and `tfp.vi.fit_surrogate_posterior` trains it. `neutra_kernel` then
runs NUTS or HMC on the flow's base space and returns states in the model's structure.
"""

from __future__ import annotations

import collections.abc
import inspect

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp._compat import TransformedDistribution, flat_part_names
from tfp_nvp.bijectors._reuse import cache_in_traces_only, one_call
from tfp_nvp.flows import BUILDERS

tfb, tfd = tfp.bijectors, tfp.distributions
_Pinned = tfp.experimental.distributions.JointDistributionPinned

__all__ = ["surrogate_posterior", "neutra_kernel", "neutra_initial_state", "neutra_trace_fn", "FLOW_NAMES"]

# Builder names `surrogate_posterior` accepts, mapped to their names in `tfp_nvp.flows.BUILDERS`.
FLOW_NAMES = {"real_nvp": "real_nvp", "maf": "maf", "iaf": "iaf", "spline": "spline_flow",
              "spline_flow": "spline_flow"}
# Coupling flows transform one half of the vector conditioned on the other: they need two dimensions at least.
_COUPLING_FLOWS = ("real_nvp", "spline_flow")


def _is_joint(dist) -> bool:
    return isinstance(dist, (tfd.JointDistribution, _Pinned))


def _part_names(structure, jd=None) -> list[str]:
    """Names of the flattened parts of `structure` (in `tf.nest` order), for messages."""
    if hasattr(structure, "_fields"):
        return list(structure._fields)
    if isinstance(structure, collections.abc.Mapping):
        return [str(k) for k in sorted(structure)]
    count = len(tf.nest.flatten(structure))
    try:  # JointDistributionSequential names its parts after the lambdas' arguments.
        names = list(flat_part_names(jd))
        if len(names) == count:
            return names
    except Exception:  # noqa: BLE001 - a name is a nicety for the message, never worth an error
        pass
    return [str(i) for i in range(count)]


def _pinned_target(target, pins):
    if not _is_joint(target):
        raise TypeError(
            "`target` must be a TFP JointDistribution pinned to the observed data (`model.experimental_pin(y=...)`) "
            f"or an unpinned JointDistribution together with `pins`; got {type(target).__name__}."
        )
    if isinstance(target, _Pinned):
        if pins is not None:
            raise ValueError("`pins` is for an unpinned JointDistribution; `target` is already pinned (drop `pins`).")
        return target
    if pins is None:
        raise ValueError(
            "`target` is an unpinned JointDistribution: pass the observed values as `pins={'y': y_observed}` "
            "(or pin it yourself with `target.experimental_pin(y=y_observed)`); the surrogate approximates the "
            "posterior of the remaining parts (`pins={}` if nothing is observed)."
        )
    if not isinstance(pins, collections.abc.Mapping):
        raise ValueError(f"`pins` must be a dict from part name to observed value; got {pins!r}.")
    # `pins={}`: nothing is observed (a funnel, a prior), so the surrogate approximates the model itself.
    return target.experimental_pin(**pins) if pins else target


def _model_of(target):
    return target.distribution if isinstance(target, _Pinned) else target


def _check_scalar_batch(pinned):
    model = _model_of(pinned)
    shapes = tf.nest.flatten(model.batch_shape)
    names = _part_names(model.batch_shape, model) if len(shapes) > 1 else ["(whole model)"]
    batched = [(n, s) for n, s in zip(names, shapes) if s.rank is None or s.rank > 0]
    if batched:
        detail = ", ".join(f"{n!r} has batch shape {s}" for n, s in batched)
        raise ValueError(
            f"`target` must have scalar batch shape (one posterior, one joint log-density per sample); {detail}. "
            "Wrap such parts in tfd.Independent(..., reinterpreted_batch_ndims=...) so their dimensions become event "
            "dimensions, or use the AutoBatched flavour (JointDistributionCoroutineAutoBatched etc.), which "
            "treats them so itself."
        )


def _latent_layout(pinned, dtype):
    """The model-side plumbing: unconstrained shapes and sizes of the latent parts and their common dtype."""
    event_space = pinned.experimental_default_event_space_bijector()
    structure = pinned.event_shape
    names = _part_names(structure, _model_of(pinned))
    dtypes = tf.nest.flatten(pinned.dtype)
    non_float = [f"{n!r} ({d.name})" for n, d in zip(names, dtypes) if not d.is_floating]
    if non_float:
        raise ValueError(
            f"every unpinned part of `target` must be continuous for a flow surrogate; {', '.join(non_float)} is "
            "not: pin it, or marginalise it out of the model."
        )
    if len(set(dtypes)) > 1:
        raise ValueError(
            "the unpinned parts of `target` must share one floating dtype (the flow computes in one); got "
            + ", ".join(f"{n!r}: {d.name}" for n, d in zip(names, dtypes)) + "."
        )
    model_dtype = dtypes[0]
    if dtype is not None and tf.as_dtype(dtype) != model_dtype:
        raise ValueError(
            f"`dtype` must match the latent parts of `target` ({model_dtype.name}): the surrogate does not cast "
            f"between the flow and the model; got {tf.as_dtype(dtype).name}."
        )
    shapes = tf.nest.flatten(event_space.inverse_event_shape(structure))
    undefined = [n for n, s in zip(names, shapes) if not s.is_fully_defined()]
    if undefined:
        raise ValueError(f"the event shapes of the latent parts {undefined} of `target` must be known statically.")
    shapes = [s.as_list() for s in shapes]
    sizes = [int(np.prod(s)) for s in shapes]
    return event_space, structure, shapes, sizes, model_dtype


def _outer_bijector(event_space, structure, shapes, sizes):
    """Flat unconstrained vector `[D]` -> the model's structure, in the model's support."""
    index_structure = tf.nest.pack_sequence_as(structure, list(range(len(sizes))))
    reshapes = tf.nest.pack_sequence_as(
        structure, [tfb.Reshape(event_shape_out=s, event_shape_in=[d]) for s, d in zip(shapes, sizes)])
    # No tfb.Identity placed after the JointMap: inside a Chain it breaks TFP's inference of the parts' structure.
    return tfb.Chain([event_space, tfb.JointMap(reshapes), tfb.Restructure(index_structure), tfb.Split(sizes)],
                     name="to_model_structure")


def _builder_by_name(name: str):
    if name not in FLOW_NAMES:
        raise ValueError(f"`flow` names an unknown flow builder {name!r}; available: {sorted(FLOW_NAMES)}.")
    return FLOW_NAMES[name], BUILDERS[FLOW_NAMES[name]]


def _call_builder(builder, builder_name, num_dims, dtype, seed, name, flow_kwargs):
    kwargs = dict(flow_kwargs or {})
    try:
        accepted = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key, value in (("dtype", dtype.name), ("seed", seed), ("name", name)):
        if key not in kwargs and value is not None and (key in accepted or takes_any):
            kwargs[key] = value
    if num_dims == 1 and builder_name in _COUPLING_FLOWS:
        raise ValueError(
            f"the latent space of `target` has a single unconstrained dimension, and `flow={builder_name!r}` is a "
            "coupling flow, which needs two at least (it transforms one part of the vector given the other). Use "
            "flow='iaf' or 'maf' (on one dimension: a learned affine map, a Gaussian in the unconstrained "
            "space), or pass a ready flow distribution over [1]."
        )
    flow = builder([num_dims], **kwargs)
    if not isinstance(flow, tfd.Distribution):
        raise TypeError(f"the flow builder {builder_name!r} must return a tfd.Distribution; got {type(flow).__name__}.")
    return flow


def _check_flow(flow, num_dims, dtype):
    if not isinstance(getattr(flow, "bijector", None), tfb.Bijector) or not isinstance(
            getattr(flow, "distribution", None), tfd.Distribution):
        raise TypeError(
            "`flow` must be a builder name, a builder callable, or a transformed distribution (a base distribution "
            f"pushed through a bijector) over vectors [D]; got {type(flow).__name__}."
        )
    if flow.event_shape.as_list() != [num_dims] or flow.batch_shape.rank != 0:
        raise ValueError(
            f"`flow` must be a distribution with event shape [{num_dims}] (the number of unconstrained latent "
            f"dimensions of `target`) and batch shape []; got event shape {flow.event_shape} and batch shape "
            f"{flow.batch_shape}."
        )
    if flow.dtype != dtype:
        raise ValueError(f"`flow` computes in {flow.dtype.name} but the latents of `target` are {dtype.name}.")
    return flow


class _FlowSurrogate(TransformedDistribution):
    """A flow's base distribution pushed through `transport` = model structure ∘ flow bijector."""

    def __init__(self, flow, outer, num_latent_dims, validate_args=False, name=None):
        parameters = dict(locals())
        self._flow = flow
        self._outer = outer
        self._num_latent_dims = num_latent_dims
        transport = tfb.Chain([outer, flow.bijector], name=f"{name}_transport")
        cache_in_traces_only(transport)
        super().__init__(flow.distribution, transport, validate_args=validate_args, parameters=parameters, name=name)

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # The flow and the plumbing are fixed parts of the architecture: batchable parameters are the parent's.
        return TransformedDistribution._parameter_properties(dtype, num_classes=num_classes)

    # Eagerly as in a trace, a scoring call's bijector results are shared within it and dropped after it.
    def _log_prob(self, x, **kwargs):
        with one_call():
            return super()._log_prob(x, **kwargs)

    def _sample_and_log_prob(self, sample_shape, seed, **kwargs):
        with one_call():
            return super()._sample_and_log_prob(sample_shape, seed=seed, **kwargs)

    @property
    def flow(self) -> tfd.Distribution:
        """The flow over flat unconstrained vectors `[D]` inside the surrogate."""
        return self._flow

    @property
    def transport(self) -> tfb.Bijector:
        """Bijector from the flow's base space `[D]` to the model's structure and support (`forward`)."""
        return self.bijector

    @property
    def to_model_structure(self) -> tfb.Bijector:
        """Bijector from the flat unconstrained vector `[D]` to the model's structure and support."""
        return self._outer

    @property
    def num_latent_dims(self) -> int:
        """`D`, the number of unconstrained latent dimensions."""
        return self._num_latent_dims


def surrogate_posterior(target, flow="real_nvp", *, pins=None, seed=None, flow_kwargs=None, dtype=None,
                        validate_args=False, name=None):
    """A normalizing-flow surrogate posterior over the unpinned latents of a JointDistribution model.

    `target` is a model pinned to its observations, `model.experimental_pin(y=y_obs)`, of any flavour
    (JointDistributionCoroutine, Sequential, Named and their AutoBatched variants), or the unpinned model with
    `pins={"y": y_obs}` (`pins={}` when nothing is observed: the surrogate then approximates the model itself,
    e.g. Neal's funnel). The surrogate is a flow over the flat vector of all unconstrained latent dimensions `[D]`,
    cut into the latent parts (`tfb.Split`, `tfb.Reshape`, `tfb.Restructure`) and mapped into the model's
    support by `target.experimental_default_event_space_bijector()` (softplus for a HalfNormal scale, ...):

    - samples have the model's structure (tuple, namedtuple, list or dict exactly as `target.sample_unpinned`),
      each part with its own shape and dtype, in the support;
    - `log_prob` of such a structure is exact: the flow's log-density of the flat unconstrained vector minus the
      event-space bijector's log-determinant.

    `flow` is a builder name (`"real_nvp"`, `"maf"`, `"iaf"`, `"spline"`; see `FLOW_NAMES`), any builder callable
    taking `event_shape=[D]` (built with `flow_kwargs`, plus `seed`, `dtype` and `name` when it accepts them), or a
    ready flow distribution over `[D]` (check `D` with a first surrogate's `num_latent_dims`). Coupling flows need
    `D >= 2`; for a single latent dimension use `"iaf"` / `"maf"` (an affine map there) or a ready flow.
    The model must have scalar batch shape: in the non-AutoBatched flavours, wrap vector parts in
    `tfd.Independent`. All latent parts must share one floating dtype, the flow's (`dtype`, by default theirs).

    Training, the TFP door (`surrogate.trainable_variables` lists every flow weight):

      >>> pinned = model.experimental_pin(y=y_obs)
      >>> q = tfp_nvp.surrogate_posterior(pinned, "real_nvp", seed=0,
      ...                                 flow_kwargs=dict(num_coupling_layers=4, hidden_units=(32, 32)))
      >>> losses = tfp.vi.fit_surrogate_posterior(pinned.unnormalized_log_prob, q,
      ...                                         tf.keras.optimizers.Adam(1e-2), num_steps=1000, seed=1)
      >>> draws = q.sample(1000, seed=2)   # the model's structure, e.g. draws.scale, draws.theta

    The Keras door: the weights live in Keras 3 layers, `tfp_nvp.flow_layers(q)`; `tfp_nvp.FlowModel(q.flow)`
    tracks the same variables for `save_weights` / `load_weights` (its `fit` is maximum likelihood on data, not
    variational inference). `q.flow` is the flow over `[D]`, `q.transport` the bijector from the flow's base
    space to the model (what `neutra_kernel` uses), `q.to_model_structure` the part after the flow.
    """
    pinned = _pinned_target(target, pins)
    _check_scalar_batch(pinned)
    event_space, structure, shapes, sizes, model_dtype = _latent_layout(pinned, dtype)
    num_dims = sum(sizes)
    if num_dims == 0:
        raise ValueError("`target` has no unpinned latent dimensions left to approximate.")
    name = name or "surrogate_posterior"
    if isinstance(flow, str):
        builder_name, builder = _builder_by_name(flow)
        flow = _call_builder(builder, builder_name, num_dims, model_dtype, seed, f"{name}_flow", flow_kwargs)
    elif isinstance(flow, tfd.Distribution):
        if flow_kwargs is not None:
            raise ValueError("`flow_kwargs` is for a builder; `flow` is a ready distribution (drop `flow_kwargs`).")
    elif callable(flow):
        flow = _call_builder(flow, getattr(flow, "__name__", "flow"), num_dims, model_dtype, seed, f"{name}_flow",
                             flow_kwargs)
    else:
        raise TypeError(
            f"`flow` must be a builder name (one of {sorted(FLOW_NAMES)}), a builder callable or a flow "
            f"distribution; got {type(flow).__name__}."
        )
    flow = _check_flow(flow, num_dims, model_dtype)
    outer = _outer_bijector(event_space, structure, shapes, sizes)
    return _FlowSurrogate(flow, outer, num_dims, validate_args=validate_args, name=name)


# ------------------------------------------------------------------------------------------------------------ NeuTra
class _StructuredStateKernel(tfp.mcmc.TransitionKernel):
    """Presents a kernel on the flat unconstrained vector `[D]` as one on the model's structure and support."""

    def __init__(self, inner_kernel, to_model_structure, name=None):
        self._inner_kernel = inner_kernel
        self._to_model = to_model_structure
        self._parameters = dict(inner_kernel=inner_kernel, to_model_structure=to_model_structure, name=name)

    @property
    def inner_kernel(self):
        return self._inner_kernel

    @property
    def parameters(self):
        return self._parameters

    @property
    def is_calibrated(self):
        return self._inner_kernel.is_calibrated

    def one_step(self, current_state, previous_kernel_results, seed=None):
        flat, results = self._inner_kernel.one_step(self._to_model.inverse(current_state), previous_kernel_results,
                                                    seed=seed)
        return self._to_model.forward(flat), results

    def bootstrap_results(self, init_state):
        return self._inner_kernel.bootstrap_results(self._to_model.inverse(init_state))


def _log_prob_fn(target):
    if isinstance(target, _Pinned):
        return target.unnormalized_log_prob
    if _is_joint(target):
        raise ValueError("`target` is an unpinned JointDistribution: pin the observations first, "
                         "`model.experimental_pin(y=y_obs)`, or pass `model.log_prob` if nothing is observed.")
    if callable(target):
        return target
    raise TypeError("`target` must be a pinned JointDistribution or a callable returning the log-density of one "
                    f"structured state; got {type(target).__name__}.")


def neutra_kernel(target, surrogate, *, kernel="nuts", step_size=0.1, num_leapfrog_steps=None, max_tree_depth=10,
                  num_adaptation_steps=None, target_accept_prob=None):
    """NeuTra MCMC: NUTS or HMC run in the flow's base space of a trained `surrogate_posterior`.

    Returns a `tfp.mcmc.TransitionKernel` whose states have the model's structure. Inside,
    `tfp.mcmc.TransformedTransitionKernel(NUTS or HMC, bijector=surrogate.flow.bijector)` runs the sampler on the
    flow's base vector `z` (`[D]`), where a well-trained surrogate makes the posterior close to a standard normal,
    so one step size fits every direction; each state is mapped back through the flow, then into the model's
    structure and support by `surrogate.to_model_structure` (together: `surrogate.transport`). With `num_adaptation_steps` set (a number below the burn-in), the step size is tuned by
    `tfp.mcmc.DualAveragingStepSizeAdaptation` towards `target_accept_prob` (default 0.8 for NUTS, 0.75 for
    HMC); with `None` it stays `step_size`.

    `target` is the pinned model (`model.experimental_pin(y=y_obs)`) or a callable returning the log-density of
    one structured state. `kernel="hmc"` needs `num_leapfrog_steps`; `max_tree_depth` bounds NUTS trajectories.

    Example (4 chains; `q` trained with `tfp.vi.fit_surrogate_posterior`):

      >>> kernel = tfp_nvp.neutra_kernel(pinned, q, kernel="nuts", step_size=0.5, num_adaptation_steps=400)
      >>> init = tfp_nvp.neutra_initial_state(q, num_chains=4, seed=1)
      >>> draws, trace = tfp.mcmc.sample_chain(
      ...     num_results=1000, num_burnin_steps=500, current_state=init, kernel=kernel,
      ...     trace_fn=tfp_nvp.neutra_trace_fn, seed=2)
      >>> draws.theta.shape                          # [1000, 4, ...]: the model's structure, chains second
      >>> tfp.mcmc.potential_scale_reduction(draws)  # R-hat per part
      >>> tfp.mcmc.effective_sample_size(draws)      # ESS per part and chain; per gradient evaluation:
      >>> tf.reduce_sum(trace["leapfrogs"])          # the gradient evaluations of the kept steps, all chains

    Run it under `tf.function(jit_compile=True)` for speed.
    """
    log_prob = _log_prob_fn(target)
    if not isinstance(surrogate, _FlowSurrogate):
        raise TypeError(f"`surrogate` must come from tfp_nvp.surrogate_posterior; got {type(surrogate).__name__}.")
    if kernel not in ("nuts", "hmc"):
        raise ValueError(f"`kernel` must be 'nuts' or 'hmc'; got {kernel!r}.")
    if kernel == "hmc" and (num_leapfrog_steps is None or isinstance(num_leapfrog_steps, bool)
                            or int(num_leapfrog_steps) != num_leapfrog_steps or num_leapfrog_steps <= 0):
        raise ValueError(f"`kernel='hmc'` needs `num_leapfrog_steps`, a positive integer; got {num_leapfrog_steps!r}.")
    if num_adaptation_steps is not None and (isinstance(num_adaptation_steps, bool)
                                             or int(num_adaptation_steps) != num_adaptation_steps
                                             or num_adaptation_steps < 0):
        raise ValueError(f"`num_adaptation_steps` must be a non-negative integer or None; got {num_adaptation_steps!r}.")
    to_model = surrogate.to_model_structure

    # The sampler's state is the flat unconstrained vector; the density there includes the log-determinant of
    # the map into the model's structure and support. TransformedTransitionKernel then moves the chain to the
    # flow's base space, and the wrapper below presents states in the model's structure.
    def flat_log_prob(flat):
        return log_prob(to_model.forward(flat)) + to_model.forward_log_det_jacobian(flat, event_ndims=1)

    dtype = surrogate.flow.dtype
    step_size = tf.convert_to_tensor(step_size, dtype=dtype)
    if kernel == "nuts":
        sampler = tfp.mcmc.NoUTurnSampler(flat_log_prob, step_size=step_size, max_tree_depth=max_tree_depth)
    else:
        # Parameters kept in the results: without them HMC's initial results hold an empty leapfrog count,
        # which `neutra_trace_fn` (and any trace reading it) cannot use when no step-size adaptation runs.
        sampler = tfp.mcmc.HamiltonianMonteCarlo(flat_log_prob, step_size=step_size,
                                                 num_leapfrog_steps=int(num_leapfrog_steps),
                                                 store_parameters_in_results=True)
    inner = tfp.mcmc.TransformedTransitionKernel(sampler, bijector=surrogate.flow.bijector)
    if num_adaptation_steps:
        if target_accept_prob is None:
            target_accept_prob = 0.8 if kernel == "nuts" else 0.75
        inner = tfp.mcmc.DualAveragingStepSizeAdaptation(
            inner, num_adaptation_steps=int(num_adaptation_steps),
            target_accept_prob=tf.constant(target_accept_prob, dtype))
    return _StructuredStateKernel(inner, to_model, name="neutra")


def neutra_initial_state(surrogate, num_chains: int, seed=None):
    """Starting states for `num_chains` NeuTra chains: surrogate samples, in the model's structure.

    Each is the flow's image of a standard-normal base draw, so the chains start where the surrogate puts its
    mass, which for a trained surrogate is where the posterior does.
    """
    if not isinstance(surrogate, _FlowSurrogate):
        raise TypeError(f"`surrogate` must come from tfp_nvp.surrogate_posterior; got {type(surrogate).__name__}.")
    if isinstance(num_chains, bool) or int(num_chains) != num_chains or num_chains <= 0:
        raise ValueError(f"`num_chains` must be a positive integer; got {num_chains!r}.")
    return surrogate.sample(int(num_chains), seed=seed)


def _sampler_results(kernel_results):
    # Step-size adaptation and TransformedTransitionKernel nest the sampler's results under `inner_results`.
    while not hasattr(kernel_results, "is_accepted"):
        kernel_results = kernel_results.inner_results
    return kernel_results


def neutra_trace_fn(state, kernel_results) -> dict:
    """A `trace_fn` for `tfp.mcmc.sample_chain` with a `neutra_kernel`: per step and chain, whether the proposal
    was accepted (`is_accepted`), the leapfrog steps (gradient evaluations) taken (`leapfrogs`) and the step size
    used (`step_size`)."""
    del state
    results = _sampler_results(kernel_results)
    if hasattr(results, "leapfrogs_taken"):  # NUTS
        leapfrogs, step_size = results.leapfrogs_taken, results.step_size
    else:  # HMC: Metropolis-Hastings around the uncalibrated leapfrog integrator
        inner = results.accepted_results
        leapfrogs = tf.fill(tf.shape(results.is_accepted), tf.cast(inner.num_leapfrog_steps, tf.int32))
        step_size = inner.step_size
    step_size = tf.nest.flatten(step_size)[0]
    return {"is_accepted": results.is_accepted, "leapfrogs": tf.cast(leapfrogs, tf.int32), "step_size": step_size}
