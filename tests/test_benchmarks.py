"""The benchmark driver and its figures, on synthetic results; the memory workers on a tiny GLOW."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(kind + body) == crc, f"{path.name}: corrupt IHDR"
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), f"{path.name} is truncated"
    return struct.unpack(">II", body[:8])


def memory_json():
    rows = []
    for variant, scale in (("standard", 1.0), ("invertible", 0.4), ("tfb.Glow", 1.2)):
        for multiple in (1, 2, 4):
            rows.append(dict(variant=variant, steps=multiple, multiple=multiple, shape=[8, 8, 3], levels=2,
                             batch=4, hidden=8, tensor_peak_mb=scale * 10 * multiple,
                             peak_rss_mb=800 + scale * 20 * multiple, rss_before_mb=780.0,
                             rss_after_first_step_mb=790.0, s_per_step=0.1 * multiple))
    rows.append(dict(variant="standard", steps=8, multiple=8, error="Traceback ...\nMemoryError"))
    return {"memory": rows, "reconstruction": [], "cpus": 2}


def two_moons_json():
    def curve(seed, flow, scale):
        seconds = [0.0, 1.0, 2.5, 4.0, 6.0]
        return dict(seed=seed, flow=flow, seconds=[s * scale for s in seconds],
                    nll=[2.8, 1.6, 1.35, 1.25, 1.2], epochs=list(range(5)), final_nll=1.2,
                    train_seconds=6.0 * scale)

    return dict(bound=1.1312, cpus=2, machine="x86_64", curve_points=5000, date="2026-01-01",
                load_average_start=[1.0, 1.0, 1.0],
                curves={"ours": [curve(0, "real_nvp", 1.0), curve(1, "real_nvp", 1.1)],
                        "spline": [curve(0, "spline", 2.0)], "ffjord": [curve(0, "ffjord", 5.0)]},
                equal_time=dict(budget_seconds=6.0, rows=[]))


def test_plots_script_writes_valid_pngs(tmp_path):
    (tmp_path / "memory.json").write_text(json.dumps(memory_json()))
    (tmp_path / "two_moons.json").write_text(json.dumps(two_moons_json()))
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "plots.py"), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("memory_vs_depth.png", "nll_vs_time.png"):
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 0
        width, height = png_size(path)
        assert width > 100 and height > 100


def test_plots_skip_missing_json_with_a_message(tmp_path, capsys):
    plots = load("plots")
    (tmp_path / "two_moons.json").write_text(json.dumps(two_moons_json()))
    written = plots.make_plots(tmp_path)
    assert [p.name for p in written] == ["nll_vs_time.png"]
    assert not (tmp_path / "memory_vs_depth.png").exists()
    assert "memory.json not found" in capsys.readouterr().out


def test_plots_skip_results_without_curves(tmp_path, capsys):
    plots = load("plots")
    (tmp_path / "two_moons.json").write_text(json.dumps(dict(bound=1.1312, curves={}, rows=[])))
    (tmp_path / "memory.json").write_text(json.dumps({"memory": [dict(variant="standard", steps=1, error="x")]}))
    assert plots.make_plots(tmp_path) == []
    out = capsys.readouterr().out
    assert "no learning curves" in out and "no successful rows" in out


def test_plots_refuse_a_missing_results_folder(tmp_path):
    plots = load("plots")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.make_plots(tmp_path / "absent")


def test_run_all_rejects_unknown_benchmark_names(capsys):
    run_all = load("run_all")
    with pytest.raises(SystemExit) as exit_info:
        run_all.parse_args(["--only", "two_moons", "no_such_bench"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'no_such_bench'" in err and "--only" in err and "two_moons" in err


def test_run_all_rejects_bad_timeout_and_file_as_out(tmp_path, capsys):
    run_all = load("run_all")
    with pytest.raises(SystemExit):
        run_all.parse_args(["--timeout", "0"])
    assert "--timeout" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(SystemExit):
        run_all.parse_args(["--out", str(a_file)])
    assert "--out" in capsys.readouterr().err


def test_run_all_commands_pass_quick_and_json(tmp_path):
    run_all = load("run_all")
    args = run_all.parse_args(["--quick", "--only", "two_moons", "--out", str(tmp_path)])
    assert args.only == ["two_moons"] and args.quick
    argv, json_path = run_all.command("two_moons", quick=True, out_dir=tmp_path)
    assert argv[1].endswith("two_moons.py") and "--quick" in argv
    assert json_path == str(tmp_path / "two_moons.json")
    assert argv[argv.index("--json") + 1] == json_path
    argv, _ = run_all.command("two_moons", quick=False, out_dir=tmp_path)
    assert "--quick" not in argv


def test_run_all_profile_entry_runs_glow_digits_with_its_own_arguments(tmp_path):
    run_all = load("run_all")
    argv, json_path = run_all.command("glow_profile", quick=True, out_dir=tmp_path)
    assert argv[1].endswith("glow_digits.py") and argv[2] == "--profile"
    assert "--profile-steps" in argv and json_path == str(tmp_path / "glow_profile.json")
    argv, _ = run_all.command("glow_digits", quick=False, out_dir=tmp_path)
    assert "--profile" not in argv


def test_glow_profile_sums_kernel_time_by_op_type(tmp_path):
    # A one-step, 8-channel GLOW keeps this cheap; the table must still find the convolutions' kernels.
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "glow_digits.py"), "--profile", "--no-xla", "--steps",
                           "1", "--hidden", "8", "--speed-steps", "5", "--profile-steps", "3", "--json", str(out)],
                          cwd=BENCHMARKS.parent, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    ops = {row["op"]: row["ms_per_step"] for row in result["op_types"]}
    assert result["kernel_ms_per_step"] == pytest.approx(sum(ops.values()))
    assert any("Conv2D" in op for op in ops) and 0 < result["convolution_share"] < 1
    assert not any(op.startswith("__inference") or op in ("Process", "ParallelFor") for op in ops)
    assert "| op type |" in proc.stdout


def test_run_all_keeps_caption_and_tables_of_stdout():
    run_all = load("run_all")
    stdout = "running a ...\n  3.0 s\n\nCaption line.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nwrote x.json\n"
    assert run_all.markdown_of(stdout) == "Caption line.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert run_all.markdown_of("no table here\n") == "no table here\n"


def test_equal_time_takes_the_last_evaluation_within_the_budget():
    two_moons = load("two_moons")

    def curve(seconds, nll, train_seconds):
        return dict(flow="f", seconds=seconds, nll=nll, epochs=list(range(len(seconds))),
                    train_seconds=train_seconds)

    curves = {"fast": [curve([0.1, 2.0, 4.0], [2.8, 1.5, 1.3], 4.0)],
              "slow": [curve([0.2, 3.0, 9.0], [2.8, 1.4, 1.2], 9.0), curve([0.2, 5.0, 10.0], [2.8, 1.6, 1.1], 10.0)]}
    table = two_moons.equal_time(curves, None)
    assert table["budget_seconds"] == 4.0  # the shortest recipe's median training time
    rows = {r["key"]: r for r in table["rows"]}
    assert rows["fast"]["nll"] == 1.3 and rows["fast"]["epoch"] == 2
    assert rows["slow"]["nll"] == (1.4 + 2.8) / 2 and rows["slow"]["seeds_scored"] == 2  # median of two seeds
    early = {r["key"]: r for r in two_moons.equal_time(curves, 0.05)["rows"]}
    assert early["fast"]["nll"] is None and early["fast"]["seeds_scored"] == 0
    assert two_moons.equal_time({}, None) is None


def test_budget_table_compares_at_every_recipes_training_time(tmp_path, capsys, monkeypatch):
    two_moons = load("two_moons")
    saved = two_moons_json()  # ours takes 6.0 / 6.6 s (median 6.3), spline 12 s, ffjord 30 s
    path = tmp_path / "two_moons.json"
    path.write_text(json.dumps(saved))
    monkeypatch.setattr(sys, "argv", ["two_moons.py", "--from-json", str(path)])
    two_moons.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert lines[0] == "| flow | after 6.3 s | after 12.0 s | after 30.0 s |"
    # At 6.3 s seed 0 has ended (1.2) and seed 1 (stretched 1.1x) is at its 4.4 s point (1.25): the median.
    assert lines[2] == "| real_nvp | 1.2250 | 1.2000 | 1.2000 |"
    assert lines[3] == "| spline | 1.3500 | 1.2000 | 1.2000 |"
    # ffjord's curve is stretched 5x: its first epoch ends at 5 s, the second at 12.5 s
    assert lines[4] == "| ffjord | 1.6000 | 1.6000 | 1.2000 |"
    assert lines[-1] == "| exact bound | 1.1312 | 1.1312 | 1.1312 |"
    table = two_moons.print_budget_table({"f": [dict(flow="f", seconds=[0.1, 9.0], nll=[2.8, 1.3], epochs=[0, 1],
                                                     train_seconds=9.0)],
                                          "g": [dict(flow="g", seconds=[0.1, 2.0], nll=[2.8, 1.5], epochs=[0, 1],
                                                     train_seconds=2.0)]}, 1.1312, 10)
    assert table["budgets"] == [2.0, 9.0]
    assert "| f | 2.8000 (untrained) | 1.3000 |" in capsys.readouterr().out


def test_recipe_overrides_may_follow_the_seeds(capsys):
    recipes = load("two_moons_recipes")
    args = recipes.parse_args(recipes.build_parser(),
                              ["--flow", "spline", "--seeds", "0", "1", "2", "jitter=0", "epochs=130"])
    assert args.seeds == [0, 1, 2] and args.flow == "spline"
    assert args.overrides == ["jitter=0", "epochs=130"]
    args = recipes.parse_args(recipes.build_parser(), ["--name", "lr=1e-3", "learning_rate=1e-3", "--seeds", "1"])
    assert args.name == "lr=1e-3" and args.overrides == ["learning_rate=1e-3"] and args.seeds == [1]
    with pytest.raises(SystemExit):
        recipes.parse_args(recipes.build_parser(), ["--seeds", "0", "jitter"])
    assert "invalid int value: 'jitter'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipes.parse_args(recipes.build_parser(), ["jitter"])
    assert "overrides are key=value; got ['jitter']" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["standard", "invertible", "tfb.Glow"])
def test_memory_worker_trains_each_variant(variant):
    # The worker as benchmarks/memory.py runs it in its subprocesses, in-process on a tiny GLOW (the allocator
    # statistics need the BFC allocator, so only the keys and finite numbers are checked here).
    memory = load("memory")
    config = dict(variant=variant, shape=[8, 8, 3], levels=2, steps=1, multiple=1, batch=4, hidden=8,
                  train_steps=1)
    row = memory.worker(config)
    assert {k: row[k] for k in config} == config
    for key in ("peak_rss_mb", "rss_before_mb", "s_per_step", "final_loss"):
        assert row[key] > 0 or key == "final_loss", (key, row[key])
    assert row["num_variables"] > 0 and row["losses_finite"] and abs(row["final_loss"]) < float("inf")


def test_defaults_table_reports_time_to_target_per_seed():
    defaults = load("defaults")
    base = dict(recipe="r", nll=1.18, steps=11, epochs=2, cpu=3.0, cpu_after_first=2.0, wall=3.5)
    rows = [dict(base, seed=0, cpu_to_target=1.25, curve={}), dict(base, seed=1, cpu_to_target=None, curve={}),
            dict(base, seed=2)]  # a row from before the curves were recorded
    table = defaults.summarise(rows)
    assert table.splitlines()[0].endswith("| CPU s to 1.20, per seed |")
    assert table.splitlines()[-1].endswith("| 1.2, never, - |")
    assert defaults.summary_rows(rows)[0]["cpu_seconds_to_target"] == [1.25, None, None]


def test_digits_table_and_run_all_entry(tmp_path):
    digits, run_all = load("digits"), load("run_all")
    rows = [dict(model="spline", seed=s, hidden=16, epochs=100 + s, train_seconds=80.0, test_bits_per_dim=2.0 + s / 10)
            for s in (0, 1)]
    rows.append(dict(model="conditional", seed=0, hidden=64, epochs=50, train_seconds=70.0, test_bits_per_dim=2.1,
                     mixture_test_bits_per_dim=2.15, classifier_accuracy=0.994))
    rows.append(dict(model="affine", seed=0, error="exit 1: Traceback\nValueError: bad"))
    lines = digits.table(rows).splitlines()
    assert lines[2] == "| spline | 0 | 16 | 100 | 80 | 2.000 |  |  |"
    assert lines[4] == "| conditional | 0 | 64 | 50 | 70 | 2.100 | 2.150 | 99.4 % |"
    assert lines[5].startswith("| affine | 0 | failed: ValueError: bad")
    assert lines[6] == "| spline, mean of 2 seeds | | | | | 2.050 | |  |"
    argv, json_path = run_all.command("digits", quick=True, out_dir=tmp_path)
    assert argv[1].endswith("digits.py") and "--quick" in argv and json_path == str(tmp_path / "digits.json")
