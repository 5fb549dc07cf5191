"""The `bmfn` command line: option parsing only; every command calls the Python API."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import io
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

import bmfn_pipeline.errors as error_state  # its hdf5_write_failed, read when the command has ended
from bmfn_pipeline import __version__
from bmfn_pipeline.errors import BmfnError, counted, one_line, printable


# glibc malloc settings of the executable (keep_freed_memory): blocks under MMAP_THRESHOLD come from the heap (32 MiB
# is glibc's largest on 64-bit), and free memory at the heap's top goes back to the system only beyond TRIM_THRESHOLD.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def run(exiting: bool = True) -> None:
    """The `bmfn` executable (and `python -m bmfn_pipeline`): the CLI, then a quick exit.

    Python's shutdown runs several full garbage collections over every object alive, and torch's import alone
    leaves about 200,000: 0.3-0.45 s of every command on 2 cores. One collection here finalises what the command
    left in reference cycles; freezing the rest lets shutdown skip it. Not inside `main`, which tests call in-process.

    SIGTERM stops a command as Ctrl-C does (Terminated). Once the command has ended, the process only exits: Ctrl-C
    and SIGTERM are then ignored, so that neither turns a finished command into a killed one; `exiting=False` (a
    caller that goes on, such as a test) gets its handlers back instead.
    """
    keep_freed_memory()
    usable_standard_streams()
    handlers = {signum: signal.getsignal(signum) for signum in _STOPPING_SIGNALS}
    hook = sys.unraisablehook
    signal.signal(signal.SIGTERM, _terminate)
    sys.unraisablehook = functools.partial(_signal_again, hook)
    try:
        try:
            main()
        except OSError as exc:  # outside any command: click's --version or --help writing to a full disk
            _report(exc)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        failed = _stdout_failed()  # now, not at the interpreter's exit ("Exception ignored", exit code 120)
        if failed is not None:
            click.echo(f"bmfn: error: standard output: {failed.strerror or failed}", err=True)
            code = code or 1
        if error_state.hdf5_write_failed:  # HDF5 would write the failed file again at the interpreter's exit, and crash
            sys.stderr.flush()
            os._exit(code)
        raise SystemExit(code) from None
    finally:
        for signum in _STOPPING_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)  # _signal_again's, where the command ended meanwhile
        gc.collect()
        gc.freeze()
        if not exiting:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            sys.unraisablehook = hook


INTERRUPTED = 128 + signal.SIGINT  # a shell's exit status for a command that SIGINT (Ctrl-C) ended
TERMINATED = 128 + signal.SIGTERM
SIGNAL_AGAIN_S = 0.01  # after which a signal whose exception a finaliser dropped is raised again (_signal_again)
# The signals run() sets up: SIGTERM stops a command, SIGALRM raises a dropped signal again; all three (Ctrl-C's too)
# are ignored once the command has ended.
_STOPPING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGALRM") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker stop, a scheduler cancelling a job) stops a command as Ctrl-C does: what is done is
    kept (a training run's selected weights written), decoding workers end, and one line says so."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _signal_again(otherwise: Callable, unraisable) -> None:
    """sys.unraisablehook: Ctrl-C's or SIGTERM's exception raised inside a finaliser (a weakref callback, a __del__)
    is dropped there by Python (with a traceback), and the command went on as if no signal came; the signal is
    raised again instead, for the code the finaliser interrupted. Anything else goes to `otherwise`."""
    dropped = unraisable.exc_value
    if isinstance(dropped, KeyboardInterrupt) and hasattr(signal, "setitimer"):
        # Raised by a timer's signal, not here: whatever this hook calls would run the handler inside the hook.
        def raise_again(signum, frame) -> None:
            raise type(dropped)

        signal.signal(signal.SIGALRM, raise_again)
        signal.setitimer(signal.ITIMER_REAL, SIGNAL_AGAIN_S)
        return
    otherwise(unraisable)


@contextlib.contextmanager
def _interrupt_says(what_is_kept: Callable[[], str] | None = None) -> Iterator[None]:
    """Ctrl-C or SIGTERM in a command: one line, with what was kept and how to go on where the command says (click
    says only "Aborted!"), and the exit status a shell gives a command that signal ended. Under torchrun, rank 0
    speaks for all: the signal reaches every rank."""
    try:
        yield
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        if os.environ.get("RANK", "0") == "0":  # torchrun's variable (bmfn_pipeline.distributed: not imported here)
            said = f": {what_is_kept()}" if what_is_kept else ""
            click.echo(f"bmfn: {'terminated' if terminated else 'interrupted'}{said}", err=True)
        raise SystemExit(TERMINATED if terminated else INTERRUPTED) from None


def usable_standard_streams() -> None:
    """Standard streams that cannot fail a command for what they are: a closed one (`2>&-`, which Python leaves as
    None) writes to nowhere, and characters its encoding lacks (PYTHONIOENCODING=ascii and a file named in
    Japanese) are escaped instead of raising. An unbuffered standard output (PYTHONUNBUFFERED, as in bmfn's Docker
    image) remembers a write that failed, which a buffered one's flush tells: an error can then name it."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
        elif name == "stdout" and type(getattr(stream, "buffer", None)) is io.FileIO:
            sys.stdout = io.TextIOWrapper(_NotingFileIO(stream.fileno(), "w", closefd=False), encoding=stream.encoding,
                                          errors="backslashreplace", write_through=True)
        elif hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


