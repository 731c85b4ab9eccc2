"""TFP bijectors whose parameters live in Keras 3 layers (one bijector a file)."""

from tfp_nvp.bijectors._base import KerasParameterizedBijector, ParameterLayer
from tfp_nvp.bijectors.actnorm import ActNorm
from tfp_nvp.bijectors.autoregressive import InverseAutoregressive, MaskedAutoregressive
from tfp_nvp.bijectors.conditional_affine import ConditionalAffine
from tfp_nvp.bijectors.conv1x1 import Invertible1x1Conv
from tfp_nvp.bijectors.coupling import AffineCoupling, Coupling
from tfp_nvp.bijectors.factor_out import FactorOut, OnChannels
from tfp_nvp.bijectors.ffjord import FFJORDFlow
from tfp_nvp.bijectors.invertible_chain import InvertibleChain
from tfp_nvp.bijectors.leaky_relu import LeakyReLU
from tfp_nvp.bijectors.logit import LogitTransform
from tfp_nvp.bijectors.spline import SplineCoupling
from tfp_nvp.bijectors.squeeze import Squeeze
from tfp_nvp.bijectors.transformers import AffineTransformer, SplineTransformer, Transformer

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "AffineTransformer",
    "ConditionalAffine",
    "Coupling",
    "FFJORDFlow",
    "FactorOut",
    "InverseAutoregressive",
    "Invertible1x1Conv",
    "InvertibleChain",
    "KerasParameterizedBijector",
    "LeakyReLU",
    "LogitTransform",
    "MaskedAutoregressive",
    "OnChannels",
    "ParameterLayer",
    "SplineCoupling",
    "SplineTransformer",
    "Squeeze",
    "Transformer",
]
