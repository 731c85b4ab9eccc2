"""tfp_nvp: normalizing flows as TensorFlow Probability bijectors with Keras 3 networks."""

import os as _os

# Keras 3 must run on TensorFlow: TFP bijectors call TF ops on the networks' outputs.
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfp_nvp import data, images, networks  # noqa: E402
from tfp_nvp.bijectors import (  # noqa: E402
    ActNorm,
    AffineCoupling,
    ConditionalAffine,
    FactorOut,
    InverseAutoregressive,
    Invertible1x1Conv,
    InvertibleChain,
    LeakyReLU,
    LogitTransform,
    MaskedAutoregressive,
    OnChannels,
    SplineCoupling,
    Squeeze,
)
from tfp_nvp.flows import conditional_kwargs, flow_bijectors, glow, real_nvp, spline_flow, standard_normal  # noqa: E402
from tfp_nvp.autoregressive import iaf, maf  # noqa: E402
from tfp_nvp.ffjord import ffjord  # noqa: E402
from tfp_nvp.keras import FlowModel, flow_layers  # noqa: E402
from tfp_nvp.schedules import WarmupCosineDecay  # noqa: E402
from tfp_nvp.optimizers import FusedAdam  # noqa: E402
from tfp_nvp.layers import FlowLayer, NegativeLogLikelihood  # noqa: E402
from tfp_nvp.conditioned import ConditionedFlow, condition  # noqa: E402
from tfp_nvp.initialize import initialize  # noqa: E402  (rebinds the submodule name to the function)
from tfp_nvp.export import export_flow  # noqa: E402
from tfp_nvp.vi import neutra_initial_state, neutra_kernel, neutra_trace_fn, surrogate_posterior  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "ConditionalAffine",
    "ConditionedFlow",
    "FactorOut",
    "FlowLayer",
    "FlowModel",
    "FusedAdam",
    "InverseAutoregressive",
    "Invertible1x1Conv",
    "InvertibleChain",
    "LeakyReLU",
    "LogitTransform",
    "MaskedAutoregressive",
    "NegativeLogLikelihood",
    "OnChannels",
    "SplineCoupling",
    "Squeeze",
    "WarmupCosineDecay",
    "condition",
    "conditional_kwargs",
    "data",
    "export_flow",
    "ffjord",
    "flow_bijectors",
    "flow_layers",
    "glow",
    "iaf",
    "images",
    "initialize",
    "maf",
    "networks",
    "neutra_initial_state",
    "neutra_kernel",
    "neutra_trace_fn",
    "real_nvp",
    "spline_flow",
    "standard_normal",
    "surrogate_posterior",
]
