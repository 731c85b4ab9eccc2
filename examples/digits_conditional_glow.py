"""Class-conditional GLOW on sklearn's 8x8 digits: p(x | label), samples per class, and a generative classifier.

    python examples/digits_conditional_glow.py            # about 5 minutes of training
    python examples/digits_conditional_glow.py --quick    # a short run that checks everything works

The flow is `tfp_nvp.glow(..., conditional_shape=[10])` conditioned on the one-hot label: its couplings, its
split prior and its top-level prior all see the label. The script reports test bits/dim given the true label
and of the label-free mixture `p(x) = mean_k p(x | k)`, classifies the test digits by
`argmax_k log p(x | k)` (Bayes' rule with a uniform class prior), and writes a grid of samples per class to
--output-dir (default outputs/digits_conditional_glow/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfp_nvp  # noqa: E402
from tfp_nvp import images  # noqa: E402

NUM_CLASSES = 10


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a short run that checks everything works: small model, 3 epochs, no XLA")
    # None: the full run's value, or --quick's.
    p.add_argument("--epochs", type=int, default=None,
                   help="upper bound; early stopping usually ends sooner (default 400; 3 with --quick)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time budget, stops after the epoch (default 5; 1 with --quick)")
    p.add_argument("--levels", type=int, default=2, help="GLOW levels")
    p.add_argument("--steps", type=int, default=None, help="flow steps per level (default 4; 2 with --quick)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden channels of the coupling networks (default 64; 32 with --quick)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the class grid")
    p.add_argument("--output-dir", default="outputs/digits_conditional_glow")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # --quick sets what was not given; what was given stays.
    for name, full, quick in (("epochs", 400, 3), ("minutes", 5.0, 1.0), ("steps", 4, 2), ("hidden", 64, 32)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("epochs", "levels", "steps", "hidden", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(args, name)}")
    if not args.minutes > 0 or not args.lr > 0:
        p.error(f"--minutes and --lr must be positive; got {args.minutes} and {args.lr}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 draws the base's mode); got {args.temperature}")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed must be in [0, 2**32); got {args.seed}")
    return args


class TimeBudget(keras.callbacks.Callback):
    """Stops training at the end of the first epoch past the budget, counted from the end of the first step.

    The first step includes tracing and (with XLA) compiling the training step, which is not training and
    takes very different times on different machines.
    """

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.start = None

    def on_train_batch_end(self, batch, logs=None):
        if self.start is None:
            self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.start is not None and time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = True


def one_hot(labels):
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]


def class_log_likelihoods(flow, x, batch_size=256, jit_compile=True):
    """`[N, 10]`: log p(x_n | k) for every image and class, from one pass per batch.

    The classes ride in the batch: contexts of shape [10, 1, 10] broadcast against images [B, 8, 8, 1], so
    every image is scored under every label with the same dequantization noise.
    """
    contexts = tf.constant(np.eye(NUM_CLASSES, dtype=np.float32)[:, None, :])
    kwargs = tfp_nvp.conditional_kwargs(flow, contexts)
    score = tf.function(lambda batch: flow.log_prob(batch, bijector_kwargs=kwargs), jit_compile=jit_compile)
    out = [score(x[i:i + batch_size]).numpy().T for i in range(0, len(x), batch_size)]
    return np.concatenate(out, axis=0)


def main():
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    data = images.load_digits_splits(num_validation=200, seed=args.seed)
    levels = images.DIGITS_LEVELS
    shape = data["train"].shape[1:]
    train = {"x": data["train"], "conditional_input": one_hot(data["train_labels"])}
    validation = {"x": data["validation"], "conditional_input": one_hot(data["validation_labels"])}
    test = {"x": data["test"], "conditional_input": one_hot(data["test_labels"])}

    flow = tfp_nvp.glow(shape, num_levels=args.levels, num_steps_per_level=args.steps, hidden_channels=args.hidden,
                        conditional_shape=[NUM_CLASSES], seed=args.seed)
    model = tfp_nvp.FlowModel(flow, levels=levels)
    tfp_nvp.initialize(model, images.dequantize(data["train"][:512], levels, seed=(args.seed, 0)),
                       conditional_input=train["conditional_input"][:512])
    # XLA speeds up every step for a one-off compilation (see FlowModel): worth it beyond a short run.
    model.compile(optimizer=keras.optimizers.Adam(args.lr), jit_compile=not args.quick)

    start = time.perf_counter()
    history = model.fit(
        train, validation_data=validation, epochs=args.epochs, batch_size=args.batch_size,
        callbacks=[
            keras.callbacks.EarlyStopping("val_bits_per_dim", patience=20, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau("val_bits_per_dim", factor=0.5, patience=8),
            keras.callbacks.TerminateOnNaN(),
            TimeBudget(60 * args.minutes),
        ],
        verbose=2,
    )
    seconds = time.perf_counter() - start
    print(f"\ntrained {len(history.history['loss'])} epochs in {seconds:.0f} s")

    # Likelihoods: given the true label (what training optimises), and of the mixture over labels.
    test_bpd = model.evaluate(test, batch_size=256, verbose=0, return_dict=True)["bits_per_dim"]
    x = images.dequantize(data["test"], levels, seed=(args.seed, 1))
    scores = class_log_likelihoods(flow, x, jit_compile=not args.quick)
    num_dims = int(np.prod(shape))
    marginal = np.logaddexp.reduce(scores, axis=1) - math.log(NUM_CLASSES)
    marginal_bpd = float(np.mean(images.bits_per_dim(-marginal, num_dims, levels)))
    print(f"{'model':<44}{'test bits/dim':>14}")
    print(f"{'conditional GLOW, p(x | true label)':<44}{test_bpd:>14.3f}")
    print(f"{'conditional GLOW, p(x) = mean_k p(x | k)':<44}{marginal_bpd:>14.3f}")
    print(f"{'full-covariance Gaussian, p(x)':<44}"
          f"{images.gaussian_bits_per_dim(data['train'], data['test'], levels):>14.3f}")
    print(f"{'uniform':<44}{images.uniform_bits_per_dim(levels):>14.3f}")

    # Generative classifier: uniform prior over classes, so the posterior's argmax is that of log p(x | k).
    predicted = np.argmax(scores, axis=1)
    accuracy = float(np.mean(predicted == data["test_labels"]))
    print(f"\ngenerative classifier: test accuracy {accuracy:.3f} on {len(predicted)} digits "
          f"(argmax_k log p(x | k), uniform class prior)")
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), int)
    np.add.at(confusion, (data["test_labels"], predicted), 1)
    print("confusion matrix (rows: true class, columns: predicted):")
    for k, row in enumerate(confusion):
        print(f"  {k}: " + " ".join(f"{v:3d}" for v in row))
    # The numbers above, for scripts that run this example (benchmarks/digits.py).
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(dict(test_bits_per_dim=float(test_bpd), mixture_test_bits_per_dim=marginal_bpd,
                       classifier_accuracy=accuracy, num_test=len(predicted), epochs=len(history.history["loss"]),
                       train_seconds=seconds, args=vars(args)), f, indent=1)

    # A row of samples per class, all rows from the same base draws.
    columns = 10
    fig, axes = plt.subplots(NUM_CLASSES, columns, figsize=(columns * 0.9, NUM_CLASSES * 0.9 + 0.4))
    for k in range(NUM_CLASSES):
        kwargs = tfp_nvp.conditional_kwargs(flow, tf.constant(one_hot(k)))
        samples = images.sample(flow, columns, temperature=args.temperature, seed=args.seed,
                                bijector_kwargs=kwargs).numpy()
        for ax, img in zip(axes[k], samples):
            ax.imshow(np.clip(img[..., 0], 0, 1), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[k, 0].set_ylabel(str(k), rotation=0, labelpad=10, fontsize=10)
    fig.suptitle(f"samples per class (T = {args.temperature})", fontsize=10)
    path = os.path.join(args.output_dir, "samples_per_class.png")
    fig.savefig(path, dpi=120), plt.close(fig)
    print(f"figure written to {path}")


if __name__ == "__main__":
    main()
