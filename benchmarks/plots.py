"""PNG figures from the benchmarks' JSON results.

    python benchmarks/plots.py --results benchmarks/results     # reads *.json there, writes the PNGs next to them

memory_vs_depth.png  from memory.json (benchmarks/memory.py): GLOW's peak training memory against steps per
                     level, one line per variant; left the tensor peak of a step, right the process peak RSS.
nll_vs_time.png      from two_moons.json (benchmarks/two_moons.py): held-out NLL of each example recipe against
                     training seconds (evaluation time excluded), with the exact entropy bound dashed.

A figure whose JSON is missing (or holds nothing to draw) is skipped with a message, not an error, so a partial
benchmark run still gets the figures it can have. Importable: `make_plots(results_dir)` returns the paths written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402

VARIANT_STYLE = {"standard": ("tab:blue", "o"), "invertible": ("tab:green", "s"), "tfb.Glow": ("tab:red", "^")}
FLOW_COLOURS = {"ours": "tab:blue", "spline": "tab:orange", "ffjord": "tab:green"}
FLOW_LABELS = {"ours": "real_nvp (affine couplings)", "spline": "spline couplings", "ffjord": "FFJORD"}


def _machine(meta: dict) -> str:
    """'N cores, machine' from a result file's metadata, else from this machine."""
    cores = meta.get("cpus") or os.cpu_count()
    machine = meta.get("machine") or meta.get("platform") or platform.machine()
    return f"{cores} cores, {machine}"


def _load(path: Path):
    """The parsed JSON, or None with a message when the file is absent or unreadable."""
    if not path.is_file():
        print(f"plots: skipping {path.name.replace('.json', '')} figure: {path} not found")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"plots: skipping figure from {path}: cannot read it ({error})")
        return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def memory_figure(data: dict, path: Path) -> Path | None:
    rows = [r for r in data.get("memory", []) if "error" not in r]
    if not rows:
        print("plots: skipping memory_vs_depth.png: memory.json has no successful rows")
        return None
    panels = [("tensor_peak_mb", "tensor peak of a training step (MB)"),
              ("peak_rss_mb", "process peak RSS (MB)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, ylabel) in zip(axes, panels):
        drawn = False
        for variant in dict.fromkeys(r["variant"] for r in rows):
            points = sorted((r["steps"], r[key]) for r in rows if r["variant"] == variant and _finite(r.get(key)))
            if not points:
                continue
            colour, marker = VARIANT_STYLE.get(variant, (None, "o"))
            ax.plot(*zip(*points), marker=marker, color=colour, label=variant)
            drawn = True
        steps = sorted({r["steps"] for r in rows})
        ax.set_xticks(steps)
        ax.set_xlabel("steps per level (flow depth)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(title="variant")
        else:
            ax.text(0.5, 0.5, f"no '{key}' in memory.json", ha="center", va="center", transform=ax.transAxes)
    first = rows[0]
    shape = first.get("shape")
    config = (f"GLOW {shape}, {first.get('levels')} levels, batch {first.get('batch')}, hidden {first.get('hidden')}"
              if shape else "GLOW")
    fig.suptitle(f"Peak training memory against depth: {config} ({_machine(data)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def nll_figure(data: dict, path: Path) -> Path | None:
    curves = {key: [c for c in cs if c.get("seconds")] for key, cs in (data.get("curves") or {}).items()}
    curves = {key: cs for key, cs in curves.items() if cs}
    if not curves:
        print("plots: skipping nll_vs_time.png: two_moons.json has no learning curves "
              "(run benchmarks/two_moons.py with ours, spline or ffjord)")
        return None
    bound = data.get("bound")
    fig, ax = plt.subplots(figsize=(8, 5))
    finals = []
    for key, cs in curves.items():
        colour = FLOW_COLOURS.get(key)
        for index, curve in enumerate(cs):
            label = FLOW_LABELS.get(key, curve.get("flow", key)) if index == 0 else None
            if label and len(cs) > 1:
                label += f" ({len(cs)} seeds)"
            ax.plot(curve["seconds"], curve["nll"], color=colour, lw=1.4, alpha=0.9 if index == 0 else 0.5,
                    marker="o", markersize=2.5, label=label)  # one marker per evaluation (epoch end)
            finals += [v for v in curve["nll"][1:] if _finite(v)]  # [0] is the untrained flow
    if _finite(bound):
        ax.axhline(bound, color="k", ls="--", lw=1, label=f"exact bound (entropy) {bound:.4f}")
    if finals:
        # The untrained flow scores far above everything else; clip so the part that matters is visible.
        low = min(finals + ([bound] if _finite(bound) else []))
        high = sorted(finals)[int(0.9 * (len(finals) - 1))]
        ax.set_ylim(low - 0.05, max(high, low + 0.2) + 0.1)
    budget = (data.get("equal_time") or {}).get("budget_seconds")
    if _finite(budget):
        ax.axvline(budget, color="grey", ls=":", lw=1, label=f"equal-time budget {budget:.0f} s")
    ax.set_xlabel("training wall-clock seconds (evaluation excluded)")
    ax.set_ylabel(f"held-out NLL (nats per point, {data.get('curve_points', '?')} test points)")
    ax.grid(alpha=0.3)
    ax.legend()
    load = data.get("load_average_start")
    load_text = f", load average {load[0]:.1f} at start" if isinstance(load, list) and load else ""
    ax.set_title(f"Two moons: held-out NLL against training time\n({_machine(data)}{load_text}, "
                 f"{data.get('date', '')})".replace(", )", ")"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(results_dir, out_dir=None) -> list[Path]:
    """Draw every figure whose JSON is in `results_dir`; return the PNG paths written (to `out_dir` or there)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {str(results_dir)!r} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source, draw, name in (("memory.json", memory_figure, "memory_vs_depth.png"),
                               ("two_moons.json", nll_figure, "nll_vs_time.png")):
        data = _load(results_dir / source)
        if data is not None:
            result = draw(data, out_dir / name)
            if result is not None:
                print(f"plots: wrote {result}")
                written.append(result)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder holding memory.json and two_moons.json (default benchmarks/results)")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the --results folder)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        parser.error(f"--results must be an existing folder of benchmark JSON files; got {args.results!r}")
    make_plots(args.results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
