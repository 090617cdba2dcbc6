"""Shared fixtures. Data is read at run time from ../shared/data (never copied into the repo)."""

import os
from pathlib import Path

import pytest

pytest_plugins = ["fixtures.bundle", "fixtures.server", "fixtures.pacs"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RADREGION_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set RADREGION_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def unifesp(shared_data) -> Path:
    return shared_data / "unifesp"


@pytest.fixture(scope="session")
def real_dicoms(shared_data) -> list:
    return sorted((shared_data / "dicom").glob("*.dcm"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the image cache of a test run out of the user's home."""
    os.environ.setdefault("RADREGION_CACHE", str(tmp_path_factory.mktemp("cache")))
