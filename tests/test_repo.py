"""The README's commands are the ones the project really runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest -q'


def test_ci_runs_the_test_command_the_readme_gives():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci_lines
    readme_lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    assert TEST_COMMAND in readme_lines


def test_readme_example_command_names_the_two_moons_script():
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.strip().startswith("pip install -e")]
    assert any("python examples/two_moons.py" in c for c in commands), commands


def _quick_start_code() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_quick_start_is_the_recipe_the_benchmark_measures():
    # benchmarks/defaults.py's "quickstart-noise0.03-clip1" runs are the README's figures for this code.
    code = _quick_start_code()
    for line in ("x = two_moons(3000)", "flow = tfp_nvp.real_nvp([2])",
                 "model = tfp_nvp.FlowModel(flow, training_noise=0.03)",
                 "model.compile(tfp_nvp.FusedAdam(tfp_nvp.WarmupCosineDecay(), clipnorm=1.0))",
                 "model.fit(x, epochs=150)"):
        assert line in code, line
    source = (ROOT / "benchmarks" / "defaults.py").read_text()
    assert '"quickstart-noise0.03-clip1": dict(quickstart=True, noise=0.03, optimizer=dict(clipnorm=1.0))' in source
    for line in ("x = two_moons(3000, seed=seed)", 'builder="real_nvp"', "epochs=150,",
                 "flow = getattr(tfp_nvp, builder)([2], seed=seed, **(builder_kwargs or {}))",
                 "model = tfp_nvp.FlowModel(flow, training_noise=noise)",
                 "schedule = tfp_nvp.WarmupCosineDecay(**({} if peak is None else dict(peak_learning_rate=peak)))",
                 "model.compile(optimizer=tfp_nvp.FusedAdam(schedule, **(optimizer or {})))",
                 "history = model.fit(x, epochs=epochs, batch_size=batch_size, verbose=0"):
        assert line in source, line


def test_quick_start_runs_as_written_and_trains(capsys):
    # The README block verbatim (about 15 s), under conftest's global seed. The measured figures (seeds,
    # held-out NLL, time to 1.20) come from benchmarks/defaults.py, not from here; this checks the block
    # reaches the documented target of 1.20. Under this seed it scored 1.165 (24 seeds: 1.166 +/- 0.013, the
    # worst 1.210), leaving ~0.03 nats for rounding differences on other CPUs.
    namespace: dict = {}
    exec(compile(_quick_start_code(), "README quick start", "exec"), namespace)
    held_out = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert held_out <= 1.20, held_out  # an untrained flow scores 2.84; the bound is 1.1312
    samples = namespace["flow"].sample(5, seed=0)
    assert samples.shape == (5, 2)