class _NotingFileIO(io.FileIO):
    """An unbuffered standard output's file, noting the error of a write that failed (_stdout_failed reads it)."""

    failed: OSError | None = None

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            self.failed = exc
            raise


def _stdout_failed() -> OSError | None:
    """Flush standard output; where it takes no more (its reader has gone, a full disk), send the rest nowhere, so
    that nothing fails on it again, and return why (once)."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        failed = exc
    else:
        noting = getattr(sys.stdout, "buffer", None)
        if not isinstance(noting, _NotingFileIO) or noting.failed is None:
            return None
        failed, noting.failed = noting.failed, None
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return failed


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for the next allocation instead of returning it to the system; False where the
    C library is not glibc.

    VGG-19 allocates and frees each layer's output (up to 13 MB for 4 frames) every batch. By default glibc gives
    such blocks back and the next batch faults them in again, zeroed: 2.5x the page faults and ~5 % of int8 VGG-19's
    time on 2 cores. The executable's choice, for its one job; a library leaves its host's allocator alone."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def _videos(inputs: tuple[str, ...]) -> list[Path]:
    """The video files of FILES arguments; a missing one stays, to fail in its turn while the others go on."""
    from bmfn_pipeline.decode import find_videos

    empty: list[Path] = []
    files = find_videos(inputs, keep_missing=True, on_empty=empty.append)
    if not files:
        raise BmfnError(f"no video files found in {', '.join(inputs)}")
    for item in empty:  # among inputs that have some
        click.echo(f"bmfn: warning: no video files in {one_line(str(item))}", err=True)
    return files


class _SecondsBar:
    """`Localizer.progress` as a terminal bar of the seconds of each file featurised, cleared when it is done."""

    def __init__(self) -> None:
        self.bar, self.path = None, None

    def __call__(self, path: Path, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is not None and path != self.path:  # the previous file failed before its end
            self.bar.close()
            self.bar = None
        if self.bar is None:
            self.bar = tqdm(total=total, desc=Path(path).name, unit="s", leave=False, dynamic_ncols=True)
            self.path = path
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.refresh()  # the end is drawn even when it comes within tqdm's redraw interval of the last draw
            self.bar.close()
            self.bar = None


class _Group(click.Group):
    """Turns a BmfnError into one line on stderr and exit code 1, never a traceback; so too an OSError that no
    stage named (a full disk, a folder that cannot be written), with its file and the system's reason; and Ctrl-C
    or SIGTERM into one line and the exit status a shell gives for that signal."""

    def invoke(self, ctx: click.Context):
        try:
            with _interrupt_says():  # commands that say more on an interrupt say it inside
                return super().invoke(ctx)
        except BmfnError as exc:
            click.echo(f"bmfn: error: {one_line(str(exc))}", err=True)
            sys.exit(1)
        except OSError as exc:
            _report(exc)


def _report(exc: OSError) -> None:
    """An OSError that no stage named, as one line with its file and the system's reason; exit code 1."""
    where = exc.filename
    if where is None and (exc.errno == errno.EPIPE or _stdout_failed() is not None):
        where = "standard output"  # its reader has gone (`| head -1`), or the disk it goes to is full
        _stdout_failed()
    click.echo(one_line(f"bmfn: error: {f'{where}: ' if where else ''}{exc.strerror or exc}"), err=True)
    sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bmfn")
def main() -> None:
    """Find what audio-visual event happens in a video, and when, second by second (BMFN, ICASSP 2022).

    \b
    Examples:
      bmfn demo                                   # the whole pipeline on synthetic clips, nothing downloaded
      bmfn probe clip.mp4
      bmfn extract videos/ --out feats.h5 --annotations Annotations.txt
      bmfn train
      bmfn evaluate --json
      bmfn localize clip.mp4 --format srt --output-dir subs/
      bmfn info feats.h5
    """


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, one per line.")
@click.option("--frames-per-second", default=16, show_default=True, type=click.IntRange(1, 64),
              help="Frames sampled per one-second segment (the AVE features used 16).")
