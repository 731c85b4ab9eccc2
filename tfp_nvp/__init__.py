"""tfp_nvp: normalizing flows as TensorFlow Probability bijectors with Keras 3 networks."""

import os as _os

# Keras 3 must run on TensorFlow: TFP bijectors call TF ops on the networks' outputs.
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfp_nvp import data, images, networks, nn  # noqa: E402
from tfp_nvp.bijectors import (  # noqa: E402
    ActNorm,
    AffineCoupling,
    AffineTransformer,
    ConditionalAffine,
    Coupling,
    FactorOut,
    InverseAutoregressive,
    Invertible1x1Conv,
    InvertibleChain,
    LeakyReLU,
    LogitTransform,
    MaskedAutoregressive,
    OnChannels,
    SplineCoupling,
    SplineTransformer,
    Squeeze,
    Transformer,
)
from tfp_nvp.flows import (  # noqa: E402
    ConditionedFlow,
    condition,
    conditional_kwargs,
    ffjord,
    flow_bijectors,
    flow_layers,
    glow,
    iaf,
    maf,
    real_nvp,
    spline_flow,
    standard_normal,
)
from tfp_nvp.inference import neutra_initial_state, neutra_kernel, neutra_trace_fn, surrogate_posterior  # noqa: E402
from tfp_nvp.models import (  # noqa: E402
    FlowLayer,
    FlowModel,
    FusedAdam,
    NegativeLogLikelihood,
    WarmupCosineDecay,
    export_flow,
    initialize,
)

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "AffineTransformer",
    "ConditionalAffine",
    "Coupling",
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
    "SplineTransformer",
    "Squeeze",
    "Transformer",
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
