"""Extraction: video files -> per-second VGG-19 pool5 maps and VGGish embeddings in a resumable feature store.

Decoding runs in worker processes while the main process runs the networks, so the device never waits on
FFmpeg; each finished clip goes to the store whole (store.py makes that crash-safe), and a clip that fails is
recorded with its error while the others go on.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bmfn_pipeline import __version__
from bmfn_pipeline.ave import load_splits, read_annotations
from bmfn_pipeline.decode import (DecodedClip, decode_many, find_videos, refuse_in_starting_worker, usable_cores,
                                  video_hwaccel)
from bmfn_pipeline.distributed import (Shard, finish_together, rank_device, rank_env, resolve_device, resolve_shard,
                                       start_together)
from bmfn_pipeline.errors import BmfnError, WriteError, check_counts, one_line, printable
from bmfn_pipeline.store import STORAGE_DTYPES, ClipLabels, FeatureStore, labels_from_annotations
from extractors.vgg19 import SOURCES, VisualExtractor, load_visual_extractor
from extractors.vggish import AudioExtractor, load_audio_extractor
from extractors.vggish_input import with_examples
from extractors.weights import weight_available

# AVE clips are 10 s and each segment is sampled at 16 frames (features-reference.md 1.1).
CLIP_SECONDS = 10
FRAMES_PER_SECOND = 16


@dataclass
class ExtractOptions:
    """Everything that decides what features a clip gets, plus how fast they are made."""

    frames_per_second: int = FRAMES_PER_SECOND
    seconds: int = CLIP_SECONDS
    visual_source: str = "ave"  # 'ave' (Keras VGG-19, caffe input) or 'torchvision'
    vgg19_weights: str | None = None  # local file; None = cache or download
    vggish_weights: str | None = None
    random_seed: int | None = None  # random weights for tests and the demo only, recorded as random:<seed>
    alignment: str = "ave"  # VGGish framing: 'ave' (0.96 s hops, as released) or 'exact' (1 s windows)
    dtype: str = "float32"  # storage dtype
    device: str = "auto"
    precision: str = "auto"  # VGG-19: float32, bfloat16 or int8 (CPUs); auto: bf16 where fast, see fast_bfloat16
    batch_size: int | None = None  # frames per VGG-19 forward; None: vgg19.default_batch_size of the device
    compile: bool = False  # torch.compile VGG-19: same features to float rounding, a little faster, slower start
    workers: int | None = None  # decoding processes; 0 decodes in the main process; None: decode_workers decides
    video_decoder: str = "cpu"  # "cuda"/"nvcodec": NVDEC on the extraction GPU (decode module docstring); same frames

    def __post_init__(self) -> None:
        check_counts("ExtractOptions", frames_per_second=self.frames_per_second, seconds=self.seconds,
                     batch_size=self.batch_size)
        check_counts("ExtractOptions", minimum=0, workers=self.workers)
        if self.random_seed is not None and (self.vgg19_weights or self.vggish_weights):
            raise BmfnError("random weights were asked for together with weight files: choose one")


@dataclass
class ExtractSummary:
    """What one extract() call did, by clip id; each clip's notes (a short clip, a late sound) are in the store."""

    out: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)
    unlabelled: list[str] = field(default_factory=list)  # clips of the store without a label
    unmatched_annotations: bool = False  # annotations were given, and none of this run's clips has a row there

    def line(self) -> str:
        text = f"{len(self.done)} extracted, {len(self.skipped)} already done, {len(self.failed)} failed -> {self.out}"
        if self.unlabelled:
            text += f" ({len(self.unlabelled)} without an annotation row)"
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "out": str(self.out), "failed": [{"path": p, "error": e} for p, e in self.failed]}


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bf16 VGG-19 is faster than float32 here: CUDA, or a CPU with native bf16 (AVX512-BF16, AMX).

    bf16 pool5 maps stay within about 4e-5 cosine distance of float32 (benchmarks/extract.py reports it),
    far inside the 1e-2 the features allow; elsewhere bf16 is emulated and slower, so float32 is kept.
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def clip_id(path: Path) -> str:
    """A clip's id is its file name without extension: the AVE video id for AVE files."""
    return path.stem


