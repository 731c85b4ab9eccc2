"""Run every benchmark script, keep each one's markdown table and JSON, then draw the figures.

    python benchmarks/run_all.py --quick                    # smoke run of everything (minutes on 2 cores)
    python benchmarks/run_all.py                            # the full budgets (hours on 2 cores)
    python benchmarks/run_all.py --only two_moons memory --out /tmp/bench
    python benchmarks/run_all.py --list                     # the benchmarks and the command each would run

Each benchmark runs as its own subprocess (one at a time: they time themselves, so they must not share the
cores with each other) from the repository root. For benchmark NAME, in the output folder (default
benchmarks/results/):
  NAME.md          the markdown the script printed (its caption and tables; progress lines left out)
  NAME.json        the same numbers, written by the script's `--json` option
  logs/NAME.out    the script's whole stdout, logs/NAME.err its stderr
then memory_vs_depth.png and nll_vs_time.png (benchmarks/plots.py) and summary.json (seconds and status of
each run). `--quick` is passed through to every script (scripts without it get the small settings listed in
QUICK_FALLBACK). A summary is printed at the end; the exit status is 1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Run order: cheap and self-contained first, so a quick run reports most of the picture early.
BENCHMARKS = {
    "fit_speed": "fit_speed.py",
    "conv_xla": "conv_xla.py",
    "mixed_precision": "mixed_precision.py",
    "two_moons": "two_moons.py",
    "distribute": "distribute.py",
    "throughput": "throughput.py",
    "memory": "memory.py",
    "probabilistic_programs": "probabilistic_programs.py",
    "glow_digits": "glow_digits.py",
    "glow_profile": "glow_digits.py --profile",
    "digits": "digits.py",
    "long_run": "long_run.py",
    "defaults": "defaults.py",
}
# spline_moons_sweep.py is left out on purpose: it trains one recipe given on its command line (a sweep step,
# not a benchmark with a table).

# Smoke settings for scripts that have no --quick option of their own.
QUICK_FALLBACK = {
    "glow_digits": ["--steps", "1", "--hidden", "16", "--speed-steps", "20"],
    "glow_profile": ["--steps", "1", "--hidden", "16", "--speed-steps", "20", "--profile-steps", "5"],
}


def script_path(name: str) -> Path:
    return HERE / BENCHMARKS[name].split()[0]


def script_arguments(name: str) -> list[str]:
    """Arguments a benchmark entry passes to its script (one script can serve two entries)."""
    return BENCHMARKS[name].split()[1:]


def declares(source: str, option: str) -> bool:
    """Whether a script's argparse declares `option` (read from its source: no TensorFlow import needed)."""
    return f'"{option}"' in source or f"'{option}'" in source


def command(name: str, quick: bool, out_dir: Path) -> tuple[list[str], str | None]:
    """The argv for benchmark `name`, and the JSON path it will write (None if the script cannot)."""
    path = script_path(name)
    source = path.read_text()
    argv = [sys.executable, str(path), *script_arguments(name)]
    if quick:
        argv += ["--quick"] if declares(source, "--quick") else QUICK_FALLBACK.get(name, [])
    if name == "defaults":
        # defaults.py appends its runs to a JSON-lines file; give it one inside the output folder.
        argv += ["--out", str(out_dir / "logs" / "defaults_runs.jsonl")]
    json_path = None
    if declares(source, "--json"):
        json_path = str(out_dir / f"{name}.json")
        argv += ["--json", json_path]
    return argv, json_path


def markdown_of(stdout: str) -> str:
    """The caption and tables of a script's stdout: from the paragraph before the first table to the end."""
    lines = stdout.splitlines()
    first = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
    if first is None:
        return stdout
    start = first
    # Back over the blank lines before the table, then over its caption paragraph.
    while start > 0 and not lines[start - 1].strip():
        start -= 1
    while start > 0 and lines[start - 1].strip() and not lines[start - 1].lstrip().startswith("{"):
        start -= 1
    kept = [line for line in lines[start:] if not line.startswith("wrote ")]
    return "\n".join(kept).strip() + "\n"


