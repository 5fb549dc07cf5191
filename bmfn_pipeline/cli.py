"""The `bmfn` command line: option parsing only; every command calls the Python API."""

from __future__ import annotations

import sys

import click

from bmfn_pipeline import __version__
from bmfn_pipeline.errors import BmfnError


class _Group(click.Group):
    """Turns a BmfnError into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BmfnError as exc:
            click.echo(f"bmfn: error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bmfn")
def main() -> None:
    """Find what audio-visual event happens in a video, and when, second by second (BMFN, ICASSP 2022).

    \b
    Examples:
      bmfn probe clip.mp4
    """


if __name__ == "__main__":
    main()
