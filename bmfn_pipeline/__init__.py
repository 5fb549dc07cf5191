"""bmfn: audio-visual event localization with BMFN, from raw video to per-second labels."""

__version__ = "0.1.0"
