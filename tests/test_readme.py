"""The README quick start stays true: two commands, and CI runs exactly the README's test command."""
import re

from tests.conftest import REPO


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_install_and_run_then_test():
    install_and_run, test = quick_start_commands()
    assert 'pip install -e ".[dev]"' in install_and_run
    assert "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = quick_start_commands()
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test in ci_commands
