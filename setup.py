import re

from setuptools import find_packages, setup

# One version, iw_relay.__version__ (read, not imported: the dependencies may be missing).
with open("iw_relay/__init__.py", encoding="utf-8") as init:
    VERSION = re.search(r'^__version__ = "([^"]+)"', init.read(), re.M).group(1)

setup(
    name="iw-relay",
    version=VERSION,
    description="WebSocket relay for real-time collaborative editing (Twisted + Autobahn)",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["iw_relay", "iw_relay.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/iwrelay.py"], "iw_relay.demo": ["*.html"],
                  # the Redis backplane's scripts, read with importlib.resources
                  "iw_relay.backplane": ["lua/*.lua"],
                  "iw_relay.static": ["*.js"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "pyjwt>=2.8",
        "prometheus-client>=0.20",
        # iw_relay/_autobahn.py reaches into its internals: tested with 26.10.2 only.
        "autobahn>=26.10.2,<26.11",
        "service-identity",
        "pyopenssl",
        "txredisapi>=1.4.10",
        "hiredis",  # txredisapi parses replies with it: a third of the CPU per message
    ],
    extras_require={
        "test": [
            "pytest", "pytest-twisted", "pytest-timeout", "treq", "trustme", "hypothesis",
            "ruff", "pyyaml", "docutils",
            # tests/test_static_checks.py: mypy with the plugin that understands
            # zope.interface (Twisted's interfaces); settings in mypy.ini.
            "mypy", "mypy-zope",
            # tests/test_readme.py builds docs/ with warnings as errors.
            "sphinx",
            # Drives the system's chromium (apt-get install chromium) in test_browser.py;
            # never `playwright install`.
            "playwright",
        ],
        # iwrelay-bench: picows is its WebSocket client, uvloop its event loop.
        "bench": ["uvloop", "picows"],
    },
    entry_points={
        "console_scripts": ["iwrelay-bench = iw_relay.bench.cli:main"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: WWW/HTTP",
    ],
)
