"""Keras 3 networks that parameterize the bijectors: every learnable function of the package lives here.

* `DenseNetwork`, `ConvResNet`: coupling conditioners for vectors and images, zero-initialised last layer.
* `MADE`, `MaskedDense`: autoregressive networks for `MaskedAutoregressive` / `InverseAutoregressive`.
* `TimeDerivativeNetwork`: FFJORD's dynamics `f(h, t)`.

Each is an ordinary Keras layer (`build`, `call`, `get_config`, registered for `.keras` files); the bijectors
hold them and never train them.

Mixed precision: `network_dtype(flow_dtype)` is the policy the builders and bijectors give the networks they
make (the global mixed policy for float32 flows, the flow's dtype otherwise; see `tfp_nvp.nn.precision`).
"""

from tfp_nvp.nn.dense import ConvResNet, DenseNetwork
from tfp_nvp.nn.ffjord import TimeDerivativeNetwork
from tfp_nvp.nn.made import INPUT_ORDERS, MADE, MaskedDense, l2_penalty
from tfp_nvp.nn.precision import network_dtype

__all__ = ["ConvResNet", "DenseNetwork", "INPUT_ORDERS", "MADE", "MaskedDense", "TimeDerivativeNetwork",
           "l2_penalty", "network_dtype"]
