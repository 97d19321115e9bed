"""pytest setup of tests/python: makes kept_testing importable whatever the working directory
or import mode (ctest runs pytest from the build tree), and provides the `kept_bin` fixture."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Imported before any test module: it sets HF's offline environment before transformers loads.
import kept_testing  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kept_bin() -> Path:
    """The kept binary: env KEPT_BIN (ctest sets it), else build/reference/kept."""
    return kept_testing.find_kept_bin()
