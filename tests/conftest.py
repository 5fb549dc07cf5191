"""Shared fixtures (the real media and AVE files beside the repository in ../shared) and test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUFFERED = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # as most shells run it
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
def resampy():
    """resampy 0.2.2, the reference bmfn_pipeline/resample.py is held to (pyproject's test extra)."""
    return pytest.importorskip("resampy", reason="resampy 0.2.2, the reference of bmfn_pipeline/resample.py, "
                               "installs only on Python < 3.12 (its setup.py imports `imp`)")


@pytest.fixture(scope="session")
def ave_dir() -> Path:
    """../shared/ave: the AVE annotation, split and label files."""
    return _shared_dir("ave")


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory):
    """A weights cache of the test session's own: tests write int8 models and verification records there, never in
    the user's cache (tests that look into a cache set BMFN_CACHE themselves)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BMFN_CACHE", str(tmp_path_factory.mktemp("bmfn-cache")))
        yield


@pytest.fixture
def one_torch_thread():
    """One torch thread: small models run no slower, and parallel test processes do not fight for the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def per_branch_state_dict(state: dict) -> dict:
    """A grouped BMFN state_dict in the layout of bmfn before grouping (one module per block), written here
    independently of bmfn_pipeline.model.group_state_dict, whose inverse it is."""
    blocks = {"self_attention": ("av_self_attention", "visual_self_attention", "audio_self_attention"),
              "cross_modal": ("fa1", "fa2", "ba1", "ba2"), "fusion": ("fbfm1", "fbfm2")}
    per_branch = {}
    for key, value in state.items():
        group, _, rest = key.partition(".")
        if group not in blocks:
            per_branch[key] = value
        elif rest.startswith("affines."):
            _, index, name = rest.split(".", 2)
            per_branch[f"{blocks[group][int(index)]}.affine.{name}"] = value
        else:
            for index, block in enumerate(blocks[group]):
                if rest.endswith("num_batches_tracked"):
                    part = value
                elif any(f".{name}." in rest for name in ("w7", "bn7", "w8", "bn8")):
                    part = value.chunk(len(blocks[group]))[index]  # channel groups
                else:
                    part = value[index]
                per_branch[f"{block}.{rest}"] = part
    return per_branch


def write_rotated_clip(path: Path, rotation: int, hflip: bool = False) -> Path:
    """1 s of 64x48 frames, white in the top-left quarter, stored with a display matrix that turns them `rotation`
    degrees counter-clockwise, then mirrors them left-right with `hflip`, for display (as phone videos are)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(rotation, hflip=hflip)
        image = np.zeros((48, 64, 3), np.uint8)
        image[:24, :32] = 255
        for _ in range(10):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path
