"""The weights registry: cache location, checksums, local files, downloads (file:// URLs) and offline errors."""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import itertools
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bmfn_pipeline.errors import BmfnError
from extractors import weights
from extractors.vggish import _NUMPY_PICKLE_GLOBALS  # what the VGGish PCA file needs
from extractors.weights import (
    WEIGHTS,
    cache_dir,
    file_checksum,
    random_provenance,
    random_weights_provenance,
    read_torch_file,
    use_compile_cache,
    weight_path,
    weights_provenance,
)

CONTENT = b"not really weights, but bytes with a known digest\n" * 1000


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("BMFN_CACHE", str(directory))
    return directory


def _fake_entry(monkeypatch: pytest.MonkeyPatch, name: str, url: str, checksum: str) -> weights.WeightFile:
    """Point registry entry `name` at a test URL and checksum for the duration of one test."""
    entry = dataclasses.replace(WEIGHTS[name], url=url, checksum=checksum)
    monkeypatch.setitem(WEIGHTS, name, entry)
    return entry


def _served(tmp_path: Path, content: bytes = CONTENT) -> Path:
    source = tmp_path / "server" / "file.bin"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(content)
    return source


def test_registry_names_and_checksums():
    assert set(WEIGHTS) == {"vgg19-keras", "vgg19-torchvision", "vggish", "vggish-pca"}
    for name, entry in WEIGHTS.items():
        assert entry.name == name
        assert entry.url.endswith("/" + entry.filename)
        assert re.fullmatch(r"(md5:[0-9a-f]{32}|sha256:[0-9a-f]{8,64})", entry.checksum), entry.checksum
        # torch.hub names carry a SHA-256 prefix after the last dash: the registry must check exactly that.
        hub = re.search(r"-([0-9a-f]{8,})\.pth$", entry.filename)
        if hub:
            assert entry.checksum == f"sha256:{hub.group(1)}"
    assert WEIGHTS["vgg19-keras"].filename == "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert WEIGHTS["vgg19-keras"].preprocessing == "caffe"
    assert WEIGHTS["vgg19-torchvision"].preprocessing == "torchvision"
    assert {WEIGHTS[n].option for n in ("vgg19-keras", "vgg19-torchvision")} == {"--vgg19-weights"}
    assert WEIGHTS["vggish"].option == "--vggish-weights"
    assert "pca_weights=" in WEIGHTS["vggish-pca"].option  # no command reads the PCA file: the Python argument


@pytest.mark.parametrize("at_import, now, expected", [
    (None, None, "bmfn"), (None, "torch's default", "bmfn"),  # unset; unset, then written by torch._dynamo's import
    ("", "", "bmfn"), ("", "cwd", "bmfn"),  # empty (torch would make it the working directory)
    ("mine", "mine", "mine"), ("torch's default", "torch's default", "torch's default"),  # the user's, kept
    (None, "mine", "mine"), ("~/mine", "~/mine", "home/mine")])  # set after bmfn's import; a ~ expanded
