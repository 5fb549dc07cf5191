"""The Docker image cannot be built here (no engine), so check what can be checked from the files."""

from __future__ import annotations

import re

import pytest
from conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

DOCKERFILE = REPO / "docker" / "Dockerfile"


def _pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups() for d in deps if "==" in d)


def test_dockerfile_pins_match_pyproject():
    pins = _pyproject_pins()
    assert {"torch", "torchvision", "torchaudio"} <= pins.keys()
    text = DOCKERFILE.read_text()
    installed = dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", text))
    assert installed == pins, f"Dockerfile pins {installed} differ from pyproject.toml's {pins}"


def test_dockerfile_runs_bmfn_with_a_cache_volume():
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["[^"]*/bmfn"\]', text, re.M)
    assert re.search(r"^VOLUME .*\"/cache\"", text, re.M)
    assert "TORCH_HOME=/cache" in text
    assert re.search(r"\bTORCHINDUCTOR_CACHE_DIR=/cache/", text)  # --compile's kernels outlive the container
    # NVDEC's library is mounted only with the video capability (`--video-decoder cuda`)
    assert re.search(r"^\s*NVIDIA_DRIVER_CAPABILITIES=\S*\bvideo\b", text, re.M)
    assert (REPO / "docker" / "README.md").read_text().count("--gpus all") >= 1
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "nvcodec" in extras and re.search(r'pip install "\.\[nvcodec\]"', text)  # `--video-decoder nvcodec`