def probe(files, as_json, frames_per_second) -> None:
    """Show what bmfn will read from each video: container, streams, segments, frames of the first segment.

    FILES are videos, folders (searched recursively for video files) or .txt lists of paths. A file that cannot be
    read gives a one-line error; the others are still probed and the exit code is 1.

    \b
    Example:
      bmfn probe clip.mp4 other.webm --json
    """
    from bmfn_pipeline.decode import first_frame_filters, probe as probe_clip, segment_frame_indices

    failed = False
    for file in _videos(files):
        try:
            info = probe_clip(file)
            shown = first_frame_filters(file, info)
        except BmfnError as exc:
            click.echo(f"bmfn: error: {one_line(str(exc))}", err=True)
            failed = True
            continue
        first = segment_frame_indices(info, 0, frames_per_second=frames_per_second)
        if as_json:
            click.echo(json.dumps({**info.to_dict(), "path": printable(info.path), "display_filters": shown,
                                   "first_segment_frames": first}))
            continue
        audio = ("none" if info.audio_index is None
                 else f"#{info.audio_index} {info.audio_codec}, " + (
                     f"{info.sample_rate} Hz, {info.channels} ch" if info.sample_rate else
                     "rate and channels read from its first packet (its header does not say)"))
        display = f"\n  display    {' + '.join(shown)} (its display matrix: frames are read as shown)" if shown else ""
        variable = (f" (variable: frames stray up to {info.frame_time_drift_s:.2f} s from it, so they are picked by "
                    "their times)" if info.variable_frame_rate else "")
        click.echo(f"{one_line(info.path)}\n"
                   f"  container  {info.container}, {info.duration_s:.3f} s, "
                   f"{info.video_streams} video / {info.audio_streams} audio streams\n"
                   f"  video      #{info.video_index} {info.video_codec}, {info.width}x{info.height}, "
                   f"{info.fps:.3f} fps{variable}, ~{info.n_frames} frames"
                   f"{display}\n"
                   f"  audio      {audio}\n"
                   f"  segments   {info.segments} of {info.seconds} ({info.indexing} frame indices)\n"
                   f"  segment 0  frames {' '.join(map(str, first))}")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", default="feats.h5", show_default=True, type=click.Path(dir_okay=False),
              help="Feature store to create or extend (resumable).")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False),
              help="AVE-format Annotations.txt: store each clip's labels beside its features, matched by video id.")
@click.option("--splits", type=click.Path(exists=True, file_okay=False),
              help="Folder with *_order.h5 or trainSet.txt/valSet.txt/testSet.txt (with --annotations).")
@click.option("--frames-per-second", default=16, show_default=True, type=click.IntRange(1, 64),
              help="Frames sampled per one-second segment (the AVE features used 16).")
@click.option("--visual", "visual_source", type=click.Choice(["ave", "torchvision"]), default="ave", show_default=True,
              help="VGG-19 weights: 'ave' = Keras/Oxford weights with caffe input (the released AVE features); "
                   "'torchvision' = IMAGENET1K_V1 (a different, incompatible feature space).")
@click.option("--vgg19-weights", type=click.Path(exists=True, dir_okay=False), help="Local VGG-19 weight file.")
@click.option("--vggish-weights", type=click.Path(exists=True, dir_okay=False), help="Local vggish-10086976.pth.")
@click.option("--weights", "weights_kind", type=click.Choice(["pretrained", "random"]), default="pretrained",
              show_default=True, help="'random': seeded random networks, for tests and demos only (recorded).")
@click.option("--seed", default=0, show_default=True, help="Seed of --weights random.")
@click.option("--alignment", type=click.Choice(["ave", "exact"]), default="ave", show_default=True,
              help="VGGish framing: 'ave' = 0.96 s hops as released; 'exact' = one example per 1 s window.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16", "int8"]), default="auto",
              show_default=True, help="VGG-19 compute precision (auto: bfloat16 on CUDA and on CPUs with native "
                                      "bf16, else float32; int8: CPU only, about twice bf16's speed).")
@click.option("--batch-size", type=click.IntRange(1),
              help="Frames per VGG-19 batch. Default: 4 on a CPU (faster there than large batches), 64 on a GPU.")
@click.option("--compile", "compile_network", is_flag=True,
              help="torch.compile VGG-19: the same features to float rounding, a little faster, ~15 s more start-up.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage dtype of the features.")
