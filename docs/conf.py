"""Sphinx configuration: ``python -m sphinx -W -b html docs build/docs``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iw_relay import __version__  # noqa: E402

project = "iw-relay"
author = "the iw-relay authors"
copyright = "iw-relay authors"  # noqa: A001
version = release = __version__
extensions: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