def test_compile_cache_is_in_bmfns_cache_unless_the_user_set_torchs_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_import, now, expected):
    """Torch's default is under /tmp, which reboots and clean-ups empty: `train --compile` would compile again."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    names = {"torch's default": default_cache_dir(), "cwd": str(tmp_path / "cwd"), "mine": str(tmp_path / "mine"),
             "~/mine": "~/mine", "home/mine": str(tmp_path / "home" / "mine"),
             "bmfn": str(tmp_path / "bmfn" / "inductor")}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "bmfn"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(weights, "_COMPILE_CACHE_AT_IMPORT", names.get(at_import, at_import))
    if now is None:
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", names.get(now, now))
    assert use_compile_cache() == Path(names[expected])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == names[expected]  # what torch then reads
    if expected == "bmfn" and now == "cwd":
        torch._dynamo.reset()
        torch.compile(lambda x: torch.relu(x.sin() + 1))(torch.randn(8))  # what torch writes goes there
        assert any(path.is_file() for path in (tmp_path / "bmfn" / "inductor").rglob("*"))
        assert not any((tmp_path / "cwd").iterdir())


def test_a_compile_cache_that_cannot_be_made_in_bmfns_cache_is_torchs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "a-file"))
    monkeypatch.setattr(weights, "_COMPILE_CACHE_AT_IMPORT", None)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache() == Path(default_cache_dir())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BMFN_CACHE", raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "torch" / "bmfn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # as torch.hub finds its TORCH_HOME
    assert cache_dir() == tmp_path / "xdg" / "torch" / "bmfn"
    # a file that an earlier bmfn (which ignored XDG_CACHE_HOME) cached is used where it is, not downloaded again
    earlier = tmp_path / "home" / ".cache" / "torch" / "bmfn" / WEIGHTS["vggish"].filename
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"cached before")
    assert weights._cached(WEIGHTS["vggish"]) == earlier and weights.weight_available("vggish")
    (tmp_path / "xdg" / "torch" / "bmfn").mkdir(parents=True)
    (tmp_path / "xdg" / "torch" / "bmfn" / WEIGHTS["vggish"].filename).write_bytes(b"cached since")
    assert weights._cached(WEIGHTS["vggish"]) == tmp_path / "xdg" / "torch" / "bmfn" / WEIGHTS["vggish"].filename
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert cache_dir() == tmp_path / "torch" / "bmfn"
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "bmfn"))
    assert cache_dir() == tmp_path / "bmfn"
    # where TORCH_HOME or BMFN_CACHE names the cache, the earlier bmfn's folder is not looked in
    for variable in ("BMFN_CACHE", "TORCH_HOME"):
        with monkeypatch.context() as patched:
            patched.delenv(variable)
            assert weights._cached(WEIGHTS["vggish"]) == cache_dir() / WEIGHTS["vggish"].filename
            assert not weights.weight_available("vggish")
    monkeypatch.setenv("BMFN_CACHE", "~/bmfn")  # a ~ is the user's home, not a folder named ~
    assert cache_dir() == tmp_path / "home" / "bmfn"


def test_file_checksum_known_digests(tmp_path: Path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert file_checksum(path, "md5") == "900150983cd24fb0d6963f7d28e17f72"
    assert file_checksum(path, "sha256") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_local_file_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path):
    local = _served(tmp_path)
    _fake_entry(monkeypatch, "vggish", "file:///nowhere", "sha256:" + hashlib.sha256(CONTENT).hexdigest()[:8])
    assert weight_path("vggish", local) == local
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weight_path("vggish", "~/server/file.bin") == local  # a ~ is the user's home
    assert weights.weight_available("vggish", local) and not weights.weight_available("vggish")
    assert [p.name for p in cache.iterdir()] == [weights.VERIFIED_FILE], \
        "a local file must be used in place, not copied or downloaded"

    digest = hashlib.sha256(CONTENT).hexdigest()
    _fake_entry(monkeypatch, "vggish", "file:///nowhere", f"sha256:{digest[:7]}{'1' if digest[7] == '0' else '0'}")
    with pytest.raises(BmfnError, match="sha256"):  # every digit of a prefix counts, its last one too
        weight_path("vggish", local)

    _fake_entry(monkeypatch, "vggish", "file:///nowhere", "md5:" + hashlib.md5(b"other").hexdigest())
    with pytest.raises(BmfnError, match=re.escape(str(local))) as err:
        weight_path("vggish", local)
    assert "md5" in str(err.value) and "\n" not in str(err.value)


def test_a_cache_that_is_a_file_costs_the_record_not_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """BMFN_CACHE naming a file: the verification is not remembered, and the weights are used all the same."""
    local = _served(tmp_path)
    _fake_entry(monkeypatch, "vggish", "file:///nowhere", "sha256:" + hashlib.sha256(CONTENT).hexdigest())
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BMFN_CACHE", str(tmp_path / "a-file"))
    assert weight_path("vggish", local) == local
    with pytest.raises(BmfnError, match=r"a-file: the weights cache folder is a file; set BMFN_CACHE to a folder, "
                                        r"or give a local copy with --vggish-weights"):
        weight_path("vggish")  # not "cannot download ... (File exists); download it to .../a-file/vggish..."


def test_a_verified_file_is_hashed_again_only_when_it_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               cache: Path):
    local = _served(tmp_path)
    _fake_entry(monkeypatch, "vggish", "file:///nowhere", "sha256:" + hashlib.sha256(CONTENT).hexdigest())
    hashed = []
    monkeypatch.setattr(weights, "file_checksum", lambda *a: hashed.append(a) or file_checksum(*a))
    for _ in range(3):
        assert weight_path("vggish", local) == local
    assert len(hashed) == 1 and (cache / weights.VERIFIED_FILE).is_file()

    local.write_bytes(CONTENT.upper())  # the same size, other bytes: the stamp no longer matches
    with pytest.raises(BmfnError, match="sha256"):
        weight_path("vggish", local)
    assert len(hashed) == 2
    local.write_bytes(CONTENT)  # matched again, and stamped again
    weight_path("vggish", local), weight_path("vggish", local)
    assert len(hashed) == 3

    _fake_entry(monkeypatch, "vggish", "file:///nowhere", "md5:" + hashlib.md5(CONTENT).hexdigest())
    weight_path("vggish", local)  # a stamp holds for the checksum it was made for only
    assert len(hashed) == 4
    (cache / weights.VERIFIED_FILE).write_text("{damaged")  # an unreadable record means hashing, not an error
    weight_path("vggish", local)
    assert len(hashed) == 5
    (cache / weights.VERIFIED_FILE).write_text("[]")  # JSON, but no record of files: hashing too
    weight_path("vggish", local)
    assert len(hashed) == 6

    before = local.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity: the change time moves on
    local.write_bytes(CONTENT.upper())
    os.utime(local, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -d` sets it back: size and mtime as then
    with pytest.raises(BmfnError, match="md5"):
        weight_path("vggish", local)
    assert len(hashed) == 7


def test_missing_local_file_names_it_and_the_option(tmp_path: Path):
    missing = tmp_path / "vgg19.h5"
    with pytest.raises(BmfnError, match=re.escape(str(missing))) as err:
        weight_path("vgg19-keras", missing)
    assert "--vgg19-weights" in str(err.value)


def test_download_verifies_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path):
    umask = 0o022
    previous = os.umask(umask)
    try:
        _check_download_and_cache(tmp_path, monkeypatch, cache, umask)
    finally:
        os.umask(previous)


def _check_download_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path, umask: int) -> None:
    monkeypatch.setenv("TQDM_DISABLE", "1")  # a download without a progress bar is still complete
    source = _served(tmp_path)
    entry = _fake_entry(monkeypatch, "vggish-pca", source.as_uri(), "sha256:" + hashlib.sha256(CONTENT).hexdigest())
    path = weight_path("vggish-pca")
    assert path == cache / entry.filename
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in cache.iterdir()) == sorted([entry.filename, weights.VERIFIED_FILE]), \
        "no partial download may be left behind"

    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by all where the umask says so, not private
    source.unlink()  # a second call must use the cache, not the network, nor hash the file it just verified
    with monkeypatch.context() as patched:
        patched.setattr(weights, "file_checksum", lambda *a: pytest.fail("hashed again, unchanged"))
        assert weight_path("vggish-pca") == path

    path.write_bytes(b"damaged")  # a cached file is checked too: it may have been put there by hand
    with pytest.raises(BmfnError, match=re.escape(str(path))):
        weight_path("vggish-pca")


def test_download_with_wrong_checksum_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path):
    source = _served(tmp_path)
    _fake_entry(monkeypatch, "vgg19-torchvision", source.as_uri(), "sha256:00000000")
    with pytest.raises(BmfnError, match=re.escape(source.as_uri())):
        weight_path("vgg19-torchvision")
    assert not any(cache.iterdir()), "a file that failed its checksum must not reach the cache"


def test_offline_error_names_url_cache_and_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path):
    url = (tmp_path / "unreachable.h5").as_uri()
    entry = _fake_entry(monkeypatch, "vgg19-keras", url, WEIGHTS["vgg19-keras"].checksum)
    for download in (True, False):
        with pytest.raises(BmfnError) as err:
            weight_path("vgg19-keras", download=download)
        message = str(err.value)
        assert url in message and str(cache / entry.filename) in message and "--vgg19-weights" in message
        assert "\n" not in message


def test_downloads_off_means_no_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path):
    """download=False with the file reachable: refused all the same, and nothing reaches the cache."""
    source = _served(tmp_path)
    _fake_entry(monkeypatch, "vggish", source.as_uri(), "sha256:" + hashlib.sha256(CONTENT).hexdigest())
    with pytest.raises(BmfnError, match=rf"^vggish weights not cached at {re.escape(str(cache))}.* and downloads are "
                                        "off; download it to "):
        weight_path("vggish", download=False)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_download_without_a_length_is_kept_and_a_stalled_one_times_out(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch, cache: Path):
    """A server that sends no Content-Length (chunked transfer) gives the whole file, not "interrupted after N of 0
    bytes"; the connection is opened with DOWNLOAD_TIMEOUT_S, so a stalled one counts as offline, not a hang."""
    entry = _fake_entry(monkeypatch, "vggish", "https://example.invalid/vggish-10086976.pth",
                        "sha256:" + hashlib.sha256(CONTENT).hexdigest())

    class Response(io.BytesIO):
        headers: dict = {}

    opened = []
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(weights.urllib.request, "urlopen",
                        lambda url, **kw: opened.append((url, kw)) or Response(CONTENT))
    assert weight_path("vggish").read_bytes() == CONTENT
    assert opened == [(entry.url, {"timeout": weights.DOWNLOAD_TIMEOUT_S})]


