"""The README's two commands are what ``.ci/run`` runs, character for character."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Install and run"):text.index("## Usage")]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_ci_runs_both_readme_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands  # the main job, then the tests
    main_job, tests = commands
    assert "flag_gems.demo" in main_job and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert main_job.strip() in (line.strip() for line in ci), "the README's main-job command is not in .ci/run"
    assert tests.strip() in ci, "the README's test command is not in .ci/run as a line of its own"
    # The main job runs in a virtual environment of its own (a missing dependency must fail it).
    venv = next(i for i, line in enumerate(ci) if "-m venv" in line)
    assert venv < next(i for i, line in enumerate(ci) if line.strip() == main_job.strip())
