"""`make test` alone sets a fresh machine up (issue 9 item 21): CI's script is README's test
command and nothing else of substance, and the test target itself installs the system tools."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_only_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")
                and line not in ("set -euo pipefail", 'cd "$(dirname "$0")/.."')]
    assert commands == ["make test"]
    assert "make test" in (ROOT / "README.md").read_text()


def test_make_test_installs_the_system_tools_first():
    # -n: print the recipes without running them; the tools recipe checks for and installs
    # promtool and PostgreSQL's server binaries before pytest runs.
    plan = subprocess.run(["make", "-n", "-W", "pyproject.toml", "test"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    assert "command -v promtool" in plan and "apt-get install" in plan
    assert "postgresql" in plan
    assert plan.index("command -v promtool") < plan.index("pytest")
