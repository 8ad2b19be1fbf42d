"""The static checks, run by the test command so that CI fails on any finding: mypy on
the package (settings in mypy.ini) and ruff on the package and the tests (ruff.toml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.relay_process import CHECKOUT


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=CHECKOUT, text=True,
                          capture_output=True, timeout=170, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(175)
def test_mypy_finds_nothing_in_the_package() -> None:
    checked = run("mypy")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Success: no issues found" in checked.stdout


def test_ruff_finds_nothing() -> None:
    checked = run("ruff", "check", "iw_relay", "tests")
    assert checked.returncode == 0, checked.stdout + checked.stderr
