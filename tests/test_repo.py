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
