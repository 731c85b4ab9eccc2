"""tfp_nvp: normalizing flows as TensorFlow Probability bijectors with Keras 3 networks."""

import os as _os

# Keras 3 must run on TensorFlow: TFP bijectors call TF ops on the networks' outputs.
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tfp_nvp import networks  # noqa: E402
from tfp_nvp.bijectors import AffineCoupling  # noqa: E402
from tfp_nvp.flows import conditional_kwargs, flow_bijectors, real_nvp, standard_normal  # noqa: E402
from tfp_nvp.keras import FlowModel, flow_layers  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AffineCoupling",
    "FlowModel",
    "conditional_kwargs",
    "flow_bijectors",
    "flow_layers",
    "networks",
    "real_nvp",
    "standard_normal",
]