def test_a_cut_or_garbled_download_is_one_line_naming_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               cache: Path):
    entry = _fake_entry(monkeypatch, "vggish", "https://example.invalid/vggish-10086976.pth", "sha256:10086976")

    class Response(io.BytesIO):
        headers = {"Content-Length": str(2 * len(CONTENT))}  # the server meant to send twice as much

    monkeypatch.setenv("TQDM_DISABLE", "1")  # no progress bar (batch jobs, CI): the bytes are still counted
    for reply, reason in ((lambda *a, **k: Response(CONTENT), f"interrupted after {len(CONTENT)} of "),
                          (http.client.IncompleteRead(b"partial"), "IncompleteRead"),
                          (http.client.BadStatusLine("garbage"), "garbage")):
        with monkeypatch.context() as patched:
            if isinstance(reply, Exception):
                def reply(*a, error=reply, **k):
                    raise error
            patched.setattr(weights.urllib.request, "urlopen", reply)
            with pytest.raises(BmfnError) as err:
                weight_path("vggish")
        message = str(err.value)
        assert message.startswith(f"cannot download {entry.url} (") and reason in message and "\n" not in message
        assert "--vggish-weights PATH" in message
        assert not cache.exists() or not any(cache.iterdir()), "nothing of a failed download is kept"
    with pytest.raises(BmfnError, match=re.escape("give a local copy with load_audio_extractor(pca=True, "
                                                  "pca_weights=PATH)")):
        weight_path("vggish-pca", download=False)


