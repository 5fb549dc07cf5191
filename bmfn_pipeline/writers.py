"""Per-second localization results and how they are written: a table, JSON, CSV, SRT/VTT subtitles, a timeline PNG.

One writer class per output format, each with ``write(result, file)`` and a file extension (the shape of
openai/whisper's writers), so ``bmfn localize --format F --output-dir DIR`` writes ``DIR/<input stem>.<ext>``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .ave import BACKGROUND, CATEGORIES, NUM_CLASSES
from .decode import SAMPLE_RATE
from .errors import BmfnError, WriteError, counted, one_line, written

BACKGROUND_NAME = "background"
# Digits kept where people read numbers (table, CSV, cue text); JSON keeps the full floats.
PROB_DECIMALS = 3
TIME_DECIMALS = 3  # milliseconds, the resolution of SRT and WebVTT timestamps
CSV_FIELDS = ("start_s", "end_s", "label", "name", "event_prob", "class_prob")
NO_EVENT_TEXT = "no audio-visual event"  # the one subtitle cue of a video without events, over its first seconds
NO_EVENT_CUE_S = 3.0


def label_name(label: int) -> str:
    """The AVE category name of a label index, or ``background`` for 28."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label {label} is outside 0..{NUM_CLASSES - 1}")
    return BACKGROUND_NAME if label == BACKGROUND else CATEGORIES[label]


@dataclass(frozen=True)
class SecondLabel:
    """The prediction for one second [start_s, end_s) of a video.

    ``event_prob`` is the model's probability that the second holds an audio-visual event, ``class_prob`` the
    probability of the predicted event class; ``label`` is that class when the second is an event, else 28.
    """

    start_s: float
    end_s: float
    label: int
    event_prob: float
    class_prob: float

    @property
    def name(self) -> str:
        return label_name(self.label)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SecondLabel:
        return cls(float(data["start_s"]), float(data["end_s"]), int(data["label"]),
                   float(data["event_prob"]), float(data["class_prob"]))


@dataclass(frozen=True)
class Interval(SecondLabel):
    """Consecutive seconds with the same label: the same fields, spanning the run, with mean probabilities."""

    def text(self) -> str:
        """Cue text: the label and the interval's mean probabilities."""
        return f"{self.name} (event {self.event_prob:.{PROB_DECIMALS}f}, class {self.class_prob:.{PROB_DECIMALS}f})"


def merge_seconds(seconds: list[SecondLabel]) -> list[Interval]:
    """Merge runs of touching seconds with the same label into intervals (background runs included)."""
    intervals: list[Interval] = []
    run: list[SecondLabel] = []
    for second in seconds:
        if run and (second.label != run[-1].label or not np.isclose(second.start_s, run[-1].end_s)):
            intervals.append(_interval(run))
            run = []
        run.append(second)
    if run:
        intervals.append(_interval(run))
    return intervals


def _interval(run: list[SecondLabel]) -> Interval:
    return Interval(run[0].start_s, run[-1].end_s, run[0].label,
                    float(np.mean([s.event_prob for s in run])), float(np.mean([s.class_prob for s in run])))


@dataclass
class LocalizationResult:
    """Everything ``bmfn localize`` says about one video."""

    path: str
    duration_s: float
    seconds: list[SecondLabel]
    warnings: list[str] = field(default_factory=list)
    # The checkpoint and the feature settings that made the labels (checkpoint path, setting, weights, ...).
    model: dict[str, Any] = field(default_factory=dict)

    def intervals(self) -> list[Interval]:
        return merge_seconds(self.seconds)

    def events(self) -> list[Interval]:
        return [interval for interval in self.intervals() if interval.label != BACKGROUND]

    def summary(self) -> str:
        """One line such as ``Bark: 3.0-8.0 s; Flute: 9.0-10.0 s``, or ``background only``."""
        events = self.events()
        if not events:
            return "background only"
        return "; ".join(f"{e.name}: {e.start_s:.1f}-{e.end_s:.1f} s" for e in events)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "duration_s": self.duration_s,
            "summary": self.summary(),
            "seconds": [second.to_dict() for second in self.seconds],
            "events": [e.to_dict() for e in self.events()],
            "warnings": list(self.warnings),
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalizationResult:
        """The inverse of ``to_dict`` (derived keys such as ``summary`` and ``events`` are recomputed, not read)."""
        return cls(str(data["path"]), float(data["duration_s"]),
                   [SecondLabel.from_dict(second) for second in data["seconds"]],
                   list(data.get("warnings", [])), dict(data.get("model", {})))