@click.option("--workers", type=click.IntRange(0),
              help="Decoding processes running beside the networks (0: decode in the main process, each clip "
                   "stored before the next is decoded, without overlap). Default: "
                   "1 on CPU; on a GPU one per core this process may use (its CPU affinity) but one (under "
                   "torchrun, per rank: its share of those cores less one).")
@click.option("--video-decoder", type=click.Choice(["cpu", "cuda", "nvcodec"]), default="cpu", show_default=True,
              help="Where video is decoded: cpu (FFmpeg), cuda (the GPU's NVDEC, through PyAV; the same frames "
                   "for 8-bit 4:2:0 video) or nvcodec (NVDEC through NVIDIA's PyNvVideoCodec, pip install "
                   "pynvvideocodec; experimental: files whose frames it cannot be shown to decode as the CPU does "
                   "are decoded on the CPU, with a note).")
@click.option("--shard", metavar="I/N",
              help="Extract only shard I of N (0-based, by a hash of the clip id) into OUT's shard file "
                   "(feats.shard-0000I-of-0000N.h5); join the shards with `bmfn merge`. Under torchrun the ranks "
                   "pick their shards themselves.")
def extract(inputs, out, annotations, splits, frames_per_second, visual_source, vgg19_weights, vggish_weights,
            weights_kind, seed, alignment, device, precision, batch_size, compile_network, dtype, workers,
            video_decoder, shard) -> None:
    """Extract per-second VGG-19 pool5 maps and VGGish embeddings from videos into a feature store.

    INPUTS are video files, folders (searched recursively) or .txt files listing paths.
    Rerunning skips clips already extracted; a failed clip is recorded and the others go on.

    \b
    Examples:
      bmfn extract videos/ --out feats.h5 --annotations Annotations.txt --splits ave/
      bmfn extract videos/ --out feats.h5 --shard 3/8        # one job of a scheduler's array
      torchrun --nproc-per-node 8 -m bmfn_pipeline extract videos/ --out feats.h5
    """
    from bmfn_pipeline.distributed import Shard
    from bmfn_pipeline.extract import ExtractOptions, extract as run_extract

    options = ExtractOptions(
        frames_per_second=frames_per_second, visual_source=visual_source, vgg19_weights=vgg19_weights,
        vggish_weights=vggish_weights, random_seed=seed if weights_kind == "random" else None,
        alignment=alignment, dtype=dtype, device=device, precision=precision, batch_size=batch_size, workers=workers,
        compile=compile_network, video_decoder=video_decoder,
    )
    with _interrupt_says(lambda: "the clips finished are kept; the same command goes on from them"):
        summary = run_extract(inputs, out, options, annotations=annotations, splits=splits,
                              shard=Shard.parse(shard) if shard else None)
    click.echo(summary.line())
    if summary.unlabelled:
        click.echo(f"without an annotation row (kept, unlabelled): {', '.join(summary.unlabelled[:10])}"
                   + (" ..." if len(summary.unlabelled) > 10 else ""))
    if summary.unmatched_annotations:
        click.echo(f"bmfn: warning: no clip matches a row of {annotations}: a clip's id is its video file name "
                   "without extension and must be the annotation's video id", err=True)
    if summary.failed:
        total = len(summary.failed) + len(summary.done) + len(summary.skipped)
        raise BmfnError(f"{len(summary.failed)} of {counted(total, 'clip')} failed; their errors are above and recorded "
                        f"in {summary.out} (`bmfn info {shlex.quote(str(summary.out))}` lists them)")


@main.command("export-ave")
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Annotations.txt whose row order the exported files follow.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for visual_feature.h5 and audio_feature.h5.")
@click.option("--dtype", type=click.Choice(["float64", "float32", "float16"]), default="float64", show_default=True,
              help="Float type of the written arrays (the released files are float64).")
