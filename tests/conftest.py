"""Shared fixtures: the real media and AVE files beside the repository in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _shared_dir(sub: str) -> Path:
    path = SHARED / sub
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the real media and AVE files live in ../shared beside the repository")
    return path


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """../shared/media: real clips, sounds and photos (see its README)."""
    return _shared_dir("media")


@pytest.fixture(scope="session")
def video_dir(media_dir: Path) -> Path:
    return media_dir / "video"


@pytest.fixture(scope="session")
def ave_dir() -> Path:
    """../shared/ave: the AVE annotation, split and label files."""
    return _shared_dir("ave")


@pytest.fixture
def one_torch_thread():
    """One torch thread: small models run no slower, and parallel test processes do not fight for the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
