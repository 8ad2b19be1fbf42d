"""README.rst is valid reStructuredText and CI runs exactly its test command."""

import re
from pathlib import Path

import docutils.core
import docutils.utils

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_valid_restructuredtext():
    source = (ROOT / "README.rst").read_text()
    docutils.core.publish_doctree(source, settings_overrides={"halt_level": 2,
                                                              "report_level": 5})


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.rst").read_text()
    install_and_test = re.search(r"Install and run the tests::\n\n\s+(.+)\n", readme).group(1)
    install, test = (part.strip() for part in install_and_test.split("&&"))
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert commands[-1] == test
    assert "pip install" in install and ".[test]" in install
    assert any("pip install" in line and ".[test]" in line for line in commands)
