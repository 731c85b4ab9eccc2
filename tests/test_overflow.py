"""log_prob never returns NaN for finite data the flow maps beyond the floating-point range.

A flow's density pass can expand far from its training data (ActNorm and 1x1-convolution scales, a coupling's
shift, an unbounded log-scale): a trained flow can send such images past the largest float32, and arithmetic on
the overflowed values (a 1x1 convolution mixing +inf and -inf, a network fed inf) then yields NaN. The flow
below is a GLOW whose first coupling has an unbounded log-scale (`log_scale_bound="none"`) set to expand `x_b`
by `exp(W |x_a|)`, so that data near the centre of the support stay in range and ordinary images overflow.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfp_nvp import AffineCoupling, flow_bijectors
from tfp_nvp.bijectors.actnorm import ActNorm
from tfp_nvp.flows import glow
from tfp_nvp import initialize

SHAPE = (4, 4, 1)
# Log-scale -GAIN * |x_a|: past the largest float (exp(89) in float32, exp(710) in float64) for ordinary images.
GAIN = {"float32": 1e3, "float64": 1e4}


def _overflowing_glow(logit_alpha, dtype="float32"):
    """A GLOW whose first coupling of the density pass has log-scale `-GAIN * |x_a[..., 0]|`."""
    flow = glow(SHAPE, num_levels=1, num_steps_per_level=2, hidden_channels=4, num_blocks=0, seed=0,
                logit_alpha=logit_alpha, log_scale_bound="none", dtype=dtype)
    initialize(flow, np.random.default_rng(0).uniform(0.02, 0.98, (16, *SHAPE)).astype(dtype))
    for bijector in flow_bijectors(flow):
        if isinstance(bijector, ActNorm):  # the identity: the centre of the data reaches the coupling as 0
            bijector.log_scale.assign(np.zeros(bijector.log_scale.shape, dtype))
            bijector.shift.assign(np.zeros(bijector.shift.shape, dtype))
    coupling = next(b for b in flow_bijectors(flow) if isinstance(b, AffineCoupling) and "_s0_" in b.name)
    stem_kernel, stem_bias, head_kernel, head_bias = coupling.network.get_weights()
    stem_kernel[:] = 0.0  # hidden channels 0 and 1 at the centre tap: relu(v) and relu(-v), v = x_a[..., 0]
    stem_kernel[1, 1, 0, 0], stem_kernel[1, 1, 0, 1] = 1.0, -1.0
    out = head_kernel.shape[-1] // 2
    head_kernel[:] = 0.0  # shift 0, h = -GAIN * (relu(v) + relu(-v)) for every transformed channel
    head_kernel[1, 1, 0, out:], head_kernel[1, 1, 1, out:] = -GAIN[dtype], -GAIN[dtype]
    coupling.network.set_weights([stem_kernel, np.zeros_like(stem_bias), head_kernel, np.zeros_like(head_bias)])
    return flow


# In float32 the logit of data this close to 0.5 keeps only a few digits of x - 0.5 (cancellation), which the
# coupling's gain magnifies, so XLA's and eager's roundings may differ in the 5th digit there; float64 is exact.
@pytest.mark.parametrize("dtype, logit_alpha, rtol", [("float32", 0.05, 1e-4), ("float64", 0.05, 1e-10),
                                                      ("float64", None, 1e-10)],
                         ids=["float32-logit", "float64-logit", "float64-no_logit"])
def test_overflow_gives_minus_inf_and_leaves_the_rest_unchanged(dtype, logit_alpha, rtol):
    flow = _overflowing_glow(logit_alpha, dtype)
    rng = np.random.default_rng(1)
    centre = 0.5 if logit_alpha is not None else 0.0
    near = (centre + rng.uniform(-1e-4, 1e-4, (3, *SHAPE))).astype(dtype)
    far = rng.uniform(0.02, 0.98, (3, *SHAPE)).astype(dtype)
    x = np.concatenate([near, far])
    latent = flow.bijector.inverse(tf.constant(x)).numpy()
    overflowed = ~np.isfinite(latent).reshape(len(x), -1).all(axis=1)
    # The setup really provokes what it is meant to: the far images leave the float range, the near ones do not.
    np.testing.assert_array_equal(overflowed, [False] * 3 + [True] * 3)
    # The density of the in-range images by the change of variables, computed without them sharing a batch.
    z = flow.bijector.inverse(tf.constant(near))
    expected = (flow.distribution.log_prob(z)
                + flow.bijector.inverse_log_det_jacobian(tf.constant(near), event_ndims=3)).numpy()
    assert np.all(np.isfinite(expected))
    for mode, log_prob in (("eager", flow.log_prob),
                           ("xla", tf.function(flow.log_prob, jit_compile=True))):
        result = log_prob(tf.constant(x)).numpy()
        assert not np.any(np.isnan(result)), (mode, result)
        np.testing.assert_array_equal(result[3:], -np.inf, err_msg=mode)
        np.testing.assert_allclose(result[:3], expected, rtol=rtol, err_msg=mode)


def test_nan_data_still_gives_nan():
    """Only overflow becomes -inf: NaN data are not a point of zero density and keep their NaN."""
    flow = _overflowing_glow(0.05)
    x = np.full((2, *SHAPE), 0.5, np.float32)
    x[1, 0, 0, 0] = np.nan
    result = flow.log_prob(tf.constant(x)).numpy()
    assert np.isfinite(result[0]) and np.isnan(result[1])
