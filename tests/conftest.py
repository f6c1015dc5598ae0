"""Shared test helpers."""

import sys
from pathlib import Path

# The installed `tessera` console script of the environment running the tests (which need not be
# on PATH: `make test` calls .venv/bin/python directly).
TESSERA = str(Path(sys.executable).parent / "tessera")
