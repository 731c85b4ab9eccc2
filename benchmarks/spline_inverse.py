"""Float32 round trip of the rational-quadratic spline: TFP's `tfb.RationalQuadraticSpline` against tfp_nvp's.

For each parameter scale s, 1000 random 8-bin splines on [-4, 4] in the package's parameterisation (widths and
heights `1e-3 + (8 - 8e-3) * softmax(u)`, slopes `1e-3 + softplus(u + log(expm1(1 - 1e-3)))`, u ~ N(0, s^2)),
one point each, x uniform on [-4.5, 4.5]; the same parameters and points for both. Columns:

* `max |x' - x|`, `> 1e-4`: the round trip x -> y -> x' (y passed through `tf.identity`, else TFP's cache
  answers with x);
* `max |g(x') - y|`, `> 2e-5`: the backward error, through the float64 spline: how far the image of the
  returned point is from the y it was asked for. A flat spline (a bin of height 1e-3 holding most of the
  width, knot slopes near 1e-20) maps many float32 x onto one float32 y; there no inverse can return x, and the
  round trip errs for both implementations alike, but a correct inverse still returns a preimage of y (backward
  error ~ float32 rounding). A large backward error is a wrong answer: the wrong bin;
* float64 round trip of TFP's spline for scale;
* time of one forward + inverse + both log-dets on a batch of 100 000 (eager, median of 5 after a warm-up).

Writes benchmarks/results/spline_inverse.md and .json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_nvp import SplineTransformer

tfb = tfp.bijectors
K, B, N = 8, 4.0, 1000
SCALES = (1, 3, 5, 10, 20, 50)
RESULTS = Path(__file__).parent / "results"


def setting(scale, n=N, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(0.0, scale, size=(n, 3 * K - 1))
    x = rng.uniform(-1.125 * B, 1.125 * B, size=(n, 1))
    return u, x


def implementations(u, dtype):
    transformer = SplineTransformer(num_bins=K, bound=B)
    u = tf.constant(u, dtype)
    params = transformer.params(u[:, :2 * K], u[:, 2 * K:], None)
    tfp_spline = tfb.RationalQuadraticSpline(*params, range_min=-B)
    return params, {
        "tfp": (tfp_spline.forward, tfp_spline.inverse,
                lambda t: tfp_spline.forward_log_det_jacobian(t, event_ndims=0),
                lambda t: tfp_spline.inverse_log_det_jacobian(t, event_ndims=0)),
        "tfp_nvp": (lambda t: transformer.forward(t, params)[0], lambda t: transformer.inverse(t, params)[0],
                    lambda t: transformer.forward_log_det(t, params),
                    lambda t: transformer.inverse_log_det(t, params)),
    }


def accuracy(scale):
    u, x = setting(scale)
    params, impls = implementations(u, tf.float32)
    ref = tfb.RationalQuadraticSpline(*(tf.cast(p, tf.float64) for p in params), range_min=-B)
    x32 = tf.constant(x, tf.float32)
    row = {"scale": scale}
    for name, (fwd, inv, _, _) in impls.items():
        y = fwd(x32)
        x_back = inv(tf.identity(y))
        err = np.abs(x_back.numpy() - x32.numpy())
        back = np.abs(ref.forward(tf.cast(x_back, tf.float64)).numpy() - y.numpy())
        row[name] = dict(max_error=float(err.max()), frac_over_1e4=float((err > 1e-4).mean()),
                         max_backward_error=float(back.max()), frac_backward_over_2e5=float((back > 2e-5).mean()))
    _, impls64 = implementations(u, tf.float64)
    fwd, inv, _, _ = impls64["tfp"]
    x64 = tf.constant(x, tf.float64)
    row["tfp_float64_max_error"] = float(np.abs(inv(tf.identity(fwd(x64))).numpy() - x).max())
    return row


def timing(batch=100_000, repeats=5):
    u, x = setting(3.0, n=batch, seed=1)
    _, impls = implementations(u, tf.float32)
    x = tf.constant(x, tf.float32)
    out = {}
    for name, (fwd, inv, fldj, ildj) in impls.items():
        def call():
            y = fwd(x)
            return inv(tf.identity(y)), fldj(x), ildj(y)
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            [t.numpy() for t in call()]
            times.append(time.perf_counter() - start)
        out[name] = float(np.median(times))
    return out


def main():
    rows = [accuracy(s) for s in SCALES]
    times = timing()
    lines = [
        "# Spline float32 round trip: TFP against tfp_nvp",
        "",
        f"{N} random {K}-bin splines on [-{B:g}, {B:g}] per scale (u ~ N(0, s^2), same seed for both), x uniform"
        " on [-4.5, 4.5]; x -> y -> x'. Backward error: |g64(x') - y| through the float64 spline.",
        "",
        "| s | TFP max \\|x'-x\\| | TFP > 1e-4 | ours max \\|x'-x\\| | ours > 1e-4 | TFP max backward | TFP backward"
        " > 2e-5 | ours max backward | ours backward > 2e-5 | TFP float64 max \\|x'-x\\| |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, o = r["tfp"], r["tfp_nvp"]
        lines.append(
            f"| {r['scale']} | {t['max_error']:.3g} | {t['frac_over_1e4']:.1%} | {o['max_error']:.3g} | "
            f"{o['frac_over_1e4']:.1%} | {t['max_backward_error']:.3g} | {t['frac_backward_over_2e5']:.1%} | "
            f"{o['max_backward_error']:.3g} | {o['frac_backward_over_2e5']:.1%} | {r['tfp_float64_max_error']:.2g} |")
    lines += ["", f"One forward + inverse + forward and inverse log-det on 100 000 points (float32, eager, median of 5):"
              f" TFP {times['tfp'] * 1e3:.1f} ms, tfp_nvp {times['tfp_nvp'] * 1e3:.1f} ms.", ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spline_inverse.md").write_text(text)
    meta = dict(tensorflow=tf.__version__, tensorflow_probability=tfp.__version__, num_splines=N, num_bins=K,
                bound=B)
    (RESULTS / "spline_inverse.json").write_text(json.dumps(dict(meta=meta, accuracy=rows, seconds=times),
                                                            indent=2) + "\n")


if __name__ == "__main__":
    main()