def format_timestamp(seconds: float, decimal_marker: str) -> str:
    """``HH:MM:SS<marker>mmm``: SRT uses a comma, WebVTT a full stop."""
    if seconds < 0:
        raise ValueError(f"negative timestamp {seconds}")
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    whole, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{decimal_marker}{milliseconds:03d}"


class ResultWriter:
    """Writes one result to an open text file; ``extension`` names the file ``get_writer`` makes. ``streams``: the
    results of several videos, written one after another to one stream, still say which video each row is of."""

    extension: str
    streams = False

    def write(self, result: LocalizationResult, file: TextIO) -> None:
        raise NotImplementedError


class TableWriter(ResultWriter):
    """The human-readable form ``bmfn localize`` prints: one row per second, then the summary."""

    extension = "txt"
    streams = True  # a header line per video

    def write(self, result: LocalizationResult, file: TextIO) -> None:
        width = max([len(BACKGROUND_NAME)] + [len(second.name) for second in result.seconds])
        print(f"# {one_line(str(result.path))} ({result.duration_s:.1f} s)", file=file)  # also a name not UTF-8
        for warning in result.warnings:
            print(f"# warning: {one_line(warning)}", file=file)
        print(f"{'start':>8} {'end':>8}  {'label':<{width}}  {'event':>6}  {'class':>6}", file=file)
        for s in result.seconds:
            print(f"{s.start_s:8.1f} {s.end_s:8.1f}  {s.name:<{width}}  "
                  f"{s.event_prob:6.{PROB_DECIMALS}f}  {s.class_prob:6.{PROB_DECIMALS}f}", file=file)
        print(f"summary: {result.summary()}", file=file)


class JSONWriter(ResultWriter):
    """One document per video, holding its path: several make a stream of documents, as jq reads them."""

    extension = "json"
    streams = True

    def write(self, result: LocalizationResult, file: TextIO) -> None:
        json.dump(result.to_dict(), file, indent=2, default=str)  # paths etc. in `model` as text
        file.write("\n")


class CSVWriter(ResultWriter):
    """One row per second under a header row; a spreadsheet's view of the result."""

    extension = "csv"

    def write(self, result: LocalizationResult, file: TextIO) -> None:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for s in result.seconds:
            writer.writerow([f"{s.start_s:.{TIME_DECIMALS}f}", f"{s.end_s:.{TIME_DECIMALS}f}", s.label, s.name,
                             f"{s.event_prob:.{PROB_DECIMALS}f}", f"{s.class_prob:.{PROB_DECIMALS}f}"])


class SubtitlesWriter(ResultWriter):
    """One cue per merged event interval, so a player shows the event over the video while it happens.

    Background intervals get no cue: the screen stays clear when nothing audio-visual is happening. A video without
    any event gets one short cue saying so: a subtitle file without cues is refused by FFmpeg's players.
    """

    decimal_marker: str

    def cues(self, result: LocalizationResult) -> list[tuple[str, str, str]]:
        events = [(e.start_s, e.end_s, e.text()) for e in result.events()]
        if not events:
            events = [(0.0, min(result.duration_s, NO_EVENT_CUE_S), NO_EVENT_TEXT)]
        return [(format_timestamp(start, self.decimal_marker), format_timestamp(end, self.decimal_marker), text)
                for start, end, text in events]


class SRTWriter(SubtitlesWriter):
    extension = "srt"
    decimal_marker = ","

    def write(self, result: LocalizationResult, file: TextIO) -> None:
        for number, (start, end, text) in enumerate(self.cues(result), start=1):
            print(f"{number}\n{start} --> {end}\n{text}\n", file=file)


class VTTWriter(SubtitlesWriter):
    extension = "vtt"
    decimal_marker = "."

    def write(self, result: LocalizationResult, file: TextIO) -> None:
        print("WEBVTT\n", file=file)
        for start, end, text in self.cues(result):
            print(f"{start} --> {end}\n{text}\n", file=file)


