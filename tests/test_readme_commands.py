"""The README's two commands are what ``.ci/run`` runs, character for character."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Install and run"):text.index("## Usage")]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def _ci_fresh_venv_commands():
    """``in_fresh_venv NAME 'COMMAND'`` lines of .ci/run: {NAME: COMMAND}."""
    ci = (ROOT / ".ci" / "run").read_text()
    return dict(re.findall(r"^in_fresh_venv (\S+) '(.+)'$", ci, flags=re.M))


def test_ci_runs_both_readme_commands_each_in_a_fresh_venv():
    commands = _readme_commands()
    assert len(commands) == 2, commands  # the main job, then the tests
    main_job, tests = (c.strip() for c in commands)
    assert "flag_gems.demo" in main_job and "pytest" in tests
    steps = _ci_fresh_venv_commands()
    assert steps.get("main-job") == main_job, "the README's main-job command is not what .ci/run runs"
    assert steps.get("tests") == tests, "the README's test command is not what .ci/run runs"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci[ci.index("in_fresh_venv() {"):]  # each step gets a new environment
