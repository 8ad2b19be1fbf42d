"""README.rst and docs/: valid, current, and the commands they give are the ones CI runs
and the ones that work."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import docutils.core
import pytest_twisted

from iw_relay.options import configuration_page
from tests.helpers import free_port, http_get
from tests.relay_process import TWISTD, stop_relay

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()
DOCS = ROOT / "docs"


def literal_block(text: str, introduction: str) -> list[str]:
    """The lines of the literal block that follows `introduction` (which ends in ::)."""
    after = text.split(introduction + "::\n\n", 1)[1]
    lines = []
    for line in after.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return [line for line in lines if line.strip()]


def ci_commands() -> list[str]:
    ci = (ROOT / ".ci" / "run").read_text()
    return [line.strip() for line in ci.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_is_valid_restructuredtext():
    docutils.core.publish_doctree(README, settings_overrides={"halt_level": 2,
                                                              "report_level": 5})


def test_readme_is_short_and_cites_nothing_outside_the_repository():
    assert len(README.splitlines()) <= 150
    sources = [ROOT / "README.rst", ROOT / "setup.py", *DOCS.glob("*.rst"),
               *(ROOT / "iw_relay").rglob("*.py"), *(ROOT / "tests").glob("*.py")]
    for path in sources:
        text = path.read_text()
        # Every Markdown file named must be in the checkout, and no path climbs out of it.
        for name in re.findall(r"[\w./-]+\.md\b", text):
            assert list(ROOT.rglob(Path(name).name)), (path, name)
        assert not re.search(r"\.\./[A-Za-z]", text), path
    assert "https://github.com/clarkezyz/iw-relay" in README  # the original relay
    assert "Impossible Writer" in README


def test_ci_runs_the_readmes_install_and_test_commands():
    (install_and_test,) = literal_block(README, "Install and run the tests")
    install, test = (part.strip() for part in install_and_test.split("&&"))
    commands = ci_commands()
    assert commands[-1] == test
    # CI installs as the README says, quietly.
    pip = next(line for line in commands if "pip install" in line)
    assert [word for word in shlex.split(pip) if not word.startswith("-")][-3:] == (
        shlex.split(install))


def test_readme_names_the_test_prerequisites_next_to_the_test_command():
    section = README.split("Running the tests\n", 1)[1].split("\nFeatures\n", 1)[0]
    (apt,) = literal_block(section, "install these too (Debian)")
    assert apt.split()[:2] == ["apt-get", "install"]
    programs = set(apt.split()[2:])
    assert {"redis-server", "coturn", "chromium", "haproxy", "nginx", "valgrind"} <= programs
    ci = (ROOT / ".ci" / "run").read_text()
    for program in ("redis-server", "coturn", "chromium", "haproxy", "nginx", "valgrind"):
        assert f"install -y {program}" in ci, program
    assert "skipped" in section and "IWRELAY_REQUIRE_REDIS" in section


@pytest_twisted.ensureDeferred
async def test_the_quick_start_runs(spawn):
    """The README's run command, as given but on a free port, serves /health."""
    install, run = literal_block(README, "Install and run")
    assert install == "pip install ."
    assert run == "twistd -n iwrelay --port tcp:3000"
    assert "curl localhost:3000/health" in README
    port = free_port()
    argv = shlex.split(run.replace("tcp:3000", f"tcp:{port}:interface=127.0.0.1"))
    relay = spawn([TWISTD, *argv[1:]])
    await relay.wait_serving(port)
    code, _, _ = await http_get(port, "/health")
    assert code == 200
    # It writes twistd.pid in the current directory (left behind if it is killed),
    # which git ignores.
    assert relay.stdout_path.with_name("twistd.pid").exists()
    assert "twistd.pid" in (ROOT / ".gitignore").read_text().split()
    assert await stop_relay(relay) == 0


def test_examples_that_start_several_relays_give_each_its_own_pidfile():
    """From one directory, a second `twistd` stops at the first one's twistd.pid."""
    checked = 0
    for path in [ROOT / "README.rst", *DOCS.glob("*.rst")]:
        for block in re.findall(r"::\n\n((?:(?: {4}.*)?\n)+)", path.read_text()):
            starts = [line for line in block.splitlines()
                      if re.match(r"\s*(taskset -c \d+ )?twistd ", line)]
            if len(starts) > 1:
                checked += 1
                for line in starts:
                    assert "--pidfile=" in line.split(" iwrelay")[0], (path.name, line)
    assert checked >= 2


def test_configuration_page_is_current():
    """docs/configuration.rst is what `python -m iw_relay.options` writes."""
    page = (DOCS / "configuration.rst").read_text()
    assert page == configuration_page(), (
        "run: python -m iw_relay.options > docs/configuration.rst")


def test_docs_build_without_warnings(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(DOCS), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    for page in ("index", "protocol", "configuration", "operations", "security", "scaling",
                 "performance", "signaling", "embedding", "changelog"):
        assert (tmp_path / "html" / f"{page}.html").exists(), page


def test_package_version_is_the_changelogs_latest_release():
    """setup.py takes iw_relay.__version__; the changelog's first heading names it."""
    import iw_relay

    changelog = (ROOT / "docs" / "changelog.rst").read_text(encoding="utf-8")
    first = re.search(r"^(\d+\.\d+\.\d+) \((unreleased|[^)]*)\)$", changelog, re.M)
    assert first is not None, "docs/changelog.rst has no release heading"
    release, when = first.groups()
    expected = release + (".dev0" if when == "unreleased" else "")
    assert iw_relay.__version__ == expected
