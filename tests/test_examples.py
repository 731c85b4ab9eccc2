"""The example scripts run as shipped (a fresh process each, tiny budgets) and write what their docstrings say.

The budgets are far too small to train anything well, so the numbers are checked against what any sane run
must satisfy: finite, above what no model can beat (the data's entropy, 0 bits/dim), and below the baseline
(an untrained flow, or the uniform density) that one step or one epoch of training should not fall behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# log2(17): a uniform density over the 17 grey levels of sklearn's 8x8 digits.
DIGITS_UNIFORM_BITS = math.log2(17)
# benchmarks/digits.py's quick arguments: one epoch of one step per level with 8 hidden channels.
DIGITS_QUICK = ["--epochs", "1", "--steps", "1", "--hidden", "8", "--minutes", "0.2"]


def run_example(script: str, *args: str, output_dir: Path) -> str:
    """Runs examples/`script` from the repository root as a user would; returns its stdout."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args, "--output-dir", str(output_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def assert_pngs(output_dir: Path, *names: str) -> None:
    for name in names:
        data = (output_dir / name).read_bytes()
        # A figure cut short by a crash mid-save has the signature but not the closing chunk.
        assert data.startswith(PNG_SIGNATURE) and data.endswith(b"IEND\xaeB`\x82"), f"{name} is not a whole PNG"


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+|nan|inf)", text)
    assert match, f"no {label!r} in the output:\n{text[-2000:]}"
    return float(match.group(1))


def finite_in(value, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and low < value < high


@pytest.mark.parametrize("flow", ["real_nvp", "spline", "ffjord"])
def test_two_moons(flow, tmp_path):
    out = run_example("two_moons.py", "--flow", flow, "--num-points", "300", "--epochs", "1", output_dir=tmp_path)
    assert "(1 epochs)" in out, out
    assert_pngs(tmp_path, "before_training.png", "after_training.png", "loss.png", "density.png")
    held_out = number_after("held-out NLL on 20000 fresh points:", out)
    bound = number_after("exact lower bound (entropy of the moons):", out)
    assert math.isclose(bound, 1.1312, abs_tol=1e-3), bound
    # Every flow starts at the identity, which scores 2.84 nats; one step at the warmup's small rate moves it
    # little either way (measured 2.72-2.80).
    assert finite_in(held_out, bound, 3.0), held_out


# `--levels 1` for the spline: its XLA compilation is most of the run and doubles with the second level; the
# affine run covers the multi-scale split.
@pytest.mark.parametrize("coupling", [[], ["--coupling", "spline", "--levels", "1"]], ids=["affine", "spline"])
def test_digits_glow(coupling, tmp_path):
    run_example("digits_glow.py", *DIGITS_QUICK, *coupling, output_dir=tmp_path)
    assert_pngs(tmp_path, "training_curves.png", "samples.png", "interpolation.png", "likely_unlikely.png")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs"] == 1, results
    assert results["args"]["coupling"] == ("spline" if coupling else "affine"), results["args"]
    # Measured after the one epoch: 3.54 (affine) and 3.47 (spline) bits/dim.
    for key in ("test_bits_per_dim", "best_val_bits_per_dim"):
        assert finite_in(results[key], 0.0, DIGITS_UNIFORM_BITS), (key, results[key])


def test_digits_conditional_glow(tmp_path):
    run_example("digits_conditional_glow.py", *DIGITS_QUICK, output_dir=tmp_path)
    assert_pngs(tmp_path, "samples_per_class.png")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["epochs"] == 1 and results["num_test"] == 360, results
    # Measured after the one epoch: 3.52 given the label, 3.53 for the mixture over labels.
    for key in ("test_bits_per_dim", "mixture_test_bits_per_dim"):
        assert finite_in(results[key], 0.0, DIGITS_UNIFORM_BITS), (key, results[key])
    # The mixture's density is at least a tenth of the true label's: at most log2(10) / 64 bits/dim more.
    # (0.01 of slack: the two are scored under different dequantization noise.)
    assert results["mixture_test_bits_per_dim"] <= results["test_bits_per_dim"] + math.log2(10) / 64 + 0.01
    assert 0.0 <= results["classifier_accuracy"] <= 1.0, results["classifier_accuracy"]


def test_conditional_density_quick(tmp_path):
    out = run_example("conditional_density.py", "--quick", output_dir=tmp_path)
    assert_pngs(tmp_path, "conditional_densities.png", "samples.png")
    assert zipfile.is_zipfile(tmp_path / "conditional_density.keras")
    held_out = number_after("held-out NLL on 20000 fresh points:", out)
    exact = number_after("exact NLL of the true conditional density:", out)
    assert finite_in(exact, 0.1, 0.3), exact
    # No model beats the true density on 20 000 points; the untrained flow (a standard normal for y, whose
    # second moment is 2.33 here) scores 3.0 nats. Measured after the quick run's 3 epochs: 2.55.
    assert finite_in(held_out, exact, 3.0), held_out