@click.option("--force", is_flag=True, help="Replace visual_feature.h5 and audio_feature.h5 already in --out.")
def export_ave(store, annotations, out_dir, dtype, force) -> None:
    """Write a feature store in the released AVE layout (key 'avadataset', row i = annotation line i).

    \b
    Example:
      bmfn export-ave feats.h5 --annotations Annotations.txt --out ave_features/
    """
    from bmfn_pipeline.store import export_ave as run_export

    with _interrupt_says(lambda: "the export did not finish; run the same command again"):
        written_files = run_export(store, annotations, out_dir, dtype=dtype, force=force)
    for path in written_files:
        click.echo(f"wrote {path}")


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="The merged store; it may be one of STORES (to extend it), else it must not exist.")
@click.option("--allow-missing", is_flag=True, help="Merge even when shard files named *.shard-I-of-N.* are missing.")
def merge(stores, out, allow_missing) -> None:
    """Join feature stores, e.g. the shards of `bmfn extract --shard` or of a torchrun extraction.

    Their provenance must agree; a clip in two stores is kept once if its features are the same to float rounding
    (runs with other thread counts differ in the last digits) and refused otherwise. Labels and failures are
    carried over. The merged file is written whole, then swapped in.

    \b
    Example:
      bmfn merge feats.shard-*.h5 --out feats.h5
    """
    from bmfn_pipeline.distributed import merge_shards

    with _interrupt_says(lambda: f"the merge did not finish; {printable(out)} is as it was"):
        summary = merge_shards(stores, out, allow_missing=allow_missing)
    click.echo(summary.line())


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per path, one per line (a store's: every clip id, failure and note).")
def info(paths, as_json) -> None:
    """Show what a feature store, a training run or a checkpoint holds.

    A store (.h5): its clips, how they were made, labels per split, the clips that failed and why, decode notes,
    clips a stopped run left in the journal; it may be read while `bmfn extract` writes to it. A run folder: epochs
    done of those asked for, each seed's selected epoch and accuracies, and whether it is being trained now or
    stopped (`--resume` goes on from its last.pt). A checkpoint (.pt): its mode, epoch, accuracies, data and features. A path that cannot be
    read gives a one-line error; the others are still shown and the exit code is 1.

    \b
    Examples:
      bmfn info feats.h5
      bmfn info runs/fully-20250101-120000 --json
    """
    from bmfn_pipeline.info import info as describe, to_json

    failed = False
    for path in paths:
        try:
            result = describe(path)
        except BmfnError as exc:
            click.echo(f"bmfn: error: {one_line(str(exc))}", err=True)
            failed = True
            continue
        click.echo(to_json(result) if as_json else "\n".join(result.lines()))
    if failed:
        sys.exit(1)


def _milestones(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(m) for m in value.split(",") if m.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of epochs, e.g. 10,20,30") from None


@main.command()
@click.option("--mode", type=click.Choice(["fully", "weakly"]),
              help="fully (default): segment labels; weakly: video labels only (the 178 noisy background clips of an "
                   "AVE folder join when present).")
@click.option("--ave-dir", type=click.Path(exists=True, file_okay=False),
              help="The AVE release: visual_feature.h5, audio_feature.h5, labels.h5 or Annotations.txt, *_order.h5.")
@click.option("--features", type=click.Path(exists=True, dir_okay=False),
              help="A bmfn feature store (bmfn extract). Default: feats.h5 in the current folder.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False), help="(Re)label clips from this Annotations.txt.")
@click.option("--splits", type=click.Path(exists=True, file_okay=False),
              help="Folder with *_order.h5 or *Set.txt (with a feature store: needs --annotations, whose rows they "
                   "index). Without any split information: 80/10/10 by video id hash.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder. Default: runs/<mode>-<timestamp>.")
@click.option("--epochs", type=click.IntRange(1), help="Default 200 (reference).")
@click.option("--batch-size", type=click.IntRange(1), help="Training batch. Default 32 (reference).")
@click.option("--eval-batch-size", type=click.IntRange(1),
              help="Default 16 on CPU (the official test batch), 256 on GPU; results do not depend on it.")
@click.option("--lr", type=float, help="Adam learning rate. Default 5e-4 (reference).")
@click.option("--milestones", callback=_milestones, help="MultiStepLR epochs. Default 10,20,30 fully; 5,20,40 weakly.")
@click.option("--gamma", type=float, help="MultiStepLR factor. Default 0.5.")
@click.option("--clip", type=float, help="Gradient-norm clip. Default 0.1 fully, 0.5 weakly.")
@click.option("--seed", type=int, help="Default 890 fully, 550 weakly (reference).")
@click.option("--seeds", type=click.IntRange(1),
              help="Train N models (seed, seed+1, ...) and report mean and sample standard deviation. Default 1.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when present, else the CPU (under torchrun, each rank its own GPU).")
@click.option("--precision", type=click.Choice(["float32", "tf32", "bfloat16"]),
              help="tf32: float32 with TF32 tensor-core matmuls (CUDA); bfloat16: autocast (mixed precision). "
                   "Default float32; a resumed run keeps its own.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="On one CUDA device, replay each training step as a CUDA graph (same arithmetic, no launch cost). "
                   "Default on; a resumed run keeps its own.")
@click.option("--compile/--no-compile", "compile_network", default=None,
              help="torch.compile the network (full batches): a graphed bf16 step takes 4.0 ms on an H100; the "
                   "first epoch takes ~56 s there, ~7 s once the kernels are in bmfn's cache. Default off; a "
                   "resumed run keeps its own.")
@click.option("--checkpoint-every", type=click.FloatRange(0),
              help="Seconds between writes of last.pt and best.pt (also after the first epoch and at the end). "
                   "Default 60; 0: every epoch; "
                   "a resumed run keeps its own.")
@click.option("--select-on-test", is_flag=True,
              help="The official protocol: keep the epoch with the best TEST accuracy (optimistic). "
                   "Default: select on val, report test for that epoch.")
@click.option("--esa-activation", type=click.Choice(["sigmoid", "relu6"]),
              help="The expansion self-attention's activation: sigmoid, the paper's (default), or relu6, the "
                   "official code's.")
@click.option("--resume", type=click.Path(exists=True, file_okay=False),
              help="Continue an interrupted run from its last.pt with its own settings (--epochs may extend it; "
                   "--precision, --cuda-graphs, --compile, --checkpoint-every, --eval-batch-size may change; what is "
                   "given is kept for later resumes; another --lr, --batch-size, --features or such is refused).")
@click.option("--force", is_flag=True, help="Resume even if the features' provenance differs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(mode, ave_dir, features, annotations, splits, out, epochs, batch_size, eval_batch_size, lr, milestones,
          gamma, clip, seed, seeds, device, precision, cuda_graphs, compile_network, checkpoint_every, select_on_test,
          esa_activation, resume, force, quiet) -> None:
    """Train BMFN on pre-extracted features; writes best.pt, last.pt, metrics.jsonl, curves.png, command.txt, run.json.

    Defaults reproduce the official hyper-parameters per mode (Adam 5e-4, MultiStepLR, 200 epochs, batch 32).

    \b
    Examples:
      bmfn train                                 # feats.h5 in this folder
      bmfn train --ave-dir AVE/ --mode weakly --seeds 3
      bmfn train --resume runs/fully-20250101-120000 --epochs 300
      torchrun --nproc-per-node 4 -m bmfn_pipeline train --features feats.h5   # DDP; --batch-size stays global
    """
    import shlex

    from bmfn_pipeline.distributed import rank_env
    from bmfn_pipeline.train import TrainConfig, train as run_train

    config = TrainConfig(mode=mode, ave_dir=ave_dir, features=features, annotations=annotations, splits=splits,
                         out=out, epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size, lr=lr,
                         milestones=milestones, gamma=gamma, clip=clip, seed=seed, seeds=seeds, device=device,
                         precision=precision, cuda_graphs=cuda_graphs, compile=compile_network,
                         checkpoint_every=checkpoint_every, select_on_test=select_on_test or None, force=force,
                         model={"esa_activation": esa_activation} if esa_activation else {}, resume=resume,
                         progress=not quiet, command=shlex.join(["bmfn", *sys.argv[1:]]))
    run_dir: list[str] = []  # the folder train() names in its "run: " line

    def log(line: str) -> None:
        if line.startswith("run: "):
            run_dir.append(line[len("run: "):].rsplit(" (", 1)[0])
        click.echo(line)

    def kept() -> str:
        if not run_dir:
            return "no run folder was made yet"
        folder = Path(run_dir[0])
        if not any(folder.glob("last.pt")) and not any(folder.glob("seed-*/last.pt")):
            return f"no last.pt in {folder} yet (the first comes after epoch 1): " \
                   f"`bmfn train --resume {folder}` starts it again"
        return f"`bmfn train --resume {folder}` goes on from its last.pt (written after the first epoch, then every " \
               "--checkpoint-every seconds)"

    with _interrupt_says(kept):
        result = run_train(config, log=log)
    if rank_env().is_main:  # under torchrun, rank 0 speaks for all
        click.echo(result.summary())
        click.echo(f"best checkpoint: {result.best_checkpoint}")


@main.command()
@click.argument("named", metavar="[CHECKPOINT]", required=False, type=click.Path(exists=True))
@click.option("--checkpoint", type=click.Path(exists=True),
              help="A best.pt or last.pt, or a run folder (its best.pt); also given as the argument. Default: the "
                   "newest run's best.pt under runs/.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True,
              help="The split whose clips are scored.")
@click.option("--ave-dir", type=click.Path(exists=True, file_okay=False), help="Default: the data the run trained on.")
@click.option("--features", type=click.Path(exists=True, dir_okay=False), help="Default: the data the run trained on.")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False),
              help="(Re)label the clips from this Annotations.txt. Default: the run's, when the data is.")
@click.option("--splits", type=click.Path(exists=True, file_okay=False),
              help="Folder with *_order.h5 or *Set.txt (with a feature store: needs --annotations, whose rows they "
                   "index). Default: the run's, when the data is.")
@click.option("--batch-size", type=click.IntRange(1), help="Default 16 on CPU, 256 on GPU; results do not depend on it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when present, else the CPU.")
@click.option("--precision", type=click.Choice(["float32", "tf32", "bfloat16"]),
              help="tf32: float32 with TF32 tensor-core matmuls (CUDA); bfloat16: autocast (mixed precision). "
                   "Default: the run's, in which its recorded accuracies were computed.")
@click.option("--force", is_flag=True, help="Evaluate on features whose provenance differs from the checkpoint's.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(named, checkpoint, split, ave_dir, features, annotations, splits, batch_size, device, precision, force,
             as_json) -> None:
    """Segment accuracy (all segments, background included), per-class accuracy and a confusion-matrix PNG.

    \b
    Examples:
      bmfn evaluate runs/fully-20250101-120000 --split val
      bmfn evaluate --checkpoint runs/fully-20250101-120000/best.pt --split test
    """
    from bmfn_pipeline.evaluate import evaluate as run_evaluate

    if named is not None and checkpoint is not None:
        raise click.UsageError(f"two checkpoints named, {named} and --checkpoint {checkpoint}: give one")
    checkpoint = named if checkpoint is None else checkpoint
    if checkpoint is None:
        from bmfn_pipeline.train import latest_checkpoint

        checkpoint = latest_checkpoint()
        click.echo(f"bmfn: no checkpoint named: using the newest run's {checkpoint}", err=True)  # as localize says it
    result = run_evaluate(checkpoint, split=split, ave_dir=ave_dir, features=features, annotations=annotations,
                          splits=splits, batch_size=batch_size, device=device, precision=precision, force=force,
                          log=lambda message: click.echo(f"bmfn: {message}", err=True))
    click.echo(json.dumps(result.to_dict()) if as_json else result.summary())


def _output_format(ctx, param, value):
    from bmfn_pipeline.writers import FORMATS

    if value not in (*FORMATS, "all"):
        raise click.BadParameter(f"{value!r}: choose from {', '.join(FORMATS)}, all")
    return value


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--checkpoint", type=click.Path(exists=True),
              help="A best.pt or last.pt, or a run folder (its best.pt). Default: the newest run's best.pt under "
                   "runs/.")
