"""Shared fixtures: paths to the real data the tests use."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_IMAGE = REPO / "resources" / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_image() -> Path:
    """The CMU-1-Small-Region H&E: `make` fetches it into resources/, shared/data has a copy."""
    if DEMO_IMAGE.exists():
        return DEMO_IMAGE
    shared = SHARED_DATA / "he" / "cmu_small_region.svs"
    if shared.exists():
        return shared
    from stmdit.resources import fetch_demo_image

    return fetch_demo_image(DEMO_IMAGE)


@pytest.fixture(scope="session")
def visium_folders() -> dict[str, Path]:
    """The two real Space Ranger folders of shared/data (1.x and 3.0 layouts); skip when absent."""
    root = SHARED_DATA / "visium"
    if not root.exists():
        pytest.skip("shared/data/visium is not beside this clone")
    return {
        "sr1": root / "mouse_muscle_Vis5A_sr1",
        "sr3": root / "mouse_placenta_cytassist_sr3",
    }
