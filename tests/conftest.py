"""Fixtures shared by the harness's own tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from fixtures.standalone.backend import StandalonePlatform

PLATFORM = Path(__file__).resolve().parents[1] / "platform"


@pytest.fixture(scope="module")
def prepared() -> Iterator[StandalonePlatform]:
    """The repository's platform translated (nothing started); its run dir is removed after."""
    plat = StandalonePlatform(PLATFORM).prepare()
    try:
        yield plat
    finally:
        shutil.rmtree(plat.run_dir, ignore_errors=True)
