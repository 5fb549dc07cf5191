"""Seconds a torch-importing `bmfn` command spends outside its work: start-up and exit, per entry point.

Each sample is one fresh process running `bmfn localize` with a file that is not a checkpoint (the README): it
imports torch and the localization stack, fails with its one-line error and exits. Entry points, alternated in the
same run:
- main: the Click group called directly (what the executable was before `cli.run`);
- run:  `cli.run`, the executable's entry point, which lets Python's shutdown skip its garbage collections.

    python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = ["localize", "clip.mp4", "--checkpoint", "README.md"]


def seconds(entry: str) -> float:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", f"from bmfn_pipeline.cli import {entry}; {entry}()", *COMMAND],
                          cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - began
    if done.returncode != 1 or "README.md: not" not in done.stderr:
        raise SystemExit(f"unexpected outcome of {entry}: exit {done.returncode}, {done.stderr.strip()}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"main": [], "run": []}
    for _ in range(args.repeats):
        for entry, times in samples.items():
            times.append(seconds(entry))
    median = {entry: statistics.median(times) for entry, times in samples.items()}
    for entry, times in samples.items():
        print(f"{entry:<5} median {median[entry]:.3f} s  (min {min(times):.3f}, max {max(times):.3f}, "
              f"{len(times)} processes)")
    print(f"run saves {median['main'] - median['run']:.3f} s per command ({median['main'] / median['run']:.2f}x)")


if __name__ == "__main__":
    main()
