"""GLOW on sklearn's digits over several seeds: affine and spline couplings, and the class-conditional GLOW.

Runs the two digits examples as they ship, one process at a time (so each run's seconds are its own), each
seed with its own validation split and initialisation, and collects the `results.json` every run writes:

- `examples/digits_glow.py` (affine couplings, 64 hidden channels) and `--coupling spline` (16 hidden
  channels): test bits/dim;
- `examples/digits_conditional_glow.py`: test bits/dim given the label, of the label-free mixture, and the
  accuracy of the flow as a generative classifier (`argmax_k log p(x | k)`).

    python benchmarks/digits.py                       # seeds 0 1, every model (~10 minutes on 2 idle cores)
    python benchmarks/digits.py --models spline --seeds 0 1 2
    python benchmarks/digits.py --quick               # smoke run: tiny models, one epoch each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "affine": ("digits_glow.py", []),
    "spline": ("digits_glow.py", ["--coupling", "spline"]),
    "conditional": ("digits_conditional_glow.py", []),
}
QUICK = ["--epochs", "1", "--steps", "1", "--hidden", "8", "--minutes", "0.2"]


def run(model: str, seed: int, quick: bool, out_dir: Path) -> dict:
    script, extra = MODELS[model]
    out = out_dir / f"{model}_seed{seed}"
    argv = [sys.executable, str(ROOT / "examples" / script), *extra, "--seed", str(seed), "--output-dir", str(out)]
    argv += QUICK if quick else []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not (out / "results.json").exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        return dict(model=model, seed=seed, error=f"exit {proc.returncode}: {tail}")
    result = json.loads((out / "results.json").read_text())
    return dict(model=model, seed=seed, wall_seconds=wall, **{k: v for k, v in result.items() if k != "args"},
                hidden=result["args"]["hidden"])


def table(rows: list[dict]) -> str:
    lines = ["| model | seed | hidden | epochs | training s | test bits/dim | mixture bits/dim | classifier accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['seed']} | failed: {r['error'].splitlines()[-1][:100]} | | | | | |")
            continue
        mixture = f"{r['mixture_test_bits_per_dim']:.3f}" if "mixture_test_bits_per_dim" in r else ""
        accuracy = f"{100 * r['classifier_accuracy']:.1f} %" if "classifier_accuracy" in r else ""
        lines.append(f"| {r['model']} | {r['seed']} | {r['hidden']} | {r['epochs']} | {r['train_seconds']:.0f} | "
                     f"{r['test_bits_per_dim']:.3f} | {mixture} | {accuracy} |")
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and "error" not in r]
        if len(ok) > 1:
            bpd = statistics.mean(r["test_bits_per_dim"] for r in ok)
            accuracy = [r["classifier_accuracy"] for r in ok if "classifier_accuracy" in r]
            acc = f"{100 * statistics.mean(accuracy):.1f} %" if accuracy else ""
            lines.append(f"| {model}, mean of {len(ok)} seeds | | | | | {bpd:.3f} | | {acc} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, one epoch, seed 0")
    parser.add_argument("--output-dir", default=None,
                        help="where the examples write their figures (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the table's numbers to this JSON file")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="digits_"))
    load_start = os.getloadavg()
    rows = []
    for seed in seeds:  # seeds outermost: a first pass over every model finishes before any second seed
        for model in args.models:
            rows.append(run(model, seed, args.quick, out_dir))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nDigits GLOW (2 levels x 4 steps unless --quick; sklearn digits, 360 test images), examples as they "
          f"ship, one run at a time; {os.cpu_count()} cores, load average {load_start[0]:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; figures in {out_dir}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(benchmark="digits", date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), quick=args.quick,
                           cpus=os.cpu_count(), load_average_start=list(load_start),
                           load_average_end=list(os.getloadavg()), rows=rows), f, indent=1)
        print(f"\nwrote {args.json}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
