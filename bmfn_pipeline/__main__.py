"""`python -m bmfn_pipeline` (what torchrun starts) runs the same CLI as `bmfn`."""

from bmfn_pipeline.cli import run

if __name__ == "__main__":
    run()
