"""The Keras seam: train, save, export and embed flows the way Keras users do.

* `FlowModel`: a `keras.Model` around a flow (`compile` / `fit` / `evaluate`, `.keras` files, `export`).
* `FlowLayer`, `NegativeLogLikelihood`: a flow as a layer and a loss inside other Keras models.
* `WarmupCosineDecay`: `compile()`'s default learning-rate schedule; `FusedAdam`: an opt-in, faster Adam.
* `initialize`: ActNorm's data-dependent initialisation; `export_flow`: a SavedModel that serves without tfp_nvp.
"""

from tfp_nvp.models.export import export_flow
from tfp_nvp.models.flow_layer import FlowLayer, NegativeLogLikelihood
from tfp_nvp.models.flow_model import FlowModel
from tfp_nvp.models.initialization import initialize
from tfp_nvp.models.optimizers import FusedAdam
from tfp_nvp.models.schedules import WarmupCosineDecay

__all__ = ["FlowLayer", "FlowModel", "FusedAdam", "NegativeLogLikelihood", "WarmupCosineDecay", "export_flow",
           "initialize"]
