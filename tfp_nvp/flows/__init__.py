"""Builders: each chains bijectors into a `tfd.TransformedDistribution` (one builder a file).

`BUILDERS` names every builder a saved flow may name (`FlowModel` and `FlowLayer` write the builder and its
arguments into `.keras` files, and `from_spec` rebuilds the flow from them). It is written out here, so what a
file can load never depends on which modules happen to have been imported.
"""

from __future__ import annotations

from tfp_nvp.flows._base import SPEC_FORMAT, standard_normal
from tfp_nvp.flows.autoregressive import iaf, maf
from tfp_nvp.flows.conditioned import ConditionedFlow, condition
from tfp_nvp.flows.ffjord import ffjord
from tfp_nvp.flows.glow import glow
from tfp_nvp.flows.real_nvp import real_nvp
from tfp_nvp.flows.routing import conditional_kwargs, flow_bijectors, flow_layers, is_conditional
from tfp_nvp.flows.spline_flow import spline_flow

__all__ = ["BUILDERS", "ConditionedFlow", "condition", "conditional_kwargs", "ffjord", "flow_bijectors",
           "flow_layers", "from_spec", "glow", "iaf", "is_conditional", "maf", "real_nvp", "spline_flow",
           "standard_normal"]

BUILDERS = {
    "real_nvp": real_nvp,
    "spline_flow": spline_flow,
    "glow": glow,
    "maf": maf,
    "iaf": iaf,
    "ffjord": ffjord,
}


def from_spec(spec: dict):
    """The flow a builder spec (what `FlowModel` and `FlowLayer` write into `.keras` files) describes.

    Refuses, with the reason, specs this version would rebuild into a different function: those of unknown
    builders, of a newer format, and the "sigmoid" log-scale bound of files written before its orientation
    was GLOW's (their weights were trained for the inverse transformer; loading them would silently change
    every density the model gives).
    """
    builder, config, version = spec.get("builder"), spec.get("config", {}), spec.get("format", 1)
    if builder not in BUILDERS:
        raise ValueError(f"The saved flow names builder {builder!r}, which this tfp_nvp does not have "
                         f"(it has {', '.join(sorted(BUILDERS))}).")
    if version > SPEC_FORMAT:
        raise ValueError(f"The saved {builder} flow was written by a newer tfp_nvp (spec format {version}; this "
                         f"version reads up to {SPEC_FORMAT}): upgrade tfp_nvp to load it.")
    if version < 2 and config.get("log_scale_bound") == "sigmoid":
        raise ValueError(
            f"The saved {builder} flow uses log_scale_bound='sigmoid' and was written by a tfp_nvp older than "
            "2026-11-27, whose sigmoid bound scaled the latent -> data pass; this version scales the data -> "
            "latent pass (GLOW's orientation), so its weights would give different densities and samples. "
            f"Retrain it, or rebuild the flow with tfp_nvp.{builder}(...) and call load_weights to start "
            "from its weights.")
    return BUILDERS[builder](**config)