def run_one(name: str, quick: bool, out_dir: Path, timeout: float | None) -> dict:
    argv, json_path = command(name, quick, out_dir)
    logs = out_dir / "logs"
    if name == "defaults":
        (logs / "defaults_runs.jsonl").unlink(missing_ok=True)  # its runs are appended: start empty
    if json_path:
        Path(json_path).unlink(missing_ok=True)  # a stale file must not pass for this run's result
    shown = " ".join(shlex.quote(a) for a in [Path(argv[0]).name, os.path.relpath(argv[1], ROOT), *argv[2:]])
    print(f"\n=== {name}: {shown}", flush=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = None
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        stderr = (expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or ""))
        stderr += f"\nrun_all: stopped after the --timeout of {timeout:g} s"
    seconds = time.perf_counter() - start
    (logs / f"{name}.out").write_text(stdout)
    (logs / f"{name}.err").write_text(stderr)
    result = dict(name=name, command=shown, seconds=round(seconds, 1), returncode=returncode,
                  ok=returncode == 0, markdown=None, json=None)
    if stdout.strip():
        md = out_dir / f"{name}.md"
        md.write_text(f"<!-- {shown}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
                      f"{seconds:.0f} s -->\n\n" + markdown_of(stdout))
        result["markdown"] = str(md)
    if json_path and Path(json_path).is_file():
        result["json"] = json_path
    elif result["ok"] and json_path:
        result["note"] = "exited 0 but wrote no JSON"
    elif not json_path:
        result["note"] = "the script has no --json option"
    if not result["ok"]:
        result["stderr_tail"] = "\n".join(stderr.strip().splitlines()[-15:])
    status = "ok" if result["ok"] else ("timed out" if returncode is None else f"failed (exit {returncode})")
    print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)
    return result


def load_plots():
    spec = importlib.util.spec_from_file_location("benchmark_plots", HERE / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: pass --quick to every script")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help=f"run only these benchmarks (of: {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", default=str(HERE / "results"),
                        help="folder for the tables, JSON, figures and logs (default benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which one benchmark is stopped and counted as failed (default: none)")
    parser.add_argument("--list", action="store_true", help="print the benchmarks and their commands, run nothing")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    args = parser.parse_args(argv)
    if args.only is not None:
        unknown = [name for name in args.only if name not in BENCHMARKS]
        if unknown:
            parser.error(f"--only: unknown benchmark name(s) {', '.join(map(repr, unknown))}; "
                         f"expected any of: {', '.join(BENCHMARKS)}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds; got {args.timeout:g}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out must be a folder; {args.out!r} is a file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out).resolve()
    names = list(dict.fromkeys(args.only)) if args.only else list(BENCHMARKS)

    if args.list:
        for name in BENCHMARKS:
            if script_path(name).is_file():
                argv, _ = command(name, args.quick, out_dir)
                print(f"{name}: {' '.join(shlex.quote(a) for a in argv[1:])}")
            else:
                print(f"{name}: ({script_path(name).name} not found)")
        return 0

    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()
    results = []
    for name in names:
        if not script_path(name).is_file():
            # A benchmark still being written is skipped when running everything, an error when asked for.
            explicit = args.only is not None
            print(f"\n=== {name}: {script_path(name).name} not found, "
                  f"{'counted as failed' if explicit else 'skipped'}", flush=True)
            results.append(dict(name=name, ok=not explicit, skipped=True, seconds=0.0,
                                note=f"{script_path(name).name} not found"))
            continue
        results.append(run_one(name, args.quick, out_dir, args.timeout))

    figures, plot_error = [], None
    if not args.no_plots:
        try:
            figures = [str(p) for p in load_plots().make_plots(out_dir)]
        except Exception as error:  # noqa: BLE001 - a figure failing must not hide the benchmarks' summary
            plot_error = f"{type(error).__name__}: {error}"
    total = time.perf_counter() - started

    summary = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), quick=args.quick,
                   cpus=os.cpu_count(), machine=platform.processor() or platform.machine(),
                   load_average_start=load_start, load_average_end=os.getloadavg(), total_seconds=round(total, 1),
                   benchmarks=results, figures=figures, plot_error=plot_error)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))

    print(f"\n## Benchmark summary ({'quick' if args.quick else 'full'} run, {os.cpu_count()} cores, "
          f"1-min load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end)\n")
    print("| benchmark | status | seconds | outputs |")
    print("|---|---|---:|---|")
    for r in results:
        status = "skipped" if r.get("skipped") and r["ok"] else ("ok" if r["ok"] else "FAILED")
        outputs = ", ".join(Path(p).name for p in (r.get("markdown"), r.get("json")) if p)
        if r.get("note"):
            outputs = f"{outputs} ({r['note']})" if outputs else r["note"]
        print(f"| {r['name']} | {status} | {r['seconds']:.0f} | {outputs} |")
    print(f"\ntotal {total:.0f} s; outputs in {out_dir}")
    for figure in figures:
        print(f"figure: {figure}")
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"\n--- {r['name']} failed; end of its stderr ({out_dir / 'logs' / (r['name'] + '.err')}):")
        print(r.get("stderr_tail") or r.get("note", ""))
    if plot_error:
        print(f"\n--- figures failed: {plot_error}")
    return 1 if failed or plot_error else 0


if __name__ == "__main__":
    sys.exit(main())