WRITERS: dict[str, type[ResultWriter]] = {
    "table": TableWriter,
    "json": JSONWriter,
    "csv": CSVWriter,
    "srt": SRTWriter,
    "vtt": VTTWriter,
}
FORMATS = tuple(WRITERS)


def get_writer(output_format: str, output_dir: str | os.PathLike | None) -> Callable[[LocalizationResult], Path | None]:
    """A callable writing a result to ``<output_dir>/<input stem>.<ext>`` and returning that path.

    With ``output_dir`` None it writes to standard output instead and returns None.
    """
    if output_format not in WRITERS:
        raise BmfnError(f"unknown output format {output_format!r} (choose from {', '.join(FORMATS)})")
    writer = WRITERS[output_format]()

    def write(result: LocalizationResult) -> Path | None:
        if output_dir is None:
            writer.write(result, sys.stdout)
            return None
        path = Path(output_dir) / f"{Path(result.path).stem}.{writer.extension}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with written(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as file:  # an earlier result
                writer.write(result, file)  # stays whole if this one cannot be written
        except OSError as err:
            raise BmfnError(f"{path}: cannot write the {output_format} result: {err.strerror or err}") from None
        except WriteError as err:
            raise WriteError(path, err.reason, f"the {output_format} result") from None
        return path

    return write


# Timeline plot ------------------------------------------------------------------------------------------------
BACKGROUND_COLOUR = (0.82, 0.82, 0.82)
TAB20_GREYS = slice(14, 16)  # tab20's grey pair, left out so that no class looks like background
STRIP_HEIGHT_PX = 64  # keyframes are subsampled to about this height, so a long video's strip stays small
FIGURE_DPI = 100
WAVEFORM_BINS = 4000  # about one per pixel column of the widest figure
PLOT_SHARE = 0.8  # of the figure's width, the time axis (the legend takes the rest)
TITLE_CHARS_PER_INCH = 14  # 10 pt title characters: the summary is cut after the events that fit on its line
NAME_PX_PER_CHAR = 5  # 8 pt event names: one is left out where it would print over the one before
EDGE_MIN_PX = 6  # a second drawn narrower gets no white edge (an hour's edges would cover its colours)


def class_colour(label: int) -> tuple[float, ...]:
    """A fixed colour per class (tab20 less its two greys, then tab20b: 38 for 28 classes); grey is background's."""
    from matplotlib import colormaps

    if label == BACKGROUND:
        return BACKGROUND_COLOUR
    tab20 = colormaps["tab20"].colors
    palette = tab20[:TAB20_GREYS.start] + tab20[TAB20_GREYS.stop:] + colormaps["tab20b"].colors
    return tuple(palette[label])


