"""TFP bijectors whose parameters live in Keras 3 layers (one bijector a file)."""

from tfp_nvp.bijectors._base import KerasParameterizedBijector, ParameterLayer
from tfp_nvp.bijectors.coupling import AffineCoupling

__all__ = ["AffineCoupling", "KerasParameterizedBijector", "ParameterLayer"]
