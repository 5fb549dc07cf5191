"""The pretrained weight files bmfn knows: where they come from, how to check them, where they are cached.

No weights ship with bmfn (features-reference.md section 4: no PyPI package carries them), so every
extractor resolves its file here: a local file given by option, else the cache, else a download that is
checksummed before it becomes visible in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import http.client
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from bmfn_pipeline.errors import BmfnError

# Read files in 1 MiB pieces when hashing and downloading.
CHUNK_BYTES = 1 << 20
# Seconds before a stalled connection counts as offline.
DOWNLOAD_TIMEOUT_S = 30
# In the cache directory: the files that matched their checksum, with their stat stamps then (see _verify).
VERIFIED_FILE = "verified.json"


@dataclass(frozen=True)
class WeightFile:
    """One published weight file.

    checksum is 'md5:<hex>' or 'sha256:<hex or hex prefix>'; a prefix is what torch.hub file names carry
    (name-<first hex digits of the SHA-256>.pth).
    """

    name: str
    url: str
    filename: str
    checksum: str
    preprocessing: str
    description: str
    option: str
    """What gives a local copy instead, as a user writes it: a CLI option, or a Python argument where no command
    reads the file."""


WEIGHTS: dict[str, WeightFile] = {
    "vgg19-keras": WeightFile(
        name="vgg19-keras",
        url="https://github.com/fchollet/deep-learning-models/releases/download/v0.1/"
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        filename="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        # md5 that keras-applications checks for this file (keras_applications/vgg19.py, file_hash of
        # WEIGHTS_PATH_NO_TOP); 80,134,624 bytes (features-reference.md 1.5).
        checksum="md5:253f8cb515780f3b799900260a226db6",
        preprocessing="caffe",
        description="Keras ImageNet VGG-19 (Oxford weights), no top: the extractor of the released AVE features",
        option="--vgg19-weights",
    ),
    "vgg19-torchvision": WeightFile(
        name="vgg19-torchvision",
        url="https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
        filename="vgg19-dcbb9e9d.pth",
        # torch.hub name convention: the SHA-256 prefix torchvision checks on download.
        checksum="sha256:dcbb9e9d",
        preprocessing="torchvision",
        description="torchvision VGG19_Weights.IMAGENET1K_V1: a different feature space from AVE's",
        option="--vgg19-weights",
    ),
    "vggish": WeightFile(
        name="vggish",
        url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
        filename="vggish-10086976.pth",
        # torch.hub name convention: SHA-256 prefix (features-reference.md 2.7).
        checksum="sha256:10086976",
        preprocessing="vggish-log-mel",
        description="torchvggish v0.1 port of the TF VGGish checkpoint (post-ReLU embedding)",
        option="--vggish-weights",
    ),
    "vggish-pca": WeightFile(
        name="vggish-pca",
        url="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish_pca_params-970ea276.pth",
        filename="vggish_pca_params-970ea276.pth",
        # torch.hub name convention: SHA-256 prefix (features-reference.md 2.7).
        checksum="sha256:970ea276",
        preprocessing="vggish-log-mel",
        description="AudioSet PCA and whitening parameters for VGGish embeddings (not used for AVE)",
        option="load_audio_extractor(pca=True, pca_weights=PATH)",
    ),
}

_CHECKSUM = re.compile(r"^(md5|sha256):([0-9a-f]+)$")


def cache_dir() -> Path:
    """$BMFN_CACHE, else $TORCH_HOME/bmfn, else <cache>/torch/bmfn with <cache> $XDG_CACHE_HOME or ~/.cache
    (torch.hub's default TORCH_HOME)."""
    if os.environ.get("BMFN_CACHE"):
        return Path(os.environ["BMFN_CACHE"]).expanduser()
    torch_home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "torch"
    return Path(torch_home).expanduser() / "bmfn"


# TORCHINDUCTOR_CACHE_DIR as it was when bmfn was imported: importing torch._dynamo writes into it (torch's default
# where it was unset, an absolute path where it was empty or relative).
_COMPILE_CACHE_AT_IMPORT = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def use_compile_cache() -> Path:
    """Where torch.compile keeps what it compiled: TORCHINDUCTOR_CACHE_DIR when the user set it, else
    cache_dir()/inductor, which this sets for the process. Torch's own default is under /tmp, which a reboot or a
    clean-up empties: the next `train --compile` then compiles again (56 s of a first epoch on an H100, 6.9 s from
    the cache). Torch still keeps a few things under /tmp whatever the variable says (CPU kernels' precompiled
    header, a GEMM-padding cache). Where bmfn's cache folder cannot be written, torch's default is used."""
    now = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # before the import below, which may write into it
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    at_import = _COMPILE_CACHE_AT_IMPORT
    torch_wrote = now != at_import and now == os.path.abspath(default_cache_dir() if at_import is None else at_import)
    given = at_import if torch_wrote else now
    directory = Path(given).expanduser() if given else cache_dir() / "inductor"
    if not given:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            writable = os.access(directory, os.W_OK)
        except OSError:  # a read-only cache, or BMFN_CACHE naming a file
            writable = False
        if not writable:
            directory = Path(default_cache_dir())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    return directory


def _cached(entry: WeightFile) -> Path:
    """Where `entry` is (or goes) in the cache. bmfn before XDG_CACHE_HOME was followed kept its files in
    ~/.cache/torch/bmfn whatever that said: a file found only there is used where it is, not downloaded again."""
    cached = cache_dir() / entry.filename
    earlier = Path("~/.cache/torch/bmfn").expanduser() / entry.filename
    uses_xdg = not (os.environ.get("BMFN_CACHE") or os.environ.get("TORCH_HOME"))
    return earlier if uses_xdg and not cached.is_file() and earlier.is_file() else cached


def file_checksum(path: str | os.PathLike, algo: str) -> str:
    """The full hex digest of a file with hashlib's `algo` ('md5' or 'sha256')."""
    digest = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# How a torch.save file begins: a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle protocol 2+ header.
_TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def read_torch_file(path: str | os.PathLike, what: str, *, allow: Iterable = (),
                    device: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """torch.load(path) onto `device` with the weights-only unpickler (tensors and plain data, plus the globals in
    `allow`), never unrestricted unpickling; a missing, foreign, truncated or unsafe file is a BmfnError naming
    the file, that it was read as `what`, and the problem.

    With `mmap`, a CPU load maps the file instead of reading it into memory: load_state_dict then copies each
    tensor from the file once, and tensors never used (last.pt's optimizer state, torchvision's classifier) are
    never read. Callers copy, never keep, the mapped tensors: a file rewritten in place under a mapping would change
    them, or fault where it shrank. The legacy format (before PyTorch 1.6) cannot be mapped and is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise BmfnError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not head.startswith(_TORCH_FILE_MAGIC):
        raise BmfnError(f"{path}: not a {what}: not a file written by torch.save")
    try:
        mapped = mmap and head == _TORCH_FILE_MAGIC[0] and torch.device(device).type == "cpu"
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=device, weights_only=True, mmap=mapped)
    except pickle.UnpicklingError:
        raise BmfnError(f"{path}: not a {what}: it holds Python objects other than tensors and plain data, which "
                        "bmfn does not unpickle (they could run code)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise BmfnError(f"{path}: not a readable {what}: truncated or damaged ({reason})") from None


def _verify(entry: WeightFile, path: Path, origin: str) -> None:
    """_check, unless `path` matched this checksum before and is unchanged since (size, times and inode as then):
    hashing VGGish's 288 MB and VGG-19's 80 MB would cost every command ~0.3 s."""
    key, stamp = str(path.resolve()), _stamp(entry, path)
    if _verified().get(key) == stamp:
        return
    _check(entry, path, origin)
    _remember(key, stamp)


def _stamp(entry: WeightFile, path: Path) -> list:
    info = path.stat()  # ctime too: no tool sets it back after a write, as `touch -d` sets mtime
    return [entry.checksum, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]


def _verified() -> dict[str, list]:
    """Each file's stamp when it last matched its checksum (VERIFIED_FILE in the cache; {} if absent or unreadable)."""
    try:
        records = json.loads((cache_dir() / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _remember(key: str, stamp: list) -> None:
    records = {**_verified(), key: stamp}
    target = cache_dir() / VERIFIED_FILE
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(records, indent=0))
        partial.replace(target)  # whole or absent; a record lost to a concurrent writer only means hashing again
    except OSError:  # a read-only or full cache: files are hashed each time, as they would be anyway
        with contextlib.suppress(OSError):  # a cache "folder" that is a file: nothing to remove
            partial.unlink(missing_ok=True)


def _check(entry: WeightFile, path: Path, origin: str) -> None:
    """Raise BmfnError unless `path` has the registered checksum; `origin` (a path or URL) leads the message."""
    algo, expected = _CHECKSUM.match(entry.checksum).groups()
    actual = file_checksum(path, algo)
    if not actual.startswith(expected):
        raise BmfnError(
            f"{origin}: {algo} {actual} does not match {entry.checksum} of {entry.filename}; "
            f"wrong or damaged {entry.name} weights file"
        )


def _download(entry: WeightFile, target: Path) -> None:
    """Fetch entry.url into a temporary file beside `target`, verify it, then rename it into place atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            total, received = int(response.headers.get("Content-Length") or 0) or None, 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.filename) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:  # a connection closed early, not a wrong file
            raise OSError(f"interrupted after {received} of {total} bytes")
        _check(entry, tmp, entry.url)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a file the user wrote (mkstemp's are private): a shared cache stays shared
        os.replace(tmp, target)
        _remember(str(target.resolve()), _stamp(entry, target))
    finally:
        tmp.unlink(missing_ok=True)


def weight_path(name: str, local_path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The verified file for weights `name`: `local_path` if given, else the cached copy, else a fresh download.

    Every file is checked against its checksum before use, a cached one too (it may have been put there by hand),
    and hashed again whenever it changed (_verify); a download only reaches the cache once verified. Offline or
    failed downloads raise one BmfnError line naming the URL, the cache path and the option.
    """
    if name not in WEIGHTS:
        raise BmfnError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
    entry = WEIGHTS[name]
    if local_path is not None:
        path = Path(local_path).expanduser()
        if not path.is_file():
            raise BmfnError(f"{path}: no such {entry.name} weights file (given with {_local_copy(entry)})")
        _verify(entry, path, str(path))
        return path
    cached = _cached(entry)
    if cached.is_file():
        _verify(entry, cached, str(cached))
        return cached
    remedy = f"download it to {cached} or give a local copy with {_local_copy(entry)}"
    if cached.parent.exists() and not cached.parent.is_dir():  # BMFN_CACHE naming a file, say
        raise BmfnError(f"{cached.parent}: the weights cache folder is a file; set BMFN_CACHE to a folder, or give "
                        f"a local copy with {_local_copy(entry)}")
    if not download:
        raise BmfnError(f"{entry.name} weights not cached at {cached} and downloads are off; {remedy} ({entry.url})")
    try:
        _download(entry, cached)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BmfnError(f"cannot download {entry.url} ({reason}); {remedy}") from exc
    return cached


def _local_copy(entry: WeightFile) -> str:
    return f"{entry.option} PATH" if entry.option.startswith("--") else entry.option


def weight_available(name: str, local_path: str | os.PathLike | None = None) -> bool:
    """Whether weight_path(name, local_path) would use a file already here (given or cached) rather than download."""
    return local_path is not None or (name in WEIGHTS and _cached(WEIGHTS[name]).is_file())


def weights_provenance(name: str, path: str | os.PathLike) -> dict[str, str]:
    """What to record about a verified weights file: registry name, file name and the checksum it matched."""
    return {"weights": name, "file": Path(path).name, "checksum": WEIGHTS[name].checksum}


def random_provenance(seed: int) -> str:
    """The checksum stand-in recorded for seeded random weights (tests and demos only)."""
    return f"random:{seed}"


def random_weights_provenance(seed: int) -> dict[str, str]:
    """weights_provenance's record for seeded random weights: no name, no file, 'random:<seed>'."""
    return {"weights": "random", "file": "", "checksum": random_provenance(seed)}


def uninitialised(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its parameters allocated but not initialised, for loaders that set every one: PyTorch's
    default initialisation costs every command ~0.4 s for VGG-19's 20 M weights and ~0.3 s for VGGish's 72 M,
    ~0.2 s for BMFN's 27 M."""
    with torch.device("meta"):
        module = build()
    # Not module.to_empty(): its empty_like on meta tensors imports sympy, another 0.6 s. The strides are kept (BMFN's
    # grouped weights are held transposed: model.grouped_weight).
    return module._apply(lambda tensor: torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype))