def plot_timeline(result: LocalizationResult, frames: np.ndarray | None, audio: np.ndarray | None,
                  path: str | os.PathLike) -> Path:
    """Write a PNG: one keyframe per second, the waveform, and per-second label bars with their probabilities.

    ``frames`` is uint8 [S,H,W,3] RGB (one frame per second), ``audio`` 16 kHz mono; either may be None.
    Bars are coloured by label and as tall as the event probability; the line marks the class probability.
    """
    from matplotlib.figure import Figure  # Agg through Figure.savefig: no pyplot state, safe off the main thread

    duration = max([result.duration_s] + [s.end_s for s in result.seconds])
    panels = ["frames"] * (frames is not None) + ["audio"] * (audio is not None) + ["labels"]
    heights = {"frames": 1.2, "audio": 1.0, "labels": 1.6}
    width = float(np.clip(2.0 + 0.35 * duration, 8.0, 40.0))
    fig = Figure(figsize=(width, sum(heights[p] for p in panels) + 0.8), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [heights[p] for p in panels]})[:, 0]
    fig.suptitle(_title(result, int(width * TITLE_CHARS_PER_INCH)), fontsize=10,
                 parse_math=False)  # '$' in names; bytes that are not UTF-8 escaped
    for ax, panel in zip(axes, panels):
        if panel == "frames":
            _plot_frames(ax, np.asarray(frames))
        elif panel == "audio":
            _plot_audio(ax, np.asarray(audio, dtype=np.float32))
        else:
            _plot_labels(ax, result, px_per_second=width * FIGURE_DPI * PLOT_SHARE / max(duration, 1e-9))
    axes[-1].set_xlim(0, duration)
    axes[-1].set_xlabel("time (s)")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name in a script the plot's font lacks (Chinese, say) shows boxes; matplotlib's warning for each glyph
        # would reach the terminal with its source line ("current font" before matplotlib 3.10).
        with written(path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from (current )?font")
            fig.savefig(tmp, format="png")
    except OSError as err:
        raise BmfnError(f"{path}: cannot write the timeline plot: {err.strerror or err}") from None
    except WriteError as err:
        raise WriteError(path, err.reason, "the timeline plot") from None
    return path


def _title(result: LocalizationResult, chars: int) -> str:
    """The file's name and summary in `chars`: a long summary (an hour's is a page) cut after the events that fit,
    the rest counted; the name shortened only where even that does not fit."""
    name = one_line(Path(result.path).name)
    parts = result.summary().split("; ")
    for shown in (name, name[:max(1, chars // 2 - 3)] + "..."):
        for kept in range(len(parts), 0, -1):
            left = len(parts) - kept
            title = f"{shown}: {'; '.join(parts[:kept])}" + (f"; ... and {counted(left, 'more event')}" if left else "")
            if len(title) <= chars:
                return title
    return f"{shown}: {counted(len(parts), 'event')}"


def _plot_frames(ax, frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [S,H,W,3] RGB, got shape {frames.shape}")
    step = max(1, frames.shape[1] // STRIP_HEIGHT_PX)
    strip = np.concatenate(list(frames[:, ::step, ::step]), axis=1)
    ax.imshow(strip, extent=(0, len(frames), 0, 1), aspect="auto", interpolation="nearest")
    ax.set_yticks([])
    ax.set_ylabel("frames")


def _plot_audio(ax, audio: np.ndarray) -> None:
    """The waveform as a min/max envelope over WAVEFORM_BINS bins: what a plot of every sample shows, far faster."""
    size = max(1, len(audio) // WAVEFORM_BINS)
    envelope = audio[:len(audio) // size * size].reshape(-1, size)
    ax.fill_between(np.arange(len(envelope)) * size / SAMPLE_RATE, envelope.min(axis=1), envelope.max(axis=1),
                    step="post", linewidth=0, color="0.2")
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    ax.set_ylim(-peak * 1.05 - 1e-6, peak * 1.05 + 1e-6)
    ax.set_yticks([])
    ax.set_ylabel("audio")


def _plot_labels(ax, result: LocalizationResult, px_per_second: float) -> None:
    """Bars per second, and the events' names where they do not print over each other."""
    from matplotlib.patches import Patch

    seconds = result.seconds
    labels = sorted({s.label for s in seconds})
    handles = [Patch(color=class_colour(label), label=label_name(label)) for label in labels]
    if seconds:
        starts = [s.start_s for s in seconds]
        ax.bar(starts, [s.event_prob for s in seconds], width=[s.end_s - s.start_s for s in seconds], align="edge",
               color=[class_colour(s.label) for s in seconds], edgecolor="white",
               linewidth=0.5 if px_per_second >= EDGE_MIN_PX else 0)
        class_probs = [s.class_prob for s in seconds]
        handles += ax.step([*starts, seconds[-1].end_s], [*class_probs, class_probs[-1]], where="post",
                           color="black", linewidth=0.8, label="class prob")
    drawn_to = -math.inf  # where the last name drawn ends, in pixels: a name that would print over it is left out
    for interval in merge_seconds(seconds):
        centre, half = (interval.start_s + interval.end_s) / 2, NAME_PX_PER_CHAR * len(interval.name) / 2
        if interval.label != BACKGROUND and centre * px_per_second - half >= drawn_to + NAME_PX_PER_CHAR:
            drawn_to = centre * px_per_second + half
            ax.text(centre, 1.02, interval.name, ha="center", va="bottom",
                    fontsize=8, clip_on=False)
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("event prob")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
