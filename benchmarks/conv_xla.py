"""3x3 'same' convolutions of a GLOW on 8x8 images: TensorFlow's kernel, XLA's, and ConvResNet's matmul path.

    python benchmarks/conv_xla.py               # a minute on 2 cores
    python benchmarks/conv_xla.py --quick       # smoke run
    python benchmarks/conv_xla.py --json out.json

Each row times one convolution's forward and backward pass (gradients for the input and the kernel) in a
`tf.function`, batch 64, at the image sizes and channel counts of `tfp_nvp.glow([8, 8, 1])`'s coupling networks
(4x4 at the first level, 2x2 at the second): TensorFlow's own kernel without XLA, the Keras `Conv2D` layer
under XLA, and, on images smaller than the kernel window, `ConvResNet`'s matmul over the 3x3 shifted copies of
the image under XLA (the network computes its residual blocks' 3x3 convolutions that way there; its stems and
heads stay `Conv2D`, whose XLA convolution is about as fast as the matmul for them). Best of `--rounds`
rounds of `--calls` calls; ms per call.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfp_nvp.networks import ConvResNet  # noqa: E402

# (image side, input channels, output channels, role in glow([8, 8, 1])'s couplings)
SHAPES = [
    (4, 2, 64, "level 1 stem"),
    (4, 64, 64, "level 1 residual block"),
    (4, 64, 4, "level 1 head"),
    (2, 4, 64, "level 2 stem"),
    (2, 64, 64, "level 2 residual block"),
    (2, 64, 8, "level 2 head"),
]


def ms_per_call(conv_fn, x, variables, jit_compile, calls, rounds):
    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = conv_fn(x)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, [x, *variables])

    step(x)  # trace and compile
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            grads = step(x)
        grads[0].numpy()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--calls", type=int, default=200, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; the best is reported")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 calls, 2 rounds")
    p.add_argument("--json", default=None, help="also write the table's numbers to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.calls, args.rounds = 20, 2
    rng = np.random.default_rng(0)
    rows = []
    for side, c_in, c_out, role in SHAPES:
        x = tf.constant(rng.normal(size=(args.batch, side, side, c_in)).astype("float32"))
        conv = keras.layers.Conv2D(c_out, 3, padding="same")
        conv.build(x.shape)
        net = ConvResNet(hidden_channels=c_out, num_blocks=1, output_channels=1)  # only its conv path is used
        variables = [conv.kernel, conv.bias]
        tf_kernel = ms_per_call(conv, x, variables, False, args.calls, args.rounds)
        xla = ms_per_call(conv, x, variables, True, args.calls, args.rounds)
        small = side < 3  # smaller than the window: where ConvResNet may take the matmul path
        path = (ms_per_call(lambda t: net._spatial_conv(conv, t), x, variables, True, args.calls, args.rounds)
                if small else None)
        # ConvResNet sends only its residual blocks' 3x3 convolutions through the path (see its docstring).
        uses = "matmul" if small and "residual" in role else "Conv2D"
        rows.append(dict(image=f"{side}x{side}", channels=f"{c_in} -> {c_out}", role=role, tf_ms=tf_kernel,
                         xla_ms=xla, matmul_xla_ms=path, convresnet_uses=uses))
        print(f"  {role}: TF kernel {tf_kernel:.2f}, XLA {xla:.2f}, matmul {path} ms", flush=True)

    print(f"\n3x3 'same' convolution, forward + backward, batch {args.batch}, ms per call (best of {args.rounds} "
          f"rounds of {args.calls}); load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("| image | channels | role | TF kernel, no XLA | Conv2D, XLA | matmul over shifted copies, XLA | "
          "ConvResNet under XLA uses |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        matmul = "-" if r["matmul_xla_ms"] is None else f"{r['matmul_xla_ms']:.2f}"
        print(f"| {r['image']} | {r['channels']} | {r['role']} | {r['tf_ms']:.2f} | {r['xla_ms']:.2f} | {matmul} | "
              f"{r['convresnet_uses']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "calls": args.calls, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