def test_unknown_name():
    with pytest.raises(BmfnError, match="vgg16"):
        weight_path("vgg16")


def test_provenance_records(tmp_path: Path):
    record = weights_provenance("vgg19-keras", tmp_path / WEIGHTS["vgg19-keras"].filename)
    assert record == {
        "weights": "vgg19-keras",
        "file": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "checksum": WEIGHTS["vgg19-keras"].checksum,
    }
    assert random_provenance(7) == "random:7"
    assert random_weights_provenance(7) == {"weights": "random", "file": "", "checksum": "random:7"}


class _Unsafe:
    """A pickled object that is no tensor or plain data: the weights-only unpickler must refuse it."""


def test_read_torch_file_loads_weights_and_names_each_kind_of_bad_file(tmp_path: Path):
    state = {"layer.weight": torch.arange(6.0).reshape(2, 3), "meta": {"epoch": 3}}
    good = tmp_path / "good.pt"
    torch.save(state, good)
    legacy = tmp_path / "legacy.pt"  # torch.save's format before PyTorch 1.6, as old weight releases are
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for path, mmap in itertools.product((good, legacy), (False, True)):  # a legacy file is read, not mapped
        loaded = read_torch_file(path, "test file", mmap=mmap)
        assert torch.equal(loaded["layer.weight"], state["layer.weight"]) and loaded["meta"] == {"epoch": 3}

    text = tmp_path / "notes.pt"
    text.write_text("garbage\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"object": _Unsafe()}, unsafe)
    numpy_file = tmp_path / "numpy.pt"
    torch.save({"array": np.arange(3.0)}, numpy_file)
    expected = {
        tmp_path / "missing.pt": "cannot read the test file",
        text: "not a test file: not a file written by torch.save",
        truncated: "not a readable test file: truncated or damaged",
        unsafe: "not a test file: it holds Python objects other than tensors and plain data",
        numpy_file: "not a test file: it holds Python objects",
    }
    for (path, message), mmap in itertools.product(expected.items(), (False, True)):
        with pytest.raises(BmfnError, match=f"^{re.escape(f'{path}: {message}')}") as err:
            read_torch_file(path, "test file", mmap=mmap)
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    # what `allow` names is unpickled, and nothing else
    allowed = read_torch_file(numpy_file, "test file", allow=_NUMPY_PICKLE_GLOBALS)
    np.testing.assert_array_equal(allowed["array"], np.arange(3.0))