@click.option("--format", "output_format", default="table", show_default=True, callback=_output_format,
              help="table, json, csv, srt, vtt; or all (with --output-dir). Without --output-dir it goes to stdout.")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Write <file stem>.<ext> per input per format here; the table is still printed.")
@click.option("--plot", is_flag=True,
              help="Write a timeline PNG per input (keyframes, waveform, label bars) to --output-dir, else here.")
@click.option("--stride", default=5, show_default=True, type=click.IntRange(1, 10),
              help="Seconds between the 10 s windows of a longer video; each second's probabilities are averaged.")
@click.option("--frames-per-second", type=click.IntRange(1, 64),
              help="Frames per second for VGG-19. Default: what the checkpoint's features used.")
@click.option("--weights", "weights_kind", type=click.Choice(["checkpoint", "pretrained", "random"]),
              default="checkpoint", show_default=True,
              help="Extractor weights; 'checkpoint': the kind its features were made with (random ones rebuilt "
                   "from their seed). Others are refused without --force.")
@click.option("--seed", type=int, help="Seed of --weights random. Default: the checkpoint's.")
@click.option("--vgg19-weights", type=click.Path(exists=True, dir_okay=False), help="Local VGG-19 weight file.")
@click.option("--vggish-weights", type=click.Path(exists=True, dir_okay=False), help="Local vggish-10086976.pth.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
              help="10 s windows per BMFN batch, shared by all files.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16", "int8"]), default="auto",
              show_default=True, help="VGG-19 compute precision, as for `bmfn extract` (int8: CPU only, fastest).")
