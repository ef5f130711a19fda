"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    script = (ROOT / "ci" / "cpu_suite.sh").read_text().splitlines()
    command = script[-1]
    assert command == 'pip install -e ".[cpu,test]" && pytest'
    assert command in readme
    assert 'pip install -e ".[cpu]" && rocmoe bench --quick' in readme
    assert "bash ci/cpu_suite.sh" in (ROOT / ".ci" / "run").read_text()
