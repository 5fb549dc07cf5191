"""The Docker image cannot be built here (no engine), so check what can be checked from the files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile

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


def test_the_build_context_is_what_the_dockerfile_copies():
    """The context is the repository root, where the README's install makes .venv (gigabytes), beside .git and
    feature stores: .dockerignore leaves out everything but what the Dockerfile copies."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    kept = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = {source for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), re.M)
              for source in line.split()[:-1]}
    assert copied == kept, f"the Dockerfile copies {sorted(copied)}, .dockerignore sends {sorted(kept)}"
    # a package's build reads its license file, which the image must be given
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license-files"] == ["LICENSE"]


def test_the_source_distribution_carries_every_tracked_file_its_tests_need(tmp_path):
    """setuptools adds tests/test_*.py to an sdist on its own, not conftest.py or the stand-in library they import:
    the tests of an unpacked sdist failed to import. Built from a copy of the tracked files, as a clean clone."""
    pytest.importorskip("setuptools.build_meta", reason="building an sdist needs setuptools")
    tracked = _tracked_files()
    source = tmp_path / "src"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=source, capture_output=True, text=True)
    if build.returncode and _old_setuptools():
        pytest.skip("setuptools before 77 cannot read an SPDX license (pip's build isolation fetches a newer one)")
    assert build.returncode == 0, build.stderr[-2000:]
    with tarfile.open(tmp_path / "dist" / build.stdout.split()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        info = sdist.extractfile(next(m for m in sdist.getmembers() if m.name.endswith("/PKG-INFO"))).read().decode()
    assert not sorted(set(tracked) - {".gitignore"} - names)  # conftest.py, tests/standin/, docker/, benchmarks/
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert "License-Expression: MIT" in info and "LICENSE" in names


def _tracked_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"{REPO} is not a git checkout: its tracked files are unknown")
    return [name for name in listed.splitlines() if (REPO / name).is_file()]


def _old_setuptools() -> bool:
    import setuptools

    return int(setuptools.__version__.split(".")[0]) < 77