@click.option("--video-decoder", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where video is decoded, as for `bmfn extract` (cuda: the GPU's NVDEC).")
@click.option("--force", is_flag=True, help="Go on when the features would differ from the checkpoint's.")
def localize(files, checkpoint, output_format, output_dir, plot, stride, frames_per_second, weights_kind, seed,
             vgg19_weights, vggish_weights, device, batch_size, precision, video_decoder, force) -> None:
    """Label every second of each video: start-end, label, event probability, class probability, then a summary.

    FILES are videos, folders (searched recursively for video files) or .txt lists of paths.
    Videos longer than 10 s are cut into 10 s windows every --stride seconds. A file that fails gives a one-line
    error; the others are still labelled and the exit code is 1.

    \b
    Examples:
      bmfn localize clip.mp4
      bmfn localize a.mp4 b.webm --checkpoint runs/fully-20250101-120000/best.pt --format all --output-dir out --plot
    """
    from bmfn_pipeline.decode import FRAMES_PER_SEGMENT, BackgroundRead

    done = 0  # files labelled (or failed), for the line Ctrl-C prints
    with _interrupt_says(lambda: f"{counted(done, 'file')} done, above; the others were not labelled" if done else
                         "no file was labelled"):
        if output_format == "all" and output_dir is None:
            raise BmfnError("--format all writes one file per format: give --output-dir")
        files = _videos(files)
        # The first file is read in a process of its own while torch is imported and the networks load (at the frame
        # rate of AVE's features, which a checkpoint of other features turns down).
        try:
            started = [BackgroundRead(files[0], frames_per_second=frames_per_second or FRAMES_PER_SEGMENT)] \
                if video_decoder == "cpu" else []
        except OSError:  # no process to spare: the file is read in its turn
            started = []
        from bmfn_pipeline.localize import Localizer, check_result_names, timeline_path
        from bmfn_pipeline.writers import FORMATS, WRITERS, get_writer

        if len(files) > 1 and output_dir is None and not WRITERS[output_format].streams:
            raise BmfnError(f"--format {output_format} describes one video per file: with {len(files)} videos give "
                            "--output-dir (a file each)")
        if output_dir is not None or plot:
            check_result_names(files)
        formats = FORMATS if output_format == "all" else (output_format,)
        to_files = [get_writer(name, output_dir) for name in formats] if output_dir is not None else []
        to_stdout = get_writer("table" if output_dir is not None else output_format, None)
        localizer = Localizer.from_checkpoint(
            checkpoint, device=device, stride=stride, batch_size=batch_size, frames_per_second=frames_per_second,
            weights=weights_kind, vgg19_weights=vgg19_weights, vggish_weights=vggish_weights, seed=seed,
            precision=precision, force=force, video_decoder=video_decoder,
            log=lambda message: click.echo(f"bmfn: {message}", err=True))
        plot_dir = (output_dir if output_dir is not None else ".") if plot else None
        if sys.stderr.isatty():  # a bar per file while VGG-19 gets through it; gone before its labels are printed
            localizer.progress = _SecondsBar()
        failed, table_lost = 0, False
        for path, result in localizer.run(files, plot_dir=plot_dir, started=started):
            errors = [result] if isinstance(result, BmfnError) else []
            plotted = plot_dir is not None and not errors
            result = getattr(result, "result", result)  # a failed plot still has its labels
            if not isinstance(result, BmfnError):
                try:
                    if to_stdout is not None:
                        to_stdout(result)
                        sys.stdout.flush()  # each file's labels as it is done, also through a pipe
                except OSError as exc:  # with files to write, a reader of the table that has gone costs the table only
                    if output_dir is None:
                        raise
                    _stdout_failed()
                    to_stdout, table_lost = None, True
                    click.echo(f"bmfn: error: standard output: {exc.strerror or exc}: the labels go on to "
                               f"{one_line(str(output_dir))} only", err=True)
                for write in to_files:
                    try:
                        click.echo(f"wrote {one_line(str(write(result)))}", err=True)
                    except BmfnError as exc:  # this file's error: the others go on
                        errors.append(exc)
                if plotted:
                    click.echo(f"wrote {one_line(str(timeline_path(plot_dir, path)))}", err=True)
            for error in errors:
                click.echo(f"bmfn: error: {one_line(str(error))}", err=True)
            failed += bool(errors)
            done += 1
    if failed:
        raise BmfnError(f"{failed} of {len(files)} files failed; their errors are above")
    if table_lost:
        sys.exit(1)


@main.command()
@click.option("--out", type=click.Path(file_okay=False),
              help="A new or empty folder for everything the demo writes. Default: ./bmfn-demo (-2, -3, ... if taken).")
@click.option("--quick", is_flag=True, help="A much smaller run (about 1 minute on 2 free cores), as the tests use.")
@click.option("--clips", type=click.IntRange(6), help="Synthetic clips to make (default 96; 24 with --quick).")
@click.option("--epochs", type=click.IntRange(1), help="Training epochs (default 20; 12 with --quick).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seed of the dataset, the random networks and training.")
def demo(out, quick, clips, epochs, seed) -> None:
    """Show the whole pipeline working with nothing downloaded: synthesise audio-visual event clips, extract
    features with RANDOM networks, train BMFN, localize held-out clips and compare with the truth.

    Takes about 6 minutes on 2 free CPU cores; everything goes into one folder.

    \b
    Examples:
      bmfn demo
      bmfn demo --quick --out my-demo/
    """
    from bmfn_pipeline.demo import run_demo

    run_demo(out, quick=quick, clips=clips, epochs=epochs, seed=seed, log=click.echo)


if __name__ == "__main__":
    main()