def unique_clips(paths: Iterable[Path]) -> list[Path]:
    """`paths` with each clip once: a file named twice (also through a link of the same name) is extracted once; a
    link under another name is another clip id, so another clip.

    Two files with one clip id are refused now, before any clip is extracted: a store holds one clip per id and
    only the user knows which file is meant. Not as a clip failure: that would be recorded under the id, and the
    other file's clip would clear it.
    """
    owner: dict[str, tuple[str, Path]] = {}  # clip id -> (real path, the path that named it first)
    unique = []
    for path in paths:
        real, cid = os.path.realpath(path), clip_id(path)
        if cid in owner:
            if owner[cid][0] == real:
                continue
            raise BmfnError(f"{printable(str(path))}: clip id '{printable(cid)}' is also "
                            f"{printable(str(owner[cid][1]))}'s: a clip id is the file name without extension and "
                            "must be unique; rename one of them or leave it out")
        owner[cid] = (real, path)
        unique.append(path)
    return unique


def decode_workers(requested: int | None, device: torch.device) -> int:
    """The requested number of decoding processes, else: beside a GPU, one per CPU core this process may use
    (usable_cores) but the main process's (decoding every H.264 frame is what bounds GPU extraction), each torchrun
    rank of this machine taking its share of the cores less one for itself; on a CPU, 1 (the networks need them)."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 1
    try:
        ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # set by torchrun
    except ValueError:
        raise BmfnError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r} must be an integer, as torchrun "
                        "sets it") from None
    return max(1, usable_cores() // ranks_here - 1)


def video_decoder_on(video_decoder: str, device: torch.device) -> str:
    """decode.VIDEO_DECODERS' "cuda" or "nvcodec" on the GPU the networks run on (each torchrun rank decodes on its
    own)."""
    if video_decoder in ("cuda", "nvcodec") and device.type == "cuda":
        return f"{video_decoder}:{device.index or 0}"
    return video_decoder


def load_extractors(options: ExtractOptions, device: torch.device) -> tuple[VisualExtractor, AudioExtractor]:
    precision = options.precision
    if precision == "auto":
        precision = "bfloat16" if fast_bfloat16(device) else "float32"
    load_audio = functools.partial(load_audio_extractor, options.vggish_weights, options.random_seed,
                                   alignment=options.alignment, device=device)
    # VGGish loads in a second thread: most of each loader's time is single-threaded work outside the GIL (hashing
    # the weight file, initialising or copying tensors), so the two overlap on two cores. Not when a file must be
    # downloaded: two progress bars would interleave, and a failing VGG-19 download would wait for VGGish's. Then
    # VGGish's file, where it is at hand, is checked first: a damaged one is said before VGG-19's download.
    with ThreadPoolExecutor(1) as pool:
        downloads = _downloads(options)
        audio = pool.submit(load_audio) if not downloads or weight_available("vggish", options.vggish_weights) else None
        if downloads and audio is not None:
            audio.result()
        visual = load_visual_extractor(
            options.visual_source,
            options.vgg19_weights,
            options.random_seed,
            device=device,
            precision=precision,
            batch_size=options.batch_size,
            compile=options.compile,
        )
        return visual, audio.result() if audio is not None else load_audio()


def _downloads(options: ExtractOptions) -> bool:
    """Whether loading the extractors of `options` would download a weight file."""
    if options.random_seed is not None:
        return False
    visual = SOURCES.get(options.visual_source, ("",))[0]
    return not (weight_available(visual, options.vgg19_weights) and weight_available("vggish", options.vggish_weights))


# Bumped when bmfn changes the features it makes from the same file, weights and settings, so that a store never
# holds clips of two revisions (its appends and merges are refused; store.REVISION_CHANGES says what changed): 1, the
# first; 2, sound from a clip's start decoded without a seek, which keeps the AAC priming packet some AVE clips begin
# with (features-reference.md 2.1); 3, a Matroska clip written by FFmpeg is as long as its Duration less its start
# time (an FFmpeg-written Duration is where the timeline ends), and a cover picture is the last choice of video.
FEATURES_REVISION = 3


def features_provenance(options: ExtractOptions, visual: VisualExtractor, audio: AudioExtractor) -> dict:
    """What made the features: recorded in the store and in every checkpoint trained on it."""
    visual_record = dict(visual.provenance)
    return {
        "bmfn_version": __version__,
        "features_revision": FEATURES_REVISION,
        # bf16 and float32 maps agree to ~4e-5 cosine distance: a run setting, not a different feature space
        # (int8 is further off: its calibration stays in the visual record, so int8 stores take only int8 clips)
        "precision": visual_record.pop("precision"),
        "visual": visual_record,
        "audio": audio.provenance,
        "frames_per_second": options.frames_per_second,
        "seconds": options.seconds,
        "alignment": options.alignment,
        "dtype": options.dtype,
    }


def clip_features(clip: DecodedClip, visual: VisualExtractor, audio: AudioExtractor) -> tuple[np.ndarray, np.ndarray]:
    """[segments,7,7,512] mean pool5 maps and [segments,128] VGGish embeddings for one decoded clip."""
    segments = clip.frames.shape[0]
    return visual.segments(clip.frames), audio(clip.audio, segments=segments)


def extract(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    options: ExtractOptions | None = None,
    *,
    annotations: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    progress: bool = True,
    on_clip: Callable[[str], None] | None = None,
    shard: Shard | None = None,
    log: Callable[[str], None] | None = None,
) -> ExtractSummary:
    """Extract every video under `inputs` (a path, or several) into the store `out`, skipping clips it already holds.

    Warnings, each clip's notes and each failed clip's error go to `log` (default: standard error, above the
    progress bar); the store keeps the notes and the failures, the summary returned the failures, so
    `log=lambda line: None` loses nothing.

    With `annotations` (and `splits`), each clip's labels and split are stored beside its features, matched by
    video id, so that `bmfn train` needs nothing else. With `shard` (or RANK/WORLD_SIZE under torchrun) only the
    clips of that shard are extracted, into the shard's own store beside `out` (`Shard.path`).
    """
    refuse_in_starting_worker("extract")
    options = options or ExtractOptions()
    log = log or _on_stderr
    shard = resolve_shard(shard)
    start_together()  # under torchrun: every rank is alive now; one that dies later is then seen at once
    if splits is not None and annotations is None:
        raise BmfnError(f"split files in {splits} need the annotations they index (--annotations)")
    if options.dtype not in STORAGE_DTYPES:
        raise BmfnError(f"storage dtype {options.dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}")
    # Labels are read before any clip is: a bad annotation or split file fails now, not after hours of extraction.
    labels = read_labels(annotations, splits) if annotations is not None else None
    # One path or several (a string is one path, not its characters); read twice: to find the videos and to name
    # them in the error below.
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not inputs:
        raise BmfnError("no inputs: name video files, folders or .txt lists of them")
    empty: list[Path] = []
    # A file that is missing (a listed download that never came, a dangling link) fails as its clip, in its turn,
    # unless nothing named exists: a mistyped path stops the command before a store is made.
    found = find_videos(inputs, keep_missing=True, on_empty=empty.append)
    if found and not any(path.exists() for path in found):
        raise BmfnError(f"{found[0]}: no such file or folder")
    paths = unique_clips(found)
    if not paths:
        raise BmfnError(f"no video files found in {', '.join(map(str, inputs))}")
    for item in empty:  # among inputs that have some
        log(f"warning: no video files in {one_line(str(item))}")
    if shard is not None:  # an empty shard still gets its (empty) store, so `bmfn merge` sees every shard
        paths, out = [path for path in paths if shard.holds(printable(clip_id(path)))], shard.path(out)
        progress = progress and rank_env().local_rank == 0  # one bar per machine under torchrun
    device = rank_device(resolve_device(options.device))
    video_decoder = video_decoder_on(options.video_decoder, device)
    video_hwaccel(video_decoder)  # no NVDEC here: one line now, before the networks load
    if options.random_seed is not None:  # said once the command is known to go ahead
        log(f"using RANDOM network weights (seed {options.random_seed}): features are for tests and demos only, "
            "and the store records it")
    visual, audio = load_extractors(options, device)
    provenance = features_provenance(options, visual, audio)
    summary = ExtractSummary(Path(out))

    with FeatureStore.open(out, provenance) as store:

        def fail(path: Path, cid: str, error: str) -> None:
            """Record a clip that could not be extracted, and say why beside the progress bar (not in stdout)."""
            error = printable(error)
            store.add_failure(cid, path, error)
            summary.failed.append((printable(str(path)), error))
            log(f"error: {one_line(error)}")

        todo: list[Path] = []
        for path in paths:
            cid = clip_id(path)
            if printable(cid) != cid:  # bytes that are not UTF-8, which Python keeps as surrogates
                fail(path, printable(cid), f"{path}: the file name is not UTF-8, and a clip id (the file name "
                                           "without extension) must be text: rename the file")
            elif cid in store:
                summary.skipped.append(cid)
            else:
                todo.append(path)
        bar = tqdm(total=len(todo), unit="clip", disable=not (progress and todo), dynamic_ncols=True)
        try:
            # The log-mel examples are made in the decoding workers (CPU work off the device loop; no torch there).
            prepare = functools.partial(with_examples, alignment=options.alignment)
            workers = decode_workers(options.workers, device)
            decoded = decode_many(todo, seconds=options.seconds, frames_per_second=options.frames_per_second,
                                  workers=workers, prepare=prepare, video_decoder=video_decoder)

            def finish(path: Path, clip: DecodedClip | str, results: _DeviceResults | None) -> None:
                cid = clip_id(path)
                if results is not None:
                    try:
                        visual_maps, embeddings = results.get()
                        store.add_clip(cid, visual_maps, embeddings, path=str(path), warnings=clip.warnings)
                    except WriteError:  # a full disk: the run stops, keeping the clips stored
                        raise
                    except BmfnError as exc:  # e.g. non-finite features: this clip fails, the others go on
                        clip = str(exc)
                    else:
                        summary.done.append(cid)
                        for warning in clip.warnings:  # kept in the store too (its `warnings` dataset)
                            log(f"note: {one_line(warning)}")
                        if on_clip is not None:
                            on_clip(cid)
                if isinstance(clip, str):
                    fail(path, cid, clip)
                bar.set_postfix(failed=len(summary.failed), refresh=False)
                bar.update()

            # One clip in flight: the device computes clip k while this loop stores clip k-1 and takes clip k+1.
            # Clips are not batched together: a clip's features must not depend on which clips shared its batch
            # (float rounding does), so that reruns, shards and merges find identical features. Decoding in this
            # process (--workers 0), each clip is stored before the next is decoded: a crash inside the decoder
            # (which no worker then absorbs) must not take a finished clip with it.
            in_flight = None
            try:
                for path, prepared in decoded:
                    clip, results = prepared, None
                    if not isinstance(prepared, str):
                        clip, examples = prepared
                        try:
                            results = _DeviceResults(visual.segment_maps(clip.frames), audio.embeddings(examples))
                        except BmfnError as exc:
                            clip = str(exc)
                    previous, in_flight = in_flight, (path, clip, results)
                    if previous is not None:
                        finish(*previous)
                    if workers == 0:
                        current, in_flight = in_flight, None
                        finish(*current)
            finally:  # the last clip, or the one computed when Ctrl-C or an error came: its features are made
                try:
                    if in_flight is not None:
                        finish(*in_flight)
                finally:  # the decoding workers end now, not when the interpreter exits (which a failed write skips)
                    if hasattr(decoded, "close"):  # a generator's
                        decoded.close()
        finally:
            bar.close()
            store.consolidate()
        if labels is not None:
            summary.unlabelled = label_store(store, labels)
            ran = summary.done + summary.skipped
            summary.unmatched_annotations = bool(ran) and not any(cid in labels for cid in ran)
    finish_together()
    return summary


def _on_stderr(message: str) -> None:
    """extract's default `log`: a line on standard error, written above the progress bar."""
    tqdm.write(f"bmfn: {message}", file=sys.stderr)


class _DeviceResults:
    """Features copied back to page-locked memory behind the work queued on the device, so that the caller can hand
    the device its next clip before waiting for these; on a CPU they are ready at once."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.ready = None
        device = tensors[0].device
        if device.type == "cuda":
            tensors = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                            for t in tensors)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(device))
        self.tensors = tensors

    def get(self) -> list[np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()
        return [t.numpy() for t in self.tensors]


def read_labels(annotations: str | os.PathLike, splits: str | os.PathLike | None) -> dict[str, ClipLabels]:
    """Per-video-id labels and splits from an Annotations.txt (and split files), as FeatureStore.set_labels takes."""
    rows = read_annotations(annotations)
    split_rows = load_splits(splits, len(rows), annotations=rows) if splits is not None else None
    return labels_from_annotations(rows, split_rows)[0]


def label_store(store: FeatureStore, labels: dict[str, ClipLabels]) -> list[str]:
    """Store the labels and splits of every annotated video id; return the store's clips left without a label (those
    of earlier runs keep the labels given then).

    Rows of clips not extracted (yet) go to the store's label table too, so clips appended later are labelled.
    """
    store.set_labels(labels)
    store.consolidate()
    return store.unlabelled()
